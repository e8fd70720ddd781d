"""What the greedy search (`score --greedy K`) may remove, and its result as the scores document's entry.

    run_greedy(engine, groups, refs, plan, shape, sources, options, scan, progress) -> the ``greedy`` entry

The search itself is :func:`gguf_prune.scoring.greedy_search.greedy`; this module says which units are
candidates (unprotected layers, the units asked for, what the base plan left), how many parameters each
removes, and what the first step already knows from the one-shot scan.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from gguf_prune.plan import ModelShape, Plan
from gguf_prune.ranges import protected_layers
from gguf_prune.scoring import ablate
from gguf_prune.scoring.greedy_search import greedy
from gguf_prune.scoring.inputs import GREEDY_UNITS, ScoreOptions


def run_greedy(engine: ablate.Engine, groups, refs, plan: Plan | None, shape: ModelShape, sources: list[int],
               o: ScoreOptions, scan: ablate.ScanResult, progress: Callable[[int], None]) -> dict:
    """``o.greedy`` steps of the greedy search over ``o.greedy_units`` of the unprotected layers (positions ↔
    source indices ``sources``), by ``o.greedy_by``; the first step starts from what ``scan`` measured.
    Returns the scores document's ``greedy`` entry."""
    units = set(o.greedy_units)
    protected = protected_layers(shape.n_layer, o.protect_first, o.protect_last)
    lps = {lp.index: lp for lp in plan.layers} if plan else {}

    def present(pos: int, modes: list[str]) -> tuple[int, int]:
        """Parameters of the attention and MLP still present at position ``pos``."""
        layer, mode, lp = engine.layers[pos], modes[pos], lps.get(sources[pos])
        attn = mlp = 0
        if ablate.has_attention(layer) and mode not in ("attn", "layer"):
            heads = lp.kept_heads(shape) if lp else range(shape.n_head)
            kv = lp.kept_kv_groups(shape) if lp else range(shape.n_head_kv)
            attn = shape.attn_params(len(heads), len(kv))
        if ablate.has_mlp(layer) and mode not in ("mlp", "layer"):
            mlp = shape.mlp_params(len(lp.kept_neurons(shape)) if lp else shape.n_ff)
        return attn, mlp

    def candidates(modes):
        for pos, src in enumerate(sources):
            if src in protected:
                continue
            attn, mlp = present(pos, modes)
            if not attn and not mlp:
                continue
            if "layer" in units and (units == {"layer"} or (attn and mlp)):
                yield ("layer", pos)
            if "attn" in units and attn:
                yield ("attn", pos)
            if "mlp" in units and mlp:
                yield ("mlp", pos)

    def params(kind, pos, modes):
        attn, mlp = present(pos, modes)
        return {"layer": attn + mlp, "attn": attn, "mlp": mlp}[kind]

    steps = greedy(engine, groups, refs, o.greedy, candidates, params, by=o.greedy_by, progress=progress,
                   describe=lambda pos: f"layer {sources[pos]}", pool=o.greedy_pool,
                   initial=_first_step(scan, engine.n_layer))
    return {"units": [u for u in GREEDY_UNITS if u in units], "by": o.greedy_by, "pool": o.greedy_pool,
            "protect_first": o.protect_first,
            "protect_last": o.protect_last,
            "steps": [{"kind": s.kind, "layer": sources[s.pos], "kl": s.kl, "delta_kl": s.delta_kl,
                       "params_removed": s.params, "candidates": s.candidates} for s in steps]}


def _first_step(scan: ablate.ScanResult, n_layer: int) -> dict:
    """What the first greedy step would measure and the one-shot scan already has: the KL of the base plan
    alone and of every single-unit removal (per real token)."""
    n_real = scan.n_real
    initial = {"base": scan.base_kl / n_real if n_real else 0.0}
    for pos in range(n_layer):
        for kind, arr in (("layer", scan.kl), ("attn", scan.attn_kl), ("mlp", scan.mlp_kl)):
            if arr is not None and np.isfinite(arr[pos]) and n_real:
                initial[(kind, pos)] = float(arr[pos]) / n_real
    return initial
