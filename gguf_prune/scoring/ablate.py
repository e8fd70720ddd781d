"""The ablation engine: what the model's predictions lose when one part is bypassed.

Causal scores need, for every unit u, KL(full ‖ model without u) over the
calibration tokens. Run naively, that is one whole forward pass per unit:
L·(L−1) layer evaluations for L layers (L·L with hooks, which still compute
the bypassed layer). This engine

* walks the layers once in order, carrying the *full* model's hidden state
  h_i (the input of layer i) forward, and for each unit at layer i starts the
  variant from h_i and runs only layers i+1… (L·(L−1)/2 layer evaluations for
  the layer ablation); only one layer's worth of cached state is held;
* stacks the variants of one layer (the layer and its two sub-blocks; every
  query head and every KV group; or its MLP narrowed to fewer neurons, the
  lowest-energy ones zeroed first) along the batch dimension and sends them
  through the rest of the model as one batch, in chunks of ``batch_tokens``;
* computes the KL without materialising a log-softmax per variant. With
  z = W·ĥ the logits of the final normed state ĥ, p the reference
  distribution and w̄ = Σ_v p_v W_v (computed once per reference token):

      KL(p ‖ q) = Σ_v p_v (z_p,v − lse_p − z_q,v + lse_q)
                = (lse_q − lse_p) − w̄ · (ĥ_q − ĥ_p)

  so a variant costs one logits matmul and one logsumexp over the vocab
  (chunked over tokens: at most ``logit_tokens`` × vocab floats at a time); the
  difference terms are formed in float64. NLL of the next token is
  lse_q − W[target]·ĥ_q, so perplexity comes almost free.

The one-shot scan that drives the engine is :mod:`gguf_prune.scoring.oneshot`,
the greedy search :mod:`gguf_prune.scoring.greedy`; the naive path the
tests hold the engine to is :mod:`gguf_prune.scoring.naive`. This module keeps
what the in-memory and the streamed engine share: the scan's spec and result,
Block Influence and the head variants of a layer.

Units are addressed by *position* in the model as loaded (after a base plan
removed layers); score.py maps positions back to source-layer indices.
Modes of a layer: ``full``, ``attn`` (attention bypassed: output zeroed, residual
kept), ``mlp`` (MLP bypassed), ``layer`` (bypassed: output = input).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MODES = ("full", "attn", "mlp", "layer")
Unit = tuple  # ("layer"|"attn"|"mlp", pos), ("heads", pos, (h, ...)) or ("neurons", pos, (j, ...))


def combine(mode: str, kind: str) -> str:
    """The mode of a layer after also bypassing ``kind`` ("layer", "attn" or "mlp")."""
    if kind == "layer" or mode == "layer":
        return "layer"
    if mode == "full" or mode == kind:
        return kind
    return "layer"  # attention and MLP both bypassed


FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types


def attention_kind(layer) -> str:
    return getattr(layer, "attention_type", FULL)


def has_sandwich_norms(layer) -> bool:
    """Gemma's layers normalise each sub-block's output too (post_attention / post_feedforward norms)."""
    return hasattr(layer, "pre_feedforward_layernorm")


def has_attention(layer) -> bool:
    return hasattr(layer.self_attn, "o_proj")  # models.cuts.ZeroAttention has no weights


def has_mlp(layer) -> bool:
    return hasattr(layer.mlp, "down_proj")  # models.cuts.ZeroMLP has no weights


def _device(module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    """What every decoder layer needs for one micro-batch, per device, batch repeat and attention kind."""

    attention_mask: torch.Tensor | None  # (b, 1, T, T) bool from the model's own create_causal_mask, or None
    position_ids: torch.Tensor  # (1, T)
    cache_position: torch.Tensor  # (T,)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1, T, head_dim)
    batch: int
    # sliding-window layers (Gemma 3's local attention): their own mask and, where the model has one, RoPE
    sliding_mask: torch.Tensor | None = None
    local_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    _cache: dict = field(default_factory=dict)

    def on(self, device: torch.device, reps: int = 1, kind: str = FULL) -> dict:
        key = (str(device), reps, kind)
        if key not in self._cache:
            sliding = kind == SLIDING
            mask = self.sliding_mask if sliding else self.attention_mask
            if mask is not None:
                mask = mask.to(device)
                if reps > 1 and mask.shape[0] > 1:
                    # (b, 1, T, T) → (reps·b, 1, T, T), variant-major like the stacked states (2-D masks alike)
                    mask = mask.repeat(reps, *([1] * (mask.dim() - 1)))
            pe = self.local_position_embeddings if sliding and self.local_position_embeddings else \
                self.position_embeddings
            cos, sin = pe
            self._cache[key] = dict(attention_mask=mask, position_ids=self.position_ids.to(device),
                                    cache_position=self.cache_position.to(device),
                                    position_embeddings=(cos.to(device), sin.to(device)))
        return self._cache[key]


@dataclass
class Reference:
    """The reference model's predictions on one micro-batch, as the KL needs them (on the head's device)."""

    real: torch.Tensor  # (b, T) bool: real tokens
    hhat: torch.Tensor  # (n_real, d) float32: final normed hidden state
    lse: torch.Tensor  # (n_real,) float64: logsumexp of the logits
    wbar: torch.Tensor  # (n_real, d) float64: Σ_v p_v W_v
    tsel: torch.Tensor  # (n_real,) bool: real tokens followed by a real token (have a next-token target)
    w_target: torch.Tensor  # (n_tgt, d) float64: W[next token]
    b_target: torch.Tensor | None  # (n_tgt,) float64 lm_head bias at the target, if any
    nll: float  # summed next-token NLL of the reference model

    @property
    def n_real(self) -> int:
        return int(self.hhat.shape[0])

    @property
    def n_tgt(self) -> int:
        return int(self.w_target.shape[0])


# ----------------------------------------------------------------------------- engine


class Engine:
    """Prefix-cached, batched forward passes over a loaded LlamaForCausalLM (any device map)."""

    def __init__(self, model, batch_tokens: int = 32768, logit_tokens: int | None = None):
        self.model = model
        self.core = model.model
        self.layers = list(self.core.layers)
        self.n_layer = len(self.layers)
        self.kinds = [attention_kind(layer) for layer in self.layers]
        self.sandwich = [has_sandwich_norms(layer) for layer in self.layers]
        cfg = model.config
        self.n_head = int(cfg.num_attention_heads)
        self.n_head_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_head)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_head)
        self.group_size = self.n_head // self.n_head_kv
        w = model.lm_head.weight  # (n_vocab, d)
        # logits in float32 whatever the model dtype: bf16 rounding of the logits would swamp small KLs
        self.W = w.detach() if w.dtype == torch.float32 else w.detach().float()
        b = getattr(model.lm_head, "bias", None)
        self.bias = None if b is None else b.detach().float()
        self.head_device = self.W.device
        self.n_vocab = int(self.W.shape[0])
        self.batch_tokens = int(batch_tokens)
        self.logit_tokens = int(logit_tokens or max(64, (256 << 20) // (4 * self.n_vocab)))
        self.seq_layer_evals = 0.0  # decoder-layer evaluations × sequences (a sub-block counts half)
        self.vocab_seconds = 0.0  # time spent in the vocabulary projection and its reductions

    # --- building blocks -----------------------------------------------------------------
    def context(self, ids: torch.Tensor, mask: torch.Tensor) -> Context:
        from transformers.masking_utils import create_causal_mask

        dev = _device(self.core.embed_tokens)
        b, T = ids.shape
        cache_position = torch.arange(T, device=dev)
        position_ids = cache_position.unsqueeze(0)  # (1, T)
        probe = torch.empty((b, T, 1), dtype=self.core.embed_tokens.weight.dtype, device=dev)
        attn_mask = create_causal_mask(config=self.model.config, input_embeds=probe,
                                       attention_mask=mask.to(dev).long(), cache_position=cache_position,
                                       past_key_values=None, position_ids=position_ids)
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
            raise RuntimeError(f"attention implementation {self.model.config._attn_implementation!r} builds a "
                               f"{type(attn_mask).__name__} mask; load the model with attn_implementation='sdpa' "
                               "or 'eager'")
        pe = self.core.rotary_emb(probe, position_ids)  # (cos, sin): (1, T, head_dim)
        sliding_mask = local_pe = None
        if SLIDING in self.kinds:
            from transformers.masking_utils import create_sliding_window_causal_mask

            sliding_mask = create_sliding_window_causal_mask(
                config=self.model.config, input_embeds=probe, attention_mask=mask.to(dev).long(),
                cache_position=cache_position, past_key_values=None, position_ids=position_ids)
            local = getattr(self.core, "rotary_emb_local", None)  # Gemma 3: local layers have their own RoPE base
            local_pe = local(probe, position_ids) if local is not None else None
        return Context(attention_mask=attn_mask, position_ids=position_ids, cache_position=cache_position,
                       position_embeddings=pe, batch=b, sliding_mask=sliding_mask, local_position_embeddings=local_pe)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.core.embed_tokens
        return emb(ids.to(_device(emb)))  # (b, T, d)

    def layer(self, i: int, h: torch.Tensor, ctx: Context, reps: int = 1) -> torch.Tensor:
        layer = self.layers[i]
        if self.sandwich[i]:  # composed from its sub-blocks: the same arithmetic as the module's forward
            h_mid = h.to(_device(layer)) + self.attn(i, h, ctx, reps)
            return h_mid + self.mlp(i, h_mid)
        dev = _device(layer)
        h = h.to(dev)
        out = layer(h, past_key_values=None, use_cache=False, **ctx.on(dev, reps, self.kinds[i]))
        self.seq_layer_evals += h.shape[0]
        return out[0] if isinstance(out, tuple) else out

    def attn(self, i: int, h: torch.Tensor, ctx: Context, reps: int = 1) -> torch.Tensor:
        """The attention sub-block's contribution to the residual stream (without the residual)."""
        layer = self.layers[i]
        dev = _device(layer)
        h = h.to(dev)
        self.seq_layer_evals += 0.5 * h.shape[0]
        out = layer.self_attn(hidden_states=layer.input_layernorm(h), past_key_values=None,
                              **ctx.on(dev, reps, self.kinds[i]))
        return self.attn_out(i, out[0] if isinstance(out, tuple) else out)

    def attn_out(self, i: int, a: torch.Tensor) -> torch.Tensor:
        """What the residual stream receives from attention output ``a`` (o_proj's output) of layer i."""
        return self.layers[i].post_attention_layernorm(a) if self.sandwich[i] else a

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """The MLP sub-block's contribution to the residual stream, from the state after attention."""
        layer = self.layers[i]
        self.seq_layer_evals += 0.5 * h.shape[0]
        h = h.to(_device(layer))
        if self.sandwich[i]:
            return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        return layer.mlp(layer.post_attention_layernorm(h))

    def mlp_out(self, i: int, y: torch.Tensor) -> torch.Tensor:
        """What the residual stream receives from MLP output ``y`` (down_proj's output) of layer i."""
        return self.layers[i].post_feedforward_layernorm(y) if self.sandwich[i] else y

    def step(self, i: int, h: torch.Tensor, ctx: Context, mode: str = "full", reps: int = 1) -> torch.Tensor:
        if mode == "full":
            return self.layer(i, h, ctx, reps)
        if mode == "layer":
            return h
        if mode == "attn":  # attention output zeroed, residual kept
            h = h.to(_device(self.layers[i]))
            return h + self.mlp(i, h)
        if mode == "mlp":
            h = h.to(_device(self.layers[i]))
            return h + self.attn(i, h, ctx, reps)
        raise ValueError(f"unknown layer mode {mode!r}; one of {MODES}")

    def run(self, h: torch.Tensor, start: int, ctx: Context, reps: int = 1,
            modes: Sequence[str] | None = None) -> torch.Tensor:
        """Layers start… on ``h`` (reps·b rows, variant-major), each in its mode (default all full)."""
        for j in range(start, self.n_layer):
            h = self.step(j, h, ctx, "full" if modes is None else modes[j], reps)
        return h

    def final(self, h: torch.Tensor) -> torch.Tensor:
        norm = self.core.norm
        return norm(h.to(_device(norm))).to(self.head_device)

    def _lse(self, x: torch.Tensor) -> torch.Tensor:
        """logsumexp of the logits of rows ``x`` (n, d), float32 logits chunked over rows → (n,) float64."""
        out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        for s in range(0, x.shape[0], self.logit_tokens):
            z = x[s:s + self.logit_tokens].float() @ self.W.T  # (chunk, n_vocab)
            if self.bias is not None:
                z += self.bias
            out[s:s + self.logit_tokens] = torch.logsumexp(z, dim=-1).double()
        return out

    # --- reference and divergence -------------------------------------------------------
    @torch.inference_mode()
    def reference(self, ids: torch.Tensor, mask: torch.Tensor, modes: Sequence[str] | None = None) -> Reference:
        ctx = self.context(ids, mask)
        hn = self.final(self.run(self.embed(ids), 0, ctx, modes=modes))  # (b, T, d)
        real = mask.to(self.head_device).bool()
        hhat = hn[real].float()  # (n_real, d)
        nxt = torch.zeros_like(real)
        nxt[:, :-1] = real[:, 1:]  # position t has a real next token
        tsel = nxt[real]  # (n_real,)
        targets = ids.to(self.head_device)[:, 1:][real[:, :-1] & real[:, 1:]]  # (n_tgt,)
        t0 = time.perf_counter()
        lse = torch.empty(hhat.shape[0], dtype=torch.float64, device=self.head_device)
        wbar = torch.empty(hhat.shape, dtype=torch.float64, device=self.head_device)
        for s in range(0, hhat.shape[0], self.logit_tokens):
            z = hhat[s:s + self.logit_tokens] @ self.W.T  # (chunk, n_vocab)
            if self.bias is not None:
                z += self.bias
            lse_c = torch.logsumexp(z, dim=-1)  # (chunk,)
            p = torch.exp(z - lse_c[:, None])  # (chunk, n_vocab): reference probabilities
            wbar[s:s + self.logit_tokens] = (p @ self.W).double()  # (chunk, d)
            lse[s:s + self.logit_tokens] = lse_c.double()
        w_target = self.W[targets].double()  # (n_tgt, d)
        b_target = None if self.bias is None else self.bias[targets].double()
        z_t = (hhat[tsel].double() * w_target).sum(-1) + (0 if b_target is None else b_target)
        nll = float((lse[tsel] - z_t).sum())
        self.vocab_seconds += time.perf_counter() - t0
        return Reference(real=real, hhat=hhat, lse=lse, wbar=wbar, tsel=tsel, w_target=w_target,
                         b_target=b_target, nll=nll)

    def divergence(self, h: torch.Tensor, ref: Reference, n_var: int) -> tuple[np.ndarray, np.ndarray]:
        """Summed KL(ref ‖ variant) and next-token NLL over real tokens, for each of ``n_var`` stacked variants.

        ``h``: (n_var·b, T, d) final hidden states (before the final norm), variant-major.
        """
        t0 = time.perf_counter()
        hn = self.final(h)
        b, T = ref.real.shape
        hn = hn.view(n_var, b, T, -1)[:, ref.real]  # (n_var, n_real, d)
        lse = self._lse(hn.reshape(n_var * ref.n_real, -1)).view(n_var, ref.n_real)  # one pass over the vocab
        kl = np.zeros(n_var)
        nll = np.zeros(n_var)
        for v in range(n_var):
            dh = hn[v].double() - ref.hhat.double()  # (n_real, d)
            kl[v] = float(((lse[v] - ref.lse) - (dh * ref.wbar).sum(-1)).sum())
            z_t = (hn[v][ref.tsel].double() * ref.w_target).sum(-1)  # (n_tgt,) target logits
            if ref.b_target is not None:
                z_t = z_t + ref.b_target
            nll[v] = float((lse[v][ref.tsel] - z_t).sum())
        self.vocab_seconds += time.perf_counter() - t0
        return kl, nll

    def run_variants(self, start: int, states: Sequence[torch.Tensor] | Callable[[int, int], torch.Tensor],
                     n_var: int, ctx: Context, ref: Reference,
                     modes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run ``n_var`` variant states (each (b, T, d), the input of layer ``start``) to the end as stacked
        batches of at most ``batch_tokens`` tokens; return summed KL and NLL per variant.

        ``states`` is a list, or a function (v0, v1) → the stacked states of variants v0..v1-1
        ((v1-v0)·b, T, d), so large families (heads) are built chunk by chunk.
        """
        b, T = ref.real.shape
        per = max(1, self.batch_tokens // (b * T))
        kl = np.zeros(n_var)
        nll = np.zeros(n_var)
        for v0 in range(0, n_var, per):
            v1 = min(n_var, v0 + per)
            if callable(states):
                h = states(v0, v1)
            else:
                h = torch.cat([s.to(states[v0].device) for s in states[v0:v1]], dim=0)  # ((v1-v0)·b, T, d)
            h = self.run(h, start, ctx, reps=v1 - v0, modes=modes)
            kl[v0:v1], nll[v0:v1] = self.divergence(h, ref, v1 - v0)
        return kl, nll

    # --- capture of sub-module inputs on the main path -----------------------------------
    @contextlib.contextmanager
    def capture(self, i: int, what: Iterable[str]):
        """Record the input of layer i's o_proj ("o_in") and/or down_proj ("ff") on the calls inside the block."""
        layer = self.layers[i]
        mods = {"o_in": getattr(layer.self_attn, "o_proj", None), "ff": getattr(layer.mlp, "down_proj", None)}
        got: dict[str, torch.Tensor] = {}
        hooks = [mods[name].register_forward_pre_hook(lambda m, args, _n=name: got.__setitem__(_n, args[0]))
                 for name in what if mods[name] is not None]
        try:
            yield got
        finally:
            for hk in hooks:
                hk.remove()


# ----------------------------------------------------------------------------- shared by both engines


@dataclass
class ScanSpec:
    layers: bool = True  # layer-bypass KL (and, with sublayers, the sub-blocks')
    sublayers: bool = True
    head_layers: tuple[int, ...] = ()  # positions
    removed_heads: dict = field(default_factory=dict)  # pos → query heads a base plan already zeroed (not scored)
    neurons: bool = False
    tau: float = 0.05
    width_drops: tuple[int, ...] = ()  # width variants: this many MLP neurons zeroed (ascending counts)
    width_order: dict = field(default_factory=dict)  # pos → neuron indices, least important first
    width_grams: Any = None  # width_repair.WidthGrams: accumulate the down_proj inputs' Grams on this walk
    width_fits: dict = field(default_factory=dict)  # pos → width_repair fits: also score each width repaired


@dataclass
class ScanResult:
    """Sums over real tokens (divide by n_real, or n_tgt for NLL, for means)."""

    n_real: int = 0
    n_tgt: int = 0
    base_kl: float = 0.0  # the model as loaded vs the reference
    base_nll: float = 0.0
    bi: np.ndarray | None = None  # (L,) Σ 1 − cos(h_in, h_out)
    attn_bi: np.ndarray | None = None
    mlp_bi: np.ndarray | None = None
    kl: np.ndarray | None = None  # (L,) layer bypassed
    nll: np.ndarray | None = None
    attn_kl: np.ndarray | None = None  # NaN where the sub-block is absent or not scored
    mlp_kl: np.ndarray | None = None
    head_kl: dict = field(default_factory=dict)  # pos → (n_head,), NaN for heads not scored
    kv_kl: dict = field(default_factory=dict)  # pos → (n_head_kv,)
    head_norm: dict = field(default_factory=dict)  # pos → (n_head,)
    ff_count: dict = field(default_factory=dict)  # pos → (n_ff,) tokens with |a| > tau
    ff_abs: dict = field(default_factory=dict)  # pos → (n_ff,) Σ|a|
    ff_sq: dict = field(default_factory=dict)  # pos → (n_ff,) Σa²
    width_kl: dict = field(default_factory=dict)  # pos → (len(width_drops),) first neurons of width_order zeroed
    width_kl_repaired: dict = field(default_factory=dict)  # pos → (len(width_drops),) the same with their repair
    seconds: dict = field(default_factory=dict)  # walk / layers / heads


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor) -> float:
    """Σ over real tokens of 1 − cos(a, b); a, b: (b, T, d)."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (b, T)
    return float((1.0 - cos.double())[real.to(cos.device)].sum())


def _head_zero_sets(n_head: int, n_head_kv: int, removed: set) -> list[tuple[str, int, list[int]]]:
    """Ablation variants of one layer: each live query head, then each live KV group (all its query heads)."""
    gs = n_head // n_head_kv
    out = [("head", q, [q]) for q in range(n_head) if q not in removed]
    if gs > 1:
        for g in range(n_head_kv):
            live = [q for q in range(g * gs, (g + 1) * gs) if q not in removed]
            if live:
                out.append(("kv", g, live))
    return out


def taylor_per_head(attn, n_head: int, n_head_kv: int, head_dim: int) -> torch.Tensor:
    """Σ |g ⊙ w| of an attention module's projections per query head, from the gradients that
    a backward pass left on its weights: the head's q_proj rows and o_proj columns, plus its
    share (1/group size) of its KV head's k_proj and v_proj rows. Returns (n_head,) float32."""
    gw = {n: (getattr(attn, n).weight.grad.float() * getattr(attn, n).weight.detach().float()).abs()
          for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    gs = n_head // n_head_kv
    q = gw["q_proj"].view(n_head, head_dim, -1).sum((1, 2))  # q_proj: (n_head*hd, d) rows per head
    o = gw["o_proj"].view(-1, n_head, head_dim).sum((0, 2))  # o_proj: (d, n_head*hd) columns per head
    k = gw["k_proj"].view(n_head_kv, head_dim, -1).sum((1, 2))  # (n_kv*hd, d) rows per KV head
    v = gw["v_proj"].view(n_head_kv, head_dim, -1).sum((1, 2))
    return q + o + ((k + v) / gs).repeat_interleave(gs)  # each query head's share of its KV head
