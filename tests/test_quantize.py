"""Quantization through llama-quantize: type names, the fallback report, imatrix, atomic output."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gguf_prune.runtime import llamacpp
from gguf_prune.writing.gguf_read import read_gguf
from gguf_prune.plan import LayerPlan, ModelShape, Plan
from gguf_prune.writing.prune import convert_cached
from gguf_prune.writing.quantize import (QUANT_TYPES, Fallback, QuantizeError, check_quant_type, parse_fallbacks,
                                         quantize)
from gguf_prune.writing.rewrite import rewrite


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "converted"


@pytest.fixture(scope="module")
def pruned_f32(tiny_tied, converted, tmp_path_factory) -> Path:
    """The tied fixture cut so that some rows cannot be q4_K: 4 query heads (attn_output ne0 128),
    a 384-neuron FFN (ffn_down ne0 384), an MLP removed (ffn_down ne0 1), layer 0 without attention."""
    base = convert_cached(tiny_tied, "f32", cache_dir=converted)
    shape = ModelShape.from_hf_dir(tiny_tied)
    L = LayerPlan
    plan = Plan(shape=shape, layers=(L(0, heads=()), L(1, heads=(0, 1, 4, 5)), L(2, neurons=tuple(range(384))),
                                     L(3, removed=True), L(4, neurons=()), L(5)))
    return rewrite(base, plan, tmp_path_factory.mktemp("quant") / "pruned-f32.gguf").path


@pytest.fixture(scope="module")
def q4(pruned_f32):
    return quantize(pruned_f32, pruned_f32.with_name("pruned-q4_k_m.gguf"), "q4_k_m")


def test_every_fallback_is_reported(q4, pruned_f32):
    # llama.cpp quantizes the 2-D weights (ne1 > 1); those whose row length ne0 is not a multiple of 256 fall back
    src = read_gguf(pruned_f32)
    expected = {t.name for t in src.tensors if len(t.ne) == 2 and t.ne[1] > 1 and t.ne[0] % 256}
    assert expected == {"blk.0.attn_output.weight", "blk.1.attn_output.weight", "blk.2.ffn_down.weight",
                        "blk.3.ffn_down.weight"}
    assert {f.tensor for f in q4.fallbacks} == expected
    assert q4.n_fallback == 4
    by_name = {f.tensor: f for f in q4.fallbacks}
    assert (by_name["blk.0.attn_output.weight"].ncols, by_name["blk.0.attn_output.weight"].used) == (32, "q5_0")
    assert by_name["blk.2.ffn_down.weight"].ncols == 384
    assert by_name["blk.3.ffn_down.weight"] == Fallback("blk.3.ffn_down.weight", 1, 256,
                                                        by_name["blk.3.ffn_down.weight"].wanted, "f16")
    for f in q4.fallbacks:
        assert {"q4_K": "q5_0", "q6_K": "q8_0"}.get(f.wanted) == f.used or f.ncols % 32, f


def test_sizes_types_and_the_file_loads(q4, pruned_f32):
    assert q4.quant == "Q4_K_M"
    assert q4.bytes_before == pruned_f32.stat().st_size
    assert q4.bytes_after == q4.path.stat().st_size < q4.bytes_before / 4
    out = read_gguf(q4.path)
    assert sum(q4.tensor_types.values()) == len(out.tensors)
    assert q4.tensor_types["Q4_K"] > 0 and q4.tensor_types["Q5_0"] >= 2
    assert out.get("general.architecture") == "deci"
    assert out.get("deci.feed_forward_length") == [768, 768, 384, 1, 768]
    llamacpp.load(q4.path).close()
    assert sorted(p.name for p in q4.path.parent.iterdir()) == ["pruned-f32.gguf", "pruned-q4_k_m.gguf"]


def test_parse_fallbacks_reads_llama_quantize_lines():
    text = (
        "[  12/  30] blk.0.ffn_up.weight - [   256,    768,      1,      1], type =    f16, converting to q4_K ..\n"
        "warning: blk.0.attn_output.weight             - ncols     32 not divisible by 256 (required for type    q4_K) "
        "-> falling back to    q5_0\n"
        "warning: blk.2.ffn_down.weight                - ncols      1 not divisible by 256 (required for type    q6_K) "
        "(WARNING: must use F16 due to unusual shape) -> falling back to     f16\n"
        "llama_model_quantize_impl: WARNING: 2 of 30 tensor(s) required fallback quantization\n"
    )
    assert parse_fallbacks(text) == (Fallback("blk.0.attn_output.weight", 32, 256, "q4_K", "q5_0"),
                                      Fallback("blk.2.ffn_down.weight", 1, 256, "q6_K", "f16"))


def test_type_names_are_llama_quantizes_own():
    usage = llamacpp.run_tool("llama-quantize", [], check=False)
    listed = re.findall(r"^\s+(?:\d+\s+or\s+)?([A-Z0-9_]+)\s+:", usage.stdout + usage.stderr, re.M)
    assert tuple(listed) == QUANT_TYPES
    assert check_quant_type(" q4_k_m ") == "Q4_K_M"
    with pytest.raises(QuantizeError) as e:
        check_quant_type("Q4_K_XL")
    assert str(e.value) == "unknown quantization type 'Q4_K_XL'; valid types: " + ", ".join(QUANT_TYPES)


def test_an_importance_matrix_from_a_calibration_text(pruned_f32, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("Measure what every layer of the network does before you cut anything out of it. " * 40)
    out = tmp_path / "imat-q4_k_m.gguf"
    r = quantize(pruned_f32, out, "Q4_K_M", imatrix_text=text, imatrix_ctx=64)
    assert r.imatrix == tmp_path / "imat-q4_k_m.gguf.imatrix.gguf"
    assert r.imatrix.stat().st_size > 0
    assert read_gguf(r.imatrix).tensors  # llama-imatrix writes its matrix as a GGUF
    assert {f.tensor for f in r.fallbacks} >= {"blk.2.ffn_down.weight"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([text.name, out.name, r.imatrix.name])


# ----------------------------------------------------------------------------- failures leave nothing behind


@pytest.fixture
def existing_out(tmp_path) -> Path:
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(b"the previous model, which must survive")
    return out


def _untouched(out: Path) -> None:
    assert out.read_bytes() == b"the previous model, which must survive"
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]


def test_a_calibration_text_too_short(pruned_f32, existing_out, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("far too short")
    with pytest.raises(QuantizeError) as e:
        quantize(pruned_f32, existing_out, "Q4_K_M", imatrix_text=text, imatrix_ctx=64)
    assert str(e.value) == (f"calibration text {text} is too short for llama-imatrix: it needs at least 128 tokens "
                            "for a context of 64; give a longer text or a smaller context")
    _untouched(existing_out)


def test_bad_inputs(pruned_f32, existing_out, tmp_path):
    with pytest.raises(QuantizeError, match=r"^unknown quantization type 'Q3'; valid types: Q1_0, "):
        quantize(pruned_f32, existing_out, "Q3")
    with pytest.raises(QuantizeError) as e:
        quantize(pruned_f32, pruned_f32, "Q8_0")
    assert str(e.value) == f"output {pruned_f32} is the input GGUF; write the quantized model to another path"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(QuantizeError) as e:
        quantize(bad, existing_out, "Q8_0")
    assert str(e.value) == (f"{bad} is truncated or damaged: the header at byte 0 needs 24 bytes but the file has 14; "
                            "re-create it")
    _untouched(existing_out)
