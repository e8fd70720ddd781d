"""Recovery: win back what a cut lost, then hand the result to ``prune`` through a directory.

Two tools, alone or together:

linear patch (closed form, no training)
    Every run of consecutive removed layers, and every removed attention
    sub-block, gets one n_embd × n_embd matrix W so that the pruned model
    reproduces what the removed part did:

        h_out ≈ h_in + W · rmsnorm(h_in)

    (for an attention sub-block, rmsnorm is the layer's own input norm and h_out the
    state after the attention). W is a ridge least-squares fit over the calibration
    tokens, accumulated as XᵀX and XᵀY in float64 (X = the normed inputs, Y = the
    wanted update), its ridge chosen on held-out sequences. By default the fit is
    *sequential* (``patch_fit="pruned"``): X comes from the pruned, already patched
    model's own state at that point and Y = the full model's state there minus it, so
    each patch also absorbs what earlier cuts changed; ``"full"`` fits every patch on
    the full model's states alone. llama.cpp runs a patch as deci's "linear attention"
    (n_head > 0, n_head_kv = 0); see rewrite.py.

fine-tuning (finetune.py)
    LoRA or full fine-tuning of the pruned (and patched) model, by distillation from
    the unpruned model or next-token loss, with the exact structure the GGUF will have.

The recover directory (the hand-off to ``gguf-prune prune --recovered DIR``)::

    plan.json               the plan with its patches (``"patch": "linear"``)
    recovered.safetensors   recovered tensors, HF names of the *source* model:
                            model.layers.{i}.patch.weight (n_embd, n_embd) and, after
                            fine-tuning, the changed weights in their unsliced shapes
    recover.json            what was done, the figures, and the hashes that tie the
                            three files to each other and to the checkpoint (and, for a
                            round of iterative pruning, the ``start`` directory it went on from)

``recover.json`` is written last: a directory without it is not a recover directory.
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

import numpy as np
import torch

from gguf_prune.models import checkpoint
from gguf_prune.models import cuts
from gguf_prune.calibration import Calibration, check_calibration_file, load_calibration
from gguf_prune.plan import ModelShape, Plan, validate
from gguf_prune.atomic import save_tensors_atomic, write_text_atomic
from gguf_prune.writing.rewrite import Override
from gguf_prune.errors import GgufPruneError

log = logging.getLogger(__name__)

RECOVER_SCHEMA = "gguf-prune/recovered"
RECOVER_VERSION = 1
MANIFEST = "recover.json"
PLAN_FILE = "plan.json"
TENSORS = "recovered.safetensors"
STATE_DIR = ".recover-state"  # fine-tuning checkpoints, removed when recovery completes
PATCH_FITS = ("pruned", "full")
RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # × mean diagonal of XᵀX


class RecoverError(GgufPruneError, ValueError):
    """A recovery request, or a recover directory, that cannot be used: what, where, what to do."""


# ----------------------------------------------------------------------------- HF ↔ GGUF names

# per-layer HF name suffix → (GGUF suffix, rope permutation of rows: "n_head" | "n_head_kv" | None)
_LAYER_NAMES: Mapping[str, tuple[str, str | None]] = {
    "input_layernorm.weight": ("attn_norm.weight", None),
    "self_attn.q_proj.weight": ("attn_q.weight", "n_head"),
    "self_attn.k_proj.weight": ("attn_k.weight", "n_head_kv"),
    "self_attn.v_proj.weight": ("attn_v.weight", None),
    "self_attn.o_proj.weight": ("attn_output.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "mlp.gate_proj.weight": ("ffn_gate.weight", None),
    "mlp.up_proj.weight": ("ffn_up.weight", None),
    "mlp.down_proj.weight": ("ffn_down.weight", None),
    "patch.weight": ("attn_output.weight", None),  # a patch is the linear attention's output matrix
}
_GLOBAL_NAMES: Mapping[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_ATTN_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight")
_MLP_SUFFIXES = ("post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight")


def split_hf_name(name: str) -> tuple[int | None, str]:
    """``model.layers.7.self_attn.q_proj.weight`` → ``(7, "self_attn.q_proj.weight")``; globals → (None, name)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), ".".join(parts[3:])
    return None, name


