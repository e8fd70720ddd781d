"""cost.json: what llama.cpp spends per token on each part of a model on this machine, and the speed-up a plan
is predicted to give.

``gguf-prune cost`` (:mod:`gguf_prune.runtime.cost`) times a few synthetic variants of the base model with
llama-bench and fits, for each speed metric and context depth (``tg@0``, ``pp@512``, ...), the seconds per token
as a linear function of what the pruned file makes llama.cpp compute:

========== ===========================================================================================
const      the per-token cost outside the layers (embedding lookup, output norm, the vocabulary matmul)
layers     per written layer: norms, residual adds, kernel launches (what counting parameters misses)
attn       per layer that keeps an attention: the attention's fixed part (softmax, RoPE, the KV-cache write)
q_heads    per query head kept: its q and output projections and its share of attention over the cache
kv_heads   per KV group kept: its k and v projections and the cache it reads
ff         per FFN neuron kept: one row of gate and up and one column of down (a linear patch counts as
           n_embd / 3 neurons: it is one n_embd × n_embd matrix)
========== ===========================================================================================

:func:`features` counts these for a plan from what the rewriter writes (``writing/jobs.layer_cuts``: a removed
MLP stays as a width-1 zero FFN, an attention removed in the first written layer as one inert head, a patch as
deci's linear attention), so the same function prices the measured variants and every plan.

A cost.json describes one model shape (the architecture and its dimensions, which alone decide the cost), one
quantization type and one thread count; :func:`check` refuses it for anything else.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from gguf_prune.atomic import write_text_atomic
from gguf_prune.errors import GgufPruneError
from gguf_prune.plan import LayerPlan, ModelShape, Plan
from gguf_prune.values import is_int, is_real

SCHEMA = "gguf-prune/cost"
VERSION = 1
FEATURES = ("const", "layers", "attn", "q_heads", "kv_heads", "ff")
SPEED_METRICS = ("tg", "pp")  # generation, prompt processing (llama-bench -n / -p)


class CostError(GgufPruneError):
    """A cost.json that is missing, damaged, or measured for another model, thread count or depth."""


def speed_option_problems(target: Any, metric: Any, depth: Any) -> list[str]:
    """--target-speedup, --speed-metric and --speed-depth out of range (plan and run share them)."""
    p = []
    if target is not None and (not is_real(target, numpy=True) or not 1 < target < 1e6):
        p.append(f"--target-speedup {target!r}: must be a number above 1 (1.3: 30% more tokens/s than the base)")
    if metric not in SPEED_METRICS:
        p.append(f"--speed-metric {metric!r}: must be one of {', '.join(SPEED_METRICS)} (generation, prompt "
                 "processing)")
    if not is_int(depth, numpy=True) or depth < 0:
        p.append(f"--speed-depth {depth!r}: must be a whole number of tokens, 0 or more")
    return p


def key(metric: str, depth: int) -> str:
    """The fit's name for ``metric`` at context ``depth``: ``tg@0``, ``pp@512``."""
    return f"{metric}@{int(depth)}"


def uncut(shape: ModelShape) -> Plan:
    """The plan that cuts nothing: the base model."""
    return Plan(shape=shape, layers=tuple(LayerPlan(i) for i in range(shape.n_layer)))


def features(plan: Plan) -> dict[str, float]:
    """What llama.cpp computes per token for the file ``plan`` writes, as the counts of :data:`FEATURES`."""
    return layer_features(plan.shape, plan.layers)


def layer_features(s: ModelShape, layers: Sequence[LayerPlan]) -> dict[str, float]:
    """:func:`features` of a plan's ``layers`` (a plan under construction has no Plan yet)."""
    f = dict.fromkeys(FEATURES, 0.0)
    f["const"] = 1.0
    patch_ff = s.n_embd / 3  # one n_embd × n_embd matrix, in FFN neurons (3 × n_embd weights each)
    first = True
    for lp in layers:
        if not lp.written:
            continue
        f["layers"] += 1
        if lp.removed:  # a patch in place of the layer: linear attention and a width-1 zero FFN
            f["ff"] += patch_ff + 1
            first = False
            continue
        heads = lp.kept_heads(s)
        if heads:
            f["attn"] += 1
            f["q_heads"] += len(heads)
            f["kv_heads"] += len(lp.kept_kv_groups(s))
        elif lp.patch is not None:
            f["ff"] += patch_ff
        elif first:  # the rewriter writes one inert head there (llama.cpp reads the head size from it)
            f["attn"] += 1
            f["q_heads"] += 1
            f["kv_heads"] += 1
        f["ff"] += max(len(lp.kept_neurons(s)), 1)  # a removed MLP stays as one zero neuron
        first = False
    return f


