"""Scores → plan: the cutting strategies (`plan --explain` is in explain.py).

Strategies combine, applied in this order on top of the scores' base plan
(if the scores were measured on an already-cut model):

1. ``drop_layers`` whole layers, ranked by ``metric`` (kl, bi or greedy order);
2. ``drop_attn`` / ``drop_mlp`` sub-blocks, ranked by their own KL (or BI);
3. ``prune_heads``: a fraction of all query heads, ranked globally, made GQA-consistent
   per layer (equal heads removed from every KV group, or whole KV groups);
4. ``prune_neurons``: MLP neurons under a threshold or a fraction per layer, the kept
   width rounded to ``align`` so k-quants apply to ffn_down;
5. a budget (``target_params`` fraction of block parameters, or ``target_size`` bytes):
   cheapest units first — in greedy order when the scores came from a greedy run
   (each step re-measured there), else by one-shot KL per parameter. Units: whole
   layers, attention / MLP sub-blocks and ``width`` cuts (an MLP narrowed to fewer of
   its highest-energy neurons, priced by the width KL that ``score --width`` measured,
   linear between the measured widths; kept widths stay multiples of the scores' align).

Layers in the protected ranges are never cut. With ``uniform`` (``plan --uniform``, and always for
families whose llama.cpp architecture loads nothing else: Qwen3, Gemma 3) steps 2–5 keep one shape for every
kept layer, so the file stays in the model's own architecture; see :mod:`gguf_prune.planning.uniform`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from gguf_prune.models import arch
from gguf_prune.planning import budget, speed, uniform
from gguf_prune.planning.draft import Draft
from gguf_prune.planning.options import (DEFAULT_UNITS, UNIFORM_UNITS, PlanOptions, PlanOptionsError, aligned_width,
                                         fit_problems)
from gguf_prune.scores import ScoresError, load as load_scores
from gguf_prune.plan import ModelShape, Plan, PlanError, validate
from gguf_prune.ranges import protected_layers

log = logging.getLogger(__name__)


class ScoresNeeded(PlanError):
    """The options ask for a measurement the scores do not have (neuron statistics, head scores, ...)."""


def build_plan(scores: Mapping[str, Any], options: PlanOptions = PlanOptions(),
               scores_path: Path | None = None) -> Plan:
    """Turn a scores.json dict into a validated Plan following ``options``."""
    shape = ModelShape(**scores["model"]["shape"])
    fingerprint = scores["model"].get("fingerprint", "")
    base = scores.get("base_plan")
    w = Draft.from_plan(Plan.from_dict(base["plan"])) if base else Draft(shape)
    protected = protected_layers(shape.n_layer, options.protect_first, options.protect_last)
    o = _settle_options(options, w, protected)
    layers = {int(e["index"]): e for e in scores.get("layers", [])}

    def stats_loader() -> Mapping[str, np.ndarray]:
        return _neuron_stats(scores, scores_path)

    # steps 1-5 of the module docstring, in order; each returns the problems it met
    problems = _drop_layers(w, scores, layers, o, protected)
    problems += _drop_sub_blocks(w, layers, o, protected)
    if o.prune_heads:
        problems += uniform.prune_heads(w, scores, o) if o.uniform else _prune_heads(w, scores, o, protected)
    if o.prune_neurons:
        stats = stats_loader()
        problems += uniform.prune_neurons(w, stats, o) if o.uniform else _prune_neurons(w, stats, o, protected)
    goal = speed.goal_for(o, shape)
    if o.target_params is not None or o.target_size is not None or o.target_speedup is not None:
        if goal is not None:
            goal.refuse_unreachable(w, protected, o)
        if o.uniform:
            curves = budget.width_curves(scores, layers, stats_loader, o.repair) if "width" in o.units else {}
            problems += uniform.fill_budget(w, scores, o, protected, lambda: budget.target_met(w, o, fingerprint, goal),
                                            curves)
        else:
            problems += budget.fill_budget(w, scores, o, protected, fingerprint, stats_loader, goal)
    if problems:
        raise PlanError(problems, "plan request")
    settings = o.to_dict() | {"scores_calibration": scores.get("calibration", {}).get("fingerprint")}
    plan = w.to_plan(fingerprint, settings)
    if goal is not None:
        plan = replace(plan, predicted=dict(plan.predicted) | {"speedup": goal.info | {"value": round(goal.speedup(w), 4)}})
    return validate(plan)


def _settle_options(o: PlanOptions, w: Draft, protected: set[int]) -> PlanOptions:
    """The options as this model takes them: uniform where its family loads nothing else, the default units
    filled in; refused when a uniform plan cannot honour them or the counts exceed what the model has left."""
    shape = w.shape
    family = arch.family_of_arch(shape.architecture)
    uniform_mode = o.uniform or family.uniform_only
    o = replace(o, uniform=uniform_mode, units=tuple(o.units) or (UNIFORM_UNITS if uniform_mode else DEFAULT_UNITS))
    if uniform_mode:
        why = family.why_uniform if family.uniform_only else "--uniform"
        refused = uniform.refusals(o, why)
        if refused:
            raise PlanError(refused, "plan request")
    alive = {i for i in range(shape.n_layer) if w.alive(i)}
    too_many = fit_problems(shape, o, alive, alive - w.attn_removed, alive - w.mlp_removed, protected)
    if too_many:
        raise PlanOptionsError(too_many, "plan options exceed this model")
    return o


def _cuttable(w: Draft, protected: set[int]) -> list[int]:
    """Layers still there and not protected."""
    return [i for i in range(w.shape.n_layer) if w.alive(i) and i not in protected]


def _drop_layers(w: Draft, scores: Mapping[str, Any], layers: Mapping[int, Mapping[str, Any]], o: PlanOptions,
                 protected: set[int]) -> list[str]:
    """Step 1: ``drop_layers`` whole layers, in the greedy run's order or lowest ``metric`` score first."""
    if not o.drop_layers:
        return []
    problems = []
    if o.metric == "greedy":
        steps = [s for s in (scores.get("greedy") or {}).get("steps", []) if s["kind"] == "layer"]
        if len(steps) < o.drop_layers:
            problems.append(f"--metric greedy needs {o.drop_layers} greedy layer steps in the scores, found "
                            f"{len(steps)}: re-run `gguf-prune score --greedy {o.drop_layers}`")
        for rank, s in enumerate(steps[:o.drop_layers]):
            w.remove_layer(int(s["layer"]))
            w.note(int(s["layer"]), removed_by="greedy", greedy_step=rank + 1, cumulative_kl=s.get("kl"))
        return problems
    key = {"kl": "kl", "bi": "bi"}.get(o.metric)
    if key is None:
        return [f"--metric {o.metric!r} is not one of kl, bi, greedy"]
    ranked = sorted((_layer_score(layers.get(i, {}), key), i) for i in _cuttable(w, protected)
                    if _layer_score(layers.get(i, {}), key) is not None)
    if len(ranked) < o.drop_layers:
        problems.append(f"--drop-layers {o.drop_layers}: only {len(ranked)} unprotected layers have "
                        f"a {key} score")
    for rank, (v, i) in enumerate(ranked[:o.drop_layers]):
        w.remove_layer(i)
        w.note(i, removed_by=f"layer {key}", **{key: v}, rank=rank + 1)
    return problems


