"""Tiny seeded checkpoints of every supported family, built at test or benchmark time.

Real Hugging Face checkpoints (config.json, model.safetensors, tokenizer) of a
randomly initialised transformers class (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM), small enough that the
whole pipeline runs on them in seconds. The tokenizer is SmolLM2's (``fixtures/smollm2-tokenizer``),
so convert_hf_to_gguf recognises it and the chat template is a real one.

The weights are drawn with a larger spread than transformers' default init so
that the logits are far from uniform: a fidelity test on a near-uniform model
could not fail.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, asdict
from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "smollm2-tokenizer"


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 256  # a multiple of 256, so Q4_K applies to every row
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 2  # GQA: 4 query heads per KV head
    tie_word_embeddings: bool = True
    vocab_size: int = 49152  # SmolLM2's tokenizer
    seed: int = 0
    init_std: float = 0.08
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    family: str = "llama"  # an arch.FAMILIES key
    # q and k scaled up (q_proj/k_proj, or the q/k norms where the family has them): sharp attention, so that a
    # wrong RoPE order or a wrong local/global layout shows in the logits (random weights attend near uniformly)
    qk_scale: float = 1.0
    rope_scaling: str | None = None  # "llama3": Llama 3.1's frequency-dependent scaling (writes rope_freqs)
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    sliding_window: int | None = None  # Gemma 3: local layers attend to this many tokens


def _config(spec: TinySpec):
    """The transformers config of ``spec``'s family."""
    import transformers

    common = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                  num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                  num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
                  rope_theta=spec.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=spec.tie_word_embeddings,
                  initializer_range=spec.init_std, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  torch_dtype="float32")
    head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads
    if spec.family == "llama":
        scaling = None
        if spec.rope_scaling == "llama3":
            scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}
        return transformers.LlamaConfig(**common, head_dim=head_dim, rope_scaling=scaling,
                                        architectures=["LlamaForCausalLM"])
    if spec.family == "mistral":
        return transformers.MistralConfig(**common, head_dim=head_dim, sliding_window=spec.sliding_window,
                                          architectures=["MistralForCausalLM"])
    if spec.family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False, architectures=["Qwen2ForCausalLM"])
    if spec.family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=head_dim, use_sliding_window=False,
                                        architectures=["Qwen3ForCausalLM"])
    if spec.family == "gemma3_text":
        common.update(rope_theta=1_000_000.0)  # global layers; local ones use rope_local_base_freq
        return transformers.Gemma3TextConfig(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                             sliding_window=spec.sliding_window or 4096, rope_local_base_freq=10000.0,
                                             final_logit_softcapping=None, attn_logit_softcapping=None,
                                             architectures=["Gemma3ForCausalLM"])
    raise ValueError(f"no tiny checkpoint for family {spec.family!r}")


def make_tiny_llama(out_dir: Path, spec: TinySpec = TinySpec(), tokenizer_dir: Path = TOKENIZER_DIR) -> Path:
    """Write a seeded random checkpoint of ``spec.family`` (LlamaForCausalLM by default) to ``out_dir``."""
    return make_tiny_model(out_dir, spec, tokenizer_dir)


def make_tiny_model(out_dir: Path, spec: TinySpec = TinySpec(), tokenizer_dir: Path = TOKENIZER_DIR) -> Path:
    """Write a seeded random checkpoint of ``spec.family``'s real transformers class to ``out_dir``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _config(spec)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(spec.seed)
    gemma = spec.family == "gemma3_text"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # norms near 1, not exactly 1, so a wrongly mapped norm shows up (Gemma stores the gain - 1)
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * spec.init_std * torch.randn(p.shape, generator=gen) * 10)
            else:
                p.copy_(spec.init_std * torch.randn(p.shape, generator=gen))
        if spec.qk_scale != 1.0:
            for name, p in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):  # q/k normalised: sharpen through the gain
                    p.copy_((1.0 + p) * spec.qk_scale - 1.0 if gemma else p * spec.qk_scale)
                elif not any(n in name for n in ("q_norm", "k_norm")) and any(
                        n in name for n in ("q_proj.", "k_proj.")) and not _has_qk_norm(model):
                    p.mul_(spec.qk_scale)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if spec.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out_dir / f.name)
    (out_dir / "tiny_spec.json").write_text(__import__("json").dumps(asdict(spec), indent=2))
    return out_dir


def _has_qk_norm(model) -> bool:
    return any(n.endswith("q_norm.weight") for n, _ in model.named_parameters())
