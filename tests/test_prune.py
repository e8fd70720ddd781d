"""HF checkpoint + plan → pruned, quantized GGUF: the whole cutting half in one call."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_prune.models import checkpoint
from gguf_prune.writing.gguf_read import read_gguf
from gguf_prune.plan import LayerPlan, ModelShape, Plan, PlanError
from gguf_prune.writing.prune import PruneError, plan_path_for, prune
from gguf_prune.writing.quantize import QUANT_TYPES, QuantizeError
from gguf_prune.writing.gguf_names import PLAN_DIGEST_KEY
from gguf_prune.writing.rewrite import gguf_identity


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "converted"


def untied_plan(hf_dir: Path) -> Plan:
    shape = ModelShape.from_hf_dir(hf_dir)
    L = LayerPlan
    return Plan(shape=shape, fingerprint=checkpoint.fingerprint(hf_dir), layers=(
        L(0), L(1, heads=(0, 1, 4, 5), neurons=tuple(range(0, 768, 3))), L(2, removed=True), L(3, heads=())))


def test_prune_converts_cuts_quantizes_and_writes_the_plan(tiny_untied, converted, tmp_path):
    plan = untied_plan(tiny_untied)
    out = tmp_path / "untied-pruned.gguf"
    r = prune(tiny_untied, plan, out, quant="Q4_K_M", outtype="f16", cache_dir=converted)
    assert r.path == out and out.exists()
    assert r.quant == "Q4_K_M" and r.outtype == "f16" and r.architecture == "deci"
    assert r.base_gguf.parent == converted and "-f16-" in r.base_gguf.name
    assert r.bytes_base > r.bytes_pruned > r.bytes_out == out.stat().st_size
    assert [(d["n_head"], d["n_head_kv"], d["n_ff"]) for d in r.dims] == [(8, 2, 768), (4, 2, 256), (0, 0, 768)]
    assert [(d["n_head"], d["n_head_kv"], d["n_ff"]) for d in r.dims] == [
        (d["n_head"], d["n_head_kv"], d["n_ff"]) for d in plan.dims()]
    assert {f["tensor"] for f in r.fallbacks} == {"blk.1.attn_output.weight"}  # 4 heads: ne0 128
    assert r.plan_path == plan_path_for(out) == tmp_path / "untied-pruned.gguf.plan.json"
    # the plan written next to it names the GGUF it cut (so `rewrite` refuses it for another of the same shape)
    recorded = replace(plan, gguf=gguf_identity(read_gguf(r.base_gguf)))
    assert Plan.load(r.plan_path) == recorded and recorded.gguf
    assert r.plan_path.read_text() == recorded.to_json()
    meta = read_gguf(out)
    assert meta.get(PLAN_DIGEST_KEY) == plan.digest() == r.plan_digest
    assert meta.get("deci.attention.head_count") == [8, 4, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["untied-pruned.gguf", "untied-pruned.gguf.plan.json"]
    assert json.loads(json.dumps(r.to_dict()))["n_fallback"] == 1
    # prune checks the checkpoint's fingerprint instead: the recorded plan cuts another conversion of it
    r32 = prune(tiny_untied, r.plan_path, tmp_path / "f32" / "m.gguf", quant="none", outtype="f32",
                cache_dir=converted)
    assert Plan.load(r32.plan_path).gguf == gguf_identity(read_gguf(r32.base_gguf)) != recorded.gguf


def test_without_a_plan_prune_makes_the_uncut_base_from_the_cached_conversion(tiny_untied, converted, tmp_path):
    prune(tiny_untied, untied_plan(tiny_untied), tmp_path / "first.gguf", quant="none", cache_dir=converted)
    cached = sorted(converted.glob("*-f16-*.gguf"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    out = tmp_path / "base.gguf"
    r = prune(tiny_untied, None, out, quant="none", outtype="f16", cache_dir=converted)
    assert sorted(converted.glob("*-f16-*.gguf")) == cached and [p.stat().st_mtime_ns for p in cached] == stamps
    assert r.base_gguf in cached
    assert out.read_bytes() == r.base_gguf.read_bytes()  # the uncut base, exactly as converted
    assert r.architecture == "llama" and r.quant == "NONE" and r.fallbacks == []
    assert Plan.load(r.plan_path) == Plan.identity(ModelShape.from_hf_dir(tiny_untied),
                                                   fingerprint=checkpoint.fingerprint(tiny_untied))


def test_bad_requests_fail_before_converting_anything(tiny_untied, tiny_tied, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "out.gguf"
    plan = untied_plan(tiny_untied)
    with pytest.raises(QuantizeError) as e:
        prune(tiny_untied, plan, out, quant="Q4_K_Z", cache_dir=cache)
    assert str(e.value) == "unknown quantization type 'Q4_K_Z'; valid types: " + ", ".join(QUANT_TYPES)
    with pytest.raises(PruneError) as e:
        prune(tiny_untied, plan, out, outtype="q8_0", cache_dir=cache)
    assert str(e.value) == "outtype 'q8_0' is not supported; choose one of f16, bf16, f32"
    # the same shape, another checkpoint: the fingerprint tells them apart
    other = Plan(shape=plan.shape, layers=plan.layers, fingerprint=checkpoint.fingerprint(tiny_tied))
    with pytest.raises(PlanError) as e:
        prune(tiny_untied, other, out, cache_dir=cache)
    assert str(e.value) == (
        "plan is invalid (1 problem):\n  - the plan was made for another model: fingerprint "
        f"{other.fingerprint} in the plan, {plan.fingerprint} for this checkpoint")
    with pytest.raises(PlanError, match="the plan was made for another model: n_layer 4 in the plan vs 6 in the model"):
        prune(tiny_tied, plan.save(tmp_path / "plan.json"), out, cache_dir=cache)
    assert not cache.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_the_prune_command_reports_errors_plainly(tiny_untied, tmp_path):
    from gguf_prune.cli import main

    plan_file = untied_plan(tiny_untied).save(tmp_path / "plan.json")
    res = CliRunner().invoke(main, ["prune", str(tiny_untied), "--plan", str(plan_file), "-o",
                                    str(tmp_path / "x.gguf"), "--quant", "Q9"])
    assert res.exit_code == 1
    assert "Error: unknown quantization type 'Q9'; valid types: Q1_0" in res.output
    res = CliRunner().invoke(main, ["prune", str(tmp_path), "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code == 1
    assert f"Error: {tmp_path} has no config.json" in res.output
