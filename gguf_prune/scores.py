"""scores.json: what scoring measured, the contract between `score` and `plan`.

A versioned JSON document (sorted keys, no NaN: a score that was not measured is
``null``) plus a side file ``<name>.neurons.safetensors`` with per-neuron
statistics (``freq.{layer}``, ``mean_abs.{layer}``, ``wxa.{layer}``, ``energy.{layer}``,
each (n_ff,) float32, layer = source index; energy = ‖down column‖²·mean a², the neuron's
mean squared contribution to the residual stream, is the order width cuts follow). Layout::

    {"schema": "gguf-prune/scores", "version": 1,
     "model": {"fingerprint", "shape", "path"},
     "calibration": {"fingerprint", "source", "kind", "n_seq", "seq_len", "n_tokens", "seed"},
     "settings": {...}, "base_plan": null | {"digest", "path", "plan", "kl", "nll", "ppl"},
     "full": {"nll", "ppl"},
     "layers": [{"index", "removed", "bi", "kl", "ppl", "attn_kl", "mlp_kl", "attn_bi", "mlp_bi",
                 "width_kl" (only with width scores), "width_kl_repaired" (only with score --repair)}, ...],
     "width": null | {"drops": [d, ...], "order": "energy", "align"}: width_kl[k] is the KL with the
              d_k lowest-energy live neurons of that layer's MLP zeroed (absent in older files);
              with score --repair also "repair": {"alpha", "cross_fitted"}, and width_kl_repaired[k] is the KL of
              the same cut with its closed-form repair,
     "heads": null | {"layers", "kl", "kv_kl", "norm", "taylor"},
     "neurons": null | {"file", "tau", "stats", "layers"},
     "greedy": null | {"units", "by", "steps": [{"kind", "layer", "kl", "delta_kl", "params_removed", "candidates"}]},
     "timing": {"seconds": {...}, "layer_evals": int}}

A streamed run (``score --stream``) adds ``"stream"``: passes over the weights and why, bytes read, the
memory budget. A run of one slice of the ablation units (``score --units K/N``) is written with schema
``gguf-prune/scores-slice`` and a ``"units"`` entry ({"spec", "layers"}); its unit scores outside its
layers are null, so nothing but ``score --merge`` reads it.

All KLs are KL(reference ‖ variant) in nats per real calibration token, where the
reference is the unpruned model (also when a base plan was applied: then every
variant includes the base plan's cuts, and ``base_plan.kl`` is the plan alone).

Every scorer (in memory, streamed, the iterative pipeline's per-round one) builds its document with
:func:`document`, :func:`layer_entry` and their helpers here, next to :func:`save` and :func:`validate`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from gguf_prune.plan import ModelShape
from gguf_prune.plan_reading import shape_from_dict
from gguf_prune.values import is_int, python_kind
from gguf_prune.atomic import save_tensors_atomic, write_text_atomic
from gguf_prune.errors import GgufPruneError

if TYPE_CHECKING:
    import numpy as np

SCORES_SCHEMA = "gguf-prune/scores"
SLICE_SCHEMA = "gguf-prune/scores-slice"  # one --units slice: only `score --merge` reads it
SCORES_VERSION = 1
NEURON_STATS = ("freq", "mean_abs", "wxa", "energy")
LAYER_KEYS = ("index", "removed", "bi", "kl", "ppl", "attn_kl", "mlp_kl", "attn_bi", "mlp_bi")
STEP_KEYS = ("kind", "layer", "kl", "delta_kl", "params_removed", "candidates")
TOP_KEYS = ("model", "calibration", "settings", "base_plan", "full", "layers", "heads", "neurons", "greedy", "timing")


class ScoresError(GgufPruneError, ValueError):
    """A scores file that cannot be used: what is wrong and what to do."""


def clean(x: Any) -> Any:
    """JSON-ready copy: NaN/inf → None, numpy scalars → Python numbers, tuples → lists."""
    if isinstance(x, Mapping):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy scalar or array
        return clean(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def neurons_file_name(scores_path: Path) -> str:
    p = Path(scores_path)
    stem = p.name[:-len(".json")] if p.name.endswith(".json") else p.name
    return f"{stem}.neurons.safetensors"


def save(path: Path, scores: Mapping[str, Any]) -> Path:
    """Validate and write ``scores`` atomically as sorted JSON."""
    path = Path(path)
    d = clean(scores)
    validate(d, source=str(path), allow_slice=d.get("schema") == SLICE_SCHEMA)
    write_text_atomic(path, json.dumps(d, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


def load(path: Path, allow_slice: bool = False) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScoresError(f"{path}: no such scores file; run `gguf-prune score HF_DIR -o {path}` first") from None
    except json.JSONDecodeError as e:
        raise ScoresError(f"{path} is not valid JSON ({e}); re-run `gguf-prune score`") from None
    return validate(d, source=str(path), allow_slice=allow_slice)


def validate(d: Any, source: str = "scores", allow_slice: bool = False) -> dict:
    """Check the structure; raise one ScoresError naming every problem."""
    _check_header(d, source, allow_slice)
    p: list[str] = [f"missing key {k!r}" for k in TOP_KEYS if k not in d]
    if p:
        raise ScoresError(f"{source} is malformed: " + "; ".join(p))
    _entry_kinds(d, p)
    if p:
        raise ScoresError(f"{source} is malformed: " + "; ".join(p))
    shape = shape_from_dict(d["model"].get("shape"), p)
    if shape is None:
        raise ScoresError(f"{source} is malformed: " + "; ".join(p))
    if not d["model"].get("fingerprint"):
        p.append("'model.fingerprint' is empty")
    _layers_problems(d["layers"], shape, p)
    if d["heads"] is not None:
        _heads_problems(d["heads"], shape, p)
    if d["neurons"] is not None:
        _neurons_problems(d["neurons"], p)
    if d["greedy"] is not None:
        for k, st in enumerate(d["greedy"].get("steps", [])):
            missing = [key for key in STEP_KEYS if key not in st]
            if missing:
                p.append(f"greedy.steps[{k}] lacks {', '.join(missing)}")
    if p:
        raise ScoresError(f"{source} is malformed ({len(p)} problem{'s' if len(p) != 1 else ''}):\n  - "
                          + "\n  - ".join(p))
    return dict(d)


def _check_header(d: Any, source: str, allow_slice: bool) -> None:
    """A JSON object of this schema (a slice only where allowed, and then with its units) and version."""
    if not isinstance(d, Mapping):
        raise ScoresError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if d.get("schema") == SLICE_SCHEMA and not allow_slice:
        u = d.get("units") or {}
        raise ScoresError(f"{source} is one slice (--units {u.get('spec')}) of a split scoring run; join the "
                          "slices with `gguf-prune score --merge a.json b.json ... -o scores.json`")
    if d.get("schema") == SLICE_SCHEMA and not (isinstance(d.get("units"), Mapping) and "layers" in d["units"]):
        raise ScoresError(f"{source}: a scores slice without its 'units' entry; re-run `gguf-prune score --units`")
    if d.get("schema") not in ((SCORES_SCHEMA, SLICE_SCHEMA) if allow_slice else (SCORES_SCHEMA,)):
        raise ScoresError(f"{source}: 'schema' is {d.get('schema')!r}, expected {SCORES_SCHEMA!r}: "
                          "not a gguf-prune scores file")
    if d.get("version") != SCORES_VERSION:
        raise ScoresError(f"{source}: 'version' is {d.get('version')!r}; this gguf-prune reads version "
                          f"{SCORES_VERSION}: re-run `gguf-prune score`")


def _entry_kinds(d: Mapping[str, Any], p: list[str]) -> None:
    """The top-level entries are objects (or null where a measurement is optional)."""
    for key in ("model", "calibration", "settings", "full", "timing"):
        if not isinstance(d[key], Mapping):
            p.append(f"{key!r} is {python_kind(d[key])}, expected an object")
    bp = d["base_plan"]
    if bp is not None and not (isinstance(bp, Mapping) and isinstance(bp.get("plan"), Mapping)):
        p.append(f"'base_plan' is {python_kind(bp)}, expected null or an object with the 'plan' scored on top of")
    for key in ("heads", "neurons", "greedy"):
        if d[key] is not None and not isinstance(d[key], Mapping):
            p.append(f"{key!r} is {python_kind(d[key])}, expected an object or null")


def _layers_problems(layers: Any, shape: ModelShape, p: list[str]) -> None:
    """One entry per source layer, in source order, with every LAYER_KEYS key of the right type."""
    if not isinstance(layers, list) or len(layers) != shape.n_layer:
        p.append(f"'layers' must list all {shape.n_layer} source layers, got "
                 f"{len(layers) if isinstance(layers, list) else type(layers).__name__}")
        return
    for k, e in enumerate(layers):
        missing = [key for key in LAYER_KEYS if not isinstance(e, Mapping) or key not in e]
        if missing:
            p.append(f"layers[{k}] lacks {', '.join(missing)}")
        elif e["index"] != k or not is_int(e["index"]):
            p.append(f"layers[{k}] has index {e['index']!r}; layers must be in source order")
        else:
            _layer_types(e, f"layers[{k}]", p)


def _heads_problems(heads: Mapping[str, Any], shape: ModelShape, p: list[str]) -> None:
    """heads.layers are layer numbers; every per-head list has one number (or null) per head or KV group."""
    hl = heads.get("layers", [])
    if not isinstance(hl, list) or not all(is_int(i) and 0 <= i < shape.n_layer for i in hl):
        p.append(f"heads.layers is {python_kind(hl)}, expected a list of layer numbers 0..{shape.n_layer - 1}")
        hl = []
    for key, n in (("kl", shape.n_head), ("kv_kl", shape.n_head_kv), ("norm", shape.n_head),
                   ("taylor", shape.n_head)):
        per_layer = heads.get(key)
        if per_layer is None and key in ("norm", "taylor"):
            continue  # not measured
        if not isinstance(per_layer, Mapping):
            p.append(f"heads.{key} is {python_kind(per_layer)}, expected an object of per-layer lists")
            continue
        for i in hl:
            vals = per_layer.get(str(i))
            if not isinstance(vals, list) or len(vals) != n or not all(
                    v is None or _is_number(v, nan_ok=True) for v in vals):  # null: a head already removed
                p.append(f"heads.{key}[{i}] must be a list of {n} numbers (null for a removed head)")


def _neurons_problems(nd: Mapping[str, Any], p: list[str]) -> None:
    """The neurons entry names its side file, tau and statistics."""
    for key in ("file", "tau", "stats"):
        if key not in nd:
            p.append(f"neurons lacks {key!r}")
    if not isinstance(nd.get("file", ""), str) or not nd.get("file", "x"):
        p.append(f"neurons.file is {python_kind(nd.get('file'))}, expected the side file's name")
    if not _is_number(nd.get("tau", 0.0)):
        p.append(f"neurons.tau is {python_kind(nd.get('tau'))}, expected a number")
    if not (isinstance(nd.get("stats", []), list) and all(isinstance(x, str) for x in nd.get("stats", []))):
        p.append(f"neurons.stats is {python_kind(nd.get('stats'))}, expected a list of statistic names")


_METRICS = ("bi", "kl", "ppl", "attn_kl", "mlp_kl", "attn_bi", "mlp_bi")


def _is_number(v: Any, nan_ok: bool = False) -> bool:
    """A JSON number (not a bool); NaN only where a measurement marks a removed unit."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (nan_ok or math.isfinite(v))


