"""Closed-form repair of narrowed layers: refit the output projection of what a cut keeps.

When a plan removes some of a layer's MLP neurons, the kept columns of ``down_proj`` (and a new bias)
are refitted so that the narrowed MLP does what the whole one did; when it removes query heads or KV
groups, the same is done for ``o_proj``'s kept head columns. With A the kept units' activations (the
input of the projection, restricted to the kept columns) and Y what the sub-block should add to the
residual stream, the fit is a ridge regression toward the original columns W₀:

    min Σₜ wₜ ‖yₜ − W·aₜ − b‖² + λ ‖W − W₀‖²

accumulated as AᵀA and AᵀY in float64 (:class:`gguf_prune.recovery.ridge.RidgeSums`), for the kept block
only, one layer at a time. The details that decide whether it helps:

* *sequential*: A comes from the pruned model with every earlier repair and patch applied, and Y is the
  full model's state after the sub-block minus the pruned state before it, so each repair also absorbs
  what earlier cuts changed (in a layer with sandwich norms, whose output is normed, Y is the full
  projection of the same activations instead);
* *outliers*: the first token of every sequence (the attention sink, whose states are orders of magnitude
  larger) is left out, and each token is weighed by 1 / mean(state²) (the next layer sees the state
  normed, so an error counts relative to its size);
* *strength by KL*: each λ of :data:`REPAIR_GRID` (× the mean diagonal of AᵀA) is tried on the held-out
  sequences, with the rest of the cut model run to the logits, and the one of least KL to the full model
  is kept; a repair that does not lower the held-out KL is not applied.

The repaired tensors are the source model's ``model.layers.{i}.mlp.down_proj.weight`` (full width, removed
columns zero) and ``.bias``, and ``self_attn.o_proj.weight`` / ``.bias``: the recover directory carries them to
the GGUF (llama and deci load the biases).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from gguf_prune.plan import LayerPlan, ModelShape
from gguf_prune.recovered import RecoverError
from gguf_prune.ridge import RidgeSums, fit_mask, token_weights

if TYPE_CHECKING:
    from gguf_prune.recovery.patches import _PatchWalk

log = logging.getLogger(__name__)

REPAIR_GRID = (0.3, 1.0, 3.0)  # ridge strengths tried, × the mean diagonal of AᵀA
DOWN = "model.layers.{}.mlp.down_proj"
OUT = "model.layers.{}.self_attn.o_proj"


def width_wanted(lp: LayerPlan, s: ModelShape) -> bool:
    """The layer keeps its MLP with some neurons removed."""
    return lp.neurons is not None and 0 < len(lp.neurons) < s.n_ff and not lp.removed


def heads_wanted(lp: LayerPlan, s: ModelShape) -> bool:
    """The layer keeps its attention with some query heads (or whole KV groups) removed."""
    return lp.heads is not None and 0 < len(lp.heads) < s.n_head and not lp.removed


def repair_count(plan) -> int:
    """How many sub-blocks of ``plan`` a repair refits."""
    s = plan.shape
    return sum(width_wanted(lp, s) + heads_wanted(lp, s) for lp in plan.layers)


def _inputs(engine, k: int, what: str, runs: list) -> list:
    """The input of pruned layer k's o_proj ("o_in") or down_proj ("ff") during each call of ``runs`` (one per
    batch), through the engine's own capture."""
    out = []
    for run in runs:
        with engine.capture(k, [what]) as cap:
            run()
        out.append(cap[what].detach().float())
    return out