def hf_shape(name: str, s: ModelShape) -> tuple[int, ...] | None:
    """The shape (torch order) of a source-model tensor, or None for a name gguf-prune does not write."""
    layer, suffix = split_hf_name(name)
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    if layer is None:
        return {"model.embed_tokens.weight": (s.n_vocab, s.n_embd), "model.norm.weight": (s.n_embd,),
                "lm_head.weight": (s.n_vocab, s.n_embd)}.get(suffix)
    return {
        "input_layernorm.weight": (s.n_embd,), "post_attention_layernorm.weight": (s.n_embd,),
        "self_attn.q_proj.weight": (q, s.n_embd), "self_attn.k_proj.weight": (kv, s.n_embd),
        "self_attn.v_proj.weight": (kv, s.n_embd), "self_attn.o_proj.weight": (s.n_embd, q),
        "mlp.gate_proj.weight": (s.n_ff, s.n_embd), "mlp.up_proj.weight": (s.n_ff, s.n_embd),
        "mlp.down_proj.weight": (s.n_embd, s.n_ff), "patch.weight": (s.n_embd, s.n_embd),
    }.get(suffix)


def gguf_name(name: str) -> str:
    layer, suffix = split_hf_name(name)
    if layer is None:
        return _GLOBAL_NAMES[suffix]
    return f"blk.{layer}.{_LAYER_NAMES[suffix][0]}"


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows as convert_hf_to_gguf writes them (LlamaModel.permute): within each head, the two
    halves of the rotary pairs are interleaved. ``w``: (n_head*head_dim, n_embd)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(name: str, w: np.ndarray, s: ModelShape) -> np.ndarray:
    """A source tensor (torch order = GGUF numpy order) with q/k rows permuted as the converter does."""
    _, suffix = split_hf_name(name)
    perm = _LAYER_NAMES.get(suffix, (None, None))[1]
    if perm == "n_head":
        return rope_permute(w, s.n_head)
    if perm == "n_head_kv":
        return rope_permute(w, s.n_head_kv)
    return w


# ----------------------------------------------------------------------------- the recover directory


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_names(names: Mapping[str, tuple[int, ...]], plan: Plan, tied: bool | None = None) -> list[str]:
    """Problems with recovered tensors (name → shape) for ``plan``; [] when they fit."""
    s = plan.shape
    by_index = {lp.index: lp for lp in plan.layers}
    problems = []
    for name, shape in sorted(names.items()):
        layer, suffix = split_hf_name(name)
        want = hf_shape(name, s)
        if want is None:
            problems.append(f"{name}: not a tensor gguf-prune can write into a llama-family GGUF")
            continue
        if tuple(shape) != want:
            problems.append(f"{name} has shape {tuple(shape)}, the plan's model needs {want}")
            continue
        if layer is None:
            if name == "lm_head.weight" and tied:
                problems.append(f"{name}: the model ties its output matrix to the embeddings; recover "
                                "model.embed_tokens.weight instead")
            continue
        lp = by_index.get(layer)
        if lp is None:
            problems.append(f"{name}: layer {layer} is outside the model's {s.n_layer} layers")
        elif suffix == "patch.weight":
            if lp.patch is None:
                problems.append(f"{name} is a patch matrix, but the plan has no patch at layer {layer}")
        elif lp.removed:
            problems.append(f"{name} belongs to layer {layer}, which the plan removes")
        elif lp.attention_removed and suffix in _ATTN_SUFFIXES:
            problems.append(f"{name} belongs to the attention of layer {layer}, which the plan removes")
        elif lp.attention_removed and suffix == "input_layernorm.weight" and lp.patch is None:
            problems.append(f"{name} belongs to the attention of layer {layer}, which the plan removes")
        elif lp.mlp_removed and suffix in _MLP_SUFFIXES:
            problems.append(f"{name} belongs to the MLP of layer {layer}, which the plan removes")
    for lp in plan.patches():
        if cuts.PATCH_NAME.format(lp.index) not in names:
            problems.append(f"layer {lp.index} has a {lp.patch} patch in the plan but "
                            f"{cuts.PATCH_NAME.format(lp.index)} is missing")
    return problems


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

    def overrides(self) -> dict[str, Override]:
        """The tensors as rewrite() takes them: source GGUF names, GGUF layout, loaded one at a time."""
        s = self.plan.shape
        path = str(self.tensors_path)

        def loader(hf: str):
            def load() -> np.ndarray:
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    w = f.get_tensor(hf).float().numpy()
                return to_gguf_layout(hf, w, s)
            return load

        return {gguf_name(hf): Override(tuple(shape), loader(hf)) for hf, shape in self.shapes.items()}


