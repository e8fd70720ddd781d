"""The naive reference path: the whole model run once per set of units, with forward hooks that bypass them,
and KL from a float64 log-softmax of its own logits.

It is what the tests hold the prefix-cached engine (:mod:`gguf_prune.scoring.ablate`) to
(|fast − naive| ≤ 1e-5 in float32), and the baseline of scripts/bench_score.py. Units are addressed by
position in the model as loaded, as in the engine.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np
import torch

from gguf_prune.scoring.ablate import Unit


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
