"""The budget of a per-layer plan (``target_params`` / ``target_size``): cut the cheapest units until it is met.

Two sources of "cheapest", in this order:

1. the greedy run of the scores (``score --greedy K``), step by step: each step was re-measured on the model
   with the earlier steps removed, so it is the best order there is, as far as it goes;
2. one-shot KL per parameter: every unit still standing is priced by its own KL divided by the parameters it
   removes *now*, and the cheapest is taken; then all are priced again (a cut changes what the units of its
   layer still remove). Units are whole layers, attention / MLP sub-blocks and ``width`` cuts: an MLP narrowed
   to fewer of its highest-energy neurons, priced by the width KL that ``score --width`` measured, linear
   between the measured widths.

Uniform plans have their own fill (:func:`gguf_prune.planning.uniform.fill_budget`); both share
:func:`budget_met`, :func:`width_curves` and :func:`width_kl_at`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from gguf_prune.plan import ModelShape, Plan
from gguf_prune.planning.draft import Draft, head_counts
from gguf_prune.planning.options import PlanOptions
from gguf_prune.planning.speed import SpeedGoal

log = logging.getLogger(__name__)

# layer → (measured (neurons removed, KL) points, the layer's live neurons from the least energy up)
WidthCurves = Mapping[int, tuple[list[tuple[int, float]], np.ndarray]]


@dataclass(frozen=True, order=True)
class Candidate:
    """One cut the one-shot fill may take next. Candidates sort cheapest first: by KL per parameter removed,
    ties by kind, then layer (the field order is the sort order)."""

    kl_per_param: float  # per second saved when planning for speed (speed.SpeedGoal)
    kind: str  # layer | attn | mlp | width
    layer: int
    kl: float  # what the cut costs (width: the KL of the MLP narrowed to that level)
    drop: int = 0  # width only: neurons of the layer's energy order removed in all at that level


def budget_met(w: Draft, o: PlanOptions, fingerprint: str) -> bool:
    """The budget (--target-params / --target-size) is reached by the plan as it stands."""
    p = w.to_plan(fingerprint, {"quant": o.quant})
    if o.target_params is not None and p.removed_fraction() < o.target_params - 1e-9:
        return False
    if o.target_size is not None and p.predicted["size_bytes_estimate_after"] > o.target_size:
        return False
    return True


def target_met(w: Draft, o: PlanOptions, fingerprint: str, goal: SpeedGoal | None) -> bool:
    """The cut is done: the speed target is reached, or the parameter / size budget is (the first target reached
    stops the cut)."""
    if goal is None or goal.target is None:
        return budget_met(w, o, fingerprint)
    if goal.met(w):
        return True
    return (o.target_params is not None or o.target_size is not None) and budget_met(w, o, fingerprint)


def fill_budget(w: Draft, scores: Mapping[str, Any], o: PlanOptions, protected: set[int], fingerprint: str,
                stats_loader: Callable[[], Mapping[str, np.ndarray]], goal: SpeedGoal | None = None) -> list[str]:
    """Cut ``w`` until the budget is met: the scores' greedy steps first, then one-shot KL per parameter (per
    second saved, with a speed ``goal``; the first of its target and --target-params / --target-size reached
    stops the cut). Returns the problems (empty: met)."""
    speed = goal is not None and goal.target is not None

    def met() -> bool:
        return target_met(w, o, fingerprint, goal)

    if met():
        return []
    steps = (scores.get("greedy") or {}).get("steps")
    if steps:
        _take_greedy_steps(w, steps, protected, met)
        if met():
            return []
        layers_scored = any(e.get("kl") is not None or e.get("mlp_kl") is not None for e in scores.get("layers", []))
        if not layers_scored:
            return [f"the greedy run in the scores ({len(steps)} steps) does not reach the budget; "
                    "re-run `gguf-prune score --greedy K` with a larger K"]
        log.warning("the greedy run (%d steps) does not reach the budget; the rest is taken by one-shot KL per "
                    "parameter (a larger `score --greedy K` re-measures further)", len(steps))
    return _take_cheapest(w, scores, o, protected, met, stats_loader, goal if speed else None)


def _take_greedy_steps(w: Draft, steps: list[Mapping[str, Any]], protected: set[int],
                       met: Callable[[], bool]) -> None:
    """The greedy run's removals in its order, until the budget is met (protected or gone layers skipped)."""
    for n, step in enumerate(steps):
        if met():
            return
        i, kind = int(step["layer"]), step["kind"]
        if i in protected or not w.alive(i):
            continue
        if kind == "layer":
            w.remove_layer(i)
        elif kind == "attn":
            w.remove_attn(i)
        elif kind == "mlp":
            w.remove_mlp(i)
        w.note(i, **{f"{kind}_removed_by": "budget/greedy", f"{kind}_greedy_step": n + 1,
                     "cumulative_kl": step.get("kl")})