def _layer_types(e: Mapping[str, Any], where: str, p: list[str]) -> None:
    """The value types of one layer entry: what the planner does arithmetic with."""
    if not isinstance(e["removed"], bool):
        p.append(f"{where}.removed is {python_kind(e['removed'])}, expected true or false")
    for key in _METRICS:
        v = e.get(key)
        if v is not None and not _is_number(v, nan_ok=True):
            p.append(f"{where}.{key} is {python_kind(v)}, expected a number or null")
    for key in ("width_kl", "width_kl_repaired"):
        w = e.get(key)
        if key in e and not (isinstance(w, list) and all(v is None or _is_number(v, nan_ok=True) for v in w)):
            p.append(f"{where}.{key} is {python_kind(w)}, expected a list of numbers, one per --width level")


# ----------------------------------------------------------------------------- building a document
# The one place that spells out a scores document: the in-memory scorer, the streamed scorer and the iterative
# pipeline's per-round scorer all build theirs here, so the three cannot drift apart.


def per_token(total: Any, n_real: int) -> float | None:
    """A sum over the real calibration tokens as a per-token mean; None for a unit not measured (None, NaN)."""
    return None if total is None or not math.isfinite(total) else float(total) / n_real


def layer_entry(index: int, *, removed: bool = False, bi: float | None = None, kl: float | None = None,
                ppl: float | None = None, attn_kl: float | None = None, mlp_kl: float | None = None,
                attn_bi: float | None = None, mlp_bi: float | None = None,
                width_kl: list | None = None, width_kl_repaired: list | None = None) -> dict:
    """One ``layers`` entry: every LAYER_KEYS key (a removed layer: all scores null), and ``width_kl`` only when
    width scores were measured (older files have none), ``width_kl_repaired`` only when they were measured
    with their repair too (``score --repair``)."""
    e = {"index": index, "removed": removed, "bi": bi, "kl": kl, "ppl": ppl, "attn_kl": attn_kl, "mlp_kl": mlp_kl,
         "attn_bi": attn_bi, "mlp_bi": mlp_bi}
    if width_kl is not None:
        e["width_kl"] = width_kl
    if width_kl_repaired is not None:
        e["width_kl_repaired"] = width_kl_repaired
    return e


