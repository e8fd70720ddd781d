"""The pinned convert_hf_to_gguf + llama.cpp compute what transformers computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_prune.runtime import llamacpp
from divergence import kl_per_token, top1_agreement

TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1998, 42 engineers measured "
    "what every layer of the network did before they cut anything out of it."
)


def _hf_logits(hf_dir: Path, tokens: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _check_fidelity(hf_dir: Path, gguf_path: Path) -> dict:
    tokens = AutoTokenizer.from_pretrained(hf_dir)(TEXT)["input_ids"]
    assert len(tokens) > 20
    ref = _hf_logits(hf_dir, tokens)
    got = llamacpp.logits(gguf_path, tokens)
    kl = kl_per_token(ref, got)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "top1": top1_agreement(ref, got)}


def test_fixture_converts_and_matches_transformers(tiny_model, tmp_path):
    out = llamacpp.convert_hf_to_gguf(tiny_model, tmp_path / "model-f32.gguf", outtype="f32")
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == ["model-f32.gguf"]
    r = _check_fidelity(tiny_model, out)
    assert r["mean_kl"] < 1e-4, r
    assert r["top1"] == 1.0, r


def test_fixture_is_not_a_uniform_model(tiny_tied):
    # A fidelity check on near-uniform predictions could not fail: make sure it can.
    tokens = AutoTokenizer.from_pretrained(tiny_tied)(TEXT)["input_ids"]
    logits = _hf_logits(tiny_tied, tokens)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert p.max(-1).mean() > 50 / p.shape[-1]  # far from uniform (1/49152)
    shuffled = np.roll(logits, 1, axis=0)
    assert kl_per_token(logits, shuffled).mean() > 0.5


@pytest.mark.e2e
def test_demo_model_converts_and_matches_transformers(demo_model, tmp_path):
    out = llamacpp.convert_hf_to_gguf(demo_model, tmp_path / "demo-f32.gguf", outtype="f32")
    r = _check_fidelity(demo_model, out)
    assert r["mean_kl"] < 1e-4, r
    assert r["top1"] == 1.0, r


def test_llama_cpp_refuses_a_non_gguf_with_a_clear_error(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(llamacpp.LlamaCppError, match="llama.cpp could not load"):
        llamacpp.load(bad)
