"""The one-shot scan of the in-memory engine: every unit's causal score from one walk through the model.

One walk per micro-batch carries the model's state h_i forward. At each layer i it measures, on the main path,
the Block Influence of the layer and of its sub-blocks, the neuron statistics and the head output norms; then
the variants born at layer i (the layer or a sub-block bypassed; each query head and KV group zeroed; the MLP
narrowed) start from h_i and run through layers i+1… as stacked batches, scored against the reference
(:meth:`gguf_prune.scoring.ablate.Engine.run_variants`). The spec and the result are shared with the streamed
engine and live in :mod:`gguf_prune.scoring.ablate`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import numpy as np
import torch

from gguf_prune.scoring import ablate
from gguf_prune.scoring.ablate import Context, Engine, Reference, ScanResult, ScanSpec, has_attention, has_mlp


@torch.inference_mode()
def scan(engine: Engine, groups: Sequence[tuple[torch.Tensor, torch.Tensor]], refs: Sequence[Reference],
         spec: ScanSpec, progress: Callable[[int], None] | None = None) -> ScanResult:
    """One walk per micro-batch through the model as loaded, carrying its state h_i forward.

    At each layer i: BI of the layer and of its sub-blocks, neuron statistics and head output norms from the
    main path; then the variants that start from h_i (layer / attention / MLP bypassed; each query head and
    KV group zeroed) run through layers i+1… as stacked batches and are scored against the reference.
    """
    drops = tuple(int(d) for d in spec.width_drops)
    r = _empty_result(engine, spec, drops)
    clock = _Clock(r.seconds)
    for (ids, mask), ref in zip(groups, refs):
        ctx = engine.context(ids, mask)
        r.n_real += ref.n_real
        r.n_tgt += ref.n_tgt
        h = engine.embed(ids)
        for i in range(engine.n_layer):
            h = _scan_layer(engine, i, h, mask, ctx, ref, spec, drops, r, clock)
            if progress:
                progress(1)
        with clock("walk"):
            kl, nll = engine.divergence(h, ref, 1)  # the model as loaded vs the reference
        r.base_kl += float(kl[0])
        r.base_nll += float(nll[0])
    _mark_unscored(engine, spec, r)
    return r


def _empty_result(engine: Engine, spec: ScanSpec, drops: tuple[int, ...]) -> ScanResult:
    """Zeroed sums for every score the spec asks for."""
    L, nh, nkv = engine.n_layer, engine.n_head, engine.n_head_kv
    r = ScanResult(bi=np.zeros(L), attn_bi=np.zeros(L), mlp_bi=np.zeros(L), kl=np.zeros(L), nll=np.zeros(L),
                   attn_kl=np.zeros(L), mlp_kl=np.zeros(L))
    for i in spec.head_layers:
        r.head_kl[i], r.kv_kl[i], r.head_norm[i] = np.zeros(nh), np.zeros(nkv), np.zeros(nh)
    for i in (spec.width_order if drops else ()):
        r.width_kl[i] = np.zeros(len(drops))
        if i in spec.width_fits:
            r.width_kl_repaired[i] = np.full(len(drops), np.nan)
    return r


def _scan_layer(engine: Engine, i: int, h: torch.Tensor, mask: torch.Tensor, ctx: Context, ref: Reference,
                spec: ScanSpec, drops: tuple[int, ...], r: ScanResult, clock: "_Clock") -> torch.Tensor:
    """Layer i of one walk: its main-path measures, then the variants born here. Returns the main path's
    state after layer i (the input of layer i+1)."""
    with clock("walk"):
        want = (["o_in"] if i in spec.head_layers else []) + (["ff"] if spec.neurons or i in r.width_kl else [])
        with engine.capture(i, want) as cap:
            h_mid = h + engine.attn(i, h, ctx)
            h_out = h_mid + engine.mlp(i, h_mid)
        rr = mask.bool().to(h.device)
        r.bi[i] += ablate._one_minus_cos(h, h_out, rr)
        r.attn_bi[i] += ablate._one_minus_cos(h, h_mid, rr)
        r.mlp_bi[i] += ablate._one_minus_cos(h_mid, h_out, rr)
        if "ff" in cap and spec.width_grams is not None:
            spec.width_grams.add(i, cap["ff"], h_out, rr)
        if "ff" in cap and spec.neurons:
            a = cap["ff"][rr].float().abs()  # (n_real, n_ff): down_proj inputs of the real tokens
            r.ff_count[i] = r.ff_count.get(i, 0) + (a > spec.tau).sum(0, dtype=torch.float64).cpu().numpy()
            r.ff_abs[i] = r.ff_abs.get(i, 0) + a.sum(0, dtype=torch.float64).cpu().numpy()
            r.ff_sq[i] = r.ff_sq.get(i, 0) + a.double().pow(2).sum(0).cpu().numpy()
    if spec.layers:
        with clock("layers"):
            _layer_variants(engine, i, h, h_mid, ctx, ref, spec.sublayers, r)
    if i in r.width_kl:
        with clock("width"):
            _width_variants(engine, i, h_mid, cap["ff"], ctx, ref, drops, spec.width_order[i], r,
                            spec.width_fits.get(i))
    if "o_in" in cap:
        with clock("heads"):
            _head_variants(engine, i, h, cap["o_in"], ctx, ref, set(spec.removed_heads.get(i, ())), r)
    return h_out


def _mark_unscored(engine: Engine, spec: ScanSpec, r: ScanResult) -> None:
    """NaN for what was not measured: every layer KL without ``spec.layers``; heads (and KV groups wholly made
    of heads) that a base plan removed."""
    if not spec.layers:
        r.kl[:] = r.nll[:] = r.attn_kl[:] = r.mlp_kl[:] = np.nan
    for i in spec.head_layers:
        removed = set(spec.removed_heads.get(i, ()))
        for q in removed:
            r.head_kl[i][q] = r.head_norm[i][q] = np.nan
        for g in range(engine.n_head_kv):
            if all(q in removed for q in range(g * engine.group_size, (g + 1) * engine.group_size)):
                r.kv_kl[i][g] = np.nan


class _Clock:
    """Seconds per phase of the scan (walk / layers / width / heads), summed into ``seconds``."""

    def __init__(self, seconds: dict):
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


# ----------------------------------------------------------------------------- the variants of one layer


def _layer_variants(engine: Engine, i: int, h, h_mid, ctx: Context, ref: Reference, sublayers: bool,
                    r: ScanResult) -> None:
    """Layer i bypassed, its attention bypassed, its MLP bypassed: one stacked batch through layers i+1…"""
    layer = engine.layers[i]
    kinds = ["layer"]
    if sublayers:
        kinds += [k for k, ok in (("attn", has_attention(layer)), ("mlp", has_mlp(layer))) if ok]
    # each variant's input to layer i+1
    states = [h if k == "layer" else (h + engine.mlp(i, h) if k == "attn" else h_mid) for k in kinds]
    kl, nll = engine.run_variants(i + 1, states, len(states), ctx, ref)
    for k, kv, nv in zip(kinds, kl, nll):
        if k == "layer":
            r.kl[i] += kv
            r.nll[i] += nv
        elif k == "attn":
            r.attn_kl[i] += kv
        else:
            r.mlp_kl[i] += kv
    if not (sublayers and has_attention(layer)):
        r.attn_kl[i] = np.nan
    if not (sublayers and has_mlp(layer)):
        r.mlp_kl[i] = np.nan


def _width_variants(engine: Engine, i: int, h_mid, ff, ctx: Context, ref: Reference, drops: Sequence[int],
                    order: np.ndarray, r: ScanResult, fits: list | None = None) -> None:
    """Layer i's MLP narrowed: the first ``d`` neurons of ``order`` zeroed, for each d in ``drops``; one stacked
    batch (chunked) through layers i+1… With ``fits`` (one per live drop, :mod:`gguf_prune.scoring.width_repair`)
    each narrowed MLP is scored again with its repair."""
    from gguf_prune.scoring.width_repair import repaired_outputs

    down = engine.layers[i].mlp.down_proj
    idx = torch.as_tensor(np.asarray(order, dtype=np.int64), device=ff.device)
    n_all = len(drops)
    drops = [d for d in drops if d < len(order)]  # at least one live neuron stays (else: the MLP's own KL)

    def states(v0: int, v1: int) -> torch.Tensor:
        x = ff.repeat(v1 - v0, 1, 1).view(v1 - v0, *ff.shape)  # (V, b, T, n_ff)
        for k, d in enumerate(drops[v0:v1]):
            x[k, ..., idx[:d]] = 0
        return h_mid.repeat(v1 - v0, 1, 1) + engine.mlp_out(i, down(x.view((v1 - v0) * ff.shape[0], *ff.shape[1:])))

    kl, _ = engine.run_variants(i + 1, states, len(drops), ctx, ref)
    r.width_kl[i][:len(drops)] += kl
    r.width_kl[i][len(drops):n_all] = np.nan
    if fits:
        def repaired(v0: int, v1: int) -> torch.Tensor:
            y = repaired_outputs(ff, fits, v0, v1).to(h_mid.dtype)
            return h_mid.repeat(v1 - v0, 1, 1) + engine.mlp_out(i, y)

        kl, _ = engine.run_variants(i + 1, repaired, len(fits), ctx, ref)
        rk = r.width_kl_repaired[i]
        rk[:len(fits)] = np.where(np.isnan(rk[:len(fits)]), 0.0, rk[:len(fits)]) + kl


def _head_variants(engine: Engine, i: int, h, o_in, ctx: Context, ref: Reference, removed: set,
                   r: ScanResult) -> None:
    """Each query head of layer i zeroed, then each KV group: one stacked batch (chunked) through layers i…"""
    nh, nkv, hd = engine.n_head, engine.n_head_kv, engine.head_dim
    b = h.shape[0]
    rr = ref.real.to(o_in.device)
    # o_in: (b, T, n_head*hd), the input of o_proj: head q owns columns q*hd:(q+1)*hd
    per_head = o_in.float().view(b, -1, nh, hd).norm(dim=-1)  # (b, T, n_head)
    r.head_norm[i] += per_head[rr].sum(0, dtype=torch.float64).cpu().numpy()
    zero_sets = ablate._head_zero_sets(nh, nkv, removed)

    def states(v0: int, v1: int) -> torch.Tensor:
        x = o_in.repeat(v1 - v0, 1, 1).view(v1 - v0, b, -1, nh, hd)  # (V, b, T, n_head, hd)
        for k, (_, _, zs) in enumerate(zero_sets[v0:v1]):
            x[k, :, :, zs] = 0
        a_v = engine.layers[i].self_attn.o_proj(x.view((v1 - v0) * b, -1, nh * hd))  # (V·b, T, d)
        a_v = engine.attn_out(i, a_v)
        hm = h.repeat(v1 - v0, 1, 1) + a_v  # (V·b, T, d)
        return hm + engine.mlp(i, hm)  # the input of layer i+1 in each variant

    kl, _ = engine.run_variants(i + 1, states, len(zero_sets), ctx, ref)
    for (kind, idx, _), v in zip(zero_sets, kl):
        if kind == "head":
            r.head_kl[i][idx] += v
        else:
            r.kv_kl[i][idx] += v
    if engine.group_size == 1:  # MHA: a KV group is one head
        r.kv_kl[i] = r.head_kl[i]
