"""`gguf-prune cost`: measure what each part of a model costs per token in llama.cpp on this machine → cost.json.

The rewriter writes a few synthetic variants of the base model (every MLP at each candidate width, every MLP
removed, every attention removed, one query head per KV group, one KV group, a quarter and a half of the layers
removed), each is quantized to the type the pruned models will have, and one llama-bench run times them all
(generation and prompt processing, at each context depth asked for, ``-r`` repetitions). For each metric and depth
a least-squares fit gives the seconds per token as a linear function of :data:`gguf_prune.costs.FEATURES`; its
error is reported per variant, in sample and left out of the fit. The planner reads the fit
(:func:`gguf_prune.costs.speedup`) to cut for speed; ``eval --cost`` checks it against measured speed-ups.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gguf_prune import costs
from gguf_prune.errors import GgufPruneError
from gguf_prune.plan import LayerPlan, ModelShape, Plan
from gguf_prune.runtime.speed import bench_against_base
from gguf_prune.values import is_int
from gguf_prune.writing.options import DEFAULT_QUANT, NO_QUANT

log = logging.getLogger(__name__)

WIDTHS = (5 / 6, 2 / 3, 1 / 2, 1 / 3, 1 / 6)  # fractions of n_ff kept in the width variants


class CostMeasureError(GgufPruneError):
    """Bad options or input for `gguf-prune cost`."""


@dataclass(frozen=True)
class CostOptions:
    threads: int | None = None  # llama.cpp threads (None: llama-bench's default, recorded as measured)
    depths: tuple[int, ...] = (0,)  # context depths (tokens already in the KV cache) to time at
    quant: str = DEFAULT_QUANT  # the type the variants are written in: the type the pruned models will have
    reps: int = 3  # rounds: llama-bench runs of every variant, the base between every two
    n_gen: int = 128  # generated tokens per tg test (eval's llama-bench: pp512 / tg128)
    n_prompt: int = 512  # prompt tokens per pp test

    def __post_init__(self) -> None:
        p = []
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            p.append(f"--threads {self.threads!r}: must be a whole number, 1 or more")
        if not self.depths or any(not is_int(d) or d < 0 for d in self.depths):
            p.append(f"--depths {','.join(map(str, self.depths))!r}: must be whole numbers of tokens, 0 or more")
        for flag, v in (("--reps", self.reps), ("--n-gen", self.n_gen), ("--n-prompt", self.n_prompt)):
            if not is_int(v) or v < 1:
                p.append(f"{flag} {v!r}: must be a whole number, 1 or more")
        if p:
            raise CostMeasureError("cost options are invalid: " + "; ".join(p))


def variants(shape: ModelShape, align: int = 32) -> list[tuple[str, Plan]]:
    """The synthetic models timed, as plans on ``shape`` (each cut the same in every layer)."""
    s, n = shape, shape.n_layer

    def every(**kw) -> Plan:
        return Plan(shape=s, layers=tuple(LayerPlan(i, **kw) for i in range(n)))

    out = [("base", costs.uncut(s))]
    widths = sorted({max(align, int(round(f * s.n_ff / align)) * align) for f in WIDTHS} - {s.n_ff}, reverse=True)
    out += [(f"every MLP at {w}", every(neurons=tuple(range(w)))) for w in widths]
    out += [("every MLP removed", every(neurons=())), ("every attention removed", every(heads=()))]
    if s.group_size > 1:
        out.append(("one query head per KV group", every(heads=tuple(range(0, s.n_head, s.group_size)))))
    if s.n_head_kv > 1:
        out.append(("one KV group", every(heads=tuple(range(s.group_size)))))
    for part, name in ((4, "a quarter"), (2, "half")):
        gone = set(range(n // 2 - n // (2 * part), n // 2 - n // (2 * part) + n // part))
        if 0 < len(gone) < n:
            out.append((f"{name} of the layers removed",
                        Plan(shape=s, layers=tuple(LayerPlan(i, removed=i in gone) for i in range(n)))))
    return out


def measure_cost(base_gguf: Path, out: Path, options: CostOptions | None = None) -> dict[str, Any]:
    """Write and time the variants of ``base_gguf`` (F16/BF16/F32, as converted), fit, write ``out`` (cost.json)."""
    from gguf_prune.writing.quantize import check_quant_type, quantize
    from gguf_prune.writing.rewrite import base_shape, rewrite

    o = options or CostOptions()
    base_gguf, out = Path(base_gguf), Path(out)
    shape = base_shape(base_gguf)
    own = file_type(base_gguf)  # the variants are written in the base's own type: no quantization
    quant = NO_QUANT if str(o.quant).upper() in (NO_QUANT, own) else check_quant_type(o.quant)
    t0 = time.time()
    plans = variants(shape, align=256 if quant.startswith(("Q", "IQ")) and "_K" in quant else 32)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".cost-", dir=out.parent))
    try:
        files = []
        for k, (name, plan) in enumerate(plans, start=1):
            log.info("[cost %d/%d] writing %s (%s)", k, len(plans), name, quant.lower())
            cut = work / f"v{k:02d}-cut.gguf"
            rewrite(base_gguf, plan, cut, fsync=False)
            if quant == NO_QUANT:
                files.append(cut)
                continue
            files.append(work / f"v{k:02d}.gguf")
            quantize(cut, files[-1], quant, threads=o.threads, check_load=False)
            cut.unlink()
        log.info("[cost] llama-bench: %d variants, pp%d / tg%d at depth %s, %d rounds with the base between "
                 "them", len(files), o.n_prompt, o.n_gen, ",".join(map(str, o.depths)), o.reps)
        res = bench_against_base(files[0], files[1:], n_prompt=o.n_prompt, n_gen=o.n_gen, rounds=o.reps,
                                 threads=o.threads, depths=o.depths)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = _document(base_gguf, shape, quant if quant != NO_QUANT else own, o, plans, res)
    doc["seconds"] = round(time.time() - t0, 1)
    costs.save(out, doc)
    log.info("wrote %s in %.0f s", out, doc["seconds"])
    return doc


def file_type(path: Path) -> str:
    """The llama.cpp file type of a GGUF (F16, Q4_K_M, ...)."""
    from gguf_prune.runtime.evaluate import file_type_name
    from gguf_prune.writing.gguf_read import read_gguf

    return file_type_name(read_gguf(Path(path)).get("general.file_type")) or "unknown"


def _document(base: Path, shape: ModelShape, quant: str, o: CostOptions, plans: list[tuple[str, Plan]],
              res: dict[str, Any]) -> dict[str, Any]:
    """cost.json: the variants, what llama-bench measured for each, and one fit per metric and depth. A variant's
    tokens/s is the base's (median) times its speed-up over the base runs beside it (median over the rounds)."""
    base_t = res["base"]
    measured = [{k: {"ts": t["ts"], "ts_std": t["ts_std"], "ratio": 1.0} for k, t in base_t.items()}]
    for timings in res["models"]:
        measured.append({k: {"ts": base_t[k]["ts"] * t["ratio"], "ts_run": t["ts"], "ts_std": t["ts_std"],
                             "ratio": t["ratio"], "ratio_spread": t["ratio_spread"]}
                         for k, t in timings.items() if k in base_t})
    feats = [costs.features(p) for _, p in plans]
    fits = {k: _fit(feats, [m.get(k, {}).get("ts") for m in measured]) for k in sorted(base_t)}
    if not fits:
        raise CostMeasureError(f"llama-bench measured nothing usable ({res['command']})")
    hw = res["hardware"]
    return {
        "schema": costs.SCHEMA, "version": costs.VERSION,
        "model": {"name": base.name, "shape": shape.to_dict()},
        "quant": quant, "threads": int(hw.get("threads") or o.threads or 0), "cpu": hw.get("cpu") or
        platform.processor(), "machine": platform.machine(), "build_commit": hw.get("build_commit"),
        "bench": {"n_prompt": o.n_prompt, "n_gen": o.n_gen, "rounds": o.reps, "depths": list(o.depths),
                  "command": res["command"]},
        "variants": [{"name": name, "features": f, "measured": m}
                     for (name, _), f, m in zip(plans, feats, measured)],
        "fits": fits,
    }


