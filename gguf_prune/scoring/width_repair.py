"""Repair-aware width scores (``score --width … --repair``): each narrowed MLP's KL with its repair applied.

The repair (:mod:`gguf_prune.recovery.repair`) refits the kept ``down_proj`` columns and a bias toward the
original weights. On the unpruned model the target of that fit is the full MLP's output ``W₀·a``, which is linear
in the activations, so every width variant of a layer can be fitted from one augmented Gram matrix of its
activations ``G = Σ wₜ [aₜ; 1][aₜ; 1]ᵀ`` (float64, (n_ff+1)², the same token weights and first-token rule as the
repair), accumulated on the neuron walk that scoring makes anyway:

    B_K = (G_KK + λD)⁻¹ (G_K,: · [W₀ᵀ; 0] + λD·[W₀,Kᵀ; 0])

To keep the scores honest the fit is *cross-fitted*: the Gram is kept in two folds (even and odd sequences of
each batch) and the variants of a sequence use the fit of the other fold, so no score is measured on the tokens
its repair was fitted on. The strength is fixed (:data:`SCORE_ALPHA`); `recover` chooses it by held-out KL.

Memory: two (n_ff+1)² float64 matrices per layer, all layers at once (the neuron walk visits them batch by
batch): 2 × 30 × 1,537² × 8 B = 1.1 GB for SmolLM2-135M.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gguf_prune.ridge import fit_mask, ridge_solve, token_weights

SCORE_ALPHA = 1.0  # ridge strength of the scored repairs, × the mean diagonal of the kept Gram block


@dataclass
class WidthGrams:
    """Per layer position, the two folds' augmented Gram matrices of the down_proj inputs."""

    eps: float
    grams: dict = field(default_factory=dict)  # pos → (2, n_ff+1, n_ff+1) float64

    def add(self, pos: int, a: torch.Tensor, after: torch.Tensor, real: torch.Tensor) -> None:
        """One batch: ``a`` (b, T, n_ff) the down_proj inputs, ``after`` (b, T, d) the state after the MLP."""
        b, _, n_ff = a.shape
        g = self.grams.get(pos)
        if g is None:
            g = self.grams[pos] = torch.zeros(2, n_ff + 1, n_ff + 1, dtype=torch.float64)
        mask = fit_mask(real.to(a.device))
        w = token_weights(after, self.eps).to(a.device)
        for fold in (0, 1):
            rows = torch.zeros_like(mask)
            rows[fold::2] = True
            sel = mask & rows
            x = a[sel].double()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], 1)
            sw = w[sel].double().sqrt()[:, None]
            g[fold] += ((x * sw).T @ (x * sw)).cpu()

    def fits(self, pos: int, order: np.ndarray, drops, w0: torch.Tensor) -> list | None:
        """For each drop d (the first d neurons of ``order`` removed): the two folds' fits, each (k+1, n_embd)
        float32 (kept columns' weights, then the bias), or None when a fold saw no token."""
        g = self.grams.get(pos)
        if g is None or any(float(g[f, -1, -1]) == 0 for f in (0, 1)):
            return None
        n_ff = g.shape[-1] - 1
        w0 = w0.detach().double().cpu()  # (n_embd, n_ff)
        target = torch.cat([w0.T, torch.zeros(1, w0.shape[0], dtype=torch.float64)])  # [W₀ᵀ; 0]: Y = [a;1]·this
        out = []
        for d in drops:
            kept = torch.as_tensor(np.asarray(order[d:], dtype=np.int64))
            idx = torch.cat([kept, torch.tensor([n_ff])])  # the kept neurons and the bias column
            prior = target[idx]  # the kept columns' original weights, and 0 for the bias
            per_fold = []
            for f in (0, 1):
                xx = g[f][idx][:, idx]
                xy = g[f][idx] @ target
                per_fold.append(ridge_solve(xx, xy, SCORE_ALPHA, prior, free=(len(kept),)).float())
            out.append((kept, per_fold))
        return out


def repaired_outputs(x: torch.Tensor, fits: list, v0: int, v1: int) -> torch.Tensor:
    """The repaired down_proj outputs of variants v0…v1-1 of one layer: ``x`` (b, T, n_ff) the full activations;
    row r of the batch uses the fit of the other fold (1 - r % 2). Returns (V·b, T, n_embd)."""
    b = x.shape[0]
    outs = []
    for kept, per_fold in fits[v0:v1]:
        kept = kept.to(x.device)
        xk = x[..., kept].float()
        y = torch.empty(*x.shape[:-1], per_fold[0].shape[1], dtype=torch.float32, device=x.device)
        for fold in (0, 1):
            rows = slice(1 - fold, b, 2)  # the rows of the other fold use this fold's fit
            B = per_fold[fold].to(x.device)
            y[rows] = xk[rows] @ B[:-1] + B[-1]
        outs.append(y)
    return torch.cat(outs, 0)
