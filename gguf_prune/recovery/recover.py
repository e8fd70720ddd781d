"""Recovery: win back what a cut lost, then hand the result to ``prune`` through a directory.

Two tools, alone or together:

linear patch (patches.py, closed form, no training)
    Every run of consecutive removed layers, and every removed attention sub-block, gets one
    n_embd × n_embd matrix W so that the pruned model reproduces what the removed part did:
    ``h_out ≈ h_in + W · rmsnorm(h_in)``, a ridge least-squares fit on the calibration tokens.

fine-tuning (finetune.py)
    LoRA or full fine-tuning of the pruned (and patched) model, by distillation from
    the unpruned model or next-token loss, with the exact structure the GGUF will have.

The result is a recover directory, the hand-off to ``gguf-prune prune --recovered DIR``; its format
(plan.json, recovered.safetensors, recover.json) lives in :mod:`gguf_prune.recovered`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from gguf_prune.calibration import Calibration, check_calibration_file, load_calibration
from gguf_prune.models import checkpoint
from gguf_prune.models import cuts
from gguf_prune.models.tensors import split_hf_name
from gguf_prune.plan import ModelShape, Plan, validate
from gguf_prune.recovered import (RECOVER_SCHEMA, RECOVER_VERSION, STATE_DIR, Recovered, RecoverError, check_names,
                                  check_output_dir, open_recovered, write_recovered)
from gguf_prune.recovery.finetune import check_data, finetune, resolve_device
from gguf_prune.recovery.options import PATCH_FITS, FinetuneError, FinetuneOptions, RecoverOptions
from gguf_prune.recovery.patches import fit_patches, mark_patches
from gguf_prune.recovery.repair import repair_count

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class RecoverResult:
    path: Path
    plan: Plan
    manifest: dict = field(default_factory=dict)

    def summary(self) -> str:
        m = self.manifest
        lines = [f"wrote {self.path}: {len(self.plan.patches())} patch(es), "
                 f"{m['tensors']['count']} tensors ({m['tensors']['bytes'] / 1e6:.1f} MB)"]
        p = m.get("patch")
        if p:
            for st in p["patches"]:
                lines.append(f"  patch at layer {st['layer']} for {st['replaces']} {st['layers']}: held-out "
                             f"residual {st.get('heldout_residual', float('nan')):.3f}, ridge {st['ridge']:.0e}")
        reps = (p or {}).get("repairs") or []
        if reps:
            done = [st for st in reps if st["ridge"] is not None]
            lines.append(f"  {len(done)} of {len(reps)} repairs applied (narrowed MLPs and attentions; the others did "
                         "not lower the held-out KL)")
        kl = m.get("heldout_kl", {})
        if kl:
            lines.append("held-out KL to the unpruned model (PyTorch, calibration split): "
                         + ", ".join(f"{k} {v:.4f}" for k, v in kl.items()))
        ft = m.get("finetune")
        if ft:
            lines.append(f"fine-tuning: {ft['method']}, {ft['steps_done']} steps (best at {ft['best_step']}), "
                         f"{ft['seconds']:.0f} s on {ft['device']}")
        lines.append(f"next: gguf-prune prune HF_DIR --recovered {self.path} -o model.gguf")
        return "\n".join(lines)


def split_heldout(n_seq: int, fraction: float, seed: int) -> set[int]:
    """Indices of the held-out sequences: round(fraction·n), at least 1 when n > 1 and fraction > 0."""
    if fraction <= 0 or n_seq < 2:
        return set()
    k = min(n_seq - 1, max(1, round(fraction * n_seq)))
    return set(random.Random(seed + 1).sample(range(n_seq), k))


@dataclass(frozen=True)
class _Request:
    """A recovery request with every input checked, before anything is loaded or written."""

    hf_dir: Path
    out: Path
    options: RecoverOptions
    finetune_options: FinetuneOptions  # with the request's method
    shape: ModelShape
    fingerprint: str
    cut: Plan  # the plan without patches
    target: Plan  # the plan recovered: the cut, with the patches to fit when options.patch
    tied: bool
    start: Recovered | None  # the earlier round this one goes on from
    calibration: Path
    calibration_kind: str
    device: str


def recover(hf_dir: Path, plan: Plan | Path, out: Path, options: RecoverOptions = RecoverOptions(),
            start: Path | None = None) -> RecoverResult:
    """Fit patches and/or fine-tune the pruned model; write the recover directory ``out``.

    ``start``: a recover directory of the same checkpoint whose cut ``plan`` contains (an earlier round of
    iterative pruning). Its tensors are the starting point: what ``plan`` still keeps of them is loaded
    before patches are fitted (on the pruned model with those weights) and before fine-tuning, and is
    written into ``out`` with what this recovery changes. Its patches are not carried: the cut has
    changed, so every patch of ``plan`` is fitted afresh. The teacher is always the unpruned checkpoint.

    Every input is checked before anything is written; the files in ``out`` are replaced one by one
    (each atomically), ``recover.json`` last.
    """
    t0 = time.time()
    req = _check_request(Path(hf_dir), plan, Path(out), options, start)
    o = options
    tokenizer = cuts.load_tokenizer(req.hf_dir)
    if (o.patch or o.repair) and req.cut.removed_fraction() <= 0:
        raise RecoverError("the plan cuts nothing: there is nothing to repair or patch. Make a plan that removes "
                           "something (`gguf-prune plan --target-params 0.2`), or prune without recovery")
    cal = load_calibration(req.calibration, tokenizer, seq_len=o.seq_len, samples=o.samples, seed=o.seed,
                           kind=req.calibration_kind)
    heldout = split_heldout(cal.n_seq, o.heldout, o.seed)
    if o.finetune:
        check_data(cal, heldout, req.finetune_options)  # before any model is loaded or any file written
    model = cuts.load_model(req.hf_dir)

    weights: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {
        "schema": RECOVER_SCHEMA, "version": RECOVER_VERSION,
        "model": {"fingerprint": req.fingerprint, "path": str(req.hf_dir), "shape": req.shape.to_dict()},
        "calibration": cal.to_dict() | {"heldout_sequences": sorted(heldout)},
        "heldout_kl": {},
    }
    if req.start is not None:
        weights = _start_weights(req, manifest)
    if req.target.patches() or (o.repair and repair_count(req.cut)):
        _add_patches(req, model, cal, heldout, weights, manifest)
    if o.finetune:
        _add_finetuned(req, model, cal, heldout, weights, manifest)
    del model
    return _finish(req, weights, manifest, t0)


def _check_request(hf_dir: Path, plan: Plan | Path, out: Path, o: RecoverOptions, start: Path | None) -> _Request:
    """Every check recover() makes before it loads a model or writes a file."""
    if not o.patch and not o.repair and not o.finetune:
        raise RecoverError("nothing to do: pass --repair (closed-form repair of narrowed parts), --patch (linear "
                           "patches for removed parts) and/or --finetune lora|full")
    if o.finetune not in (None, "lora", "full"):
        raise RecoverError(f"--finetune {o.finetune!r} is not one of lora, full")
    if o.patch_fit not in PATCH_FITS:
        raise RecoverError(f"--patch-fit {o.patch_fit!r} is not one of {', '.join(PATCH_FITS)}")
    if not 0 <= o.heldout < 1:
        raise RecoverError(f"--heldout {o.heldout} must be in [0, 1)")
    fto = o.finetune_options or FinetuneOptions(method=o.finetune or "lora")
    if o.finetune:
        fto = replace(fto, method=o.finetune)
    shape = checkpoint.check_model_dir(hf_dir)
    if shape.architecture != "llama":
        raise RecoverError(f"{hf_dir}: recovery (linear patches, fine-tuning) writes llama-layout tensors into a "
                           f"llama or deci GGUF; it supports llama-family models (llama, mistral), not "
                           f"{shape.architecture} yet. Prune without --recovered.")
    fp = checkpoint.fingerprint(hf_dir)
    if not isinstance(plan, Plan):
        plan = Plan.load(Path(plan))
    validate(plan, shape, fp, source="plan")
    cut = plan.without_patches()
    target = mark_patches(cut) if o.patch else cut
    if o.patch and not target.patches():
        log.warning("the plan removes no layer and no attention sub-block: there is nothing to patch")
    if o.repair and not repair_count(cut):
        log.warning("the plan narrows no attention and no MLP: there is nothing to repair")
    tied = bool(checkpoint.read_config(hf_dir).get("tie_word_embeddings", False))
    start_rec = None if start is None else _check_start(Path(start), shape, fp, cut, tied, out)
    check_output_dir(out)
    cal_path, kind = check_calibration_file(o.calibration, o.calibration_kind)
    device = resolve_device(o.device)
    return _Request(hf_dir=hf_dir, out=out, options=o, finetune_options=fto, shape=shape, fingerprint=fp, cut=cut,
                    target=target, tied=tied, start=start_rec, calibration=cal_path, calibration_kind=kind,
                    device=device)


def _start_weights(req: _Request, manifest: dict) -> dict[str, torch.Tensor]:
    """The start directory's tensors that the cut still uses; recorded in the manifest's ``start``."""
    start = req.start
    weights = carry_weights(start.weights(), req.cut, req.tied)
    manifest["start"] = {"path": str(start.path), "plan_digest": start.plan.digest(),
                         "tensors_sha256": start.manifest["tensors"]["sha256"], "carried": sorted(weights)}
    log.info("starting from %s: %d of its %d tensors still fit the cut", start.path, len(weights), len(start.shapes))
    return weights


def _add_patches(req: _Request, model, cal: Calibration, heldout: set[int], weights: dict, manifest: dict) -> None:
    """Fit the target's patches (on the pruned model with ``weights`` loaded, if any) into ``weights``."""
    o = req.options
    src = _with_weights(model, weights) if weights else None
    pw, pstats = fit_patches(model, req.target, cal, heldout, fit=o.patch_fit, weighting=o.patch_weighting,
                             pruned_from=src, repair=o.repair, repair_bias=o.repair_bias)
    del src
    weights.update(pw)
    manifest["patch"] = pstats
    if "heldout_kl" in pstats:
        manifest["heldout_kl"].update(cut=pstats["heldout_kl"]["cut"], patched=pstats["heldout_kl"]["patched"])


