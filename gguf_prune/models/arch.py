"""Model families and llama.cpp architectures, as data: the one place that knows them.

Two tables:

* :data:`FAMILIES`, keyed by Hugging Face ``model_type``: which transformers class a
  checkpoint is, which llama.cpp architecture the pinned convert_hf_to_gguf.py writes for
  it, and what stock llama.cpp can express after a cut (per-layer shapes through ``deci``
  or only uniform cuts in the native architecture, RoPE order, extra norms).
* :data:`ARCHITECTURES`, keyed by GGUF ``general.architecture``: which tensors a layer
  has, what each holds and on which axis its heads or neurons lie.

Adding a family is an entry in each table plus its tests (``tests/test_families.py``).

Axes are in *numpy* order (the order of ``ReaderTensor.data``): a GGUF tensor
with ggml ``ne = (ne0, ne1)`` is a numpy array of shape ``(ne1, ne0)``. So
``attn_q.weight`` (ne ``(n_embd, n_head*head_dim)``) is numpy
``(n_head*head_dim, n_embd)``: one row per output feature, heads on axis 0 in
blocks of head_dim rows. convert_hf_to_gguf permutes rows *within* each q/k head
for Llama's RoPE; whole-head blocks stay contiguous, so slicing whole heads is exact.

Units:
    ``q_head``  query head (head_dim rows/columns each)
    ``kv_head`` key/value head = KV group (head_dim rows each)
    ``neuron``  FFN intermediate neuron (one row/column each)
    ``None``    the tensor is kept whole (norms, biases over n_embd, per-head-dim q/k norms)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from gguf_prune.errors import GgufPruneError


class ArchError(GgufPruneError, ValueError):
    """A model of an architecture, or with a tensor, that gguf-prune cannot cut."""


# ----------------------------------------------------------------------------- GGUF side


@dataclass(frozen=True)
class TensorRole:
    block: str  # "attention" or "mlp": which sub-block the tensor belongs to
    unit: str | None  # "q_head", "kv_head", "neuron" or None (kept whole)
    axis: int | None  # numpy axis holding the units; None when unit is None
    rope: bool = False  # q/k rows (weight or bias) that RoPE rotates: permuted when NEOX is written as NORM


@dataclass(frozen=True)
class ArchSpec:
    name: str
    # per-layer tensors: "blk.{i}.<suffix>" -> role
    layer_tensors: Mapping[str, TensorRole]
    # tensors outside the layers, copied as they are
    global_tensors: tuple[str, ...]
    # metadata keys (without the "<arch>." prefix) that describe the shape
    keys: Mapping[str, str]

    def role(self, suffix: str) -> TensorRole | None:
        return self.layer_tensors.get(suffix)


_ATTN = "attention"
_MLP = "mlp"

LLAMA_LAYER_TENSORS: Mapping[str, TensorRole] = {
    "attn_norm.weight":   TensorRole(_ATTN, None, None),             # (n_embd,)
    "attn_q.weight":      TensorRole(_ATTN, "q_head", 0, rope=True),  # (n_head*head_dim, n_embd)
    "attn_q.bias":        TensorRole(_ATTN, "q_head", 0, rope=True),  # (n_head*head_dim,)
    "attn_k.weight":      TensorRole(_ATTN, "kv_head", 0, rope=True),  # (n_head_kv*head_dim, n_embd)
    "attn_k.bias":        TensorRole(_ATTN, "kv_head", 0, rope=True),  # (n_head_kv*head_dim,)
    "attn_v.weight":      TensorRole(_ATTN, "kv_head", 0),           # (n_head_kv*head_dim, n_embd)
    "attn_v.bias":        TensorRole(_ATTN, "kv_head", 0),           # (n_head_kv*head_dim,)
    "attn_output.weight": TensorRole(_ATTN, "q_head", 1),            # (n_embd, n_head*head_dim)
    "attn_output.bias":   TensorRole(_ATTN, None, None),             # (n_embd,)
    "ffn_norm.weight":    TensorRole(_MLP, None, None),              # (n_embd,)
    "ffn_gate.weight":    TensorRole(_MLP, "neuron", 0),             # (n_ff, n_embd)
    "ffn_gate.bias":      TensorRole(_MLP, "neuron", 0),             # (n_ff,)
    "ffn_up.weight":      TensorRole(_MLP, "neuron", 0),             # (n_ff, n_embd)
    "ffn_up.bias":        TensorRole(_MLP, "neuron", 0),             # (n_ff,)
    "ffn_down.weight":    TensorRole(_MLP, "neuron", 1),             # (n_embd, n_ff)
    "ffn_down.bias":      TensorRole(_MLP, None, None),              # (n_embd,)
}

# per-head RMS norms over head_dim, shared by every head: kept whole whatever heads go
QK_NORM_TENSORS: Mapping[str, TensorRole] = {
    "attn_q_norm.weight": TensorRole(_ATTN, None, None),  # (head_dim,)
    "attn_k_norm.weight": TensorRole(_ATTN, None, None),  # (head_dim,)
}

# Gemma's "sandwich" norms on each sub-block's output
SANDWICH_NORM_TENSORS: Mapping[str, TensorRole] = {
    "post_attention_norm.weight": TensorRole(_ATTN, None, None),  # (n_embd,)
    "post_ffw_norm.weight":       TensorRole(_MLP, None, None),   # (n_embd,)
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
    "swa_pattern": "attention.sliding_window_pattern",
}

_GLOBALS = ("token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight")

ARCHITECTURES: Mapping[str, ArchSpec] = {
    "llama": ArchSpec("llama", LLAMA_LAYER_TENSORS, _GLOBALS, LLAMA_KEYS),
    "qwen2": ArchSpec("qwen2", LLAMA_LAYER_TENSORS, _GLOBALS, LLAMA_KEYS),
    "qwen3": ArchSpec("qwen3", {**LLAMA_LAYER_TENSORS, **QK_NORM_TENSORS}, _GLOBALS, LLAMA_KEYS),
    "gemma3": ArchSpec("gemma3", {**LLAMA_LAYER_TENSORS, **QK_NORM_TENSORS, **SANDWICH_NORM_TENSORS}, _GLOBALS,
                       LLAMA_KEYS),
}
PER_LAYER_ARCH = "deci"  # llama.cpp's architecture with per-layer n_head / n_head_kv / n_ff arrays

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def get(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ArchError(f"GGUF architecture {name!r} is not supported (supported: {', '.join(ARCHITECTURES)}); "
                        f"gguf-prune cuts {supported_families()}") from None


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``"blk.7.attn_q.weight"`` → ``(7, "attn_q.weight")``; None for a tensor outside the layers."""
    m = _LAYER_NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def neox_to_norm_rows(head_dim: int) -> np.ndarray:
    """Row order, within one head, that turns a rotate-half (NEOX) q/k head into llama.cpp's adjacent-pair
    (NORM) RoPE order: pair j = (row j, row j + head_dim/2) becomes rows (2j, 2j+1). q·k is unchanged
    because q and k move alike. (What convert_hf_to_gguf does to Llama's q/k; Qwen2's are written unpermuted.)"""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)  # (head_dim,)


