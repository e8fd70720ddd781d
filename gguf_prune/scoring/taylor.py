"""Taylor head scores: Σ |g ⊙ w| over each query head's weights, g the gradient of the mean next-token loss.

Two ways to the same numbers: :func:`head_taylor` runs one backward pass through a model in memory;
:func:`taylor_streamed` makes two more passes over a checkpoint's weights (forward keeping each layer's input,
then backward layer by layer), for the streamed engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gguf_prune.calibration import Calibration
from gguf_prune.scoring import ablate

if TYPE_CHECKING:
    from gguf_prune.scoring.stream_engine import StreamEngine


def head_taylor(model, cal: Calibration, positions: list[int], removed_heads: dict, tokens: int = 1024) -> dict:
    """Σ |g ⊙ w| over each query head's weights: its q_proj rows and o_proj columns, plus its KV head's
    k_proj / v_proj rows shared equally among the group's query heads. g is the gradient of the mean
    next-token loss over every real calibration target (one backward pass, accumulated over micro-batches).
    """
    cfg = model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    layers = model.model.layers
    params = [m.weight for p in positions for m in (layers[p].self_attn.q_proj, layers[p].self_attn.k_proj,
                                                     layers[p].self_attn.v_proj, layers[p].self_attn.o_proj)]
    was = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)
    real = cal.attention_mask
    n_tgt = int((real[:, :-1] & real[:, 1:]).sum())
    try:
        with torch.enable_grad():
            for ids, mask in cal.batches(max(1, tokens // cal.seq_len)):
                dev = model.model.embed_tokens.weight.device
                logits = model(input_ids=ids.to(dev), attention_mask=mask.long().to(dev)).logits  # (b, T, V)
                tm = (mask[:, :-1] & mask[:, 1:]).to(logits.device)  # (b, T-1): next token is real
                lp = torch.log_softmax(logits[:, :-1].float(), -1)
                nll = -lp.gather(-1, ids[:, 1:].to(logits.device)[..., None])[..., 0]  # (b, T-1)
                (nll[tm].sum() / n_tgt).backward()
                del logits, lp, nll
        out = {}
        for p in positions:
            t = ablate.taylor_per_head(layers[p].self_attn, nh, nkv, hd).double().cpu().numpy()
            for h in removed_heads.get(p, ()):
                t[h] = np.nan
            out[p] = t
        return out
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(was[id(p)])


def taylor_streamed(eng: StreamEngine, micro: Sequence[tuple[torch.Tensor, torch.Tensor]], layers: Sequence[int],
                    bar=None) -> dict:
    """Σ |g ⊙ w| per query head (as :func:`head_taylor`) with two more passes over the weights:
    forward keeping each layer's input, then backward layer by layer in reverse order."""
    want = set(layers)
    if not want:
        return {}
    L, nh, nkv, hd = eng.n_layer, eng.n_head, eng.n_head_kv, eng.head_dim
    store = "cpu"
    n_tgt = sum(int((m[:, :-1] & m[:, 1:]).sum()) for _, m in micro)
    ctxs = [eng.context(ids, mask) for ids, mask in micro]
    with torch.no_grad():
        hs = [[eng.embed(ids).to(store)] for ids, _ in micro]  # per micro-batch: inputs of layers 0..L
        for j in range(L):
            layer = eng.load_layer(j)
            for k in range(len(micro)):
                hs[k].append(eng.forward(layer, hs[k][-1].to(eng.device), ctxs[k]).to(store))
            del layer
            if bar is not None:
                bar.update(1)
    head = eng.load_head(64)
    W = head.W.to(eng.dtype)  # the model's own lm_head dtype
    grads = []
    with torch.enable_grad():
        for k, (ids, mask) in enumerate(micro):
            x = hs[k][L].to(eng.device).requires_grad_(True)
            logits = F.linear(head.core.norm(x), W)  # (b, T, V)
            tm = (mask[:, :-1] & mask[:, 1:]).to(eng.device)
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            nll = -lp.gather(-1, ids[:, 1:].to(eng.device)[..., None])[..., 0]  # (b, T-1)
            (nll[tm].sum() / n_tgt).backward()
            grads.append(x.grad.detach())
            del logits, lp, nll, x
    del head, W
    out = {}
    for j in reversed(range(L)):
        layer = eng.load_layer(j, grad=j in want)
        if j not in want:
            for p in layer.parameters():
                p.requires_grad_(False)
        with torch.enable_grad():
            for k in range(len(micro)):
                x = hs[k][j].to(eng.device).requires_grad_(True)
                y = eng.forward(layer, x, ctxs[k])
                y.backward(grads[k])
                grads[k] = x.grad.detach()
                hs[k][j + 1] = None
        if j in want:
            out[j] = ablate.taylor_per_head(layer.self_attn, nh, nkv, hd).double().cpu().numpy()
        del layer
        if bar is not None:
            bar.update(1)
    return out
