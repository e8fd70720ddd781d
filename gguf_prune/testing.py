"""Tiny seeded llama-family checkpoints, built at test or benchmark time.

Real Hugging Face checkpoints (config.json, model.safetensors, tokenizer) of a
randomly initialised LlamaForCausalLM, small enough that the whole pipeline
runs on them in seconds. The tokenizer is SmolLM2's (``fixtures/smollm2-tokenizer``),
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


def make_tiny_llama(out_dir: Path, spec: TinySpec = TinySpec(), tokenizer_dir: Path = TOKENIZER_DIR) -> Path:
    """Write a seeded random LlamaForCausalLM checkpoint to ``out_dir`` and return it."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # norms near 1, not exactly 1, so a wrongly mapped norm shows up
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(spec.init_std * torch.randn(p.shape, generator=gen))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if spec.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out_dir / f.name)
    (out_dir / "tiny_spec.json").write_text(__import__("json").dumps(asdict(spec), indent=2))
    return out_dir
