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

The naive path (:func:`naive_divergence`) runs the whole model with forward
hooks that bypass the units and computes KL from a float64 log-softmax of the
model's own logits. It is the reference the tests hold the engine to
(|fast − naive| ≤ 1e-5 in float32), and the baseline of scripts/bench_score.py.

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
from typing import Callable, Iterable, Sequence

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
    return hasattr(layer.self_attn, "o_proj")  # hfmodel._ZeroAttention has no weights


def has_mlp(layer) -> bool:
    return hasattr(layer.mlp, "down_proj")  # hfmodel._ZeroMLP has no weights


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


# ----------------------------------------------------------------------------- the scan


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


class _Clock:
    def __init__(self, seconds: dict):
        self.seconds = seconds

    def __call__(self, name: str):
        import time

        clock = self

        class _T:
            def __enter__(self_):
                self_.t = time.perf_counter()

            def __exit__(self_, *exc):
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self_.t
                return False

        return _T()


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
                    order: np.ndarray, r: ScanResult) -> None:
    """Layer i's MLP narrowed: the first ``d`` neurons of ``order`` zeroed, for each d in ``drops``; one stacked
    batch (chunked) through layers i+1…"""
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


def _head_variants(engine: Engine, i: int, h, o_in, ctx: Context, ref: Reference, removed: set,
                   r: ScanResult) -> None:
    """Each query head of layer i zeroed, then each KV group: one stacked batch (chunked) through layers i…"""
    nh, nkv, hd = engine.n_head, engine.n_head_kv, engine.head_dim
    b = h.shape[0]
    rr = ref.real.to(o_in.device)
    # o_in: (b, T, n_head*hd), the input of o_proj: head q owns columns q*hd:(q+1)*hd
    per_head = o_in.float().view(b, -1, nh, hd).norm(dim=-1)  # (b, T, n_head)
    r.head_norm[i] += per_head[rr].sum(0, dtype=torch.float64).cpu().numpy()
    zero_sets = _head_zero_sets(nh, nkv, removed)

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


@torch.inference_mode()
def scan(engine: Engine, groups: Sequence[tuple[torch.Tensor, torch.Tensor]], refs: Sequence[Reference],
         spec: ScanSpec, progress: Callable[[int], None] | None = None) -> ScanResult:
    """One walk per micro-batch through the model as loaded, carrying its state h_i forward.

    At each layer i: BI of the layer and of its sub-blocks, neuron statistics and head output norms from the
    main path; then the variants that start from h_i (layer / attention / MLP bypassed; each query head and
    KV group zeroed) run through layers i+1… as stacked batches and are scored against the reference.
    """
    L, nh, nkv = engine.n_layer, engine.n_head, engine.n_head_kv
    r = ScanResult(bi=np.zeros(L), attn_bi=np.zeros(L), mlp_bi=np.zeros(L), kl=np.zeros(L), nll=np.zeros(L),
                   attn_kl=np.zeros(L), mlp_kl=np.zeros(L))
    for i in spec.head_layers:
        r.head_kl[i], r.kv_kl[i], r.head_norm[i] = np.zeros(nh), np.zeros(nkv), np.zeros(nh)
    drops = tuple(int(d) for d in spec.width_drops)
    for i in (spec.width_order if drops else ()):
        r.width_kl[i] = np.zeros(len(drops))
    clock = _Clock(r.seconds)
    heads = set(spec.head_layers)
    for (ids, mask), ref in zip(groups, refs):
        ctx = engine.context(ids, mask)
        r.n_real += ref.n_real
        r.n_tgt += ref.n_tgt
        h = engine.embed(ids)
        for i in range(L):
            with clock("walk"):
                want = (["o_in"] if i in heads else []) + (["ff"] if spec.neurons or i in r.width_kl else [])
                with engine.capture(i, want) as cap:
                    h_mid = h + engine.attn(i, h, ctx)
                    h_out = h_mid + engine.mlp(i, h_mid)
                rr = mask.bool().to(h.device)
                r.bi[i] += _one_minus_cos(h, h_out, rr)
                r.attn_bi[i] += _one_minus_cos(h, h_mid, rr)
                r.mlp_bi[i] += _one_minus_cos(h_mid, h_out, rr)
                if "ff" in cap and spec.neurons:
                    a = cap["ff"][rr].float().abs()  # (n_real, n_ff)
                    r.ff_count[i] = r.ff_count.get(i, 0) + (a > spec.tau).sum(0, dtype=torch.float64).cpu().numpy()
                    r.ff_abs[i] = r.ff_abs.get(i, 0) + a.sum(0, dtype=torch.float64).cpu().numpy()
                    r.ff_sq[i] = r.ff_sq.get(i, 0) + a.double().pow(2).sum(0).cpu().numpy()
            if spec.layers:
                with clock("layers"):
                    _layer_variants(engine, i, h, h_mid, ctx, ref, spec.sublayers, r)
            if i in r.width_kl:
                with clock("width"):
                    _width_variants(engine, i, h_mid, cap["ff"], ctx, ref, drops, spec.width_order[i], r)
            if "o_in" in cap:
                with clock("heads"):
                    _head_variants(engine, i, h, cap["o_in"], ctx, ref, set(spec.removed_heads.get(i, ())), r)
            h = h_out
            if progress:
                progress(1)
        with clock("walk"):
            kl, nll = engine.divergence(h, ref, 1)  # the model as loaded vs the reference
        r.base_kl += float(kl[0])
        r.base_nll += float(nll[0])
    if not spec.layers:
        r.kl[:] = r.nll[:] = r.attn_kl[:] = r.mlp_kl[:] = np.nan
    for i in spec.head_layers:  # heads a base plan removed are not scored
        removed = set(spec.removed_heads.get(i, ()))
        for q in removed:
            r.head_kl[i][q] = r.head_norm[i][q] = np.nan
        for g in range(nkv):
            if all(q in removed for q in range(g * engine.group_size, (g + 1) * engine.group_size)):
                r.kv_kl[i][g] = np.nan
    return r