def _drop_sub_blocks(w: Draft, layers: Mapping[int, Mapping[str, Any]], o: PlanOptions,
                     protected: set[int]) -> list[str]:
    """Step 2: ``drop_attn`` / ``drop_mlp`` sub-blocks, lowest own KL (or BI) first."""
    problems = []
    for count, kind in ((o.drop_attn, "attn"), (o.drop_mlp, "mlp")):
        if not count:
            continue
        key = f"{kind}_bi" if o.metric == "bi" else f"{kind}_kl"
        done = w.attn_removed if kind == "attn" else w.mlp_removed
        ranked = sorted((_layer_score(layers.get(i, {}), key), i) for i in _cuttable(w, protected)
                        if i not in done and _layer_score(layers.get(i, {}), key) is not None)
        if len(ranked) < count:
            problems.append(f"--drop-{kind} {count}: only {len(ranked)} unprotected layers have a {key} score")
        for rank, (v, i) in enumerate(ranked[:count]):
            (w.remove_attn if kind == "attn" else w.remove_mlp)(i)
            w.note(i, **{f"{kind}_removed_by": key, key: v, f"{kind}_rank": rank + 1})
    return problems


def _prune_heads(w: Draft, scores: Mapping[str, Any], o: PlanOptions, protected: set[int]) -> list[str]:
    """Step 3: a fraction of all query heads, ranked globally; each layer then takes the GQA-consistent cut
    closest to its share (see :func:`_cheapest_head_cut`)."""
    s = w.shape
    heads = scores.get("heads")
    if not heads:
        return ["--prune-heads needs head scores: re-run `gguf-prune score --heads`"]
    table = heads.get(o.head_metric)
    if not table:
        return [f"--head-metric {o.head_metric!r}: the scores have no such head score (have: "
                f"{', '.join(k for k in ('kl', 'norm', 'taylor') if heads.get(k))})"]
    kv_table = heads.get("kv_kl") or {}
    layers = [int(i) for i in table if int(i) not in protected and w.alive(int(i)) and int(i) not in w.attn_removed]
    pool = [(float(v), i, h) for i in layers for h, v in enumerate(table[str(i)])
            if v is not None and v == v]  # null / NaN: a head the base plan already removed
    total_heads = sum(len(w.heads.get(i, range(s.n_head))) for i in range(s.n_layer) if w.alive(i)
                      and i not in w.attn_removed)
    n_remove = int(round(o.prune_heads * total_heads))
    if n_remove > len(pool):
        return [f"--prune-heads {o.prune_heads}: {n_remove} heads to remove but only {len(pool)} are scored in "
                "unprotected layers (see --head-layers of `score`)"]
    want: dict[int, int] = {}  # layer → heads the global ranking takes from it
    for _, i, _h in sorted(pool)[:n_remove]:
        want[i] = want.get(i, 0) + 1
    gs, nkv = s.group_size, s.n_head_kv
    for i, r in sorted(want.items()):
        head_score = np.asarray(table[str(i)], dtype=float)
        kv_score = np.asarray(kv_table.get(str(i), [head_score[g * gs:(g + 1) * gs].sum() for g in range(nkv)]),
                              float)
        cut = _cheapest_head_cut(s, head_score, kv_score, r, o.min_heads)
        if cut is None:
            continue
        if not cut.keep:
            w.remove_attn(i)
        else:
            w.heads[i] = tuple(cut.keep)
        w.note(i, heads_removed=cut.removed, kv_groups_removed=[int(g) for g in cut.groups],
               head_metric=o.head_metric)
    return []