def _take_cheapest(w: Draft, scores: Mapping[str, Any], o: PlanOptions, protected: set[int],
                   met: Callable[[], bool], stats_loader: Callable[[], Mapping[str, np.ndarray]],
                   goal: SpeedGoal | None = None) -> list[str]:
    """One-shot: the cheapest unit per parameter (per second saved, with a speed ``goal``) first, re-priced after
    every cut. Width cuts of one layer are taken in order, each to the level with the lowest price from where the
    layer stands."""
    s = w.shape
    layers = {int(e["index"]): e for e in scores.get("layers", [])}
    width = width_curves(scores, layers, stats_loader, o.repair) if "width" in o.units else {}
    before = width_curves(scores, layers, stats_loader, False) if width and o.repair and has_repaired(scores) else {}
    if not width and o.units == ("width",):
        return ["--units width needs width scores: run `gguf-prune score --width 0.17,0.33,0.5`"]
    if not _candidates(w, layers, width, o.units, protected, goal):
        if not any(w.alive(i) and i not in protected for i in range(s.n_layer)):
            return [f"the budget cannot be met: every layer left is protected (protect_first={o.protect_first}, "
                    f"protect_last={o.protect_last} of {s.n_layer} layers)"]
        return ["the budget needs layer or sub-block KL scores, width scores or a greedy run in the scores"]
    while not met():
        candidates = _candidates(w, layers, width, o.units, protected, goal)
        if not candidates:
            break
        _take(w, candidates[0], width, before)
        if goal is not None:
            w.note(candidates[0].layer, speedup_after=round(goal.speedup(w), 4))
    return [] if met() else ["the budget cannot be met without cutting protected layers"]


def _candidates(w: Draft, layers: Mapping[int, Mapping[str, Any]], width: WidthCurves, units: tuple[str, ...],
                protected: set[int], goal: SpeedGoal | None = None) -> list[Candidate]:
    """Every cut still open, cheapest first, priced by what it removes *now* (a base plan or an earlier cut may
    have taken part of its layer): parameters, or with a speed ``goal`` the seconds per token it saves (a cut
    that saves none is not offered)."""
    s = w.shape
    saving = goal.saving(w) if goal is not None else None
    out = []
    for i in range(s.n_layer):
        if i in protected or not w.alive(i):
            continue
        e = layers.get(i, {})
        attn_p = 0 if i in w.attn_removed else s.attn_params(*head_counts(s, w.heads.get(i)))
        n_ff = 0 if i in w.mlp_removed else len(w.neurons.get(i, range(s.n_ff)))
        mlp_p = s.mlp_params(n_ff)
        for kind, key, params in (("layer", "kl", attn_p + mlp_p), ("attn", "attn_kl", attn_p),
                                  ("mlp", "mlp_kl", mlp_p)):
            gain = params if saving is None or not params else saving(i, kind, None)
            if kind in units and e.get(key) is not None and params and gain > 0:
                out.append(Candidate(float(e[key]) / gain, kind, i, float(e[key])))
        if i in width and n_ff:
            best = _width_candidate(s, i, *width[i], n_ff, saving)
            if best:
                out.append(best)
    return sorted(out)