# ----------------------------------------------------------------------------- greedy


@dataclass
class GreedyStep:
    kind: str
    pos: int
    kl: float  # mean KL vs the reference after this removal
    delta_kl: float
    params: int
    candidates: int


@torch.inference_mode()
def greedy(engine: Engine, groups, refs, steps: int, candidates: Callable,
           params: Callable[[str, int, list[str]], int], by: str = "kl",
           progress: Callable[[int], None] | None = None,
           describe: Callable[[int], str] = lambda pos: f"layer position {pos}",
           pool: int | None = None, initial: dict | None = None) -> list[GreedyStep]:
    """Remove ``steps`` units one at a time, each time the one whose removal costs least.

    ``candidates(modes)`` → [(kind, pos)] still removable; ``params(kind, pos, modes)`` → parameters that
    unit removes now. Each step is one walk: the state of the current (pruned) model at the input of layer i is
    shared by every candidate at layer i, whose variants then run through the rest of the pruned model.

    ``pool``: lazy greedy. The first step measures every candidate; later steps re-measure only the
    ``pool`` candidates that were cheapest when last measured (and any never measured), and pick the best
    of those. Exact greedy when ``pool`` is None; with a pool of a few units it costs a fraction of a step
    and, because removals rarely make a costly unit cheap, usually picks the same units.
    ``initial``: {(kind, pos): mean KL with that unit removed} already measured on this same model (the
    one-shot scan); with a pool, the first step then also re-measures only the pool instead of everything.
    """
    last: dict[tuple[str, int], float] = {}
    if pool and initial:
        base = 0.0 if initial.get("base") is None else float(initial["base"])
        modes0 = ["full"] * engine.n_layer
        for c in candidates(modes0):
            v = initial.get(c)
            if v is None or not np.isfinite(v):
                continue
            last[c] = v if by == "kl" else (v - base) / max(1, params(c[0], c[1], modes0))
    modes = ["full"] * engine.n_layer
    n_real = sum(r.n_real for r in refs)
    out: list[GreedyStep] = []
    for _ in range(steps):
        cands = list(candidates(modes))
        if not cands:
            log.warning("greedy: no removable units left after %d steps", len(out))
            break
        n_all = len(cands)
        if pool and last:
            cands = sorted(cands, key=lambda c: (c in last, last.get(c, 0.0), c[1]))[:max(pool, 1)]
        by_pos: dict[int, list[str]] = {}
        for kind, pos in cands:
            by_pos.setdefault(pos, []).append(kind)
        kl_sum = {c: 0.0 for c in cands}
        cur = 0.0
        for (ids, mask), ref in zip(groups, refs):
            ctx = engine.context(ids, mask)
            h = engine.embed(ids)
            for i in range(engine.n_layer):
                if i in by_pos:
                    kinds = by_pos[i]
                    states = [engine.step(i, h, ctx, combine(modes[i], k)) for k in kinds]
                    kl, _ = engine.run_variants(i + 1, states, len(states), ctx, ref, modes=modes)
                    for k, v in zip(kinds, kl):
                        kl_sum[(k, i)] += v
                h = engine.step(i, h, ctx, modes[i])
                if progress:
                    progress(1)
            cur += float(engine.divergence(h, ref, 1)[0][0])
        cur /= n_real
        mean = {c: v / n_real for c, v in kl_sum.items()}
        if by == "kl":
            crit = {c: mean[c] for c in cands}
        else:
            crit = {c: (mean[c] - cur) / max(1, params(c[0], c[1], modes)) for c in cands}
        last.update(crit)
        best = min(cands, key=lambda c: (crit[c], c[1]))
        kind, pos = best
        n_params = params(kind, pos, modes)
        modes[pos] = combine(modes[pos], kind)
        last.pop(best, None)
        out.append(GreedyStep(kind=kind, pos=pos, kl=mean[best], delta_kl=mean[best] - cur, params=n_params,
                              candidates=len(cands)))
        log.info("greedy step %d: remove %s of %s (KL %.4g, %+.4g; %d of %d candidates measured)",
                 len(out), kind, describe(pos), mean[best], mean[best] - cur, len(cands), n_all)
    return out