@dataclass(frozen=True)
class _HeadCut:
    keep: list[int]  # query heads kept
    groups: list  # KV groups removed whole (numpy integers, lowest KV score first)
    removed: int  # query heads removed


def _cheapest_head_cut(s: ModelShape, head_score: np.ndarray, kv_score: np.ndarray, want: int,
                       min_heads: int) -> _HeadCut | None:
    """Of the GQA-consistent cuts of one layer (g whole KV groups, then k heads from each remaining group),
    the one that removes closest to ``want`` heads, ties by the least summed score of what it removes (whole
    groups by their KV score); None when none is allowed."""
    gs, nkv = s.group_size, s.n_head_kv
    best = None
    for g in range(nkv + 1):
        for k in range(gs):
            removed = g * gs + k * (nkv - g)
            kept = s.n_head - removed
            if removed == 0 or kept < min_heads or (kept == 0 and g < nkv):
                continue
            groups = list(np.argsort(kv_score, kind="stable")[:g])
            cost = float(kv_score[groups].sum()) if g else 0.0
            drop_heads = []
            for grp in range(nkv):
                if grp in groups:
                    continue
                hs = list(range(grp * gs, (grp + 1) * gs))
                hs.sort(key=lambda h: head_score[h])
                drop_heads += hs[:k]
            cost += float(head_score[drop_heads].sum())
            key = (abs(removed - want), cost)
            if best is None or key < best[0]:
                keep = [h for h in range(s.n_head) if h // gs not in groups and h not in drop_heads]
                best = (key, _HeadCut(keep, groups, removed))
    return None if best is None else best[1]


def _prune_neurons(w: Draft, stats: Mapping[str, np.ndarray], o: PlanOptions, protected: set[int]) -> list[str]:
    """Step 4: each layer's least active neurons (under ``neuron_threshold``, or ``neuron_fraction`` of them),
    the kept width rounded to ``align``."""
    s = w.shape
    if (o.neuron_threshold is None) == (o.neuron_fraction is None):
        return ["--prune-neurons needs exactly one of --neuron-threshold or --neuron-fraction"]
    problems = []
    for i in range(s.n_layer):
        if i in protected or not w.alive(i) or i in w.mlp_removed:
            continue
        key = f"{o.neuron_metric}.{i}"
        if key not in stats:
            problems.append(f"neuron statistic {key!r} is missing from the scores' neuron file")
            continue
        v = np.asarray(stats[key], dtype=float)
        order = np.argsort(v, kind="stable")  # ascending: least active first
        if o.neuron_threshold is not None:
            n_drop = int((v < o.neuron_threshold).sum())
        else:
            n_drop = int(round(o.neuron_fraction * s.n_ff))
        n_keep = aligned_width(s.n_ff - n_drop, o.align, s.n_ff)
        if n_keep >= s.n_ff:
            continue
        keep = tuple(sorted(int(j) for j in order[s.n_ff - n_keep:]))
        w.neurons[i] = keep
        w.note(i, neurons_kept=n_keep, neuron_metric=o.neuron_metric,
               neuron_cutoff=float(v[order[s.n_ff - n_keep - 1]]))
    return problems


def _neuron_stats(scores: Mapping[str, Any], scores_path: Path | None) -> dict[str, np.ndarray]:
    """The scores' neuron statistics (the safetensors file written next to scores.json)."""
    neurons = scores.get("neurons")
    if not neurons:
        raise ScoresNeeded(["--prune-neurons needs neuron statistics: re-run `gguf-prune score` with neuron scores"])
    from safetensors.numpy import load_file

    side = Path(neurons["file"])
    if not side.is_absolute() and scores_path is not None:
        side = Path(scores_path).parent / side
    if not side.exists():
        raise ScoresNeeded([f"neuron statistics file {side} is missing (it is written next to scores.json)"])
    return load_file(str(side))


def _layer_score(entry: Mapping[str, Any], key: str) -> float | None:
    v = entry.get(key)
    return None if v is None else float(v)


def make_plan(scores_path: Path, out: Path, options: PlanOptions) -> Plan:
    """Read scores.json, build the plan, write plan.json (atomically) and return it."""
    scores_path = Path(scores_path)
    try:
        scores = load_scores(scores_path)
    except ScoresError as e:
        raise PlanError([str(e)], "plan request") from None
    plan = build_plan(scores, options, scores_path)
    plan.save(out)
    log.info("wrote %s: %.1f%% of block parameters removed", out, 100 * plan.removed_fraction())
    return plan