def save_neurons(scores_path: Path, tensors: Mapping[str, Any], tau: float, n_tokens: int) -> dict:
    """Write the neuron side file next to ``scores_path`` (see neuron_tensors); its ``neurons`` entry."""
    name = neurons_file_name(scores_path)
    save_tensors_atomic(Path(scores_path).parent / name, tensors, {"tau": str(tau), "n_tokens": str(n_tokens)})
    return neurons_entry(name, tau, tensors)


def neurons_entry(file_name: str, tau: float, tensors: Mapping[str, Any]) -> dict:
    """The ``neurons`` entry for a side file named ``file_name`` holding ``tensors`` (see neuron_tensors)."""
    return {"file": file_name, "tau": tau, "stats": list(NEURON_STATS),
            "layers": sorted(int(k.split(".")[1]) for k in tensors if k.startswith("freq."))}


def base_plan_entry(plan: Any, path: str | None, kl: float, nll: float) -> dict:
    """The ``base_plan`` entry: the plan scored on top of (a gguf_prune.plan.Plan), its KL and NLL alone."""
    return {"digest": plan.digest(), "path": path, "plan": plan.to_dict(), "kl": kl, "nll": nll, "ppl": math.exp(nll)}


def document(*, fingerprint: str, shape: ModelShape, model_path: Path, calibration: Mapping[str, Any],
             settings: Mapping[str, Any], full_nll: float, layers: list, seconds: Mapping[str, float],
             layer_evals: int, base_plan: dict | None = None, heads: dict | None = None,
             neurons: dict | None = None, greedy: dict | None = None, width: dict | None = None,
             stream: dict | None = None, units: dict | None = None) -> dict:
    """A whole scores document, ready for :func:`save`. ``width``, ``stream`` and ``units`` are written only when
    given; ``units`` ({"spec", "layers"}) makes it a slice (SLICE_SCHEMA) that only ``score --merge`` reads."""
    doc = {
        "schema": SLICE_SCHEMA if units is not None else SCORES_SCHEMA, "version": SCORES_VERSION,
        "model": {"fingerprint": fingerprint, "shape": shape.to_dict(), "path": str(model_path)},
        "calibration": calibration, "settings": settings, "base_plan": base_plan,
        "full": {"nll": full_nll, "ppl": math.exp(full_nll)},
        "layers": layers, "heads": heads, "neurons": neurons, "greedy": greedy,
        "timing": {"seconds": seconds, "layer_evals": layer_evals},
    }
    for key, value in (("width", width), ("stream", stream), ("units", units)):
        if value is not None:
            doc[key] = value
    return doc


