"""Uniform plans: one shape for every kept layer, so the model's own llama.cpp architecture loads the cut.

``llama``, ``qwen2``, ``qwen3`` and ``gemma3`` in llama.cpp size every layer's tensors from layer 0's n_ff and
head counts, so a file in the native architecture (the one every llama.cpp runtime loads) can only hold a
*uniform* cut: whole layers removed, then the same FFN width and the same query-head / KV-group counts in every
kept layer. Each layer still keeps its *own* best neurons and heads. ``qwen3`` and ``gemma3`` take nothing else
(see :mod:`gguf_prune.models.arch`); for the other families it is ``plan --uniform``.

What a uniform plan may do:

* drop whole layers (``--drop-layers``, and the budget), ranked by their scores as in a per-layer plan;
* narrow every kept MLP to one width (``--prune-neurons --neuron-fraction``, or the budget priced by
  ``score --width``: the KL of a width level is the sum over the kept layers of each layer's measured KL);
* remove the same number of query heads in every kept layer (``--prune-heads``), as whole KV groups and / or
  the same number of heads in each remaining group, each layer choosing its own cheapest ones.

Protected layers (``--protect-first`` / ``--protect-last``) are never removed, but they are narrowed like every
other layer: one width for all is what makes the cut uniform.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from gguf_prune.planning.budget import WidthCurves, width_kl_at
from gguf_prune.planning.draft import Draft, head_counts
from gguf_prune.planning.options import PlanOptions, aligned_width

log = logging.getLogger(__name__)

PER_LAYER_UNITS = ("attn", "mlp")  # remove a sub-block in some layers only: never uniform


def refusals(o: PlanOptions, why: str) -> list[str]:
    """The options of ``o`` (PlanOptions) a uniform plan cannot honour, each with the reason."""
    p = []
    if o.drop_attn or o.drop_mlp:
        p.append(f"--drop-attn / --drop-mlp remove a sub-block in some layers only, which a uniform plan cannot "
                 f"hold ({why})")
    if o.prune_neurons and o.neuron_threshold is not None:
        p.append(f"--neuron-threshold keeps a different width in each layer; a uniform plan needs "
                 f"--neuron-fraction ({why})")
    bad = [u for u in o.units if u in PER_LAYER_UNITS]
    if bad:
        p.append(f"--units {','.join(bad)}: removing a sub-block in some layers only is not uniform ({why}); "
                 "use --units layer,width")
    return p


def prune_neurons(w: Draft, stats: Mapping[str, np.ndarray], o: PlanOptions) -> list[str]:
    """Every kept layer keeps the same number of neurons: its own highest by ``o.neuron_metric``."""
    s = w.shape
    n_keep = aligned_width(s.n_ff - int(round(o.neuron_fraction * s.n_ff)), o.align, s.n_ff)
    if n_keep >= s.n_ff:
        return []
    problems = []
    for i in range(s.n_layer):
        if not w.alive(i):
            continue
        key = f"{o.neuron_metric}.{i}"
        if key not in stats:
            problems.append(f"neuron statistic {key!r} is missing from the scores' neuron file")
            continue
        order = np.argsort(np.asarray(stats[key], dtype=float), kind="stable")  # least active first
        w.neurons[i] = tuple(sorted(int(j) for j in order[s.n_ff - n_keep:]))
        w.note(i, neurons_kept=n_keep, neuron_metric=o.neuron_metric, uniform=True)
    return problems


def head_split(n_head: int, n_head_kv: int, remove: int, min_heads: int) -> tuple[int, int] | None:
    """(KV groups removed, heads removed from each remaining group) closest to ``remove`` heads per layer,
    keeping at least ``min_heads`` (and at least one) query head; None when no split removes anything."""
    gs = n_head // n_head_kv
    best = None
    for g in range(n_head_kv):  # at least one group stays: a uniform plan never removes attention
        for k in range(gs):
            removed = g * gs + k * (n_head_kv - g)
            kept = n_head - removed
            if removed == 0 or kept < max(1, min_heads):
                continue
            key = (abs(removed - remove), -g)  # ties: whole groups first (they also save K and V)
            if best is None or key < best[0]:
                best = (key, (g, k))
    return None if best is None else best[1]


def prune_heads(w: Draft, scores: Mapping[str, Any], o: PlanOptions) -> list[str]:
    """The same (KV groups, heads per group) removed in every kept layer, each layer its cheapest ones."""
    s = w.shape
    heads = scores.get("heads") or {}
    table = heads.get(o.head_metric)
    if not table:
        return [f"--prune-heads needs {o.head_metric} head scores: re-run `gguf-prune score --heads`"]
    split = head_split(s.n_head, s.n_head_kv, int(round(o.prune_heads * s.n_head)), o.min_heads)
    if split is None:
        return []
    g, k = split
    gs = s.group_size
    kv_table = heads.get("kv_kl") or {}
    alive = [i for i in range(s.n_layer) if w.alive(i)]
    missing = [i for i in alive if str(i) not in table]
    if missing:
        return [f"a uniform head cut removes heads in every kept layer, but layers {missing} have no "
                f"{o.head_metric} head scores: re-run `gguf-prune score --heads --protect-first 0 --protect-last 0`"]
    for i in alive:
        h_i = np.asarray(table[str(i)], dtype=float)
        kv_i = np.asarray(kv_table.get(str(i), [h_i[q * gs:(q + 1) * gs].sum() for q in range(s.n_head_kv)]), float)
        groups = set(int(q) for q in np.argsort(kv_i, kind="stable")[:g])
        keep = []
        for grp in range(s.n_head_kv):
            if grp in groups:
                continue
            hs = sorted(range(grp * gs, (grp + 1) * gs), key=lambda h: h_i[h])
            keep += hs[k:]
        w.heads[i] = tuple(sorted(keep))
        w.note(i, heads_removed=s.n_head - len(keep), kv_groups_removed=sorted(groups), head_metric=o.head_metric,
               uniform=True)
    return []


@dataclass(frozen=True, order=True)
class _UniformMove:
    """One uniform cut the budget may take next; moves sort cheapest first (the field order is the sort order)."""

    kl_per_param: float
    kind: str  # layer | width
    at: int  # layer: the layer removed; width: neurons every kept layer has cut at that level
    kl: float  # layer: its KL; width: the sum over the kept layers of the KL the level adds


def fill_budget(w: Draft, scores: Mapping[str, Any], o: PlanOptions, protected: set[int], met: Callable[[], bool],
                width_curves: WidthCurves) -> list[str]:
    """Cheapest uniform move per parameter until the budget is met: the next whole layer (by its KL), or the
    next width level for every kept layer at once (the sum of their measured width KLs)."""
    layers = {int(e["index"]): e for e in scores.get("layers", [])}
    drops = sorted({d for curve, _ in width_curves.values() for d, _ in curve}) if "width" in o.units else []
    if "width" in o.units and not width_curves and o.units == ("width",):
        return ["--units width needs width scores: run `gguf-prune score --width 0.17,0.33,0.5`"]

    def moves() -> list[_UniformMove]:
        return _uniform_moves(w, layers, drops, width_curves, o.units, protected)

    if not moves() and not met():
        return ["a uniform budget needs layer KL scores or width scores (`gguf-prune score --width ...`)"]
    while not met():
        open_moves = moves()
        if not open_moves:
            return ["the budget cannot be met with uniform cuts without cutting protected layers"]
        _take_uniform(w, open_moves[0], width_curves)
    return []


def _width_now(w: Draft) -> int:
    """Neurons every kept layer has cut so far (uniform: the same in each)."""
    s = w.shape
    alive = [i for i in range(s.n_layer) if w.alive(i)]
    return s.n_ff - len(w.neurons.get(alive[0], range(s.n_ff))) if alive else 0


def _uniform_moves(w: Draft, layers: Mapping[int, Mapping[str, Any]], drops: list[int], width_curves: WidthCurves,
                   units: tuple[str, ...], protected: set[int]) -> list[_UniformMove]:
    """Every uniform cut still open, priced from where the plan stands: each unprotected layer by its KL, each
    width level below the current one by the summed KL it adds over the kept layers."""
    s = w.shape
    out = []
    alive = [i for i in range(s.n_layer) if w.alive(i)]
    done = _width_now(w)
    n_ff = s.n_ff - done
    attn_p = s.attn_params(*head_counts(s, w.heads.get(alive[0]) if alive else None))
    if "layer" in units:
        for i in alive:
            kl = layers.get(i, {}).get("kl")
            if i not in protected and kl is not None:
                out.append(_UniformMove(float(kl) / (attn_p + s.mlp_params(n_ff)), "layer", i, float(kl)))
    if drops and all(i in width_curves for i in alive):
        for d in drops:
            if d <= done or d >= s.n_ff:
                continue
            added_kl = sum(max(width_kl_at(width_curves[i][0], d) - width_kl_at(width_curves[i][0], done), 0.0)
                           for i in alive)
            saved = len(alive) * (s.mlp_params(n_ff) - s.mlp_params(s.n_ff - d))
            out.append(_UniformMove(added_kl / saved, "width", d, added_kl))
    return sorted(out)


def _take_uniform(w: Draft, move: _UniformMove, width_curves: WidthCurves) -> None:
    s = w.shape
    if move.kind == "layer":
        w.remove_layer(move.at)
        w.note(move.at, layer_removed_by="budget/uniform-kl-per-param", layer_kl=move.kl)
        return
    for i in range(s.n_layer):
        if not w.alive(i):
            continue
        order = width_curves[i][1]  # this layer's neurons, least energy first
        w.neurons[i] = tuple(sorted(int(j) for j in order[move.at:]))
        w.note(i, width_removed_by="budget/uniform-width", neurons_kept=s.n_ff - move.at, width_level_kl=move.kl,
               uniform=True)