def _fit(feats: list[dict[str, float]], ts: list[float | None]) -> dict[str, Any]:
    """Seconds per token on the features: least squares of the relative error, every cost ≥ 0 (a part never
    costs less than nothing; noise would otherwise buy one part's fit with another's negative cost); the error
    of each variant in the fit and left out of it."""
    rows = [(f, 1.0 / t) for f, t in zip(feats, ts) if t]
    x = np.array([[f[k] for k in costs.FEATURES] for f, _ in rows])
    y = np.array([s for _, s in rows])
    coef = _nonnegative_fit(x, y)
    rel = x @ coef / y - 1
    loo = []
    for i in range(len(y)):  # each variant predicted by the fit to the others
        keep = np.arange(len(y)) != i
        loo.append(float(x[i] @ _nonnegative_fit(x[keep], y[keep]) / y[i] - 1))
    return {"coef": {k: float(v) for k, v in zip(costs.FEATURES, coef)},
            "rel_error": [round(float(r), 5) for r in rel], "rel_error_left_out": [round(r, 5) for r in loo],
            "max_rel_error": round(float(np.abs(rel).max()), 5),
            "median_rel_error_left_out": round(float(np.median(np.abs(loo))), 5),
            "variants_used": len(y)}


def _nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin Σ ((x·c − y) / y)² over c ≥ 0, exactly: every subset of the features (there are six) fitted
    freely, the best whose costs are all ≥ 0 kept."""
    a, b = x / y[:, None], np.ones_like(y)
    n = x.shape[1]
    best, best_err = np.zeros(n), float("inf")
    for mask in range(1, 2 ** n):
        cols = [j for j in range(n) if mask >> j & 1]
        c = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
        if (c < 0).any():
            continue
        err = float(((a[:, cols] @ c - b) ** 2).sum())
        if err < best_err - 1e-15:
            best, best_err = np.zeros(n), err
            best[cols] = c
    return best


def format_table(doc: dict[str, Any]) -> str:
    """The variants, measured and fitted tokens/s for every metric and depth, and each fit's per-part costs."""
    keys = sorted(doc["fits"])
    lines = ["| variant | " + " | ".join(f"{k} t/s (× base) | fit" for k in keys) + " |",
             "|---|" + "---|---|" * len(keys)]
    for v in doc["variants"]:
        cells = []
        for k in keys:
            m = v["measured"].get(k)
            pred = 1.0 / costs.seconds_of(doc["fits"][k]["coef"], v["features"])
            cells.append(f"{m['ts']:.1f} (×{m['ratio']:.3f}) | {pred:.1f}" if m else f"- | {pred:.1f}")
        lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
    lines.append("")
    for k in keys:
        f = doc["fits"][k]
        c = f["coef"]
        lines.append(f"{k}: per token {c['const'] * 1e3:.3f} ms + per layer {c['layers'] * 1e3:.4f} ms + per attention "
                     f"{c['attn'] * 1e3:.4f} ms + per query head {c['q_heads'] * 1e6:.2f} µs + per KV group "
                     f"{c['kv_heads'] * 1e6:.2f} µs + per FFN neuron {c['ff'] * 1e9:.1f} ns; error in the fit ≤ "
                     f"{100 * f['max_rel_error']:.1f}%, left out (median) {100 * f['median_rel_error_left_out']:.1f}%")
    return "\n".join(lines)
