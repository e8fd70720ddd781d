"""Speed-ups measured against the base in interleaved rounds, so that a machine whose speed drifts (a shared VM
swings ±15% within a minute) still gives true ratios.

One llama-bench run is one round: base, model 1, base, model 2, …, base, each timed once (after llama-bench's
warm-up). A model's speed-up in a round is its tokens/s over the mean of the two base runs beside it; the
reported speed-up is the median over the rounds, and its tokens/s the median of its own runs. ``eval`` times its
models this way and ``cost`` its synthetic variants.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gguf_prune.runtime import llamacpp

log = logging.getLogger(__name__)


@dataclass
class Timing:
    """One model's figures for one test (``tg@0``, ``pp@512``, ...)."""

    samples: list[float] = field(default_factory=list)  # its tokens/s, one per round
    ratios: list[float] = field(default_factory=list)  # over the base beside it, one per round

    def to_dict(self) -> dict[str, Any]:
        return {"ts": statistics.median(self.samples),
                "ts_std": statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0,
                "ratio": statistics.median(self.ratios) if self.ratios else 1.0,
                "ratio_spread": (max(self.ratios) - min(self.ratios)) if self.ratios else 0.0,
                "samples": self.samples, "ratios": self.ratios}


def row_key(row: dict) -> str | None:
    """``tg@D`` / ``pp@D`` for a llama-bench row (None for a row that is neither)."""
    depth = int(row.get("n_depth", 0) or 0)
    if row.get("n_gen") and not row.get("n_prompt"):
        return f"tg@{depth}"
    if row.get("n_prompt") and not row.get("n_gen"):
        return f"pp@{depth}"
    return None


def bench_against_base(base: Path, models: Sequence[Path], *, n_prompt: int, n_gen: int, rounds: int,
                       threads: int | None = None, depths: Sequence[int] = (0,)) -> dict[str, Any]:
    """Time ``models`` against ``base`` in ``rounds`` interleaved llama-bench runs.

    Returns {"base": {test: Timing dict}, "models": [{test: Timing dict}, ...] (in the order given),
    "command": one round's command, "hardware": CPU, threads, backends and build as llama-bench says, "rows":
    every row of every round}.
    """
    order = [Path(base)]
    for m in models:
        order += [Path(m), Path(base)]
    base_t: dict[str, Timing] = {}
    model_t: list[dict[str, Timing]] = [{} for _ in models]
    all_rows, cmd, hw = [], "", {}
    for r in range(rounds):
        log.info("[bench] round %d/%d: %d models and the base between them", r + 1, rounds, len(models))
        rows, cmd = llamacpp.llama_bench(order, n_prompt=n_prompt, n_gen=n_gen, reps=1, threads=threads,
                                         depths=depths)
        all_rows += rows
        runs = _by_position(rows, len(order))
        for key in {k for run in runs for k in run}:
            speeds = [run.get(key) for run in runs]
            for k in range(0, len(order), 2):
                if speeds[k]:
                    base_t.setdefault(key, Timing()).samples.append(speeds[k])
            for i in range(len(models)):
                ts, before, after = speeds[2 * i + 1], speeds[2 * i], speeds[2 * i + 2]
                if not ts:
                    continue
                t = model_t[i].setdefault(key, Timing())
                t.samples.append(ts)
                if before and after:
                    t.ratios.append(ts / ((before + after) / 2))
        if rows:
            row = rows[-1]
            hw = {"cpu": row.get("cpu_info"), "gpu": row.get("gpu_info"), "threads": row.get("n_threads"),
                  "backends": row.get("backends"), "build_commit": row.get("build_commit")}
    return {"base": {k: t.to_dict() for k, t in base_t.items()},
            "models": [{k: t.to_dict() for k, t in m.items()} for m in model_t],
            "command": cmd, "hardware": hw, "rows": all_rows, "rounds": rounds}


def _by_position(rows: list[dict], n: int) -> list[dict[str, float]]:
    """The rows of one round, which come in the order of the ``-m`` list (each model's tests together), as one
    {test: tokens/s} per position."""
    runs: list[dict[str, float]] = []
    last = None
    for row in rows:
        key = row_key(row)
        name = row.get("model_filename")
        if last is None or name != last or (runs and key in runs[-1]):
            runs.append({})
        last = name
        if key is not None:
            runs[-1][key] = float(row["avg_ts"])
    if len(runs) != n:
        raise llamacpp.LlamaCppError(f"llama-bench returned results for {len(runs)} models, {n} were asked for")
    return runs
