"""Linear patches: closed-form stand-ins for the parts a cut removes (no training).

Every run of consecutive removed layers, and every removed attention sub-block, gets one
n_embd × n_embd matrix W so that the pruned model reproduces what the removed part did:

    h_out ≈ h_in + W · rmsnorm(h_in)

(for an attention sub-block, rmsnorm is the layer's own input norm and h_out the state after the
attention). W is a ridge least-squares fit over the calibration tokens, accumulated as XᵀX and XᵀY in
float64 (X = the normed inputs, Y = the wanted update), its ridge chosen on held-out sequences. By
default the fit is *sequential* (``fit="pruned"``): X comes from the pruned, already patched model's own
state at that point and Y = the full model's state there minus it, so each patch also absorbs what
earlier cuts changed; ``"full"`` fits every patch on the full model's states alone. llama.cpp runs a
patch as deci's "linear attention" (n_head > 0, n_head_kv = 0); see rewrite.py.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from gguf_prune.calibration import Calibration
from gguf_prune.models import cuts
from gguf_prune.models.tensors import PATCH_NAME
from gguf_prune.plan import LayerPlan, Plan
from gguf_prune.recovered import RecoverError
from gguf_prune.recovery.options import PATCH_FITS

log = logging.getLogger(__name__)

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # × mean diagonal of XᵀX


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


# ----------------------------------------------------------------------------- one ridge fit


def _rmsnorm(h: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm with gain 1, as llama.cpp's build_norm and LlamaRMSNorm compute it (float32)."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class RidgeSums:
    """Sums for one ridge least-squares fit Y ≈ X·B over real tokens (float64), train and held-out apart."""

    def __init__(self, d: int):
        z = lambda: torch.zeros(d, d, dtype=torch.float64)  # noqa: E731
        self.xx, self.xy, self.xx_h, self.xy_h = z(), z(), z(), z()
        self.yy = self.yy_h = 0.0
        self.n = self.n_h = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, real: torch.Tensor, heldout: bool, w: torch.Tensor | None):
        x, y = x[real].double(), y[real].double()  # (n, d): the real tokens of the batch
        if w is not None:
            sw = w[real].double().sqrt()[:, None]  # (n, 1): √weight on both sides weighs the squared error
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
        """W (d_out, d_in) with the ridge that does best on the held-out sums (1e-3 without any), and figures."""
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


# ----------------------------------------------------------------------------- fitting every patch of a plan


def _kl_sum(full_engine, h_ref: torch.Tensor, h: torch.Tensor, real: torch.Tensor, chunk: int = 256) -> float:
    """Σ over real tokens of KL(softmax(ref) ‖ softmax(h)), both final states before the norm."""
    a = full_engine.final(h_ref)[real.to(h_ref.device)]  # (n, d) normed
    b = full_engine.final(h)[real.to(h.device)]
    W = full_engine.W  # (V, d)
    total = 0.0
    for s in range(0, a.shape[0], chunk):
        lp = torch.log_softmax((a[s:s + chunk].float() @ W.T).double(), -1)  # (chunk, V)
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


@dataclass(frozen=True)
class _Batch:
    ids: torch.Tensor  # (b, T) token ids
    mask: torch.Tensor  # (b, T) 1 for a real token
    heldout: bool


def _batches(cal: Calibration, heldout: set[int], seqs_per_batch: int) -> list[_Batch]:
    """The calibration sequences in batches, the training ones first; held-out sequences in batches of their own."""
    out = []
    ho = sorted(heldout)
    tr = [i for i in range(cal.n_seq) if i not in heldout]
    for group, is_ho in ((tr, False), (ho, True)):
        for s in range(0, len(group), seqs_per_batch):
            idx = torch.tensor(group[s:s + seqs_per_batch])
            out.append(_Batch(cal.input_ids[idx], cal.attention_mask[idx], is_ho))
    return out


class _PatchWalk:
    """One pass down the layers with three residual streams per batch, each (b, T, n_embd) float32:

    ``full``     the unpruned model: the target every patch is fitted toward;
    ``patched``  the pruned model with the patches fitted so far (the input of a sequential fit);
    ``cut``      the pruned model without patches, held-out batches only: what the patches are compared with.
    """

    def __init__(self, model, plan: Plan, fit: str, weighting: str, pruned_from=None):
        from gguf_prune.scoring.ablate import Engine

        self.fit, self.weighting = fit, weighting
        self.eps = float(getattr(model.config, "rms_norm_eps", 1e-6))
        src = model if pruned_from is None else pruned_from
        self.full_e, self.pr_e = Engine(model), Engine(src)
        self.pr_e.layers = _pruned_layers(src, plan.without_patches())
        self.pr_e.n_layer = len(self.pr_e.layers)
        self.pos = {layer.source_index: k for k, layer in enumerate(self.pr_e.layers)}  # source index → pruned
        self.spans = patch_spans(plan)
        self.d = plan.shape.n_embd
        self.weights: dict[str, torch.Tensor] = {}
        self.patch_stats: list[dict] = []

    def start(self, batches: list[_Batch]) -> None:
        """The three streams at the embedding (call under torch.inference_mode, as every step after)."""
        self.batches = batches
        self.ctxs = [self.full_e.context(b.ids, b.mask) for b in batches]
        self.reals = [b.mask.bool() for b in batches]
        self.full = [self.full_e.embed(b.ids).float() for b in batches]
        self.patched = [h.clone() for h in self.full]
        self.cut = [h.clone() if b.heldout else None for h, b in zip(self.full, batches)]
        self.run_in: tuple[list, list] | None = None  # (full, patched) where the current run of removed layers began

    def layer(self, lp: LayerPlan) -> None:
        """Move the streams through one layer of the plan, fitting its patch if it has one."""
        if lp.removed:
            self._removed_layer(lp)
            return
        self.run_in = None  # a run without a patch ends here: the cut alone
        i, k = lp.index, self.pos[lp.index]
        if lp.attention_removed and lp.patch is not None:
            self._patched_attention(lp, k)
        else:
            self.full = [self.full_e.layer(i, h, c) for h, c in zip(self.full, self.ctxs)]
            self.patched = [self.pr_e.layer(k, h, c) for h, c in zip(self.patched, self.ctxs)]
        self.cut = [None if h is None else self.pr_e.layer(k, h, c) for h, c in zip(self.cut, self.ctxs)]

    def _removed_layer(self, lp: LayerPlan) -> None:
        """The full stream goes through the layer; the pruned ones skip it, and at the run's patch take
        ``h + W·rmsnorm(h)`` from where the run began."""
        i, eps = lp.index, self.eps
        if self.run_in is None:
            self.run_in = (self.full, self.patched)
        self.full = [self.full_e.layer(i, h, c) for h, c in zip(self.full, self.ctxs)]
        if lp.patch is not None:
            run_full, run_patched = self.run_in
            inputs = run_patched if self.fit == "pruned" else run_full
            W = self._fit_one(i, inputs, lambda h: _rmsnorm(h, eps), self.full)
            self.patched = [h + _rmsnorm(h, eps) @ W.T for h in run_patched]
            self.run_in = None

    def _patched_attention(self, lp: LayerPlan, k: int) -> None:
        """A removed attention with its patch ``h + W·input_layernorm(h)``, then the layer's MLP."""
        i = lp.index
        ln = self.pr_e.layers[k].input_layernorm
        full_mid = [h + self.full_e.attn(i, h, c) for h, c in zip(self.full, self.ctxs)]
        inputs = self.patched if self.fit == "pruned" else self.full
        W = self._fit_one(i, inputs, lambda h: ln(h).float(), full_mid)
        patched_mid = [h + ln(h).float() @ W.T for h in self.patched]
        self.patched = [h + self.pr_e.mlp(k, h) for h in patched_mid]
        self.full = [h + self.full_e.mlp(i, h) for h in full_mid]

    def _fit_one(self, index: int, inputs: list, x_of: Callable[[torch.Tensor], torch.Tensor],
                 target: list) -> torch.Tensor:
        """Fit the patch at ``index``: X = x_of(input state), Y = target − input state; return W (d, d)."""
        acc = RidgeSums(self.d)
        for b, (s_, t_) in enumerate(zip(inputs, target)):
            x = x_of(s_)
            w = 1.0 / (t_.float().pow(2).mean(-1) + self.eps) if self.weighting == "rms" else None  # (b, T)
            acc.add(x, t_.float() - s_.float(), self.reals[b], self.batches[b].heldout, w)
        W, st = acc.fit()
        st = {"layer": index, **self.spans[index], **st}
        self.patch_stats.append(st)
        log.info("patch at layer %d (%s %s): %d tokens, ridge %.0e, held-out residual %.3f of the "
                 "removed part's update (no patch: 1)", index, st["replaces"],
                 ",".join(map(str, st["layers"])), st["tokens"], st["ridge"], st.get("heldout_residual", -1))
        self.weights[PATCH_NAME.format(index)] = W
        return W

    def heldout_kl(self) -> dict | None:
        """KL to the full model per held-out real token, of the cut alone and with its patches; None without
        held-out tokens."""
        ho = [b for b in range(len(self.batches)) if self.batches[b].heldout]
        n_ho = sum(int(self.reals[b].sum()) for b in ho)
        if not n_ho:
            return None
        kl_cut = sum(_kl_sum(self.full_e, self.full[b], self.cut[b], self.reals[b]) for b in ho)
        kl_patch = sum(_kl_sum(self.full_e, self.full[b], self.patched[b], self.reals[b]) for b in ho)
        log.info("held-out KL to the full model (PyTorch): cut alone %.4f, with %d patch(es) %.4f",
                 kl_cut / n_ho, len(self.weights), kl_patch / n_ho)
        return {"cut": kl_cut / n_ho, "patched": kl_patch / n_ho, "tokens": n_ho}


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
    if fit not in PATCH_FITS:
        raise RecoverError(f"patch fit {fit!r} is not one of {', '.join(PATCH_FITS)}")
    t0 = time.time()
    walk = _PatchWalk(model, plan, fit, weighting, pruned_from)  # copies the layers the plan cuts inside
    batches = _batches(cal, heldout, seqs_per_batch)
    stats: dict[str, Any] = {"fit": fit, "weighting": weighting, "patches": walk.patch_stats}
    with torch.inference_mode():
        walk.start(batches)
        for lp in plan.layers:
            walk.layer(lp)
        kl = walk.heldout_kl()
    if kl is not None:
        stats["heldout_kl"] = kl
    stats["seconds"] = round(time.time() - t0, 2)
    return walk.weights, stats