def _add_finetuned(req: _Request, model, cal: Calibration, heldout: set[int], weights: dict, manifest: dict) -> None:
    """Fine-tune the pruned model with ``weights`` (checkpoints in the output's state directory, resumed when
    every input is the same); the changed tensors go into ``weights``."""
    fto, target = req.finetune_options, req.target
    req.out.mkdir(parents=True, exist_ok=True)
    state_dir = req.out / STATE_DIR
    # what a checkpoint must match to be resumed: the checkpoint, the plan, the data, the options, the patches
    key = hashlib.sha256(json.dumps({"fp": req.fingerprint, "plan": target.digest(), "cal": cal.fingerprint,
                                     "heldout": sorted(heldout), "ft": asdict(fto),
                                     "patches": _digest_tensors(weights)}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    student = cuts.apply_plan(copy.deepcopy(model), target, weights)
    try:
        ft = finetune(model, student, target, cal, heldout, fto, device=req.device, state_dir=state_dir, key=key)
    except FinetuneError as e:
        raise RecoverError(str(e)) from None
    weights.update(ft.weights)
    manifest["finetune"] = ft.stats
    if ft.stats.get("heldout_kl_before") is not None:
        manifest["heldout_kl"].setdefault("cut" if not target.patches() else "patched", ft.stats["heldout_kl_before"])
        manifest["heldout_kl"]["finetuned"] = ft.stats["heldout_kl_best"]


def _finish(req: _Request, weights: dict, manifest: dict, t0: float) -> RecoverResult:
    """Check the tensors against the target plan, write the directory, drop the fine-tuning checkpoints."""
    problems = check_names({k: tuple(v.shape) for k, v in weights.items()}, req.target, req.tied)
    if problems:  # a bug, not a user error: say so plainly
        raise RecoverError("internal error: the recovered tensors do not fit the plan:\n  - " + "\n  - ".join(problems))
    manifest = write_recovered(req.out, req.target, weights, manifest, time.time() - t0)
    shutil.rmtree(req.out / STATE_DIR, ignore_errors=True)
    log.info("recover directory written: %s (%.0f s)", req.out, time.time() - t0)
    return RecoverResult(path=req.out, plan=req.target, manifest=manifest)


def _check_start(start: Path, shape: ModelShape, fp: str, cut: Plan, tied: bool, out: Path) -> Recovered:
    """Open ``start`` (an earlier round's recover directory) and check that ``cut`` only cuts more."""
    from gguf_prune.planning.diff import revived

    if start.resolve() == out.resolve():
        raise RecoverError(f"the start directory {start} is also the output: write the new recovery elsewhere "
                           "(the start is an input and is never overwritten)")
    rec = open_recovered(start, shape, fp, tied=tied)
    back = revived(rec.plan.without_patches(), cut)
    if back:
        raise RecoverError(f"the plan keeps parts that the start directory {start} removed (a later round "
                           "may only cut more):\n  - " + "\n  - ".join(back))
    return rec


def carry_weights(weights: Mapping[str, torch.Tensor], cut: Plan, tied: bool | None = None) -> dict:
    """The recovered tensors of an earlier round that ``cut`` still uses (patch matrices are not carried:
    a changed cut needs its patches fitted afresh)."""
    s = cut.shape
    by_index = {lp.index: lp for lp in cut.layers}
    keep = {}
    for name, w in weights.items():
        if name.endswith(".patch.weight") or check_names({name: tuple(w.shape)}, cut.without_patches(), tied):
            continue
        layer, suffix = split_hf_name(name)
        lp = by_index.get(layer)
        if lp is not None and suffix == "self_attn.o_proj.weight" and lp.heads is not None:
            w = w.clone()  # (n_embd, n_head*head_dim): zero the columns of heads this cut removes, as training does
            for h in sorted(set(range(s.n_head)) - set(lp.heads)):
                w[:, h * s.head_dim:(h + 1) * s.head_dim] = 0
        if lp is not None and suffix == "mlp.down_proj.weight" and lp.neurons is not None:
            w = w.clone()  # (n_embd, n_ff): zero the columns of removed neurons
            w[:, sorted(set(range(s.n_ff)) - set(lp.neurons))] = 0
        keep[name] = w
    return keep


def _with_weights(model, weights: Mapping[str, torch.Tensor]):
    """A copy of ``model`` with ``weights`` (source names, full shapes) loaded over its own."""
    m = copy.deepcopy(model)
    for name in weights:
        if name.endswith(".bias") and name not in m.state_dict():
            cuts.add_bias(m.get_submodule(name.rsplit(".", 1)[0]))  # a repair's bias
    state = m.state_dict()
    with torch.no_grad():
        for name, w in weights.items():
            state[name].copy_(w.to(state[name].dtype))
    return m


def _digest_tensors(weights: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
