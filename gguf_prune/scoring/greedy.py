"""The greedy search (`score --greedy K`): remove one unit at a time, each time the one whose removal costs
least on the model with the earlier removals already made.

One-shot scores price every unit on the whole model; removals interact (two layers that each cost little can
cost much together), so the greedy order re-measures after every step. Each step is one walk of the
in-memory engine (:class:`gguf_prune.scoring.ablate.Engine`) through the pruned model.

Which units are candidates (unprotected layers, the units asked for, what a base plan left), how many parameters
each removes, and the scores document's ``greedy`` entry: :func:`run_greedy`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from gguf_prune.plan import ModelShape, Plan
from gguf_prune.ranges import protected_layers
from gguf_prune.scoring import ablate
from gguf_prune.scoring.ablate import Engine, combine
from gguf_prune.scoring.options import GREEDY_UNITS, ScoreOptions

log = logging.getLogger(__name__)

Candidate = tuple  # (kind, pos): "layer" | "attn" | "mlp" at layer position pos


@dataclass
class GreedyStep:
    kind: str
    pos: int
    kl: float  # mean KL vs the reference after this removal
    delta_kl: float
    params: int
    candidates: int


@torch.inference_mode()
def greedy(engine: Engine, groups, refs, steps: int, candidates: Callable,
           params: Callable[[str, int, list[str]], int], by: str = "kl",
           progress: Callable[[int], None] | None = None,
           describe: Callable[[int], str] = lambda pos: f"layer position {pos}",
           pool: int | None = None, initial: dict | None = None) -> list[GreedyStep]:
    """Remove ``steps`` units one at a time, each time the one whose removal costs least.

    ``candidates(modes)`` → [(kind, pos)] still removable; ``params(kind, pos, modes)`` → parameters that
    unit removes now. Each step is one walk: the state of the current (pruned) model at the input of layer i is
    shared by every candidate at layer i, whose variants then run through the rest of the pruned model.

    ``pool``: lazy greedy. The first step measures every candidate; later steps re-measure only the
    ``pool`` candidates that were cheapest when last measured (and any never measured), and pick the best
    of those. Exact greedy when ``pool`` is None; with a pool of a few units it costs a fraction of a step
    and, because removals rarely make a costly unit cheap, usually picks the same units.
    ``initial``: {(kind, pos): mean KL with that unit removed} already measured on this same model (the
    one-shot scan); with a pool, the first step then also re-measures only the pool instead of everything.
    """
    # candidate → its criterion when last measured (lazy greedy re-measures the cheapest of these)
    last = _criteria_from_scan(engine, candidates, params, by, initial) if pool and initial else {}
    modes = ["full"] * engine.n_layer
    n_real = sum(r.n_real for r in refs)
    out: list[GreedyStep] = []
    for _ in range(steps):
        cands = list(candidates(modes))
        if not cands:
            log.warning("greedy: no removable units left after %d steps", len(out))
            break
        n_all = len(cands)
        if pool and last:
            cands = sorted(cands, key=lambda c: (c in last, last.get(c, 0.0), c[1]))[:max(pool, 1)]
        kl_sum, cur = _measure(engine, groups, refs, cands, modes, progress)
        cur /= n_real
        mean = {c: v / n_real for c, v in kl_sum.items()}
        if by == "kl":
            crit = {c: mean[c] for c in cands}
        else:
            crit = {c: (mean[c] - cur) / max(1, params(c[0], c[1], modes)) for c in cands}
        last.update(crit)
        best = min(cands, key=lambda c: (crit[c], c[1]))
        kind, pos = best
        n_params = params(kind, pos, modes)
        modes[pos] = combine(modes[pos], kind)
        last.pop(best, None)
        out.append(GreedyStep(kind=kind, pos=pos, kl=mean[best], delta_kl=mean[best] - cur, params=n_params,
                              candidates=len(cands)))
        log.info("greedy step %d: remove %s of %s (KL %.4g, %+.4g; %d of %d candidates measured)",
                 len(out), kind, describe(pos), mean[best], mean[best] - cur, len(cands), n_all)
    return out


def _criteria_from_scan(engine: Engine, candidates: Callable, params: Callable[[str, int, list[str]], int],
                        by: str, initial: dict) -> dict[Candidate, float]:
    """The first step's criteria from the one-shot scan's KLs (``initial``), so that it too re-measures only
    the pool; units the scan did not measure (or measured as NaN) are left out, and so measured first."""
    last: dict[Candidate, float] = {}
    base = 0.0 if initial.get("base") is None else float(initial["base"])
    modes0 = ["full"] * engine.n_layer
    for c in candidates(modes0):
        v = initial.get(c)
        if v is None or not np.isfinite(v):
            continue
        last[c] = v if by == "kl" else (v - base) / max(1, params(c[0], c[1], modes0))
    return last


def _measure(engine: Engine, groups, refs, cands: list[Candidate], modes: list[str],
             progress: Callable[[int], None] | None) -> tuple[dict[Candidate, float], float]:
    """One walk through the model in ``modes``: the summed KL with each candidate also removed, and the summed
    KL of the model as it stands (both over real tokens)."""
    by_pos: dict[int, list[str]] = {}
    for kind, pos in cands:
        by_pos.setdefault(pos, []).append(kind)
    kl_sum = {c: 0.0 for c in cands}
    cur = 0.0
    for (ids, mask), ref in zip(groups, refs):
        ctx = engine.context(ids, mask)
        h = engine.embed(ids)
        for i in range(engine.n_layer):
            if i in by_pos:
                kinds = by_pos[i]
                states = [engine.step(i, h, ctx, combine(modes[i], k)) for k in kinds]
                kl, _ = engine.run_variants(i + 1, states, len(states), ctx, ref, modes=modes)
                for k, v in zip(kinds, kl):
                    kl_sum[(k, i)] += v
            h = engine.step(i, h, ctx, modes[i])
            if progress:
                progress(1)
        cur += float(engine.divergence(h, ref, 1)[0][0])
    return kl_sum, cur


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