def seconds_per_token(doc: Mapping[str, Any], plan: Plan, metric: str = "tg", depth: int = 0) -> float:
    """The fitted seconds per token of the model ``plan`` writes."""
    return seconds_of(fit_for(doc, metric, depth)["coef"], features(plan))


def seconds_of(coef: Mapping[str, float], f: Mapping[str, float]) -> float:
    """A fit's seconds per token for the feature counts ``f``."""
    return sum(float(coef[k]) * f[k] for k in FEATURES)


def speedup(doc: Mapping[str, Any], plan: Plan, metric: str = "tg", depth: int = 0) -> float:
    """Predicted tokens/s of the pruned model over the base's (both from the fit, so its bias cancels)."""
    return seconds_per_token(doc, uncut(plan.shape), metric, depth) / seconds_per_token(doc, plan, metric, depth)


def fit_for(doc: Mapping[str, Any], metric: str, depth: int) -> Mapping[str, Any]:
    """The fit of ``metric`` at ``depth``; CostError naming what the file has when it was not measured."""
    fits = doc.get("fits", {})
    k = key(metric, depth)
    if k not in fits:
        have = ", ".join(sorted(fits)) or "none"
        raise CostError(f"the cost file has no {metric} measurement at depth {depth} (it has: {have}); measure it "
                        f"with `gguf-prune cost BASE.gguf --depths {depth}`, or plan with --speed-metric / "
                        "--speed-depth it has")
    return fits[k]


def check(doc: Mapping[str, Any], shape: ModelShape, threads: int | None = None, quant: str | None = None,
          source: str = "cost.json") -> None:
    """Refuse a cost file measured for another model shape, thread count or quantization type."""
    problems = []
    have = ModelShape(**doc["model"]["shape"])
    if have != shape:
        diff = ", ".join(f"{k} {getattr(have, k)} ≠ {getattr(shape, k)}" for k in shape.to_dict()
                         if getattr(have, k) != getattr(shape, k))
        problems.append(f"it was measured for another model ({doc['model'].get('name', '?')}: {diff})")
    if threads is not None and int(doc["threads"]) != int(threads):
        problems.append(f"it was measured with {doc['threads']} threads, not {threads}")
    unquantized = str(quant).upper() == "NONE" and str(doc["quant"]).upper() in ("F16", "BF16", "F32")
    if quant is not None and str(doc["quant"]).upper() != str(quant).upper() and not unquantized:
        problems.append(f"it was measured on {doc['quant']} files, not {quant}")
    if problems:
        raise CostError(f"{source} does not fit: " + "; ".join(problems) + ". Measure this model with "
                        "`gguf-prune cost BASE.gguf -o cost.json` (with the same --threads and --quant)")


def validate(d: Any, source: str = "cost.json") -> dict:
    """Check the structure; one CostError naming every problem."""
    if not isinstance(d, dict):
        raise CostError(f"{source} is not a cost file (a JSON object is expected); write one with `gguf-prune cost`")
    p = []
    if d.get("schema") != SCHEMA:
        p.append(f"schema is {d.get('schema')!r}, not {SCHEMA!r}")
    if d.get("version") != VERSION:
        p.append(f"version {d.get('version')!r} is not {VERSION}")
    try:
        ModelShape(**d["model"]["shape"])
    except (KeyError, TypeError):
        p.append("model.shape is missing or incomplete")
    if not is_int(d.get("threads")) or d.get("threads") < 1:
        p.append(f"threads {d.get('threads')!r} is not a whole number ≥ 1")
    if not isinstance(d.get("quant"), str):
        p.append("quant is missing")
    fits = d.get("fits")
    if not isinstance(fits, dict) or not fits:
        p.append("fits is missing or empty")
    else:
        for k, fit in fits.items():
            coef = fit.get("coef") if isinstance(fit, dict) else None
            if not isinstance(coef, dict) or any(not is_real(coef.get(f)) or not math.isfinite(coef[f])
                                                 for f in FEATURES):
                p.append(f"fits.{k}.coef must give a finite number for each of {', '.join(FEATURES)}")
    if p:
        raise CostError(f"{source} is not a valid cost file: " + "; ".join(p) + "; measure it again with "
                        "`gguf-prune cost BASE.gguf -o cost.json`")
    return d


def load(path: Path) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CostError(f"{path}: no such cost file; measure one with `gguf-prune cost BASE.gguf -o {path}`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CostError(f"{path} is not valid JSON ({e}); measure it again with `gguf-prune cost`") from None
    return validate(d, source=str(path))


def save(path: Path, doc: Mapping[str, Any]) -> Path:
    """Validate and write ``doc`` atomically."""
    validate(dict(doc), source=str(path))
    write_text_atomic(Path(path), json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return Path(path)
