"""The recover directory: the hand-off from ``gguf-prune recover`` to ``prune --recovered DIR`` (and from one
round of iterative pruning to the next).

Layout::

    plan.json               the plan with its patches (``"patch": "linear"``)
    recovered.safetensors   recovered tensors, HF names of the *source* model:
                            model.layers.{i}.patch.weight (n_embd, n_embd) and, after
                            fine-tuning, the changed weights in their unsliced shapes
    recover.json            what was done, the figures, and the hashes that tie the
                            three files to each other and to the checkpoint (and, for a
                            round of iterative pruning, the ``start`` directory it went on from)

``recover.json`` is written last: a directory without it is not a recover directory. While fine-tuning
runs, its checkpoints live in ``.recover-state/``, removed when recovery completes.

This module owns the format: :func:`write_recovered` writes it, :func:`open_recovered` reads and checks it
(:func:`check_names` says whether recovered tensors fit a plan), :func:`load_recovered_model` builds the
PyTorch model a recovered GGUF must match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from gguf_prune.atomic import save_tensors_atomic, write_text_atomic
from gguf_prune.errors import GgufPruneError
from gguf_prune.models import checkpoint
from gguf_prune.models.tensors import ATTENTION_TENSORS, MLP_TENSORS, PATCH_NAME, PATCH_TENSOR, hf_shape, split_hf_name
from gguf_prune.plan import LayerPlan, ModelShape, Plan, validate

if TYPE_CHECKING:
    import torch

RECOVER_SCHEMA = "gguf-prune/recovered"
RECOVER_VERSION = 1
MANIFEST = "recover.json"
PLAN_FILE = "plan.json"
TENSORS = "recovered.safetensors"
STATE_DIR = ".recover-state"  # fine-tuning checkpoints, removed when recovery completes


class RecoverError(GgufPruneError, ValueError):
    """A recovery request, or a recover directory, that cannot be used: what, where, what to do."""


def _problem_list(problems: list[str]) -> str:
    """``(N problem[s]):`` and one indented line per problem."""
    return f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  - " + "\n  - ".join(problems)


# ----------------------------------------------------------------------------- checking tensors against a plan


def check_names(names: Mapping[str, tuple[int, ...]], plan: Plan, tied: bool | None = None) -> list[str]:
    """Problems with recovered tensors (name → shape) for ``plan``; [] when they fit."""
    by_index = {lp.index: lp for lp in plan.layers}
    problems = []
    for name, shape in sorted(names.items()):
        problem = _name_problem(name, tuple(shape), plan.shape, by_index, tied)
        if problem:
            problems.append(problem)
    for lp in plan.patches():
        if PATCH_NAME.format(lp.index) not in names:
            problems.append(f"layer {lp.index} has a {lp.patch} patch in the plan but "
                            f"{PATCH_NAME.format(lp.index)} is missing")
    return problems


def _name_problem(name: str, shape: tuple[int, ...], s: ModelShape, by_index: Mapping[int, LayerPlan],
                  tied: bool | None) -> str | None:
    """What is wrong with one recovered tensor for a plan's layers, or None when it fits."""
    layer, suffix = split_hf_name(name)
    want = hf_shape(name, s)
    if want is None:
        return f"{name}: not a tensor gguf-prune can write into a llama-family GGUF"
    if shape != want:
        return f"{name} has shape {shape}, the plan's model needs {want}"
    if layer is None:
        if name == "lm_head.weight" and tied:
            return (f"{name}: the model ties its output matrix to the embeddings; recover "
                    "model.embed_tokens.weight instead")
        return None
    lp = by_index.get(layer)
    if lp is None:
        return f"{name}: layer {layer} is outside the model's {s.n_layer} layers"
    if suffix == PATCH_TENSOR:
        return None if lp.patch is not None else f"{name} is a patch matrix, but the plan has no patch at layer {layer}"
    if lp.removed:
        return f"{name} belongs to layer {layer}, which the plan removes"
    # a patched attention keeps its input norm: the patch reads rmsnorm(h) with that gain
    if lp.attention_removed and (suffix in ATTENTION_TENSORS
                                 or (suffix == "input_layernorm.weight" and lp.patch is None)):
        return f"{name} belongs to the attention of layer {layer}, which the plan removes"
    if lp.mlp_removed and suffix in MLP_TENSORS:
        return f"{name} belongs to the MLP of layer {layer}, which the plan removes"
    return None


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Recovered:
    """An opened, checked recover directory."""

    path: Path
    plan: Plan  # with its patches
    manifest: dict
    shapes: dict  # HF name → shape (torch order)

    @property
    def tensors_path(self) -> Path:
        return self.path / TENSORS

    def weights(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every recovered tensor (float32), for cuts.apply_plan."""
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(self.tensors_path), device=str(device)).items()}


def open_recovered(path: Path, shape: ModelShape | None = None, fingerprint: str | None = None,
                   plan: Plan | None = None, tied: bool | None = None) -> Recovered:
    """Open a recover directory and check it against the checkpoint (shape, fingerprint) and ``plan``.

    ``plan`` may be the plan the directory was made from, with or without its patches: its cut must be
    the directory's. Raises RecoverError / PlanError naming what does not match.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    rec_plan = Plan.load(path / PLAN_FILE)
    problems = _mismatches(path, manifest, rec_plan, shape, fingerprint, plan)
    if problems:
        raise RecoverError(f"recover directory {path} does not fit {_problem_list(problems)}")
    validate(rec_plan, shape, fingerprint, source=str(path / PLAN_FILE))
    from safetensors import safe_open

    tpath = path / TENSORS
    with safe_open(str(tpath), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    bad = check_names(shapes, rec_plan, tied)
    if bad:
        raise RecoverError(f"{tpath} does not fit its plan {_problem_list(bad)}")
    return Recovered(path=path, plan=rec_plan, manifest=manifest, shapes=shapes)


def _read_manifest(path: Path) -> dict:
    """``recover.json`` of the directory ``path``, of this schema and version."""
    if not path.is_dir():
        raise RecoverError(f"{path} is not a directory; pass the directory `gguf-prune recover -o DIR` wrote")
    man_path = path / MANIFEST
    if not man_path.is_file():
        raise RecoverError(f"{path} has no {MANIFEST}: not a (complete) recover directory; run "
                           "`gguf-prune recover` (again) to make one")
    try:
        manifest = json.loads(man_path.read_text())
    except json.JSONDecodeError as e:
        raise RecoverError(f"{man_path} is not valid JSON: {e}") from None
    if manifest.get("schema") != RECOVER_SCHEMA or manifest.get("version") != RECOVER_VERSION:
        raise RecoverError(f"{man_path}: schema {manifest.get('schema')!r} version {manifest.get('version')!r}; "
                           f"this gguf-prune reads {RECOVER_SCHEMA!r} version {RECOVER_VERSION}")
    return manifest


def _mismatches(path: Path, manifest: dict, rec_plan: Plan, shape: ModelShape | None, fingerprint: str | None,
                plan: Plan | None) -> list[str]:
    """Every way the directory does not fit the checkpoint, the given plan, or its own manifest."""
    problems = []
    if fingerprint and manifest.get("model", {}).get("fingerprint") not in (None, "", fingerprint):
        problems.append(f"it was made from another checkpoint: fingerprint {manifest['model']['fingerprint']}, "
                        f"this checkpoint is {fingerprint}")
    if shape is not None and rec_plan.shape != shape:
        diffs = [f"{k} {getattr(rec_plan.shape, k)} vs {getattr(shape, k)}" for k in shape.__dataclass_fields__
                 if getattr(shape, k) != getattr(rec_plan.shape, k)]
        problems.append(f"its plan is for another model shape ({', '.join(diffs)})")
    if manifest.get("plan_digest") != rec_plan.digest():
        problems.append(f"{PLAN_FILE} (digest {rec_plan.digest()}) is not the plan {MANIFEST} records "
                        f"({manifest.get('plan_digest')}): it was edited after recovery")
    if plan is not None:
        if plan.without_patches().digest() != rec_plan.without_patches().digest():
            diff = [lp.index for lp, rp in zip(plan.layers, rec_plan.layers)
                    if replace(lp, patch=None, why={}) != replace(rp, patch=None, why={})]
            problems.append("it was made for another plan: the cuts differ"
                            + (f" at layers {diff}" if diff else "") + "; recover with this plan, or prune with "
                            f"the directory's own {path / PLAN_FILE}")
        elif plan.patches() and plan.digest() != rec_plan.digest():
            problems.append("the given plan's patches are not the directory's: use its own "
                            f"{path / PLAN_FILE}")
    tpath = path / TENSORS
    if not tpath.is_file():
        problems.append(f"{TENSORS} is missing")
    elif checkpoint.file_sha256(tpath) != manifest.get("tensors", {}).get("sha256"):
        problems.append(f"{TENSORS} is not the file {MANIFEST} records (changed or replaced after recovery)")
    return problems


def load_recovered_model(hf_dir: Path, recovered: Path | Recovered):
    """The recovered PyTorch model (float32, eval): the reference a recovered GGUF must match."""
    from gguf_prune.models import cuts  # torch and transformers: only where a model is built

    shape = checkpoint.check_model_dir(hf_dir)
    rec = recovered if isinstance(recovered, Recovered) else open_recovered(recovered, shape,
                                                                            checkpoint.fingerprint(hf_dir))
    model = cuts.load_model(hf_dir)
    return cuts.apply_plan(model, rec.plan, rec.weights())


# ----------------------------------------------------------------------------- writing


def check_output_dir(out: Path) -> None:
    """``out`` may become a recover directory: new, empty, or an earlier one (whose files are replaced)."""
    if out.exists() and not out.is_dir():
        raise RecoverError(f"output {out} is a file; pass a directory (it is created if missing)")
    if out.is_dir():
        ours = {MANIFEST, PLAN_FILE, TENSORS, STATE_DIR}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
        if foreign:
            raise RecoverError(f"output directory {out} holds other files ({', '.join(foreign[:5])}); pass an "
                               "empty or new directory, or an earlier recover directory to replace")


def write_recovered(out: Path, plan: Plan, weights: Mapping[str, torch.Tensor], manifest: dict,
                    seconds: float) -> dict:
    """Write the recover directory ``out``: tensors, then the plan, then ``recover.json`` (the figures in
    ``manifest`` plus the digests and hashes that tie the files together), each atomically. Returns the
    manifest as written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the new manifest lands
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in sorted(weights.items())}
    save_tensors_atomic(out / TENSORS, tensors, {"format": "pt", "gguf_prune.plan_digest": plan.digest()})
    plan.save(out / PLAN_FILE)
    manifest = dict(manifest)
    manifest["plan_digest"] = plan.digest()
    manifest["cut_digest"] = plan.without_patches().digest()
    manifest["patches"] = {str(lp.index): {"kind": lp.patch, "params": plan.shape.patch_params()}
                           for lp in plan.patches()}
    manifest["tensors"] = {"file": TENSORS, "count": len(tensors), "bytes": (out / TENSORS).stat().st_size,
                           "sha256": checkpoint.file_sha256(out / TENSORS), "names": sorted(tensors)}
    manifest["seconds"] = round(seconds, 2)
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True, default=_jsonable) + "\n")
    return manifest


def _jsonable(x):
    """What json cannot write by itself: numpy scalars (figures) and paths."""
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