def shape_of(d: Mapping[str, Any]) -> ModelShape:
    return ModelShape(**d["model"]["shape"])


def check_model(d: Mapping[str, Any], fingerprint: str, shape: ModelShape | None = None,
                source: str = "scores") -> None:
    """Raise ScoresError unless the scores were measured on the checkpoint with this fingerprint (and shape)."""
    got = d["model"].get("fingerprint")
    if shape is not None and shape_of(d) != shape:
        s = shape_of(d)
        diffs = [f"{k} {getattr(s, k)} in the scores vs {getattr(shape, k)} in the model"
                 for k in s.__dataclass_fields__ if getattr(s, k) != getattr(shape, k)]
        raise ScoresError(f"{source} were measured on another model: {', '.join(diffs)}; "
                          "re-run `gguf-prune score` on this checkpoint")
    if got != fingerprint:
        raise ScoresError(f"{source} were measured on another checkpoint: fingerprint {got} in the scores, "
                          f"{fingerprint} for this one; re-run `gguf-prune score` on this checkpoint")


def neuron_tensors(sources, ff_count: Mapping, ff_abs: Mapping, ff_sq: Mapping, col_norm: Mapping,
                   n_real: int) -> dict:
    """The side file's arrays for source layers ``sources`` (``(source, key)`` pairs; the dicts are keyed by
    ``key``: a position or a source index), skipping layers without statistics (MLP removed)."""
    import numpy as np
    import torch

    out = {}
    for s, k in sources:
        if k not in ff_count:
            continue
        mean_abs = ff_abs[k] / n_real
        cn = np.asarray(col_norm[k], dtype=np.float64)
        out[f"freq.{s}"] = torch.from_numpy((ff_count[k] / n_real).astype(np.float32))
        out[f"mean_abs.{s}"] = torch.from_numpy(mean_abs.astype(np.float32))
        out[f"wxa.{s}"] = torch.from_numpy((cn * mean_abs).astype(np.float32))
        out[f"energy.{s}"] = torch.from_numpy(neuron_energy(cn, ff_sq[k], n_real).astype(np.float32))
    return out