class Repairs:
    """The repairs of one plan, fitted by a :class:`~gguf_prune.recovery.patches._PatchWalk` as it passes each
    narrowed layer: the repaired tensors (``weights``) and one figure per repair (``stats``)."""

    def __init__(self, shape: ModelShape, bias: bool = True, grid: tuple[float, ...] = REPAIR_GRID):
        if not grid or any(not a > 0 for a in grid):
            raise RecoverError(f"repair ridge strengths {grid!r}: give one or more positive numbers")
        self.s, self.bias, self.grid = shape, bias, tuple(grid)
        self.weights: dict[str, torch.Tensor] = {}
        self.stats: list[dict] = []

    def wanted(self, lp: LayerPlan) -> bool:
        return self.width_wanted(lp) or self.heads_wanted(lp)

    def width_wanted(self, lp: LayerPlan) -> bool:
        return width_wanted(lp, self.s)

    def heads_wanted(self, lp: LayerPlan) -> bool:
        return heads_wanted(lp, self.s) and not lp.attention_removed

    # --- the two sub-blocks

    def attention(self, walk: _PatchWalk, lp: LayerPlan, k: int, full_mid: list) -> None:
        """Refit ``o_proj``'s kept head columns of pruned layer ``k`` (source ``lp.index``), in place."""
        from gguf_prune.scoring.ablate import has_sandwich_norms

        layer, s = walk.pr_e.layers[k], self.s
        cols = torch.cat([torch.arange(h * s.head_dim, (h + 1) * s.head_dim) for h in sorted(lp.kept_heads(s))])
        proj = layer.self_attn.o_proj
        w0 = walk.full_e.layers[lp.index].self_attn.o_proj.weight.detach().float()  # the original (n_embd, q)
        e = walk.pr_e
        z = _inputs(e, k, "o_in", [lambda h=h, c=c: e.attn(k, h, c) for h, c in zip(walk.patched, walk.ctxs)])
        local = has_sandwich_norms(layer)
        targets = [zi @ w0.T if local else fm - h for zi, fm, h in zip(z, full_mid, walk.patched)]

        def states(b: int, y: torch.Tensor) -> torch.Tensor:  # the held-out state after the attention
            return walk.patched[b] + walk.pr_e.attn_out(k, y)

        self._fit(walk, "heads", lp.index, proj, OUT.format(lp.index), cols, w0, z, targets, full_mid, states,
                  k, mlp_of=k)

    def mlp(self, walk: _PatchWalk, lp: LayerPlan, k: int, patched_mid: list, full_out: list) -> None:
        """Refit ``down_proj``'s kept neuron columns of pruned layer ``k`` (source ``lp.index``), in place."""
        from gguf_prune.scoring.ablate import has_sandwich_norms

        layer = walk.pr_e.layers[k]
        cols = torch.tensor(sorted(lp.neurons))
        proj = layer.mlp.down_proj
        w0 = walk.full_e.layers[lp.index].mlp.down_proj.weight.detach().float()  # the original (n_embd, n_ff)
        e = walk.pr_e
        a = _inputs(e, k, "ff", [lambda h=h: e.mlp(k, h) for h in patched_mid])
        local = has_sandwich_norms(layer)
        targets = [ai @ w0.T if local else fo - h for ai, fo, h in zip(a, full_out, patched_mid)]

        def states(b: int, y: torch.Tensor) -> torch.Tensor:  # the held-out state after the MLP
            return patched_mid[b] + walk.pr_e.mlp_out(k, y)

        self._fit(walk, "width", lp.index, proj, DOWN.format(lp.index), cols, w0, a, targets, full_out, states,
                  k + 1, mlp_of=None)

    # --- the fit

    def _fit(self, walk: _PatchWalk, kind: str, index: int, proj: torch.nn.Linear, name: str, cols: torch.Tensor,
             w0: torch.Tensor, acts: list, targets: list, after: list, states, k_next: int,
             mlp_of: int | None) -> None:
        """Fit ``proj``'s columns ``cols`` (and a bias) on ``acts`` → ``targets``; keep the strength of least
        held-out KL, or nothing when no strength beats the cut."""
        n_in = len(cols) + self.bias
        acc = RidgeSums(n_in, w0.shape[0], heldout_sums=False)  # judged by held-out KL, not residual
        for b, (x, y) in enumerate(zip(acts, targets)):
            x = x[..., cols]
            if self.bias:
                ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype)
                x = torch.cat([x, ones], -1)
            acc.add(x, y, fit_mask(walk.reals[b]), walk.batches[b].heldout, token_weights(after[b], walk.eps))
        if acc.n == 0:
            raise RecoverError("no calibration tokens to fit a repair on (every sequence has one real token)")
        if acc.n < len(cols):
            log.warning("layer %d %s repair: %d calibration tokens for %d kept units: the fit is underdetermined "
                        "and leans on the ridge toward the original weights; give more calibration text "
                        "(--samples, --seq-len)", index, kind, acc.n, len(cols))
        prior = w0[:, cols].T.double()  # (k, n_embd): the original columns
        if self.bias:
            prior = torch.cat([prior, torch.zeros(1, w0.shape[0], dtype=torch.float64)])
        free = (len(cols),) if self.bias else ()
        choice, fit, kls = self._choose(walk, lambda a: acc.solve(a, prior, free), acts, cols, proj, states,
                                        k_next, mlp_of)
        st = {"layer": index, "kind": kind, "kept": len(cols), "tokens": acc.n, "heldout_tokens": acc.n_h,
              "ridge": choice, "heldout_kl": kls}
        if choice is not None:
            self._apply(proj, cols, fit, name)
            st["train_residual"] = round(acc.train_residual(fit), 6)
        self.stats.append(st)
        log.info("repair of layer %d (%s, %d kept): %s", index, kind, len(cols),
                 "not applied (no strength beat the cut on held-out KL)" if choice is None
                 else f"ridge {choice:g}, held-out KL " + " → ".join(f"{kls[k]:.4f}" for k in ("cut", str(choice))
                                                                      if k in kls))

    def _choose(self, walk: _PatchWalk, solve, acts: list, cols, proj, states, k_next: int,
                mlp_of: int | None) -> tuple[float | None, torch.Tensor | None, dict]:
        """The strength whose fit (``solve(alpha)``) gives the least held-out KL, and that fit ((None, None): the
        cut itself is best), and every KL. One fit is held at a time."""
        ho = [b for b, batch in enumerate(walk.batches) if batch.heldout]
        if not ho:
            mid = self.grid[len(self.grid) // 2]
            return mid, solve(mid), {}  # nothing to choose on: the middle strength
        kls = {"cut": walk.heldout_kl_from(k_next, [states(b, proj(acts[b])) for b in ho], mlp_of)}
        best, best_fit = "cut", None
        for a in self.grid:
            fit = solve(a)
            ys = [self._project(acts[b], cols, fit) for b in ho]
            kls[a] = walk.heldout_kl_from(k_next, [states(b, y) for b, y in zip(ho, ys)], mlp_of)
            if kls[a] < kls[best]:
                best, best_fit = a, fit
            del fit
        return (None if best == "cut" else best), best_fit, {str(k): round(v, 6) for k, v in kls.items()}

    def _project(self, x: torch.Tensor, cols: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
        """The repaired projection of activations ``x`` (…, n_in): the kept columns times the fit, plus the bias."""
        k = len(cols)
        y = x[..., cols] @ fit[:k].float()
        return y + fit[k].float() if self.bias else y

    def _apply(self, proj: torch.nn.Linear, cols: torch.Tensor, fit: torch.Tensor, name: str) -> None:
        """Write the fit into the pruned layer's projection and into the recovered tensors."""
        from gguf_prune.models.cuts import add_bias

        k = len(cols)
        with torch.no_grad():
            w = torch.zeros_like(proj.weight)
            w[:, cols] = fit[:k].T.to(w.dtype)
            proj.weight.copy_(w)
            self.weights[name + ".weight"] = w.detach().float().clone()
            if self.bias:
                add_bias(proj).copy_(fit[k].to(proj.weight.dtype))
                self.weights[name + ".bias"] = proj.bias.detach().float().clone()
