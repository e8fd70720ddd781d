"""Hugging Face tensor names and shapes of a llama-family checkpoint, and the GGUF tensors they become.

The one place that knows them, as tables: which tensors every layer has (``model.layers.{i}.<suffix>``) and
outside the layers, each one's shape in ModelShape's dimensions, its GGUF name, and whether
convert_hf_to_gguf.py permutes its rows for RoPE. A *patch* (recovery's linear stand-in for removed parts,
``model.layers.{i}.patch.weight``) is not in a checkpoint, but is written into the GGUF as a linear
attention's output matrix, so it has a row here too.

Shapes are in torch order ``(out, in)``, which is also the numpy order of the GGUF tensor
(see :mod:`gguf_prune.models.arch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from gguf_prune.plan import ModelShape


@dataclass(frozen=True)
class HfTensor:
    """One tensor of the checkpoint: its shape in ModelShape's dimensions and its GGUF counterpart."""

    dims: tuple[str, ...]  # torch order; "q" = n_head*head_dim, "kv" = n_head_kv*head_dim, else a ModelShape field
    gguf: str  # GGUF name: the suffix after "blk.{i}." for a layer's tensor, the whole name for a global one
    rope: str | None = None  # q/k rows convert_hf_to_gguf permutes, per head of this count: "n_head" | "n_head_kv"


# every llama-family decoder layer's tensors, relative to model.layers.{i}., in checkpoint order
LAYER_TENSORS: Mapping[str, HfTensor] = {
    "input_layernorm.weight":          HfTensor(("n_embd",), "attn_norm.weight"),
    "self_attn.q_proj.weight":         HfTensor(("q", "n_embd"), "attn_q.weight", rope="n_head"),
    "self_attn.k_proj.weight":         HfTensor(("kv", "n_embd"), "attn_k.weight", rope="n_head_kv"),
    "self_attn.v_proj.weight":         HfTensor(("kv", "n_embd"), "attn_v.weight"),
    "self_attn.o_proj.weight":         HfTensor(("n_embd", "q"), "attn_output.weight"),
    "post_attention_layernorm.weight": HfTensor(("n_embd",), "ffn_norm.weight"),
    "mlp.gate_proj.weight":            HfTensor(("n_ff", "n_embd"), "ffn_gate.weight"),
    "mlp.up_proj.weight":              HfTensor(("n_ff", "n_embd"), "ffn_up.weight"),
    "mlp.down_proj.weight":            HfTensor(("n_embd", "n_ff"), "ffn_down.weight"),
}
# biases a repair adds to the output projections (llama and deci load them when present; a checkpoint has none)
REPAIR_BIASES: Mapping[str, HfTensor] = {
    "self_attn.o_proj.bias": HfTensor(("n_embd",), "attn_output.bias"),
    "mlp.down_proj.bias":    HfTensor(("n_embd",), "ffn_down.bias"),
}
ATTENTION_TENSORS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "self_attn.o_proj.bias")
# the MLP's norm belongs to it: a removed MLP's norm is not read (the attention's norm is its input_layernorm)
MLP_TENSORS = ("post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight", "mlp.down_proj.bias")

PATCH_TENSOR = "patch.weight"  # a patch's matrix, relative to model.layers.{i}.
PATCH_NAME = "model.layers.{}." + PATCH_TENSOR  # .format(source layer index)
# a patch is the linear attention's output matrix: (n_embd, n_embd), no RoPE
_PATCH = HfTensor(("n_embd", "n_embd"), "attn_output.weight")

# the tensors outside the layers, in checkpoint order (lm_head.weight is absent when it is tied to the embedding)
GLOBAL_TENSORS: Mapping[str, HfTensor] = {
    "model.embed_tokens.weight": HfTensor(("n_vocab", "n_embd"), "token_embd.weight"),
    "model.norm.weight":         HfTensor(("n_embd",), "output_norm.weight"),
    "lm_head.weight":            HfTensor(("n_vocab", "n_embd"), "output.weight"),
}


def split_hf_name(name: str) -> tuple[int | None, str]:
    """``model.layers.7.self_attn.q_proj.weight`` → ``(7, "self_attn.q_proj.weight")``; globals → (None, name)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), ".".join(parts[3:])
    return None, name


def _layer_tensor(suffix: str) -> HfTensor | None:
    return _PATCH if suffix == PATCH_TENSOR else LAYER_TENSORS.get(suffix) or REPAIR_BIASES.get(suffix)


def _resolve(dims: tuple[str, ...], s: ModelShape) -> tuple[int, ...]:
    sizes = {"q": s.n_head * s.head_dim, "kv": s.n_head_kv * s.head_dim}
    return tuple(sizes[d] if d in sizes else getattr(s, d) for d in dims)


def layer_shapes(s: ModelShape) -> dict[str, tuple[int, ...]]:
    """Suffix → shape (torch order) of every tensor a layer of ``s`` has, in checkpoint order."""
    return {suffix: _resolve(t.dims, s) for suffix, t in LAYER_TENSORS.items()}


def global_shapes(s: ModelShape, tied: bool) -> dict[str, tuple[int, ...]]:
    """Name → shape (torch order) of the tensors outside the layers; no lm_head.weight when ``tied``."""
    return {name: _resolve(t.dims, s) for name, t in GLOBAL_TENSORS.items() if not (tied and name == "lm_head.weight")}


def hf_shape(name: str, s: ModelShape) -> tuple[int, ...] | None:
    """The shape (torch order) of a source-model tensor, or None for a name gguf-prune does not write."""
    layer, suffix = split_hf_name(name)
    t = GLOBAL_TENSORS.get(suffix) if layer is None else _layer_tensor(suffix)
    return None if t is None else _resolve(t.dims, s)


# ----------------------------------------------------------------------------- the GGUF side


def gguf_name(name: str) -> str:
    """``model.layers.7.self_attn.q_proj.weight`` → ``blk.7.attn_q.weight``; a patch → its attn_output."""
    layer, suffix = split_hf_name(name)
    if layer is None:
        return GLOBAL_TENSORS[suffix].gguf
    t = _layer_tensor(suffix)
    if t is None:
        raise KeyError(suffix)
    return f"blk.{layer}.{t.gguf}"


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows as convert_hf_to_gguf writes them (LlamaModel.permute): within each head, the two
    halves of the rotary pairs are interleaved. ``w``: (n_head*head_dim, n_embd)."""
    # (n_head, 2, head_dim/2, n_embd) → (n_head, head_dim/2, 2, n_embd): row pairs (r, r + head_dim/2) side by side
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(name: str, w: np.ndarray, s: ModelShape) -> np.ndarray:
    """A source tensor (torch order = GGUF numpy order) with q/k rows permuted as the converter does."""
    _, suffix = split_hf_name(name)
    t = _layer_tensor(suffix)
    if t is None or t.rope is None:
        return w
    return rope_permute(w, s.n_head if t.rope == "n_head" else s.n_head_kv)