def open_recovered(path: Path, shape: ModelShape | None = None, fingerprint: str | None = None,
                   plan: Plan | None = None, tied: bool | None = None) -> Recovered:
    """Open a recover directory and check it against the checkpoint (shape, fingerprint) and ``plan``.

    ``plan`` may be the plan the directory was made from, with or without its patches: its cut must be
    the directory's. Raises RecoverError / PlanError naming what does not match.
    """
    path = Path(path)
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
    rec_plan = Plan.load(path / PLAN_FILE)
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
    elif _sha256(tpath) != manifest.get("tensors", {}).get("sha256"):
        problems.append(f"{TENSORS} is not the file {MANIFEST} records (changed or replaced after recovery)")
    if problems:
        raise RecoverError(f"recover directory {path} does not fit ({len(problems)} problem"
                           f"{'s' if len(problems) > 1 else ''}):\n  - " + "\n  - ".join(problems))
    validate(rec_plan, shape, fingerprint, source=str(path / PLAN_FILE))
    from safetensors import safe_open

    with safe_open(str(tpath), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    bad = check_names(shapes, rec_plan, tied)
    if bad:
        raise RecoverError(f"{tpath} does not fit its plan ({len(bad)} problem{'s' if len(bad) > 1 else ''}):\n  - "
                           + "\n  - ".join(bad))
    return Recovered(path=path, plan=rec_plan, manifest=manifest, shapes=shapes)


# ----------------------------------------------------------------------------- where patches go


def mark_patches(plan: Plan) -> Plan:
    """The plan with a linear patch on the last layer of every run of removed layers and on every
    removed attention sub-block (a layer whose attention and MLP both go counts as the latter)."""
    layers = list(plan.layers)
    for k, lp in enumerate(layers):
        run_ends = lp.removed and (k + 1 == len(layers) or not layers[k + 1].removed)
        if run_ends or lp.attention_removed:
            layers[k] = replace(lp, patch="linear")
    return replace(plan, layers=tuple(layers))


def patch_spans(plan: Plan) -> dict[int, dict]:
    """What each patch stands for: ``{index: {"replaces": "layers", "layers": [..]}}`` or the attention."""
    out, run = {}, []
    for lp in plan.layers:
        if lp.removed:
            run.append(lp.index)
            if lp.patch is not None:
                out[lp.index] = {"replaces": "layers", "layers": list(run)}
                run = []
            continue
        run = []
        if lp.patch is not None:
            out[lp.index] = {"replaces": "attention", "layers": [lp.index]}
    return out


# ----------------------------------------------------------------------------- the patch fit


def _rmsnorm(h: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm with gain 1, as llama.cpp's build_norm and LlamaRMSNorm compute it (float32)."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class _Normal:
    """Sums for one ridge least-squares fit Y ≈ X·B over real tokens (float64), train and held-out apart."""

    def __init__(self, d: int):
        z = lambda: torch.zeros(d, d, dtype=torch.float64)  # noqa: E731
        self.xx, self.xy, self.xx_h, self.xy_h = z(), z(), z(), z()
        self.yy = self.yy_h = 0.0
        self.n = self.n_h = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, real: torch.Tensor, heldout: bool, w: torch.Tensor | None):
        x, y = x[real].double(), y[real].double()  # (n, d)
        if w is not None:
            sw = w[real].double().sqrt()[:, None]
            x, y = x * sw, y * sw
        xx, xy, yy = x.T @ x, x.T @ y, float((y * y).sum())
        if heldout:
            self.xx_h += xx
            self.xy_h += xy
            self.yy_h += yy
            self.n_h += x.shape[0]
        else:
            self.xx += xx
            self.xy += xy
            self.yy += yy
            self.n += x.shape[0]

    def solve(self, alpha: float) -> torch.Tensor:
        d = self.xx.shape[0]
        lam = alpha * float(torch.diagonal(self.xx).mean())
        return torch.linalg.solve(self.xx + lam * torch.eye(d, dtype=torch.float64), self.xy)  # B: (d_in, d_out)

    @staticmethod
    def residual(b: torch.Tensor, xx: torch.Tensor, xy: torch.Tensor, yy: float) -> float:
        """Σ‖y − x·B‖² from the sums."""
        return float(torch.sum(b * (xx @ b)) - 2 * torch.sum(b * xy) + yy)

    def fit(self, grid=RIDGE_GRID) -> tuple[torch.Tensor, dict]:
        if self.n == 0:
            raise RecoverError("no calibration tokens to fit a patch on")
        scores = {}
        if self.n_h:
            for a in grid:
                scores[a] = self.residual(self.solve(a), self.xx_h, self.xy_h, self.yy_h) / max(self.yy_h, 1e-30)
            alpha = min(scores, key=scores.get)
        else:
            alpha = 1e-3
        b = self.solve(alpha)
        stats = {"tokens": self.n, "heldout_tokens": self.n_h, "ridge": alpha,
                 "train_residual": round(self.residual(b, self.xx, self.xy, self.yy) / max(self.yy, 1e-30), 6)}
        if self.n_h:
            stats["heldout_residual"] = round(scores[alpha], 6)
        return b.T.float().contiguous(), stats  # W: (d_out, d_in), the HF / GGUF (numpy) layout


def _kl_sum(full_engine, h_ref: torch.Tensor, h: torch.Tensor, real: torch.Tensor, chunk: int = 256) -> float:
    """Σ over real tokens of KL(softmax(ref) ‖ softmax(h)), both final states before the norm."""
    a = full_engine.final(h_ref)[real.to(h_ref.device)]
    b = full_engine.final(h)[real.to(h.device)]
    W = full_engine.W
    total = 0.0
    for s in range(0, a.shape[0], chunk):
        lp = torch.log_softmax((a[s:s + chunk].float() @ W.T).double(), -1)
        lq = torch.log_softmax((b[s:s + chunk].float() @ W.T).double(), -1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total


def _pruned_layers(model, cut: Plan) -> list:
    """The cut model's layers, sharing the full model's modules where a layer is kept whole: only layers
    the plan cuts inside are copied (a plan that only removes layers costs no memory)."""
    from types import SimpleNamespace

    full = list(model.model.layers)
    by_index = {lp.index: lp for lp in cut.layers}
    layers = [layer if by_index[i].untouched or by_index[i].removed else copy.deepcopy(layer)
              for i, layer in enumerate(full)]
    idx = [getattr(layer.self_attn, "layer_idx", None) for layer in full]
    shell = SimpleNamespace(model=SimpleNamespace(layers=torch.nn.ModuleList(layers)),
                            config=copy.deepcopy(model.config))
    cuts.apply_plan(shell, cut)
    for layer, i in zip(full, idx):  # apply_plan renumbered the shared layers' cache slots: put them back
        if i is not None:
            layer.self_attn.layer_idx = i
    return list(shell.model.layers)


def fit_patches(model, plan: Plan, cal: Calibration, heldout: set[int], fit: str = "pruned",
                weighting: str = "rms", seqs_per_batch: int = 8,
                pruned_from=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit every patch of ``plan`` on ``cal`` (sequences in ``heldout`` choose the ridge and are scored).

    Returns ``{model.layers.{i}.patch.weight: W}`` and statistics, with the held-out KL of the cut alone
    and of the cut with its patches (PyTorch, per real token).

    ``model`` is the unpruned model (the target). ``pruned_from``: a model of the same shape whose layers
    the pruned path runs instead of ``model``'s (the weights an earlier recovery left); default ``model``.

    ``weighting="rms"`` weighs each token by 1/mean(h_out²): the next layer sees rmsnorm(h), so an error
    matters relative to the size of the state (without it the few huge "attention sink" states dominate).
    """
    from gguf_prune.scoring.ablate import Engine

    if fit not in PATCH_FITS:
        raise RecoverError(f"patch fit {fit!r} is not one of {', '.join(PATCH_FITS)}")
    t0 = time.time()
    eps = float(getattr(model.config, "rms_norm_eps", 1e-6))
    cut = plan.without_patches()
    src = model if pruned_from is None else pruned_from
    full_e, pr_e = Engine(model), Engine(src)
    pr_e.layers = _pruned_layers(src, cut)
    pr_e.n_layer = len(pr_e.layers)
    pos = {layer.source_index: k for k, layer in enumerate(pr_e.layers)}
    spans = patch_spans(plan)
    d = plan.shape.n_embd

    batches = []  # (ids, mask, heldout?) — held-out sequences in batches of their own
    ho = sorted(heldout)
    tr = [i for i in range(cal.n_seq) if i not in heldout]
    for group, is_ho in ((tr, False), (ho, True)):
        for s in range(0, len(group), seqs_per_batch):
            idx = torch.tensor(group[s:s + seqs_per_batch])
            batches.append((cal.input_ids[idx], cal.attention_mask[idx], is_ho))
    weights: dict[str, torch.Tensor] = {}
    stats: dict[str, Any] = {"fit": fit, "weighting": weighting, "patches": []}
    with torch.inference_mode():
        ctxs = [full_e.context(ids, m) for ids, m, _ in batches]
        reals = [m.bool() for _, m, _ in batches]
        hf = [full_e.embed(ids).float() for ids, _, _ in batches]  # the full model
        hp = [h.clone() for h in hf]  # the pruned model with its patches so far
        hc = [h.clone() if b[2] else None for h, b in zip(hf, batches)]  # the cut alone (held-out only)
        run_in: tuple[list, list] | None = None

        def fit_one(index: int, src: list, x_of, target: list) -> torch.Tensor:
            acc = _Normal(d)
            for b, (s_, t_) in enumerate(zip(src, target)):
                x = x_of(s_)
                w = 1.0 / (t_.float().pow(2).mean(-1) + eps) if weighting == "rms" else None
                acc.add(x, t_.float() - s_.float(), reals[b], batches[b][2], w)
            W, st = acc.fit()
            st = {"layer": index, **spans[index], **st}
            stats["patches"].append(st)
            log.info("patch at layer %d (%s %s): %d tokens, ridge %.0e, held-out residual %.3f of the "
                     "removed part's update (no patch: 1)", index, st["replaces"],
                     ",".join(map(str, st["layers"])), st["tokens"], st["ridge"], st.get("heldout_residual", -1))
            weights[cuts.PATCH_NAME.format(index)] = W
            return W

        for lp in plan.layers:
            i = lp.index
            if lp.removed:
                if run_in is None:
                    run_in = (hf, hp)
                hf = [full_e.layer(i, h, c) for h, c in zip(hf, ctxs)]
                if lp.patch is not None:
                    src = run_in[1] if fit == "pruned" else run_in[0]
                    W = fit_one(i, src, lambda h: _rmsnorm(h, eps), hf)
                    hp = [h + _rmsnorm(h, eps) @ W.T for h in run_in[1]]
                    run_in = None
                continue
            run_in = None  # a run without a patch ends here: the cut alone
            k = pos[i]
            if lp.attention_removed and lp.patch is not None:
                ln = pr_e.layers[k].input_layernorm
                hf_mid = [h + full_e.attn(i, h, c) for h, c in zip(hf, ctxs)]
                src = hp if fit == "pruned" else hf
                W = fit_one(i, src, lambda h: ln(h).float(), hf_mid)
                hp_mid = [h + ln(h).float() @ W.T for h in hp]
                hp = [h + pr_e.mlp(k, h) for h in hp_mid]
                hf = [h + full_e.mlp(i, h) for h in hf_mid]
            else:
                hf = [full_e.layer(i, h, c) for h, c in zip(hf, ctxs)]
                hp = [pr_e.layer(k, h, c) for h, c in zip(hp, ctxs)]
            hc = [None if h is None else pr_e.layer(k, h, c) for h, c in zip(hc, ctxs)]
        n_ho = sum(int(reals[b].sum()) for b in range(len(batches)) if batches[b][2])
        if n_ho:
            kl_cut = sum(_kl_sum(full_e, hf[b], hc[b], reals[b]) for b in range(len(batches)) if batches[b][2])
            kl_patch = sum(_kl_sum(full_e, hf[b], hp[b], reals[b]) for b in range(len(batches)) if batches[b][2])
            stats["heldout_kl"] = {"cut": kl_cut / n_ho, "patched": kl_patch / n_ho, "tokens": n_ho}
            log.info("held-out KL to the full model (PyTorch): cut alone %.4f, with %d patch(es) %.4f",
                     kl_cut / n_ho, len(weights), kl_patch / n_ho)
    stats["seconds"] = round(time.time() - t0, 2)
    return weights, stats


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class RecoverOptions:
    calibration: Path | None = None
    calibration_kind: str = "auto"
    seq_len: int = 128
    samples: int = 64
    seed: int = 0
    heldout: float = 0.1  # fraction of sequences held out (ridge choice, early stopping, the figures)
    patch: bool = False
    patch_fit: str = "pruned"
    patch_weighting: str = "rms"
    finetune: str | None = None  # None | "lora" | "full"
    finetune_options: Any = None  # finetune.FinetuneOptions (defaults when None)
    device: str = "auto"

    def __post_init__(self) -> None:
        # ranges refused when the options are made, for an API user as for the CLI; recover() checks the rest
        p = []
        for flag, v, lo in (("--seq-len", self.seq_len, 2), ("--samples", self.samples, 1), ("--seed", self.seed, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                p.append(f"{flag} {v!r}: must be a whole number, {lo} or more")
        if isinstance(self.heldout, bool) or not isinstance(self.heldout, (int, float)) or not 0 <= self.heldout < 1:
            p.append(f"--heldout {self.heldout!r}: must be a fraction of the sequences in [0, 1)")
        if self.calibration_kind not in ("auto", "text", "chat"):
            p.append(f"--calibration-kind {self.calibration_kind!r}: use auto, text or chat")
        if self.patch_fit not in PATCH_FITS:
            p.append(f"--patch-fit {self.patch_fit!r} is not one of {', '.join(PATCH_FITS)}")
        if self.finetune not in (None, "lora", "full"):
            p.append(f"--finetune {self.finetune!r} is not one of lora, full")
        if p:
            raise RecoverError("invalid recover options: " + "; ".join(p))


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


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RecoverError(f"output {out} is a file; pass a directory (it is created if missing)")
    if out.is_dir():
        ours = {MANIFEST, PLAN_FILE, TENSORS, STATE_DIR}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
        if foreign:
            raise RecoverError(f"output directory {out} holds other files ({', '.join(foreign[:5])}); pass an "
                               "empty or new directory, or an earlier recover directory to replace")


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
    from gguf_prune.recovery.finetune import FinetuneError, FinetuneOptions, check_data, finetune, resolve_device

    t0 = time.time()
    hf_dir, out = Path(hf_dir), Path(out)
    o = options
    if not o.patch and not o.finetune:
        raise RecoverError("nothing to do: pass --patch (linear patches) and/or --finetune lora|full")
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
    tied = bool(checkpoint.read_config(hf_dir).get("tie_word_embeddings", False))
    start_rec = None if start is None else _check_start(Path(start), shape, fp, cut, tied, out)
    _check_output(out)
    cal_path, kind = check_calibration_file(o.calibration, o.calibration_kind)
    device = resolve_device(o.device)

    tokenizer = cuts.load_tokenizer(hf_dir)
    cal = load_calibration(cal_path, tokenizer, seq_len=o.seq_len, samples=o.samples, seed=o.seed, kind=kind)
    heldout = split_heldout(cal.n_seq, o.heldout, o.seed)
    if o.finetune:
        check_data(cal, heldout, fto)  # before any model is loaded or any file written
    model = cuts.load_model(hf_dir)

    weights: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {
        "schema": RECOVER_SCHEMA, "version": RECOVER_VERSION,
        "model": {"fingerprint": fp, "path": str(hf_dir), "shape": shape.to_dict()},
        "calibration": cal.to_dict() | {"heldout_sequences": sorted(heldout)},
        "heldout_kl": {},
    }
    if start_rec is not None:
        weights = carry_weights(start_rec.weights(), cut, tied)
        manifest["start"] = {"path": str(start_rec.path), "plan_digest": start_rec.plan.digest(),
                             "tensors_sha256": start_rec.manifest["tensors"]["sha256"],
                             "carried": sorted(weights)}
        log.info("starting from %s: %d of its %d tensors still fit the cut", start_rec.path, len(weights),
                 len(start_rec.shapes))
    if target.patches():
        src = _with_weights(model, weights) if weights else None
        pw, pstats = fit_patches(model, target, cal, heldout, fit=o.patch_fit, weighting=o.patch_weighting,
                                 pruned_from=src)
        del src
        weights.update(pw)
        manifest["patch"] = pstats
        if "heldout_kl" in pstats:
            manifest["heldout_kl"].update(cut=pstats["heldout_kl"]["cut"], patched=pstats["heldout_kl"]["patched"])
    if o.finetune:
        out.mkdir(parents=True, exist_ok=True)
        state_dir = out / STATE_DIR
        key = hashlib.sha256(json.dumps({"fp": fp, "plan": target.digest(), "cal": cal.fingerprint,
                                         "heldout": sorted(heldout), "ft": asdict(fto),
                                         "patches": _digest_tensors(weights)}, sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        student = cuts.apply_plan(copy.deepcopy(model), target, weights)
        try:
            ft = finetune(model, student, target, cal, heldout, fto, device=device, state_dir=state_dir, key=key)
        except FinetuneError as e:
            raise RecoverError(str(e)) from None
        weights.update(ft.weights)
        manifest["finetune"] = ft.stats
        if ft.stats.get("heldout_kl_before") is not None:
            manifest["heldout_kl"].setdefault("cut" if not target.patches() else "patched",
                                              ft.stats["heldout_kl_before"])
            manifest["heldout_kl"]["finetuned"] = ft.stats["heldout_kl_best"]
    del model

    problems = check_names({k: tuple(v.shape) for k, v in weights.items()}, target, tied)
    if problems:  # a bug, not a user error: say so plainly
        raise RecoverError("internal error: the recovered tensors do not fit the plan:\n  - " + "\n  - ".join(problems))
    manifest = _write(out, target, weights, manifest, time.time() - t0)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    log.info("recover directory written: %s (%.0f s)", out, time.time() - t0)
    return RecoverResult(path=out, plan=target, manifest=manifest)


def _check_start(start: Path, shape: ModelShape, fp: str, cut: Plan, tied: bool, out: Path) -> Recovered:
    """Open ``start`` (an earlier round's recover directory) and check that ``cut`` only cuts more."""
    from gguf_prune.planning.strategies import revived

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


def _write(out: Path, plan: Plan, weights: Mapping[str, torch.Tensor], manifest: dict, seconds: float) -> dict:
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
                           "sha256": _sha256(out / TENSORS), "names": sorted(tensors)}
    manifest["seconds"] = round(seconds, 2)
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True, default=_jsonable) + "\n")
    return manifest


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_recovered_model(hf_dir: Path, recovered: Path | Recovered):
    """The recovered PyTorch model (float32, eval): the reference a recovered GGUF must match."""
    shape = checkpoint.check_model_dir(hf_dir)
    rec = recovered if isinstance(recovered, Recovered) else open_recovered(recovered, shape,
                                                                            checkpoint.fingerprint(hf_dir))
    model = cuts.load_model(hf_dir)
    return cuts.apply_plan(model, rec.plan, rec.weights())
