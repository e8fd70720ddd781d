"""Which engine scores a model: in memory, or layer-major from the shards (:mod:`gguf_prune.scoring.stream`),
because ``--stream`` or ``--units`` asked for it or because the model would not fit; and, for ``--units``, which
layers' ablation units this run owns.

    choose_engine(hf_dir, options, inputs) -> None (in memory) | StreamChoice
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from gguf_prune.models.checkpoint import read_config
from gguf_prune.plan import ModelShape
from gguf_prune.scoring.options import ScoreError, ScoreOptions
from gguf_prune.scoring.inputs import ScoreInputs, parse_layers
from gguf_prune.scoring.memory import StreamError, activation_budget, available_memory, fmt_bytes, parse_bytes

log = logging.getLogger(__name__)


@dataclass
class StreamChoice:
    """What choose_engine decided: stream, on which device, within which budget, which layers this run owns."""

    device: str
    budget: int
    owned: list[int]  # layers whose ablation units this run scores
    units: str | None  # the --units text (None: every unit)
    reason: str


def slice_layers(k: int, n: int, cost: Sequence[float]) -> list[int]:
    """Slice ``k`` of ``n`` (0-based) of the layers: contiguous ranges, each cut where the running cost is
    nearest to its share (j/n of the total), and every slice at least one layer."""
    L = len(cost)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(cost, dtype=float))])  # prefix[c]: cost of layers < c
    cuts = [0]
    for j in range(1, n):
        lo, hi = cuts[-1] + 1, L - (n - j)
        target = prefix[-1] * j / n
        cuts.append(min(range(lo, hi + 1), key=lambda c: (abs(prefix[c] - target), c)))
    cuts.append(L)
    return list(range(cuts[k], cuts[k + 1]))


def in_memory_bytes(hf_dir: Path, shape: ModelShape, o: ScoreOptions, device: str) -> int:
    """What loading the model for the in-memory engine takes: weights in the compute dtype + activations."""
    tied = bool(read_config(hf_dir).get("tie_word_embeddings", False))
    elt = 2 if o.dtype in ("bf16", "bfloat16") else 4
    params = shape.n_layer * shape.layer_params() + shape.n_vocab * shape.n_embd * (1 if tied else 2) + shape.n_embd
    act = activation_budget(device) if device.startswith("cuda") else 2 << 30
    return params * elt + act


def parse_units(spec: str, shape: ModelShape, o: ScoreOptions, head_layers: list[int]) -> list[int]:
    """--units K/N (slice K of N, 0-based, of about equal cost) or a layer list '3,5-8' → the layers owned."""
    spec = str(spec).strip()
    if "/" not in spec:
        return parse_layers(spec, shape.n_layer, what="--units")
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ScoreError(f"--units {spec!r}: use K/N (slice K of N, counted from 0) or layers like 3,5-8") from None
    if not (n >= 1 and 0 <= k < n):
        raise ScoreError(f"--units {spec!r}: K must be in 0..N-1 (slice K of N, counted from 0)")
    if n > shape.n_layer:
        raise ScoreError(f"--units {spec!r}: {n} slices of a {shape.n_layer}-layer model; slices are cut at layer "
                         f"boundaries, use at most {shape.n_layer}")
    heads = set(head_layers)
    per = [(1 + (2 if o.sublayers else 0) + (shape.n_head + (shape.n_head_kv if shape.group_size > 1 else 0)
                                             if i in heads else 0)) * (shape.n_layer - i) for i in range(shape.n_layer)]
    return slice_layers(k, n, per)


def choose_engine(hf_dir: Path, o: ScoreOptions, inp: ScoreInputs) -> StreamChoice | None:
    """None for the in-memory engine, or a StreamChoice: asked for, or the model would not fit."""
    try:
        budget = parse_bytes(o.max_memory)
    except StreamError as e:
        raise ScoreError(str(e)) from None
    device = inp.device if inp.device != "map" else "cpu"
    asked = o.stream or o.units is not None
    reason = "--stream" if o.stream else ("--units" if o.units is not None else "")
    if not asked:
        if o.device_map is not None:
            return None
        need = in_memory_bytes(hf_dir, inp.shape, o, device)
        have = budget if budget is not None else available_memory(device)
        if need <= have:
            return None
        where = f"--max-memory {fmt_bytes(have)}" if budget is not None else \
            f"{fmt_bytes(have)} free on {device}"
        base = f"the model would need about {fmt_bytes(need)} in memory ({where})"
        if plan_or_greedy := [x for x, on in (("--plan", o.plan is not None), ("--greedy", o.greedy)) if on]:
            log.warning("%s, but %s is not supported in streamed mode: trying in memory anyway", base,
                        " and ".join(plan_or_greedy))
            return None
        reason = base + ": scoring layer-major from the shards instead (--stream)"
        log.info("%s", reason)
    if inp.shape.architecture != "llama":
        raise ScoreError(f"{reason}: the streamed engine runs llama decoder layers and supports llama-family "
                         f"models (llama, mistral) only, not {inp.shape.architecture}; score in memory (drop --stream "
                         "/ --units, or give --device-map auto to spread the model over devices)")
    bad = [x for x, on in (("--plan", o.plan is not None), ("--greedy", bool(o.greedy)),
                           ("--device-map", o.device_map is not None)) if on]
    if bad:
        raise ScoreError(f"{reason}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not supported by the streamed "
                         "engine yet; score in memory (drop --stream / --units), or drop "
                         + ", ".join(bad))
    owned = list(range(inp.shape.n_layer)) if o.units is None else parse_units(o.units, inp.shape, o, inp.head_layers)
    if budget is None:
        free = available_memory(device)
        budget = int(free * (0.9 if device.startswith("cuda") else 0.8))
    return StreamChoice(device=device, budget=budget, owned=owned, units=o.units, reason=reason)
