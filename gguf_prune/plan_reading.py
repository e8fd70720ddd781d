"""Reading plan.json: its JSON form → :class:`~gguf_prune.plan.Plan`, every problem of structure and type
collected into one PlanError (:func:`gguf_prune.plan.validate` checks the plan against a model afterwards).

A misspelt key, a string where a number belongs, a removed layer that still lists heads: each is named with
where it is and what was expected, so that a hand-edited plan can be fixed in one pass.
"""

from __future__ import annotations

from typing import Any, Mapping

from gguf_prune.plan import PATCH_KINDS, PLAN_SCHEMA, PLAN_VERSION, LayerPlan, ModelShape, Plan, PlanError
from gguf_prune.values import is_int, kind, show

_PLAN_KEYS = ("schema", "version", "model", "settings", "predicted", "layers")
_MODEL_KEYS = ("fingerprint", "shape", "gguf")
_LAYER_KEYS = ("index", "removed", "heads", "neurons", "patch", "why")
_LAYER_EXAMPLE = '{"index": N, "removed": true} or {"index": N, "heads": [...]|null, "neurons": [...]|null}'
# Bounds far above any real model that keep a damaged plan from asking for absurd work (a tuple of
# n_ff neurons is built per layer); 512 layers is llama.cpp's own LLAMA_MAX_LAYERS.
SHAPE_LIMITS = {"n_layer": 512, "n_embd": 1 << 20, "n_head": 1 << 16, "n_head_kv": 1 << 16, "head_dim": 1 << 16,
                "n_ff": 1 << 20, "n_vocab": 1 << 24}


def plan_from_dict(d: Any, source: str = "plan") -> Plan:
    """A plan from its JSON form (:meth:`Plan.from_dict`)."""
    if not isinstance(d, Mapping):
        raise PlanError([f"the plan is {kind(d)}, expected a JSON object (a plan.json that "
                         "`gguf-prune plan` wrote)"], source)
    if d.get("schema") != PLAN_SCHEMA:
        raise PlanError([f"'schema' is {kind(d.get('schema'))}, expected {PLAN_SCHEMA!r}: not a gguf-prune plan"],
                        source)
    if not is_int(d.get("version")) or d.get("version") != PLAN_VERSION:
        raise PlanError([f"'version' is {kind(d.get('version'))}; this gguf-prune reads version {PLAN_VERSION}"],
                        source)
    p: list[str] = []
    _unknown_keys(d, _PLAN_KEYS, "the plan", p)
    model = d.get("model")
    shape = None
    if not isinstance(model, Mapping):
        p.append(f"'model' is {kind(model)}, expected an object "
                 '{"fingerprint": "...", "shape": {...}}')
    else:
        _unknown_keys(model, _MODEL_KEYS, "'model'", p)
        for key in ("fingerprint", "gguf"):
            if not isinstance(model.get(key, ""), str):
                p.append(f"'model.{key}' is {kind(model[key])}, expected a string")
        shape = shape_from_dict(model.get("shape"), p)
    layers = []
    entries = d.get("layers")
    if not isinstance(entries, list):
        p.append(f"'layers' is {kind(entries)}, expected an array with one entry per source layer")
    else:
        for k, entry in enumerate(entries):
            lp = _layer_from_dict(entry, f"layers[{k}]", p)
            if lp is not None:
                layers.append(lp)
    for key in ("settings", "predicted"):
        if d.get(key) is not None and not isinstance(d[key], Mapping):
            p.append(f"'{key}' is {kind(d[key])}, expected an object")
    if p:
        raise PlanError(p, source)
    return Plan(shape=shape, layers=tuple(layers), fingerprint=model.get("fingerprint", ""),
               gguf=model.get("gguf", ""),
               settings=dict(d.get("settings") or {}), predicted=dict(d.get("predicted") or {}))


def _unknown_keys(d: Mapping, known: tuple[str, ...], where: str, p: list[str]) -> None:
    """A misspelt or misplaced key would be ignored and the cut silently differ: refuse it."""
    extra = [k for k in d if k not in known]
    if extra:
        p.append(f"{where} has unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(show, extra))} "
                 f"(known: {', '.join(known)})")


def shape_from_dict(d: Any, p: list[str]) -> ModelShape | None:
    """``model.shape`` of plan.json (scores.json carries the same shape: one check for both files); None, with
    the problems added to ``p``, when it is not a valid shape."""
    fields = tuple(ModelShape.__dataclass_fields__)
    if not isinstance(d, Mapping):
        p.append(f"'model.shape' is {kind(d)}, expected an object with {', '.join(fields)}")
        return None
    n = len(p)
    _unknown_keys(d, fields, "'model.shape'", p)
    missing = [f for f in fields if f not in d]
    if missing:
        p.append(f"'model.shape' lacks {', '.join(missing)}")
    if "architecture" in d and not isinstance(d["architecture"], str):
        p.append(f"'model.shape.architecture' is {kind(d['architecture'])}, expected a string such as 'llama'")
    for f, top in SHAPE_LIMITS.items():
        if f in d and not (is_int(d[f]) and 1 <= d[f] <= top):
            p.append(f"'model.shape.{f}' is {kind(d[f])}, expected an integer from 1 to {top}")
    if len(p) > n:
        return None
    if d["n_head"] % d["n_head_kv"]:
        p.append(f"'model.shape': n_head {d['n_head']} is not a multiple of n_head_kv {d['n_head_kv']}")
        return None
    return ModelShape(**{f: d[f] for f in fields})


def _layer_from_dict(e: Any, where: str, p: list[str]) -> LayerPlan | None:
    if not isinstance(e, Mapping):
        p.append(f"{where} is {kind(e)}, expected {_LAYER_EXAMPLE}")
        return None
    n = len(p)
    _unknown_keys(e, _LAYER_KEYS, where, p)
    if not is_int(e.get("index")):
        p.append(f"{where}.index is {kind(e.get('index'))}, expected the source layer's number")
    removed = e.get("removed", False)
    if not isinstance(removed, bool):
        p.append(f"{where}.removed is {kind(removed)}, expected true or false")
    for key, unit in (("heads", "query heads"), ("neurons", "FFN neurons")):
        v = e.get(key)
        if v is not None and not isinstance(v, list):
            p.append(f"{where}.{key} is {kind(v)}, expected null (all kept) or an array of the numbers of the "
                     f"kept {unit} ([] removes them all)")
        elif v is not None and not all(is_int(x) for x in v):
            i = next(i for i, x in enumerate(v) if not is_int(x))
            p.append(f"{where}.{key}[{i}] is {kind(v[i])}, expected the number of one of the kept {unit}")
        elif v is not None and removed is True:
            p.append(f"{where} is removed, so it cannot keep {unit}: drop {key!r} or 'removed'")
    if e.get("patch") is not None and not isinstance(e["patch"], str):
        p.append(f"{where}.patch is {kind(e['patch'])}, expected null or one of: {', '.join(PATCH_KINDS)}")
    if e.get("why") is not None and not isinstance(e["why"], Mapping):
        p.append(f"{where}.why is {kind(e['why'])}, expected an object (the scores behind the choice)")
    if len(p) > n:
        return None
    heads, neurons = e.get("heads"), e.get("neurons")
    return LayerPlan(index=e["index"], removed=removed,
                     heads=None if heads is None or removed else tuple(heads),
                     neurons=None if neurons is None or removed else tuple(neurons),
                     why=dict(e.get("why") or {}), patch=e.get("patch"))
