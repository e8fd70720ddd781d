"""A plan under construction (:class:`Draft`) and the parameter counts and file size it predicts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from gguf_prune.plan import LayerPlan, ModelShape, Plan
from gguf_prune.writing.options import DEFAULT_QUANT

# Approximate bits per weight of block tensors, for the predicted size of a budget.
BITS_PER_WEIGHT = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.7,
                   "Q5_K_S": 5.5, "Q5_0": 5.5, "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q3_K_M": 3.9,
                   "Q2_K": 3.35}


@dataclass
class Draft:
    """A plan under construction: the strategies cut it step by step, :meth:`to_plan` freezes it.

    Removing both sub-blocks of a layer removes the layer; removing a layer or a sub-block drops the head /
    neuron cuts inside it, so every state is one that :func:`gguf_prune.plan.validate` can take."""

    shape: ModelShape
    removed: set[int] = field(default_factory=set)
    attn_removed: set[int] = field(default_factory=set)
    mlp_removed: set[int] = field(default_factory=set)
    heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    neurons: dict[int, tuple[int, ...]] = field(default_factory=dict)
    why: dict[int, dict[str, Any]] = field(default_factory=dict)

    def note(self, layer: int, **kw) -> None:
        self.why.setdefault(layer, {}).update(kw)

    def remove_attn(self, i: int) -> None:
        self.attn_removed.add(i)
        self.heads.pop(i, None)
        if i in self.mlp_removed:
            self.remove_layer(i)

    def remove_mlp(self, i: int) -> None:
        self.mlp_removed.add(i)
        self.neurons.pop(i, None)
        if i in self.attn_removed:
            self.remove_layer(i)

    def remove_layer(self, i: int) -> None:
        self.removed.add(i)
        self.attn_removed.discard(i)
        self.mlp_removed.discard(i)
        self.heads.pop(i, None)
        self.neurons.pop(i, None)

    def alive(self, i: int) -> bool:
        return i not in self.removed

    def layer_plan(self, i: int, why: Mapping[str, Any] | None = None) -> LayerPlan:
        """Layer ``i`` as the plan would hold it now."""
        if i in self.removed:
            return LayerPlan(i, removed=True, why=why or {})
        heads = () if i in self.attn_removed else self.heads.get(i)
        neurons = () if i in self.mlp_removed else self.neurons.get(i)
        return LayerPlan(i, heads=heads, neurons=neurons, why=why or {})

    def to_plan(self, fingerprint: str, settings: Mapping[str, Any]) -> Plan:
        layers = tuple(self.layer_plan(i, self.why.get(i, {})) for i in range(self.shape.n_layer))
        plan = Plan(shape=self.shape, layers=layers, fingerprint=fingerprint, settings=dict(settings))
        return replace(plan, predicted=predict(plan, settings.get("quant", DEFAULT_QUANT)))

    @classmethod
    def from_plan(cls, plan: Plan) -> "Draft":
        w = cls(plan.shape)
        for lp in plan.layers:
            if lp.removed:
                w.removed.add(lp.index)
                continue
            if lp.attention_removed:
                w.attn_removed.add(lp.index)
            elif lp.heads is not None:
                w.heads[lp.index] = tuple(lp.heads)
            if lp.mlp_removed:
                w.mlp_removed.add(lp.index)
            elif lp.neurons is not None:
                w.neurons[lp.index] = tuple(lp.neurons)
            if lp.why:
                w.why[lp.index] = dict(lp.why)
        return w


def predict(plan: Plan, quant: str = DEFAULT_QUANT) -> dict[str, Any]:
    """Parameter counts before/after and an estimate of the quantized size."""
    s = plan.shape
    before, after = plan.block_params()
    embed = s.n_vocab * s.n_embd
    bpw = BITS_PER_WEIGHT.get(quant.upper(), 16.0)
    # token_embd and output are usually kept at a higher type (q6_K/q8_0 in Q4_K_M); count them at ~6.6 bpw
    other_bits = 6.5625 if bpw < 16 else bpw
    return {
        "block_params_before": before,
        "block_params_after": after,
        "block_params_removed_fraction": round(1 - after / before, 6),
        "embedding_params": embed,
        "quant": quant,
        "size_bytes_estimate_before": int((before * bpw + embed * other_bits) / 8),
        "size_bytes_estimate_after": int((after * bpw + embed * other_bits) / 8),
    }


def head_counts(s: ModelShape, heads: tuple[int, ...] | None) -> tuple[int, int]:
    """(query heads, KV groups) kept, for attn_params."""
    if heads is None:
        return s.n_head, s.n_head_kv
    return len(heads), len({h // s.group_size for h in heads})