def _width_candidate(s: ModelShape, i: int, curve: list[tuple[int, float]], order: np.ndarray,
                     n_ff: int, saving: Callable[[int, str, int | None], float] | None = None) -> Candidate | None:
    """Layer i's MLP narrowed from ``n_ff`` live neurons to the measured level with the lowest added KL per
    parameter removed (per second saved, with ``saving``); None when no measured level lies below the width it
    has."""
    done = len(order) - n_ff  # neurons this plan already cut (in energy order)
    kl_now = width_kl_at(curve, done)
    best = None
    for d, _ in curve:
        if d <= done or d >= len(order):
            continue
        added_kl = max(width_kl_at(curve, d) - kl_now, 0.0)
        gain = (s.mlp_params(n_ff) - s.mlp_params(len(order) - d) if saving is None
                else saving(i, "width", len(order) - d))
        if gain <= 0:
            continue
        ratio = added_kl / gain
        if best is None or ratio < best.kl_per_param:
            best = Candidate(ratio, "width", i, width_kl_at(curve, d), d)
    return best


def _take(w: Draft, c: Candidate, width: WidthCurves, before: WidthCurves) -> None:
    """Make cut ``c``; ``before``: the width curves without repair, when ``width`` holds the repaired ones."""
    i = c.layer
    if c.kind == "width":
        order = width[i][1]
        now = set(w.neurons.get(i, range(w.shape.n_ff)))  # other neuron cuts (e.g. --prune-neurons) stay cut
        keep = tuple(sorted(int(j) for j in order[c.drop:] if int(j) in now))
        w.neurons[i] = keep
        if i in before:  # ranked by the KL after repair: the note shows it and the KL of the cut alone
            w.note(i, width_removed_by="budget/repaired-width-kl-per-param", neurons_kept=len(keep),
                   width_kl_cut=width_kl_at(before[i][0], c.drop), width_kl_repaired=c.kl)
        else:
            w.note(i, width_removed_by="budget/width-kl-per-param", neurons_kept=len(keep), width_kl=c.kl)
        return
    {"layer": w.remove_layer, "attn": w.remove_attn, "mlp": w.remove_mlp}[c.kind](i)
    w.note(i, **{f"{c.kind}_removed_by": "budget/kl-per-param", f"{c.kind}_kl": c.kl})


def width_kl_at(curve: list[tuple[int, float]], d: int) -> float:
    """KL of a width cut of ``d`` neurons, linear between the measured points (and 0 at 0)."""
    xs = [0] + [c[0] for c in curve]
    ys = [0.0] + [c[1] for c in curve]
    return float(np.interp(d, xs, ys))


def has_repaired(scores: Mapping[str, Any]) -> bool:
    """The scores hold width KLs measured with their repair (``score --width … --repair``)."""
    return any(e.get("width_kl_repaired") for e in scores.get("layers", []))


def width_curves(scores: Mapping[str, Any], layers: Mapping[int, Mapping[str, Any]],
                 stats_loader: Callable[[], Mapping[str, np.ndarray]], repaired: bool = False) -> WidthCurves:
    """layer → (measured (removed neurons, KL) points, live neurons in energy order). ``repaired``: each cut's KL
    after repair where the scores have it, or the cut alone's where that is lower (recover applies no repair
    that makes held-out KL worse)."""
    from gguf_prune.scores import energy_order

    wd = scores.get("width")
    if not wd:
        return {}
    stats = stats_loader()
    base = scores.get("base_plan")
    base_plan = Plan.from_dict(base["plan"]) if base else None
    s = ModelShape(**scores["model"]["shape"])
    out = {}
    for i, e in layers.items():
        kls = e.get("width_kl")
        if repaired and e.get("width_kl_repaired") and kls:  # a repair that does not help is not applied
            kls = [None if a is None else (a if b is None else min(a, b)) for a, b in zip(kls, e["width_kl_repaired"])]
        if not kls or f"energy.{i}" not in stats:
            continue
        curve = [(int(d), float(k)) for d, k in zip(wd["drops"], kls) if k is not None]
        if not curve:
            continue
        # the order the scores measured: live neurons of the base plan, least energy first
        order = energy_order(stats[f"energy.{i}"], base_plan.layers[i].kept_neurons(s) if base_plan else None)
        out[i] = (curve, order)
    return out
