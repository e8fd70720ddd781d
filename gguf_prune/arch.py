"""Per-architecture facts, as data: which GGUF tensors a layer has, what each one
holds, and on which axis its heads or neurons lie.

Axes are in *numpy* order (the order of ``ReaderTensor.data``): a GGUF tensor
with ggml ``ne = (ne0, ne1)`` is a numpy array of shape ``(ne1, ne0)``. So
``attn_q.weight`` (ne ``(n_embd, n_head*head_dim)``) is numpy
``(n_head*head_dim, n_embd)``: one row per output feature, heads on axis 0 in
blocks of head_dim rows. convert_hf_to_gguf permutes rows *within* each q/k head
for RoPE; whole-head blocks stay contiguous, so slicing whole heads is exact.

Units:
    ``q_head``  query head (head_dim rows/columns each)
    ``kv_head`` key/value head = KV group (head_dim rows each)
    ``neuron``  FFN intermediate neuron (one row/column each)
    ``None``    the tensor is kept whole (norms, biases over n_embd)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class TensorRole:
    block: str  # "attention" or "mlp": which sub-block the tensor belongs to
    unit: str | None  # "q_head", "kv_head", "neuron" or None (kept whole)
    axis: int | None  # numpy axis holding the units; None when unit is None


@dataclass(frozen=True)
class ArchSpec:
    name: str
    # per-layer tensors: "blk.{i}.<suffix>" -> role
    layer_tensors: Mapping[str, TensorRole]
    # tensors outside the layers, copied as they are
    global_tensors: tuple[str, ...]
    # metadata keys (without the "<arch>." prefix) that describe the shape
    keys: Mapping[str, str]
    # the llama.cpp architecture that reads per-layer n_head / n_head_kv / n_ff arrays
    per_layer_arch: str

    def role(self, suffix: str) -> TensorRole | None:
        return self.layer_tensors.get(suffix)


_ATTN = "attention"
_MLP = "mlp"

LLAMA_LAYER_TENSORS: Mapping[str, TensorRole] = {
    "attn_norm.weight":   TensorRole(_ATTN, None, None),       # (n_embd,)
    "attn_q.weight":      TensorRole(_ATTN, "q_head", 0),      # (n_head*head_dim, n_embd)
    "attn_q.bias":        TensorRole(_ATTN, "q_head", 0),      # (n_head*head_dim,)
    "attn_k.weight":      TensorRole(_ATTN, "kv_head", 0),     # (n_head_kv*head_dim, n_embd)
    "attn_k.bias":        TensorRole(_ATTN, "kv_head", 0),     # (n_head_kv*head_dim,)
    "attn_v.weight":      TensorRole(_ATTN, "kv_head", 0),     # (n_head_kv*head_dim, n_embd)
    "attn_v.bias":        TensorRole(_ATTN, "kv_head", 0),     # (n_head_kv*head_dim,)
    "attn_output.weight": TensorRole(_ATTN, "q_head", 1),      # (n_embd, n_head*head_dim)
    "attn_output.bias":   TensorRole(_ATTN, None, None),       # (n_embd,)
    "ffn_norm.weight":    TensorRole(_MLP, None, None),        # (n_embd,)
    "ffn_gate.weight":    TensorRole(_MLP, "neuron", 0),       # (n_ff, n_embd)
    "ffn_gate.bias":      TensorRole(_MLP, "neuron", 0),       # (n_ff,)
    "ffn_up.weight":      TensorRole(_MLP, "neuron", 0),       # (n_ff, n_embd)
    "ffn_up.bias":        TensorRole(_MLP, "neuron", 0),       # (n_ff,)
    "ffn_down.weight":    TensorRole(_MLP, "neuron", 1),       # (n_embd, n_ff)
    "ffn_down.bias":      TensorRole(_MLP, None, None),        # (n_embd,)
}

LLAMA_KEYS: Mapping[str, str] = {
    "n_layer": "block_count",
    "n_embd": "embedding_length",
    "n_ff": "feed_forward_length",
    "n_head": "attention.head_count",
    "n_head_kv": "attention.head_count_kv",
    "key_length": "attention.key_length",
    "value_length": "attention.value_length",
    "n_vocab": "vocab_size",
    "n_rot": "rope.dimension_count",
}

LLAMA = ArchSpec(
    name="llama",
    layer_tensors=LLAMA_LAYER_TENSORS,
    global_tensors=("token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"),
    keys=LLAMA_KEYS,
    per_layer_arch="deci",
)

ARCHITECTURES: Mapping[str, ArchSpec] = {"llama": LLAMA}

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


class ArchError(ValueError):
    """A model of an architecture, or with a tensor, that gguf-prune cannot cut."""


def get(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ArchError(f"architecture {name!r} is not supported (supported: {', '.join(ARCHITECTURES)}); "
                        "gguf-prune cuts llama-family models (Llama 2/3, SmolLM/SmolLM2, TinyLlama, ...)") from None


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``"blk.7.attn_q.weight"`` → ``(7, "attn_q.weight")``; None for a tensor outside the layers."""
    m = _LAYER_NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else None
