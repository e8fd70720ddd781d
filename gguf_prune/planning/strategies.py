"""Scores → plan: the cutting strategies, and `plan --explain`.

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

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from gguf_prune.models import arch
from gguf_prune.planning import uniform
from gguf_prune import scores as scores_io
from gguf_prune.plan import LayerPlan, ModelShape, Plan, PlanError, validate
from gguf_prune.ranges import protected_layers, ranges

log = logging.getLogger(__name__)

# Approximate bits per weight of block tensors, for the predicted size of a budget.
BITS_PER_WEIGHT = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.7,
                   "Q5_K_S": 5.5, "Q5_0": 5.5, "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q3_K_M": 3.9,
                   "Q2_K": 3.35}


@dataclass(frozen=True)
class PlanOptions:
    drop_layers: int = 0
    metric: str = "kl"  # kl | bi | greedy
    drop_attn: int = 0
    drop_mlp: int = 0
    prune_heads: float = 0.0  # fraction of query heads
    head_metric: str = "kl"  # kl | norm | taylor
    min_heads: int = 1
    prune_neurons: bool = False
    neuron_metric: str = "freq"  # freq | mean_abs | wxa
    neuron_threshold: float | None = None
    neuron_fraction: float | None = None
    align: int = 256
    protect_first: int = 2
    protect_last: int = 2
    target_params: float | None = None  # fraction of transformer-block parameters to remove
    target_size: int | None = None  # bytes of the quantized file
    units: tuple[str, ...] = ()  # unit kinds the budget may take (UNITS); () = DEFAULT_UNITS / UNIFORM_UNITS
    quant: str = "Q4_K_M"  # for target_size and the predicted size
    uniform: bool = False  # one shape for every kept layer (forced for families that load nothing else)

    def __post_init__(self) -> None:
        # an API user gets the same refusal as the CLI: a negative count used as a slice bound removes all but
        # one layer (ranked[:-1]), a negative fraction keeps 1-4 of 8 heads; neither may reach the planner
        problems = option_problems(self)
        if problems:
            raise PlanOptionsError(problems)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["units"] = list(self.units)
        return d


UNITS = ("layer", "attn", "mlp", "width")
DEFAULT_UNITS = ("layer", "attn", "mlp")
UNIFORM_UNITS = ("layer", "width")
METRICS = ("kl", "bi", "greedy")
HEAD_METRICS = ("kl", "norm", "taylor")
NEURON_METRICS = ("freq", "mean_abs", "wxa")
# Kept FFN widths are rounded to a multiple of ``align``: every quantized type's block is 32 (q4_0, q8_0, ...) or
# 256 (k-quants) values along a row of ffn_down; 1 (no rounding) suits F16/BF16/F32 files only.
ALIGN_BLOCK = 32


class ScoresNeeded(PlanError):
    pass


class PlanOptionsError(PlanError):
    """Plan options out of range, or beyond what the model has: one line naming each option, its value and
    the allowed range."""

    def __init__(self, problems: list[str], what: str = "invalid plan options"):
        self.problems = list(problems)
        Exception.__init__(self, f"{what}: " + "; ".join(problems))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and bool(np.isfinite(v))


def is_align(v: Any) -> bool:
    """1 (no rounding) or a positive multiple of 32 (the smallest quantization block)."""
    return _is_int(v) and (v == 1 or (v >= ALIGN_BLOCK and v % ALIGN_BLOCK == 0))


def option_problems(o: PlanOptions) -> list[str]:
    """Every option of ``o`` outside its range, one message each (empty: all in range). The model's own limits
    (at most the layers that are not protected, at most its heads) are checked by :func:`build_plan`."""
    from gguf_prune.writing.quantize import QUANT_TYPES

    p = []
    for flag, v, what in (("--drop-layers", o.drop_layers, "whole layers to remove"),
                          ("--drop-attn", o.drop_attn, "attention sub-blocks to remove"),
                          ("--drop-mlp", o.drop_mlp, "MLP sub-blocks to remove"),
                          ("--protect-first", o.protect_first, "layers kept at the start"),
                          ("--protect-last", o.protect_last, "layers kept at the end")):
        if not _is_int(v) or v < 0:
            p.append(f"{flag} {v!r}: must be a whole number, 0 or more ({what})")
    if not _is_int(o.min_heads) or o.min_heads < 1:
        p.append(f"--min-heads {o.min_heads!r}: must be a whole number, 1 or more (query heads every kept layer "
                 "keeps; --drop-attn removes attention)")
    for flag, v, choices in (("--metric", o.metric, METRICS), ("--head-metric", o.head_metric, HEAD_METRICS),
                             ("--neuron-metric", o.neuron_metric, NEURON_METRICS)):
        if v not in choices:
            p.append(f"{flag} {v!r}: must be one of {', '.join(choices)}")
    if not _is_real(o.prune_heads) or not 0 <= o.prune_heads < 1:
        p.append(f"--prune-heads {o.prune_heads!r}: must be a fraction of the query heads in [0, 1)")
    if o.neuron_threshold is not None and (not _is_real(o.neuron_threshold) or o.neuron_threshold < 0):
        p.append(f"--neuron-threshold {o.neuron_threshold!r}: must be a number, 0 or more (the neuron statistics "
                 "are never negative)")
    if o.neuron_fraction is not None and (not _is_real(o.neuron_fraction) or not 0 <= o.neuron_fraction < 1):
        p.append(f"--neuron-fraction {o.neuron_fraction!r}: must be a fraction of each layer's neurons in [0, 1)")
    given = [f for f, v in (("--neuron-threshold", o.neuron_threshold), ("--neuron-fraction", o.neuron_fraction))
             if v is not None]
    if o.prune_neurons and len(given) != 1:
        p.append("--prune-neurons needs exactly one of --neuron-threshold or --neuron-fraction")
    elif given and not o.prune_neurons:
        p.append(f"{given[0]} needs --prune-neurons (without it no neuron is removed)")
    if not is_align(o.align):
        p.append(f"--align {o.align!r}: must be a positive multiple of {ALIGN_BLOCK} (256 for k-quants), or 1 for no "
                 "rounding (F16/BF16/F32 files only)")
    if o.target_params is not None and (not _is_real(o.target_params) or not 0 < o.target_params < 1):
        p.append(f"--target-params {o.target_params!r}: must be a fraction of the block parameters in (0, 1)")
    if o.target_size is not None and (not _is_int(o.target_size) or o.target_size < 1):
        p.append(f"--target-size {o.target_size!r}: must be a whole number of bytes, 1 or more")
    bad = [u for u in o.units if u not in UNITS]
    if bad:
        p.append(f"--units {','.join(map(str, o.units))!r}: unknown unit {bad[0]!r}; use a comma list of "
                 f"{', '.join(UNITS)}")
    if str(o.quant).strip().upper() not in QUANT_TYPES + ("NONE",):
        p.append(f"--quant {o.quant!r}: must be a llama-quantize type ({', '.join(QUANT_TYPES)}) or none")
    return p


def fit_problems(shape: ModelShape, o: PlanOptions, alive: set[int], has_attn: set[int], has_mlp: set[int],
                 protected: set[int]) -> list[str]:
    """Counts beyond what the model has: more layers or sub-blocks than are unprotected (and not already cut by
    the scores' base plan), a --min-heads above the heads a layer has."""
    p = []
    free = sorted(i for i in alive if i not in protected)
    where = (f"the layers not protected (--protect-first {o.protect_first}, --protect-last {o.protect_last} of "
             f"{shape.n_layer}){' and not removed by the base plan' if len(alive) < shape.n_layer else ''}")
    if o.drop_layers > len(free):
        p.append(f"--drop-layers {o.drop_layers}: at most {len(free)}, "
                 f"{where}{': ' + ranges(free) if free else ''}")
    for flag, count, present in (("--drop-attn", o.drop_attn, has_attn), ("--drop-mlp", o.drop_mlp, has_mlp)):
        n = len([i for i in free if i in present])
        if count > n:
            p.append(f"{flag} {count}: at most {n}, the sub-blocks left in {where}")
    if o.min_heads > shape.n_head:
        p.append(f"--min-heads {o.min_heads}: at most {shape.n_head}, the query heads of a layer")
    return p


@dataclass
class _Work:
    """A mutable plan under construction."""

    shape: ModelShape
    removed: set[int] = field(default_factory=set)
    attn_removed: set[int] = field(default_factory=set)
    mlp_removed: set[int] = field(default_factory=set)
    heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    neurons: dict[int, tuple[int, ...]] = field(default_factory=dict)
    why: dict[int, dict[str, Any]] = field(default_factory=dict)

    def note(self, layer: int, **kw) -> None:
        self.why.setdefault(layer, {}).update(kw)

    def remove_attn(self, i: int) -> None:
        self.attn_removed.add(i)
        self.heads.pop(i, None)
        if i in self.mlp_removed:
            self.remove_layer(i)

    def remove_mlp(self, i: int) -> None:
        self.mlp_removed.add(i)
        self.neurons.pop(i, None)
        if i in self.attn_removed:
            self.remove_layer(i)

    def remove_layer(self, i: int) -> None:
        self.removed.add(i)
        self.attn_removed.discard(i)
        self.mlp_removed.discard(i)
        self.heads.pop(i, None)
        self.neurons.pop(i, None)

    def alive(self, i: int) -> bool:
        return i not in self.removed

    def to_plan(self, fingerprint: str, settings: Mapping[str, Any]) -> Plan:
        layers = []
        for i in range(self.shape.n_layer):
            why = self.why.get(i, {})
            if i in self.removed:
                layers.append(LayerPlan(i, removed=True, why=why))
                continue
            heads = () if i in self.attn_removed else self.heads.get(i)
            neurons = () if i in self.mlp_removed else self.neurons.get(i)
            layers.append(LayerPlan(i, heads=heads, neurons=neurons, why=why))
        plan = Plan(shape=self.shape, layers=tuple(layers), fingerprint=fingerprint, settings=dict(settings))
        return replace(plan, predicted=predict(plan, settings.get("quant", "Q4_K_M")))

    @classmethod
    def from_plan(cls, plan: Plan) -> "_Work":
        w = cls(plan.shape)
        for lp in plan.layers:
            if lp.removed:
                w.removed.add(lp.index)
                continue
            if lp.attention_removed:
                w.attn_removed.add(lp.index)
            elif lp.heads is not None:
                w.heads[lp.index] = tuple(lp.heads)
            if lp.mlp_removed:
                w.mlp_removed.add(lp.index)
            elif lp.neurons is not None:
                w.neurons[lp.index] = tuple(lp.neurons)
            if lp.why:
                w.why[lp.index] = dict(lp.why)
        return w


def predict(plan: Plan, quant: str = "Q4_K_M") -> dict[str, Any]:
    """Parameter counts before/after and an estimate of the quantized size."""
    s = plan.shape
    before, after = plan.block_params()
    embed = s.n_vocab * s.n_embd
    bpw = BITS_PER_WEIGHT.get(quant.upper(), 16.0)
    # token_embd and output are usually kept at a higher type (q6_K/q8_0 in Q4_K_M); count them at ~6.6 bpw
    other_bits = 6.5625 if bpw < 16 else bpw
    return {
        "block_params_before": before,
        "block_params_after": after,
        "block_params_removed_fraction": round(1 - after / before, 6),
        "embedding_params": embed,
        "quant": quant,
        "size_bytes_estimate_before": int((before * bpw + embed * other_bits) / 8),
        "size_bytes_estimate_after": int((after * bpw + embed * other_bits) / 8),
    }


def _neuron_stats(scores: Mapping[str, Any], scores_path: Path | None) -> dict[str, np.ndarray]:
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


def _protected(shape: ModelShape, o: PlanOptions) -> set[int]:
    n = shape.n_layer
    return protected_layers(n, o.protect_first, o.protect_last)


def _layer_score(entry: Mapping[str, Any], key: str) -> float | None:
    v = entry.get(key)
    return None if v is None else float(v)


def build_plan(scores: Mapping[str, Any], options: PlanOptions = PlanOptions(),
               scores_path: Path | None = None) -> Plan:
    """Turn a scores.json dict into a validated Plan following ``options``."""
    o = options
    shape = ModelShape(**scores["model"]["shape"])
    fingerprint = scores["model"].get("fingerprint", "")
    base = scores.get("base_plan")
    w = _Work.from_plan(Plan.from_dict(base["plan"])) if base else _Work(shape)
    protected = _protected(shape, o)
    layers = {int(e["index"]): e for e in scores.get("layers", [])}
    problems: list[str] = []
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

    def candidates() -> list[int]:
        return [i for i in range(shape.n_layer) if w.alive(i) and i not in protected]

    # 1. whole layers
    if o.drop_layers:
        if o.metric == "greedy":
            steps = [s for s in (scores.get("greedy") or {}).get("steps", []) if s["kind"] == "layer"]
            if len(steps) < o.drop_layers:
                problems.append(f"--metric greedy needs {o.drop_layers} greedy layer steps in the scores, found "
                                f"{len(steps)}: re-run `gguf-prune score --greedy {o.drop_layers}`")
            for rank, s in enumerate(steps[:o.drop_layers]):
                w.remove_layer(int(s["layer"]))
                w.note(int(s["layer"]), removed_by="greedy", greedy_step=rank + 1, cumulative_kl=s.get("kl"))
        else:
            key = {"kl": "kl", "bi": "bi"}.get(o.metric)
            if key is None:
                problems.append(f"--metric {o.metric!r} is not one of kl, bi, greedy")
            else:
                ranked = sorted((_layer_score(layers.get(i, {}), key), i) for i in candidates()
                                if _layer_score(layers.get(i, {}), key) is not None)
                if len(ranked) < o.drop_layers:
                    problems.append(f"--drop-layers {o.drop_layers}: only {len(ranked)} unprotected layers have "
                                    f"a {key} score")
                for rank, (v, i) in enumerate(ranked[:o.drop_layers]):
                    w.remove_layer(i)
                    w.note(i, removed_by=f"layer {key}", **{key: v}, rank=rank + 1)

    # 2. sub-blocks
    for count, kind in ((o.drop_attn, "attn"), (o.drop_mlp, "mlp")):
        if not count:
            continue
        key = f"{kind}_bi" if o.metric == "bi" else f"{kind}_kl"
        done = w.attn_removed if kind == "attn" else w.mlp_removed
        ranked = sorted((_layer_score(layers.get(i, {}), key), i) for i in candidates()
                        if i not in done and _layer_score(layers.get(i, {}), key) is not None)
        if len(ranked) < count:
            problems.append(f"--drop-{kind} {count}: only {len(ranked)} unprotected layers have a {key} score")
        for rank, (v, i) in enumerate(ranked[:count]):
            (w.remove_attn if kind == "attn" else w.remove_mlp)(i)
            w.note(i, **{f"{kind}_removed_by": key, key: v, f"{kind}_rank": rank + 1})

    # 3. heads
    if o.prune_heads:
        problems += uniform.prune_heads(w, scores, o) if uniform_mode else _prune_heads(w, scores, o, protected)

    # 4. neurons
    if o.prune_neurons:
        stats = _neuron_stats(scores, scores_path)
        problems += (uniform.prune_neurons(w, stats, o, _align) if uniform_mode
                     else _prune_neurons(w, stats, o, protected))

    # 5. budget
    if (o.target_params is not None or o.target_size is not None) and uniform_mode:
        curves = _width_curves(scores, layers, o, lambda: _neuron_stats(scores, scores_path)) \
            if "width" in o.units else {}
        problems += uniform.fill_budget(w, scores, o, protected, lambda: _met(w, o, fingerprint), curves, _interp)
    elif o.target_params is not None or o.target_size is not None:
        problems += _fill_budget(w, scores, o, protected, fingerprint,
                                 stats_loader=lambda: _neuron_stats(scores, scores_path))

    if problems:
        raise PlanError(problems, "plan request")
    settings = o.to_dict() | {"scores_calibration": scores.get("calibration", {}).get("fingerprint")}
    plan = w.to_plan(fingerprint, settings)
    return validate(plan)


def _prune_heads(w: _Work, scores: Mapping[str, Any], o: PlanOptions, protected: set[int]) -> list[str]:
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
    want: dict[int, int] = {}
    for _, i, _h in sorted(pool)[:n_remove]:
        want[i] = want.get(i, 0) + 1
    gs, nkv = s.group_size, s.n_head_kv
    for i, r in sorted(want.items()):
        scores_i = np.asarray(table[str(i)], dtype=float)
        kv_i = np.asarray(kv_table.get(str(i), [scores_i[g * gs:(g + 1) * gs].sum() for g in range(nkv)]), float)
        best = None
        # options: drop g whole KV groups, then k heads from each remaining group; total close to r
        for g in range(nkv + 1):
            for k in range(gs):
                removed = g * gs + k * (nkv - g)
                kept = s.n_head - removed
                if removed == 0 or kept < o.min_heads or (kept == 0 and g < nkv):
                    continue
                groups = list(np.argsort(kv_i, kind="stable")[:g])
                cost = float(kv_i[groups].sum()) if g else 0.0
                drop_heads = []
                for grp in range(nkv):
                    if grp in groups:
                        continue
                    hs = list(range(grp * gs, (grp + 1) * gs))
                    hs.sort(key=lambda h: scores_i[h])
                    drop_heads += hs[:k]
                cost += float(scores_i[drop_heads].sum())
                key = (abs(removed - r), cost)
                if best is None or key < best[0]:
                    keep = [h for h in range(s.n_head) if h // gs not in groups and h not in drop_heads]
                    best = (key, keep, groups, removed)
        if best is None:
            continue
        _, keep, groups, removed = best
        if not keep:
            w.remove_attn(i)
        else:
            w.heads[i] = tuple(keep)
        w.note(i, heads_removed=removed, kv_groups_removed=[int(g) for g in groups], head_metric=o.head_metric)
    return []


def _align(n: int, align: int, n_ff: int) -> int:
    if align <= 1:
        return n
    a = int(round(n / align)) * align
    return min(max(a, align), n_ff)


def _prune_neurons(w: _Work, stats: Mapping[str, np.ndarray], o: PlanOptions, protected: set[int]) -> list[str]:
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
        n_keep = _align(s.n_ff - n_drop, o.align, s.n_ff)
        if n_keep >= s.n_ff:
            continue
        keep = tuple(sorted(int(j) for j in order[s.n_ff - n_keep:]))
        w.neurons[i] = keep
        w.note(i, neurons_kept=n_keep, neuron_metric=o.neuron_metric,
               neuron_cutoff=float(v[order[s.n_ff - n_keep - 1]]))
    return problems


def _met(w: _Work, o: PlanOptions, fingerprint: str) -> bool:
    """The budget (--target-params / --target-size) is reached by the plan as it stands."""
    p = w.to_plan(fingerprint, {"quant": o.quant})
    if o.target_params is not None and p.removed_fraction() < o.target_params - 1e-9:
        return False
    if o.target_size is not None and p.predicted["size_bytes_estimate_after"] > o.target_size:
        return False
    return True


def _fill_budget(w: _Work, scores: Mapping[str, Any], o: PlanOptions, protected: set[int],
                 fingerprint: str, stats_loader=None) -> list[str]:
    s = w.shape

    def current() -> Plan:
        return w.to_plan(fingerprint, {"quant": o.quant})

    def met() -> bool:
        p = current()
        if o.target_params is not None and p.removed_fraction() < o.target_params - 1e-9:
            return False
        if o.target_size is not None and p.predicted["size_bytes_estimate_after"] > o.target_size:
            return False
        return True

    if met():
        return []
    greedy = scores.get("greedy")
    if greedy and greedy.get("steps"):
        for n, step in enumerate(greedy["steps"]):
            if met():
                return []
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
        if met():
            return []
        layers_scored = any(e.get("kl") is not None or e.get("mlp_kl") is not None for e in scores.get("layers", []))
        if not layers_scored:
            return [f"the greedy run in the scores ({len(greedy['steps'])} steps) does not reach the budget; "
                    "re-run `gguf-prune score --greedy K` with a larger K"]
        log.warning("the greedy run (%d steps) does not reach the budget; the rest is taken by one-shot KL per "
                    "parameter (a larger `score --greedy K` re-measures further)", len(greedy["steps"]))
    # one-shot: cheapest unit per parameter first, re-ranked after every cut (a cut changes what the units
    # of its layer still remove); width cuts of one layer are taken in order, each to the level with the
    # lowest KL per parameter from where the layer stands
    layers = {int(e["index"]): e for e in scores.get("layers", [])}
    width = _width_curves(scores, layers, o, stats_loader) if "width" in o.units else {}
    if not width and o.units == ("width",):
        return ["--units width needs width scores: run `gguf-prune score --width 0.17,0.33,0.5`"]

    def options() -> list[tuple[float, str, int, float, int]]:
        out = []
        for i in range(s.n_layer):
            if i in protected or not w.alive(i):
                continue
            e = layers.get(i, {})
            # what each unit removes now: a base plan or an earlier cut may have taken part of this layer
            attn_p = 0 if i in w.attn_removed else s.attn_params(*_head_counts(s, w.heads.get(i)))
            n_ff = 0 if i in w.mlp_removed else len(w.neurons.get(i, range(s.n_ff)))
            mlp_p = s.mlp_params(n_ff)
            if "layer" in o.units and e.get("kl") is not None and attn_p + mlp_p:
                out.append((float(e["kl"]) / (attn_p + mlp_p), "layer", i, float(e["kl"]), 0))
            if "attn" in o.units and e.get("attn_kl") is not None and attn_p:
                out.append((float(e["attn_kl"]) / attn_p, "attn", i, float(e["attn_kl"]), 0))
            if "mlp" in o.units and e.get("mlp_kl") is not None and mlp_p:
                out.append((float(e["mlp_kl"]) / mlp_p, "mlp", i, float(e["mlp_kl"]), 0))
            if i in width and n_ff:
                curve, order = width[i]
                done = len(order) - n_ff  # neurons this plan already cut (in energy order)
                base = _interp(curve, done)
                best = None
                for d, _ in curve:
                    if d <= done or d >= len(order):
                        continue
                    dk = max(_interp(curve, d) - base, 0.0)
                    ratio = dk / (s.mlp_params(n_ff) - s.mlp_params(len(order) - d))
                    if best is None or ratio < best[0]:
                        best = (ratio, "width", i, _interp(curve, d), d)
                if best:
                    out.append(best)
        return sorted(out)

    opts = options()
    if not opts and not any(w.alive(i) and i not in protected for i in range(s.n_layer)):
        return [f"the budget cannot be met: every layer left is protected (protect_first={o.protect_first}, "
                f"protect_last={o.protect_last} of {s.n_layer} layers)"]
    if not opts:
        return ["the budget needs layer or sub-block KL scores, width scores or a greedy run in the scores"]
    while not met():
        opts = options()
        if not opts:
            break
        _, kind, i, kl, d = opts[0]
        if kind == "width":
            order = width[i][1]
            now = set(w.neurons.get(i, range(s.n_ff)))  # other neuron cuts (e.g. --prune-neurons) stay cut
            keep = tuple(sorted(int(j) for j in order[d:] if int(j) in now))
            w.neurons[i] = keep
            w.note(i, width_removed_by="budget/width-kl-per-param", neurons_kept=len(keep), width_kl=kl)
            continue
        {"layer": w.remove_layer, "attn": w.remove_attn, "mlp": w.remove_mlp}[kind](i)
        w.note(i, **{f"{kind}_removed_by": "budget/kl-per-param", f"{kind}_kl": kl})
    return [] if met() else ["the budget cannot be met without cutting protected layers"]


def _interp(curve: list[tuple[int, float]], d: int) -> float:
    """KL of a width cut of ``d`` neurons, linear between the measured points (and 0 at 0)."""
    xs = [0] + [c[0] for c in curve]
    ys = [0.0] + [c[1] for c in curve]
    return float(np.interp(d, xs, ys))


def _width_curves(scores: Mapping[str, Any], layers: Mapping[int, Mapping[str, Any]], o: PlanOptions,
                  stats_loader) -> dict[int, tuple[list[tuple[int, float]], np.ndarray]]:
    """layer → (measured (removed neurons, KL) points, live neurons in energy order)."""
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
        if not kls or f"energy.{i}" not in stats:
            continue
        curve = [(int(d), float(k)) for d, k in zip(wd["drops"], kls) if k is not None]
        if not curve:
            continue
        # the order the scores measured: live neurons of the base plan, least energy first
        order = energy_order(stats[f"energy.{i}"], base_plan.layers[i].kept_neurons(s) if base_plan else None)
        out[i] = (curve, order)
    return out


def _head_counts(s: ModelShape, heads: tuple[int, ...] | None) -> tuple[int, int]:
    """(query heads, KV groups) kept, for attn_params."""
    if heads is None:
        return s.n_head, s.n_head_kv
    return len(heads), len({h // s.group_size for h in heads})


# ------------------------------------------------------------------- explain


def explain(plan: Plan) -> str:
    """A table of what goes and why, with parameter counts before and after."""
    s = plan.shape
    rows = [("layer", "status", "heads", "kv", "n_ff", "params", "→ after", "why")]
    tot_b = tot_a = 0
    for lp in plan.layers:
        before = s.layer_params()
        heads = lp.kept_heads(s)
        kv = lp.kept_kv_groups(s)
        ff = len(lp.kept_neurons(s))
        if lp.removed:
            status, after = "removed", 0
            if lp.patch is not None:
                status, after = f"removed, {lp.patch} patch", s.patch_params()
        else:
            after = s.attn_params(len(heads), len(kv)) + s.mlp_params(ff)
            parts = []
            if lp.attention_removed and lp.patch is not None:
                parts.append(f"attn → {lp.patch} patch")
                after += s.patch_params()
            elif lp.attention_removed:
                parts.append("attn removed")
            elif lp.heads is not None:
                parts.append(f"heads {ranges(heads)}")
            if lp.mlp_removed:
                parts.append("mlp removed")
            elif lp.neurons is not None:
                parts.append(f"ffn {ff}/{s.n_ff}")
            status = ", ".join(parts) or "kept"
        tot_b += before
        tot_a += after
        why = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(lp.why.items()))
        rows.append((str(lp.index), status, f"{len(heads)}/{s.n_head}", f"{len(kv)}/{s.n_head_kv}",
                     f"{ff}/{s.n_ff}", _human(before), _human(after), why))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(len(widths))) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * (sum(widths) + 2 * len(widths) + 3))
    pred = plan.predicted or predict(plan)
    lines.append("")
    lines.append(f"block parameters: {_human(tot_b)} → {_human(tot_a)} "
                 f"({100 * (1 - tot_a / tot_b):.1f}% removed); {len(plan.kept_layers())}/{s.n_layer} layers kept")
    out_arch, why = plan.output_architecture()
    lines.append(f"output architecture: {out_arch or 'none'} ({why})")
    patches = plan.patches()
    if patches:
        lines.append(f"{len(patches)} {patches[0].patch} patch{'es' if len(patches) > 1 else ''} "
                     f"(layers {ranges(lp.index for lp in patches)}): {_human(s.patch_params())} parameters each "
                     f"(n_embd² + attn_norm), {_human(len(patches) * s.patch_params())} in all, counted above; "
                     "weights from `gguf-prune recover`")
    if "size_bytes_estimate_after" in pred:
        lines.append(f"predicted {pred.get('quant', '')} size: {pred['size_bytes_estimate_before'] / 1e6:.1f} MB → "
                     f"{pred['size_bytes_estimate_after'] / 1e6:.1f} MB (estimate)")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def revived(before: Plan, after: Plan) -> list[str]:
    """What ``after`` keeps that ``before`` removed (a layer, an attention or MLP sub-block, a head, a
    neuron), one line each; [] when ``after`` only cuts more. Patches are ignored: they stand in for
    removed parts, they do not keep them."""
    s = before.shape
    out = []
    for b, a in zip(before.layers, after.layers):
        i = b.index
        if b.removed:
            if not a.removed:
                out.append(f"layer {i} is removed before and kept after")
            continue
        if a.removed:
            continue
        back_h = sorted(set(a.kept_heads(s)) - set(b.kept_heads(s)))
        if b.attention_removed and back_h:
            out.append(f"layer {i}: attention removed before and kept after")
        elif back_h:
            out.append(f"layer {i}: query heads {ranges(back_h)} removed before and kept after")
        back_n = sorted(set(a.kept_neurons(s)) - set(b.kept_neurons(s)))
        if b.mlp_removed and back_n:
            out.append(f"layer {i}: MLP removed before and kept after")
        elif back_n:
            out.append(f"layer {i}: {len(back_n)} MLP neuron(s) removed before and kept after")
    return out


def make_plan(scores_path: Path, out: Path, options: PlanOptions) -> Plan:
    """Read scores.json, build the plan, write plan.json (atomically) and return it."""
    scores_path = Path(scores_path)
    try:
        scores = scores_io.load(scores_path)
    except scores_io.ScoresError as e:
        raise PlanError([str(e)], "plan request") from None
    plan = build_plan(scores, options, scores_path)
    plan.save(out)
    log.info("wrote %s: %.1f%% of block parameters removed", out, 100 * plan.removed_fraction())
    return plan