# ----------------------------------------------------------------------------- HF side: families


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family and what stock llama.cpp can express of it after a cut."""

    model_type: str  # config.json "model_type"
    hf_classes: tuple[str, ...]  # config.json "architectures" this family loads as
    gguf_arch: str  # what the pinned convert_hf_to_gguf.py writes (general.architecture)
    examples: str
    per_layer: bool  # per-layer shapes, attention/MLP removal and linear patches load, through `deci`
    native_head_cuts: bool = True  # the native architecture loads fewer query heads / KV groups (uniformly)
    neox_rope: bool = False  # q/k in the base GGUF are rotate-half: `deci` needs them permuted (NEOX → NORM)
    why_uniform: str = ""  # why only uniform cuts load (when not per_layer)

    @property
    def uniform_only(self) -> bool:
        return not self.per_layer


FAMILIES: Mapping[str, Family] = {
    "llama": Family("llama", ("LlamaForCausalLM",), "llama",
                    "Llama 2, Llama 3.x, SmolLM/SmolLM2, TinyLlama", per_layer=True),
    "mistral": Family("mistral", ("MistralForCausalLM",), "llama", "Mistral 7B (v0.2+, no sliding window)",
                      per_layer=True),
    "qwen2": Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", "Qwen2, Qwen2.5", per_layer=True,
                    native_head_cuts=False, neox_rope=True),
    "qwen3": Family("qwen3", ("Qwen3ForCausalLM",), "qwen3", "Qwen3 (dense)", per_layer=False,
                    why_uniform="llama.cpp's qwen3 sizes every layer from layer 0's n_ff and head counts, and "
                                "deci (per-layer shapes) has no per-head q/k norms"),
    "gemma3_text": Family("gemma3_text", ("Gemma3ForCausalLM",), "gemma3", "Gemma 3 text models (270M, 1B)",
                          per_layer=False,
                          why_uniform="llama.cpp's gemma3 sizes every layer from layer 0's n_ff and head counts, and "
                                      "deci (per-layer shapes) has neither q/k norms nor Gemma's sandwich norms"),
}
# GGUF architecture → the family whose cut rules it follows (llama and mistral convert to the same `llama`)
BY_GGUF_ARCH: Mapping[str, Family] = {"llama": FAMILIES["llama"], "qwen2": FAMILIES["qwen2"],
                                      "qwen3": FAMILIES["qwen3"], "gemma3": FAMILIES["gemma3_text"]}


def supported_families() -> str:
    return "; ".join(f"{f.model_type} ({f.examples})" for f in FAMILIES.values())


def family_of_arch(gguf_arch: str) -> Family:
    """The cut rules of a plan's / base GGUF's architecture (``ModelShape.architecture``)."""
    try:
        return BY_GGUF_ARCH[gguf_arch]
    except KeyError:
        raise ArchError(f"architecture {gguf_arch!r} is not supported; gguf-prune cuts "
                        f"{supported_families()}") from None


def _moe(config: Mapping[str, Any]) -> bool:
    return any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size"))


def family_of_config(config: Mapping[str, Any], where: str = "checkpoint") -> Family:
    """The family of an HF config.json, or one ArchError that says what is wrong and what is supported.

    Checks what the family's llama.cpp architecture cannot compute, before any work: MoE, fused projections,
    sliding windows llama.cpp would ignore, logit soft-capping, Gemma 3 27B's attention scale.
    """
    model_type = config.get("model_type")
    classes = ", ".join(config.get("architectures") or []) or "no architectures listed"
    fam = FAMILIES.get(str(model_type))
    if fam is None and model_type == "gemma3":
        raise ArchError(f"{where}: a multimodal Gemma 3 ({classes}) is not supported; gguf-prune cuts the text-only "
                        "Gemma3ForCausalLM (model_type gemma3_text: Gemma 3 270M and 1B)")
    if fam is None:
        kind = " (a mixture-of-experts model)" if _moe(config) or "moe" in str(model_type).lower() else ""
        raise ArchError(f"{where}: model_type {model_type!r} ({classes}){kind} is not supported. "
                        f"gguf-prune cuts dense decoder models of these families: {supported_families()}")
    problems = []
    if _moe(config):
        problems.append("it has mixture-of-experts layers")
    archs = tuple(config.get("architectures") or ())
    if archs and not set(archs) & set(fam.hf_classes):
        problems.append(f"its class {classes} is not {' or '.join(fam.hf_classes)} (gguf-prune cuts the "
                        "text-only causal LM)")
    window = config.get("sliding_window")
    if fam.model_type in ("llama", "mistral") and window:
        if int(window) < int(config.get("max_position_embeddings") or 0):
            problems.append(f"its sliding window ({window} tokens) is shorter than its context "
                            f"({config.get('max_position_embeddings')}): llama.cpp's llama architecture attends "
                            "to the whole context, so the GGUF would not compute what the model computes")
    if fam.model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        problems.append("it uses sliding-window attention (use_sliding_window), which llama.cpp's "
                        f"{fam.gguf_arch} architecture does not apply")
    if fam.model_type == "gemma3_text":
        head_dim = int(config.get("head_dim") or 256)
        scalar = config.get("query_pre_attn_scalar")
        if scalar is not None and int(scalar) != head_dim:
            problems.append(f"query_pre_attn_scalar {scalar} differs from head_dim {head_dim} (Gemma 3 27B): "
                            "llama.cpp takes that scale from the layer count and n_embd / n_head, which a cut "
                            "changes")
        if config.get("final_logit_softcapping") or config.get("attn_logit_softcapping"):
            problems.append("it soft-caps logits, which gguf-prune's scoring does not model")
    if problems:
        raise ArchError(f"{where}: {model_type} model cannot be cut: " + "; ".join(problems))
    return fam


def output_architecture(fam: Family, shapes: set[tuple[int, int, int]], inside: bool,
                        full: tuple[int, int, int]) -> tuple[str | None, str]:
    """Which llama.cpp architecture a cut is written as, and why.

    ``shapes``: the (n_head, n_head_kv, n_ff) of every written layer; ``inside``: a layer loses its whole
    attention or MLP or carries a patch; ``full``: the unpruned (n_head, n_head_kv, n_ff).
    Returns (None, reason) when no stock llama.cpp architecture can load the cut.
    """
    uniform = len(shapes) <= 1 and not inside
    heads_cut = any(s[:2] != full[:2] for s in shapes)
    if uniform and (fam.native_head_cuts or not heads_cut):
        why = "every kept layer has one shape" if shapes and shapes != {full} else "whole layers only"
        return fam.gguf_arch, f"{why}: stays in the model's own architecture, which every llama.cpp runtime loads"
    if fam.per_layer:
        if uniform:
            reason = f"{fam.gguf_arch} cannot lose query heads (it sizes attn_q as n_embd × n_embd)"
        elif inside:
            reason = "a layer loses its whole attention or MLP (or carries a patch)"
        else:
            reason = "layers keep different shapes"
        return PER_LAYER_ARCH, f"{reason}: written as deci, llama.cpp's per-layer architecture"
    return None, (f"{fam.model_type} models take uniform cuts only ({fam.why_uniform}): every kept layer must "
                  "keep the same FFN width and head / KV-group counts, with no attention or MLP removed alone")