def neuron_energy(col_norm, ff_sq, n_real: int):
    """‖down_proj column‖² · mean a²: each neuron's mean squared contribution to the residual stream."""
    import numpy as np

    return np.asarray(col_norm, dtype=np.float64) ** 2 * np.asarray(ff_sq, dtype=np.float64) / n_real


def energy_order(energy, live=None) -> "np.ndarray":
    """Live neurons (``live``; None: all) from the least to the most energy; ties by index."""
    import numpy as np

    order = np.argsort(np.asarray(energy, dtype=np.float64), kind="stable")
    if live is None:
        return order.astype(np.int64)
    keep = set(int(j) for j in live)
    return np.array([int(j) for j in order if int(j) in keep], dtype=np.int64)


def load_neurons(scores_path: Path, d: Mapping[str, Any] | None = None) -> dict:
    """The per-neuron statistics: {"freq": {layer: array}, "mean_abs": {...}, "wxa": {...}}."""
    from safetensors.numpy import load_file

    scores_path = Path(scores_path)
    d = d if d is not None else load(scores_path)
    if d["neurons"] is None:
        raise ScoresError(f"{scores_path} has no neuron statistics; re-run `gguf-prune score` without --no-neurons")
    f = scores_path.parent / d["neurons"]["file"]
    if not f.exists():
        raise ScoresError(f"{f} is missing: it is written next to {scores_path.name}; copy both files together")
    raw = load_file(str(f))
    out: dict[str, dict[int, Any]] = {s: {} for s in NEURON_STATS}
    for name, arr in raw.items():
        stat, _, layer = name.rpartition(".")
        if stat in out:
            out[stat][int(layer)] = arr
    return out
