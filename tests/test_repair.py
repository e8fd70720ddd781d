"""Closed-form repair of narrowed attentions and MLPs: the repaired GGUF computes what the repaired PyTorch model
computes (llama.cpp F32 logits, mean KL < 1e-4) for width, heads, KV groups and a mixed plan with patches; the
fit never gives non-finite weights and never makes held-out KL worse; bad requests fail clearly."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoTokenizer

from divergence import kl_per_token
from gguf_prune.models import checkpoint, cuts
from gguf_prune.plan import LayerPlan, ModelShape, Plan
from gguf_prune.recovered import RecoverError, load_recovered_model
from gguf_prune.recovery.options import RecoverOptions
from gguf_prune.recovery.recover import recover
from gguf_prune.ridge import RidgeSums
from gguf_prune.runtime import llamacpp
from gguf_prune.writing.prune import prune

log = logging.getLogger(__name__)

CALIBRATION = Path(__file__).parent / ".." / "gguf_prune" / "data" / "pydoc_topics.txt"
TEXT = ("The quick brown fox jumps over the lazy dog. In 1998, 42 engineers measured what every layer of the "
        "network did before they cut anything out of it.")
KL_MAX = 1e-4


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    p.write_text(CALIBRATION.read_text()[:12000])
    return p


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


def _plan(hf_dir: Path, kind: str) -> Plan:
    """A plan of one kind of narrowing (8 query heads in 2 KV groups, FFN 768 in the fixtures)."""
    shape = ModelShape.from_hf_dir(hf_dir)
    L, n, ff = LayerPlan, shape.n_layer, shape.n_ff
    g = shape.n_head // shape.n_head_kv  # query heads per KV group
    cut = {
        "width": {1: L(1, neurons=tuple(range(0, ff, 3))), 2: L(2, neurons=tuple(range(ff // 2)))},
        # two heads of each KV group kept in layer 1; layer 2 keeps one head less in every group
        "heads": {1: L(1, heads=tuple(q for q in range(shape.n_head) if q % g < 2)),
                  2: L(2, heads=tuple(q for q in range(shape.n_head) if q % g != 0))},
        "kv": {1: L(1, heads=tuple(range(g, shape.n_head)))},  # KV group 0 removed
        "mixed": {1: L(1, heads=tuple(range(g, shape.n_head)), neurons=tuple(range(0, ff, 2))),
                  2: L(2, removed=True), n - 2: L(n - 2, heads=(), neurons=tuple(range(ff // 3)))},
    }[kind]
    return Plan(shape=shape, layers=tuple(cut.get(i, L(i)) for i in range(n)),
                fingerprint=checkpoint.fingerprint(hf_dir))


def _opts(text: Path, **kw) -> RecoverOptions:
    # heldout 0: every repair is applied (nothing to judge it on), so the fidelity test always has repairs to check
    return RecoverOptions(**({"seq_len": 32, "samples": 12, "heldout": 0.0, "calibration": text, "repair": True}
                             | kw))


def _logits(model, hf_dir: Path) -> tuple[np.ndarray, list[int]]:
    tokens = AutoTokenizer.from_pretrained(hf_dir)(TEXT)["input_ids"]
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy(), tokens


@pytest.mark.parametrize("kind", ["width", "heads", "kv", "mixed"])
def test_repaired_gguf_matches_pytorch(tiny_model, small_text, cache, tmp_path, kind):
    """llama.cpp runs the repaired projections and their biases; the controls (the cut without its repair, the
    repair without its biases) miss by orders of magnitude, so the repair is really in the file."""
    plan = _plan(tiny_model, kind)
    r = recover(tiny_model, plan, tmp_path / "rec", _opts(small_text, patch=kind == "mixed"))
    reps = r.manifest["patch"]["repairs"]
    assert reps and all(st["ridge"] is not None for st in reps)
    assert {st["kind"] for st in reps} == {"width": {"width"}, "heads": {"heads"}, "kv": {"heads"},
                                           "mixed": {"width", "heads"}}[kind]
    out = prune(tiny_model, None, tmp_path / "repaired.gguf", quant="none", outtype="f32", cache_dir=cache,
                recovered=r.path)
    names = {t.name for t in GGUFReader(out.path).tensors}
    biases = [n for n in names if n.endswith(("ffn_down.bias", "attn_output.bias"))]
    assert len(biases) == len(reps)
    model = load_recovered_model(tiny_model, r.path)
    ref, tokens = _logits(model, tiny_model)
    got = llamacpp.logits(out.path, tokens)
    kl = float(kl_per_token(ref, got).mean())
    log.info("%s %s repaired: mean KL %.3g over %d tokens", tiny_model.name, kind, kl, len(tokens))
    assert kl < KL_MAX
    cut, _ = _logits(cuts.apply_plan(cuts.load_model(tiny_model), r.plan.without_patches()), tiny_model)
    assert kl_per_token(cut, got).mean() > 100 * KL_MAX  # had llama.cpp missed the repaired weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("down_proj.bias", "o_proj.bias")):
                p.zero_()
    no_bias, _ = _logits(model, tiny_model)
    assert kl_per_token(no_bias, got).mean() > 100 * KL_MAX  # had llama.cpp dropped the new bias tensors


def test_a_repair_never_makes_held_out_kl_worse(tiny_tied, small_text, tmp_path):
    r = recover(tiny_tied, _plan(tiny_tied, "mixed"), tmp_path / "rec",
                _opts(small_text, heldout=0.25, samples=16, patch=True))
    for st in r.manifest["patch"]["repairs"]:
        kls = st["heldout_kl"]
        assert set(kls) == {"cut", "0.3", "1.0", "3.0"}
        if st["ridge"] is None:
            assert min(kls.values()) == kls["cut"]
        else:
            assert kls[str(st["ridge"])] == min(kls.values()) <= kls["cut"]
    kl = r.manifest["heldout_kl"]
    assert kl["patched"] <= kl["cut"]


@pytest.mark.bad_input
def test_too_few_tokens_for_the_kept_units_still_give_finite_weights(tiny_tied, small_text, tmp_path, caplog):
    """6 sequences of 8 tokens (42 fitted tokens) for 384 kept neurons: underdetermined, said once per repair,
    and the ridge toward the original weights keeps every weight finite."""
    plan = _plan(tiny_tied, "width")
    with caplog.at_level(logging.WARNING):
        r = recover(tiny_tied, plan, tmp_path / "rec", _opts(small_text, seq_len=8, samples=6))
    assert "calibration tokens for 384 kept units: the fit is underdetermined" in caplog.text
    from safetensors.torch import load_file

    weights = load_file(str(r.path / "recovered.safetensors"))
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_the_ridge_is_finite_on_degenerate_sums():
    acc = RidgeSums(4, 3)
    x = torch.zeros(1, 5, 4)  # every activation zero: XᵀX = 0
    acc.add(x, torch.randn(1, 5, 3), torch.ones(1, 5, dtype=torch.bool), False)
    prior = torch.randn(4, 3, dtype=torch.float64)
    b = acc.solve(1.0, prior)
    assert torch.isfinite(b).all() and torch.allclose(b, prior)  # nothing to fit: the prior
    acc.add(torch.full((1, 2, 4), 1e30), torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), False)
    assert torch.isfinite(acc.solve(0.3, prior)).all()


@pytest.mark.bad_input
def test_repair_on_a_plan_that_cuts_nothing_is_refused(tiny_tied, small_text, tmp_path):
    shape = ModelShape.from_hf_dir(tiny_tied)
    with pytest.raises(RecoverError, match="the plan cuts nothing: there is nothing to repair"):
        recover(tiny_tied, Plan.identity(shape, fingerprint=checkpoint.fingerprint(tiny_tied)), tmp_path / "rec",
                _opts(small_text))
    assert not (tmp_path / "rec").exists()


def test_sweep_repair_adds_a_repaired_row_per_point(tiny_untied, tmp_path):
    """`sweep --repair`: width scores are measured with their repair, each point gets a repaired row written from
    its recover directory (the cut planned by repaired width KL), evaluated in llama.cpp like the others."""
    from gguf_prune.pipeline.sweep import SweepOptions, sweep

    opts = SweepOptions(budgets=(0.25,), strategies=("kl-layers", "width"), samples=4, seq_len=32, quant="F16",
                        eval_chunks=2, threads=2, bench=False, out_dir=tmp_path / "sw", protect_first=1,
                        protect_last=0, repair=True, recover_samples=8)
    r = sweep(tiny_untied, opts)
    rows = {m["label"]: m for m in r["runs"]}
    assert set(rows) == {"kl-layers-25", "kl-layers-25+repair", "width-25", "width-25+repair"}
    assert all(m["quality"] for m in rows.values())
    assert rows["width-25+repair"]["repaired"] and not rows["width-25"]["repaired"]
    assert (tmp_path / "sw" / "recovered" / "width-25+repair" / "recover.json").is_file()
    layers = {e["index"]: e for e in json.loads((tmp_path / "sw" / "scores.json").read_text())["layers"]}
    assert any(e.get("width_kl_repaired") for e in layers.values())
    assert "width + repair" in (tmp_path / "sw" / "sweep.md").read_text()
    # the same sweep again with llama-bench: every GGUF and recover directory is reused, the costs are measured,
    # and each point gets its measured and predicted generation speed-up and a place on the speed panel
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sw").rglob("*") if p.suffix in (".gguf", ".safetensors")}
    r2 = sweep(tiny_untied, dataclasses.replace(opts, bench=True, bench_reps=1))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sw").rglob("*") if p.name in made} == made
    assert r2["cost"] == str(tmp_path / "sw" / "cost.json")
    for m in r2["runs"]:
        assert m["speed"]["tg_ratio"] > 0 and m["speed"]["tg_ratio_predicted"] > 0
    md = (tmp_path / "sw" / "sweep.md").read_text()
    assert "tg× pred" in md and "prediction error median" in md
