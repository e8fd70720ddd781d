"""The core guarantee: llama.cpp running a pruned GGUF computes what PyTorch computes
with the same parts removed (cuts.apply_plan), for every kind of cut."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from gguf_prune.runtime import llamacpp
from gguf_prune.models import cuts
from divergence import kl_per_token, top1_agreement
from gguf_prune.plan import LayerPlan, ModelShape, Plan
from gguf_prune.writing.prune import convert_cached
from gguf_prune.writing.quantize import quantize
from gguf_prune.writing.rewrite import rewrite

log = logging.getLogger(__name__)

TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1998, 42 engineers measured "
    "what every layer of the network did before they cut anything out of it."
)
KL_MAX = 1e-4
# llama.cpp at F32 and PyTorch differ by up to ~0.005 in the winning logit (~0.01 anywhere) even on the uncut
# fixture: other summation orders. A token whose two best logits are closer than that is a tie that either side
# may break its own way (measured: a margin of 0.0008 flipped at mean KL 1e-6). Top-1 agreement must be exact on
# every token with a clear winner; the ties left out are counted, and must stay few.
TIE_MARGIN = 0.005


def decisive_top1(ref: np.ndarray, got: np.ndarray, margin: float = TIE_MARGIN) -> tuple[float, int]:
    """Top-1 agreement over the tokens whose reference top-2 margin is at least ``margin``; and the ties left out."""
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) >= margin
    return top1_agreement(ref[clear], got[clear]), int((~clear).sum())


def _neurons(shape: ModelShape, n: int, seed: int) -> tuple[int, ...]:
    return tuple(sorted(np.random.default_rng(seed).choice(shape.n_ff, n, replace=False).tolist()))


def make_plan(kind: str, shape: ModelShape) -> Plan:
    """A plan exercising one kind of cut (or all of them) on a fixture: 8 query heads in 2 KV groups of 4."""
    n = shape.n_layer
    cut: dict[int, LayerPlan] = {}
    L = LayerPlan
    if kind == "layers":
        cut = {1: L(1, removed=True), n - 2: L(n - 2, removed=True)}
    elif kind == "attention":  # includes the last layer, where llama.cpp selects output rows
        cut = {1: L(1, heads=()), n - 1: L(n - 1, heads=())}
    elif kind == "attention_first":  # written as one inert head (see rewrite.py)
        cut = {0: L(0, heads=())}
    elif kind == "mlp":
        cut = {1: L(1, neurons=()), n - 1: L(n - 1, neurons=())}
    elif kind == "heads":  # the same number of query heads in every KV group
        cut = {0: L(0, heads=(0, 1, 4, 5)), 2: L(2, heads=(3, 7))}
    elif kind == "kv_groups":
        cut = {1: L(1, heads=(4, 5, 6, 7)), 3: L(3, heads=(0, 1, 2, 3))}
    elif kind == "neurons":
        cut = {1: L(1, neurons=_neurons(shape, 512, 1)), 2: L(2, neurons=_neurons(shape, 256, 2))}
    elif kind == "uniform":  # the same cut in every layer: the file stays llama, with new global sizes
        cut = {i: L(i, heads=(2, 3, 6, 7), neurons=_neurons(shape, 256, 10 + i)) for i in range(n)}
    elif kind == "mixed":
        cut = {0: L(0, heads=()),
               1: L(1, heads=(0, 1, 4, 5), neurons=_neurons(shape, 512, 3)),
               2: L(2, removed=True),
               3: L(3, heads=(4, 5, 6, 7), neurons=())}
        if n >= 6:
            cut |= {4: L(4, heads=(2, 6), neurons=()), 5: L(5, heads=(), neurons=_neurons(shape, 256, 4))}
    else:
        raise ValueError(kind)
    return Plan(shape=shape, layers=tuple(cut.get(i, L(i)) for i in range(n)))


KINDS = ["layers", "attention", "attention_first", "mlp", "heads", "kv_groups", "neurons", "uniform", "mixed"]


class Reference:
    """A fixture model: its F32 GGUF, its PyTorch model (loaded once), the tokens."""

    def __init__(self, hf_dir: Path, gguf_f32: Path):
        self.hf_dir, self.gguf = hf_dir, gguf_f32
        self.shape = ModelShape.from_hf_dir(hf_dir)
        self.model = cuts.load_model(hf_dir)
        self.tokens = AutoTokenizer.from_pretrained(hf_dir)(TEXT)["input_ids"]

    def torch_logits(self, plan: Plan) -> np.ndarray:
        model = cuts.apply_plan(copy.deepcopy(self.model), plan)
        with torch.no_grad():
            return model(torch.tensor([self.tokens])).logits[0].numpy()

    def compare(self, ref: np.ndarray, gguf_path: Path) -> dict:
        got = llamacpp.logits(gguf_path, self.tokens)
        kl = kl_per_token(ref, got)
        top1, ties = decisive_top1(ref, got)
        return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "top1": top1, "ties": ties,
                "top1_all": top1_agreement(ref, got)}


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "converted"


@pytest.fixture(scope="session")
def reference(tiny_model, converted) -> Reference:
    return Reference(tiny_model, convert_cached(tiny_model, "f32", cache_dir=converted))


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_gguf_matches_pytorch(reference, kind, tmp_path):
    plan = make_plan(kind, reference.shape)
    result = rewrite(reference.gguf, plan, tmp_path / f"{kind}.gguf")
    r = reference.compare(reference.torch_logits(plan), result.path)
    log.info("%s %s: %s (%s, dims %s)", reference.hf_dir.name, kind, r, result.architecture,
             [(d["n_head"], d["n_head_kv"], d["n_ff"]) for d in result.layers])
    assert r["mean_kl"] < KL_MAX, r
    assert r["top1"] == 1.0, r
    assert r["ties"] <= len(reference.tokens) // 10, r  # a few near-ties at most
    assert result.architecture == ("llama" if kind in ("layers", "uniform") else "deci")


def test_a_layer_without_its_mlp_keeps_its_attention(reference, tmp_path):
    """A width-1 zero FFN, not n_ff = 0 (which makes llama.cpp skip the layer's attention too)."""
    plan = make_plan("mlp", reference.shape)
    path = rewrite(reference.gguf, plan, tmp_path / "mlp.gguf").path
    assert reference.compare(reference.torch_logits(plan), path)["mean_kl"] < KL_MAX
    # the same layers removed whole: what the file would compute had the attention been dropped
    whole = Plan(shape=plan.shape, layers=tuple(LayerPlan(lp.index, removed=True) if lp.mlp_removed else lp
                                                for lp in plan.layers))
    dropped = reference.compare(reference.torch_logits(whole), path)
    assert dropped["mean_kl"] > 100 * KL_MAX, dropped


QUANT_FACTOR = 1.05  # ours vs llama-quantize's own choice of types, each against the same F32 (measured: equal)


def test_a_quantized_pruned_model_loads_and_stays_close(reference, tmp_path):
    plan = make_plan("mixed", reference.shape)
    f32 = rewrite(reference.gguf, plan, tmp_path / "mixed-f32.gguf").path
    q = quantize(f32, tmp_path / "mixed-q4_k_m.gguf", "Q4_K_M")
    ref = llamacpp.logits(f32, reference.tokens)
    got = llamacpp.logits(q.path, reference.tokens)
    kl = kl_per_token(ref, got)
    log.info("%s: Q4_K_M vs its own F32: mean KL %.4g, max %.4g, top-1 %.3f; %d fallbacks; %.1f MB -> %.1f MB",
             reference.hf_dir.name, kl.mean(), kl.max(), top1_agreement(ref, got), q.n_fallback,
             q.bytes_before / 1e6, q.bytes_after / 1e6)
    print(f"\n{reference.hf_dir.name}: Q4_K_M vs F32 pruned: mean KL {kl.mean():.4g}, top-1 {top1_agreement(ref, got):.3f}")
    assert np.isfinite(kl).all()
    # the bound: the same pruned F32 quantized by llama-quantize run by hand (its own fallbacks for rows it
    # cannot quantize), measured the same way
    by_hand = tmp_path / "by-hand-q4_k_m.gguf"
    llamacpp.run_tool("llama-quantize", [f32, by_hand, "Q4_K_M"])
    kl_hand = kl_per_token(ref, llamacpp.logits(by_hand, reference.tokens))
    print(f"{reference.hf_dir.name}: llama-quantize by hand: mean KL {kl_hand.mean():.4g}")
    assert kl.mean() <= QUANT_FACTOR * kl_hand.mean(), (kl.mean(), kl_hand.mean())
    # the inert attention head's output (ne0 = head_dim 32) and the width-1 FFNs (ne0 = 1) cannot be q4_K
    assert {f.tensor for f in q.fallbacks} >= {"blk.0.attn_output.weight"}
    assert all(f.used == "f16" for f in q.fallbacks if f.ncols == 1)


# ----------------------------------------------------------------------------- the demo model


@pytest.fixture(scope="session")
def demo_reference(demo_model) -> Reference:
    # converted once into the user's cache (the demo checkpoint lives there too)
    return Reference(demo_model, convert_cached(demo_model, "f32"))


def demo_plan(shape: ModelShape) -> Plan:
    """SmolLM2-135M: 30 layers, 9 query heads in 3 KV groups of 3, FFN 1536."""
    L = LayerPlan
    cut = {
        3: L(3, heads=()),  # attention removed
        7: L(7, neurons=()),  # MLP removed
        10: L(10, removed=True),
        12: L(12, heads=(0, 1, 3, 4, 6, 7)),  # 2 of 3 query heads in each group
        15: L(15, heads=(0, 1, 2, 6, 7, 8)),  # KV group 1 removed
        18: L(18, neurons=_neurons(shape, 1024, 5)),
        20: L(20, removed=True),
        25: L(25, heads=(3, 4, 5), neurons=_neurons(shape, 768, 6)),
    }
    return Plan(shape=shape, layers=tuple(cut.get(i, L(i)) for i in range(shape.n_layer)))


@pytest.mark.e2e
def test_demo_model_mixed_plan_matches_pytorch(demo_reference, tmp_path):
    plan = demo_plan(demo_reference.shape)
    result = rewrite(demo_reference.gguf, plan, tmp_path / "demo-mixed.gguf")
    r = demo_reference.compare(demo_reference.torch_logits(plan), result.path)
    log.info("demo mixed plan: %s", r)
    print(f"\ndemo mixed plan vs PyTorch: {r}")
    assert r["mean_kl"] < KL_MAX, r
    assert r["top1"] == 1.0, r
    assert r["ties"] <= len(demo_reference.tokens) // 10, r
