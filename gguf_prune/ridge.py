"""One ridge least-squares fit, accumulated over a token stream: the arithmetic under every closed-form recovery
(linear patches, repairs) and under repair-aware scoring.

``Y ≈ X·B`` over the real tokens of the calibration batches, with the sums XᵀX, XᵀY and ΣY² kept in float64,
the training and the held-out sequences apart. :meth:`RidgeSums.solve` regularises toward a *prior* B₀ (zero for
a linear patch, the original weights for a repair):

    B = (XᵀX + λ·D)⁻¹ (XᵀY + λ·D·B₀),   λ = alpha · mean diag(XᵀX)

where the diagonal D is 1 for every input but those listed as ``free`` (a bias column), which get a small
weight instead. The solve is a Cholesky factorisation of a symmetric positive definite matrix (λ > 0), in
float64: it gives finite weights even when the system is underdetermined (fewer tokens than inputs), and
:meth:`solve` checks that it did.
"""

from __future__ import annotations

import torch

from gguf_prune.errors import GgufPruneError

FREE_WEIGHT = 1e-3  # the ridge on a "free" column (a bias), relative to the others


class RidgeError(GgufPruneError, ValueError):
    """A fit that cannot give finite weights: what, and what to do."""


def fit_mask(real: torch.Tensor) -> torch.Tensor:
    """The real tokens (b, T) a repair is fitted on: all but the first real token of each sequence, whose state
    (the attention sink) is orders of magnitude larger than the others' and would dominate a squared error."""
    return real & (real.long().cumsum(-1) > 1)


def token_weights(after: torch.Tensor, eps: float) -> torch.Tensor:
    """Each token's weight in a repair's squared error, from the full model's state after the sub-block (b, T, d):
    1 / mean(state²), because the next layer sees the state normed, so an error counts relative to its size."""
    return 1.0 / (after.float().pow(2).mean(-1) + eps)


def ridge_solve(xx: torch.Tensor, xy: torch.Tensor, alpha: float, prior: torch.Tensor | None = None,
                free: tuple[int, ...] = ()) -> torch.Tensor:
    """B = (XᵀX + λ·D)⁻¹ (XᵀY + λ·D·B₀) from the sums ``xx`` (d_in, d_in) and ``xy`` (d_in, d_out), float64;
    λ = alpha × the mean of XᵀX's diagonal (1 where that is 0), D = 1 but FREE_WEIGHT on the ``free`` inputs."""
    d = xx.shape[0]
    scale = float(torch.diagonal(xx).mean())
    lam = alpha * (scale if scale > 0 else 1.0)
    reg = torch.ones(d, dtype=torch.float64, device=xx.device)
    if free:
        reg[list(free)] = FREE_WEIGHT
    a = xx + torch.diag(lam * reg)
    rhs = xy if prior is None else xy + (lam * reg)[:, None] * prior.to(xy)
    factor, info = torch.linalg.cholesky_ex(a)
    b = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.lstsq(a, rhs).solution
    if not bool(torch.isfinite(b).all()):
        raise RidgeError(f"the ridge fit (alpha {alpha:g}) gave non-finite weights: the calibration "
                         "activations hold inf or NaN; check the checkpoint's weights")
    return b


class RidgeSums:
    """Sums for one ridge fit of ``d_out`` targets on ``d_in`` inputs, train and held-out apart (float64)."""

    def __init__(self, d_in: int, d_out: int | None = None, device: str | torch.device = "cpu",
                 heldout_sums: bool = True):
        """``heldout_sums=False``: held-out tokens are only counted (a caller that judges a fit another way, by
        held-out KL, saves two d_in² matrices: 1.6 GB each for a 14,336-wide MLP)."""
        d_out = d_in if d_out is None else d_out
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.xx, self.xy = z(d_in, d_in), z(d_in, d_out)
        self.xx_h, self.xy_h = (z(d_in, d_in), z(d_in, d_out)) if heldout_sums else (None, None)
        self.yy = self.yy_h = 0.0
        self.n = self.n_h = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, real: torch.Tensor, heldout: bool,
            w: torch.Tensor | None = None) -> None:
        """Add the tokens of one batch: ``x`` (b, T, d_in), ``y`` (b, T, d_out), ``real`` (b, T) the tokens that
        count, ``w`` (b, T) a weight per token (its squared error counts w times)."""
        if heldout and self.xx_h is None:
            self.n_h += int(real.sum())
            return
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

    def solve(self, alpha: float, prior: torch.Tensor | None = None, free: tuple[int, ...] = ()) -> torch.Tensor:
        """B (d_in, d_out) for ridge strength ``alpha`` toward ``prior`` (d_in, d_out; None: zero)."""
        return ridge_solve(self.xx, self.xy, alpha, prior, free)

    @staticmethod
    def residual(b: torch.Tensor, xx: torch.Tensor, xy: torch.Tensor, yy: float) -> float:
        """Σ‖y − x·B‖² from the sums."""
        return float(torch.sum(b * (xx @ b)) - 2 * torch.sum(b * xy) + yy)

    def heldout_residual(self, b: torch.Tensor) -> float:
        """The held-out squared error of B relative to the targets' (1: B predicts nothing)."""
        return self.residual(b, self.xx_h, self.xy_h, self.yy_h) / max(self.yy_h, 1e-30)

    def train_residual(self, b: torch.Tensor) -> float:
        return self.residual(b, self.xx, self.xy, self.yy) / max(self.yy, 1e-30)
