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
from gguf_prune.plan import LayerPlan, Plan, with_patches
from gguf_prune.recovered import RecoverError
from gguf_prune.recovery.options import PATCH_FITS
from gguf_prune.ridge import RidgeSums

log = logging.getLogger(__name__)

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # × mean diagonal of XᵀX


# ----------------------------------------------------------------------------- where patches go


def mark_patches(plan: Plan) -> Plan:
    """The plan with a linear patch on the last layer of every run of removed layers and on every
    removed attention sub-block (:func:`gguf_prune.plan.with_patches`)."""
    return replace(plan, layers=with_patches(plan.layers))


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


def fit_patch(acc: RidgeSums, grid=RIDGE_GRID) -> tuple[torch.Tensor, dict]:
    """W (d_out, d_in) toward zero with the ridge that does best on the held-out sums (1e-3 without any),
    and its figures."""
    if acc.n == 0:
        raise RecoverError("no calibration tokens to fit a patch on")
    scores = {}
    if acc.n_h:
        for a in grid:
            scores[a] = acc.heldout_residual(acc.solve(a))
        alpha = min(scores, key=scores.get)
    else:
        alpha = 1e-3
    b = acc.solve(alpha)
    stats = {"tokens": acc.n, "heldout_tokens": acc.n_h, "ridge": alpha,
             "train_residual": round(acc.train_residual(b), 6)}
    if acc.n_h:
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

    def __init__(self, model, plan: Plan, fit: str, weighting: str, pruned_from=None, repairs=None):
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
        self.repairs = repairs  # fits the narrowed layers' output projections (repair.Repairs), or None

    def start(self, batches: list[_Batch]) -> None:
        """The three streams at the embedding (call under torch.inference_mode, as every step after)."""
        self.batches = batches
        self.ctxs = [self.full_e.context(b.ids, b.mask) for b in batches]
        self.reals = [b.mask.bool() for b in batches]
        self.full = [self.full_e.embed(b.ids).float() for b in batches]
        self.patched = [h.clone() for h in self.full]
        self.cut = [h.clone() if b.heldout else None for h, b in zip(self.full, batches)]
        self.run_in: tuple[list, list] | None = None  # (full, patched) where the current run of removed layers began
        self.ref_logp = None
        if self.repairs is not None:  # the full model's log-probabilities on the held-out tokens: a repair's KL is to them
            self.ref_logp = [self._logp(self._rest(self.full_e, 0, h, c), r) if b.heldout else None
                             for h, c, r, b in zip(self.full, self.ctxs, self.reals, batches)]

    def _logp(self, h: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """log-softmax of the logits of the real tokens of last states ``h`` (b, T, d) → (n, n_vocab) float32."""
        x = self.full_e.final(h)[real.to(h.device)].float()
        z = x @ self.full_e.W.T
        if self.full_e.bias is not None:
            z += self.full_e.bias
        return torch.log_softmax(z, -1)

    @staticmethod
    def _rest(engine, k: int, h: torch.Tensor, ctx) -> torch.Tensor:
        """``h`` through ``engine``'s layers k, k+1, … to the last."""
        for j in range(k, engine.n_layer):
            h = engine.layer(j, h, ctx)
        return h

    def heldout_kl_from(self, k: int, states: list, mlp_of: int | None = None) -> float:
        """Mean KL to the full model over the held-out real tokens when the pruned stream holds ``states`` (one per
        held-out batch, in batch order) before pruned layer ``k`` and runs the rest of the cut model from there;
        ``mlp_of`` = k: the states are after layer k's attention (its MLP runs first)."""
        total, n = 0.0, 0
        ho = [b for b, batch in enumerate(self.batches) if batch.heldout]
        for b, h in zip(ho, states):
            if mlp_of is not None:
                h = h + self.pr_e.mlp(mlp_of, h)
            h = self._rest(self.pr_e, k, h, self.ctxs[b])
            p = self.ref_logp[b]  # (n, V)
            total += float((p.exp() * (p - self._logp(h, self.reals[b]))).sum(-1).double().sum())
            n += p.shape[0]
        return total / max(n, 1)

    def layer(self, lp: LayerPlan) -> None:
        """Move the streams through one layer of the plan, fitting its patch if it has one."""
        if lp.removed:
            self._removed_layer(lp)
            return
        self.run_in = None  # a run without a patch ends here: the cut alone
        i, k = lp.index, self.pos[lp.index]
        self.cut = [None if h is None else self.pr_e.layer(k, h, c) for h, c in zip(self.cut, self.ctxs)]  # unrepaired
        if self.repairs is not None and self.repairs.wanted(lp):
            self._repaired_layer(lp, k)
        elif lp.attention_removed and lp.patch is not None:
            self._patched_attention(lp, k)
        else:
            self.full = [self.full_e.layer(i, h, c) for h, c in zip(self.full, self.ctxs)]
            self.patched = [self.pr_e.layer(k, h, c) for h, c in zip(self.patched, self.ctxs)]

    def _repaired_layer(self, lp: LayerPlan, k: int) -> None:
        """A kept layer with a narrowed attention or MLP: each repair is fitted on the states the pruned,
        already repaired model gives, toward the full model's state after the sub-block."""
        i = lp.index
        full_mid = [h + self.full_e.attn(i, h, c) for h, c in zip(self.full, self.ctxs)]
        if lp.attention_removed and lp.patch is not None:
            patched_mid = self._attention_patch(lp, k, full_mid)
        else:
            if self.repairs.heads_wanted(lp):
                self.repairs.attention(self, lp, k, full_mid)
            patched_mid = [h + self.pr_e.attn(k, h, c) for h, c in zip(self.patched, self.ctxs)]
        self.full = [h + self.full_e.mlp(i, h) for h in full_mid]
        if self.repairs.width_wanted(lp):
            self.repairs.mlp(self, lp, k, patched_mid, self.full)
        self.patched = [h + self.pr_e.mlp(k, h) for h in patched_mid]

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
        full_mid = [h + self.full_e.attn(i, h, c) for h, c in zip(self.full, self.ctxs)]
        patched_mid = self._attention_patch(lp, k, full_mid)
        self.patched = [h + self.pr_e.mlp(k, h) for h in patched_mid]
        self.full = [h + self.full_e.mlp(i, h) for h in full_mid]

    def _attention_patch(self, lp: LayerPlan, k: int, full_mid: list) -> list:
        """Fit the patch of a removed attention toward ``full_mid``; the patched stream after it."""
        ln = self.pr_e.layers[k].input_layernorm
        inputs = self.patched if self.fit == "pruned" else self.full
        W = self._fit_one(lp.index, inputs, lambda h: ln(h).float(), full_mid)
        return [h + ln(h).float() @ W.T for h in self.patched]

    def _fit_one(self, index: int, inputs: list, x_of: Callable[[torch.Tensor], torch.Tensor],
                 target: list) -> torch.Tensor:
        """Fit the patch at ``index``: X = x_of(input state), Y = target − input state; return W (d, d)."""
        acc = RidgeSums(self.d)
        for b, (s_, t_) in enumerate(zip(inputs, target)):
            x = x_of(s_)
            w = 1.0 / (t_.float().pow(2).mean(-1) + self.eps) if self.weighting == "rms" else None  # (b, T)
            acc.add(x, t_.float() - s_.float(), self.reals[b], self.batches[b].heldout, w)
        W, st = fit_patch(acc)
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
        n_rep = 0 if self.repairs is None else sum(st["ridge"] is not None for st in self.repairs.stats)
        log.info("held-out KL to the full model (PyTorch): cut alone %.4f, with %d patch(es) and %d repair(s) %.4f",
                 kl_cut / n_ho, len(self.weights), n_rep, kl_patch / n_ho)
        return {"cut": kl_cut / n_ho, "patched": kl_patch / n_ho, "tokens": n_ho}


def fit_patches(model, plan: Plan, cal: Calibration, heldout: set[int], fit: str = "pruned",
                weighting: str = "rms", seqs_per_batch: int = 8, pruned_from=None,
                repair: bool = False, repair_bias: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit every patch of ``plan`` on ``cal`` (sequences in ``heldout`` choose the ridge and are scored), and with
    ``repair`` every repair of a narrowed attention or MLP (:mod:`gguf_prune.recovery.repair`), in one pass
    down the layers: each fit sees the states the pruned model with every earlier fit gives.

    Returns the tensors (``{model.layers.{i}.patch.weight: W}``, and the repaired projections) and statistics,
    with the held-out KL of the cut alone and of the cut with its patches and repairs (PyTorch, per real token).

    ``model`` is the unpruned model (the target). ``pruned_from``: a model of the same shape whose layers
    the pruned path runs instead of ``model``'s (the weights an earlier recovery left); default ``model``.

    ``weighting="rms"`` weighs each token by 1/mean(h_out²): the next layer sees rmsnorm(h), so an error
    matters relative to the size of the state (without it the few huge "attention sink" states dominate).
    ``repair_bias``: repairs fit a bias on the output projection too (llama and deci load one).
    """
    from gguf_prune.recovery.repair import Repairs

    if fit not in PATCH_FITS:
        raise RecoverError(f"patch fit {fit!r} is not one of {', '.join(PATCH_FITS)}")
    t0 = time.time()
    repairs = Repairs(plan.shape, bias=repair_bias) if repair else None
    walk = _PatchWalk(model, plan, fit, weighting, pruned_from, repairs)  # copies the layers the plan cuts inside
    batches = _batches(cal, heldout, seqs_per_batch)
    stats: dict[str, Any] = {"fit": fit, "weighting": weighting, "patches": walk.patch_stats}
    with torch.inference_mode():
        walk.start(batches)
        for lp in plan.layers:
            walk.layer(lp)
        kl = walk.heldout_kl()
    if repairs is not None:
        walk.weights.update(repairs.weights)
        stats["repairs"] = repairs.stats
    if kl is not None:
        stats["heldout_kl"] = kl
    stats["seconds"] = round(time.time() - t0, 2)
    return walk.weights, stats