# ----------------------------------------------------------------------------- naive reference path


def _bypass_hooks(model, units: Iterable[Unit]) -> list:
    """Forward hooks on the model as loaded that bypass each unit; return the handles."""
    layers = model.model.layers
    handles = []
    for u in units:
        kind, pos = u[0], u[1]
        layer = layers[pos]
        if kind == "layer":
            def hook(mod, args, kwargs, out):
                h_in = args[0] if args else kwargs["hidden_states"]
                return (h_in,) + tuple(out[1:]) if isinstance(out, tuple) else h_in
            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        elif kind == "attn":
            handles.append(layer.self_attn.register_forward_hook(
                lambda mod, args, out: (torch.zeros_like(out[0]),) + tuple(out[1:])))
        elif kind == "mlp":
            handles.append(layer.mlp.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)))
        elif kind == "heads":
            hd = model.config.head_dim if getattr(model.config, "head_dim", None) else \
                model.config.hidden_size // model.config.num_attention_heads
            cols = [c for hh in u[2] for c in range(hh * hd, (hh + 1) * hd)]

            def pre(mod, args, cols=cols):
                x = args[0].clone()
                x[..., cols] = 0  # o_proj input columns of the removed heads
                return (x,) + tuple(args[1:])
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
        elif kind == "neurons":
            def pre_ff(mod, args, cols=list(u[2])):
                x = args[0].clone()
                x[..., cols] = 0  # down_proj input columns of the removed neurons
                return (x,) + tuple(args[1:])
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(pre_ff))
        else:
            raise ValueError(f"unknown unit kind {kind!r}")
    return handles


@torch.inference_mode()
def naive_divergence(model, groups: Sequence[tuple[torch.Tensor, torch.Tensor]], unit_sets: Sequence[Sequence[Unit]],
                     reference_model=None, timing: dict | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Reference implementation: for each set of units, run the whole model with those units bypassed.

    Returns (mean KL per set, mean next-token NLL per set, n_real, n_tgt), KL from a float64 log-softmax of
    the model's logits against the reference model's (``reference_model`` or ``model`` itself, unhooked).
    """
    ref_model = reference_model or model
    kl = np.zeros(len(unit_sets))
    nll = np.zeros(len(unit_sets))
    n_real = n_tgt = 0
    for ids, mask in groups:
        am = mask.long()
        real = mask.bool()
        tmask = real[:, :-1] & real[:, 1:]  # (b, T-1)
        targets = ids[:, 1:]
        lp = torch.log_softmax(ref_model(input_ids=ids, attention_mask=am).logits.double(), -1)  # (b, T, V)
        p = lp.exp()
        n_real += int(real.sum())
        n_tgt += int(tmask.sum())
        for k, units in enumerate(unit_sets):
            handles = _bypass_hooks(model, units)
            try:
                t0 = time.perf_counter()
                hidden = model.model(input_ids=ids, attention_mask=am).last_hidden_state  # (b, T, d)
                t1 = time.perf_counter()
                lq = torch.log_softmax(model.lm_head(hidden).double(), -1)  # (b, T, V), as model(...).logits
            finally:
                for hk in handles:
                    hk.remove()
            kl[k] += float((p * (lp - lq)).sum(-1)[real].sum())
            nll[k] -= float(lq[:, :-1].gather(-1, targets[..., None])[..., 0][tmask].sum())
            if timing is not None:
                timing["body"] = timing.get("body", 0.0) + t1 - t0
                timing["vocab"] = timing.get("vocab", 0.0) + time.perf_counter() - t1
    return kl / n_real, nll / max(1, n_tgt), n_real, n_tgt


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
