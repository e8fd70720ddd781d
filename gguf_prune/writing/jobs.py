"""Plan a rewrite: how each kept layer is written (:class:`LayerCut`) and one :class:`TensorJob` per output tensor.

Nothing is read or written here: the jobs say, for each tensor of the pruned GGUF, which base tensor it comes
from, its output shape and how its bytes are made (copied, rows or columns taken, zeros, ones), and planning
collects every problem with the input (a tensor of no known role, a recovered tensor that does not fit) so
that :func:`gguf_prune.writing.rewrite.rewrite` refuses the file once, naming all of them. See rewrite.py's
docstring for what each kind of cut writes.

Naming: ``ne`` is ggml order; ``shape`` is numpy order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from gguf import GGMLQuantizationType

from gguf_prune.models import arch as archmod
from gguf_prune.plan import ModelShape, Plan
from gguf_prune.writing.gguf_read import TensorRef

# output biases a repair may add to a layer that has none in the base (llama and deci load them if present)
NEW_BIASES = ("attn_output.bias", "ffn_down.bias")


@dataclass(frozen=True)
class LayerCut:
    """How one kept source layer is written."""

    source: int
    target: int
    q_heads: tuple[int, ...]  # kept query heads (source numbering)
    kv_heads: tuple[int, ...]  # kept KV groups (source numbering)
    neurons: tuple[int, ...]  # kept FFN neurons
    # "kept" | "sliced" | "removed" | "inert" (one zero head) | "linear" (a patch in place of the attention)
    # | "patch" (a patch in place of a removed layer)
    attention: str
    mlp: str  # "kept" | "sliced" | "inert" (one zero neuron)

    @property
    def n_head(self) -> int:
        return {"removed": 0, "inert": 1}.get(self.attention, len(self.q_heads))

    @property
    def n_head_kv(self) -> int:
        return {"removed": 0, "inert": 1, "linear": 0, "patch": 0}.get(self.attention, len(self.kv_heads))

    @property
    def n_ff(self) -> int:
        return 1 if self.mlp == "inert" else len(self.neurons)

    def dims(self) -> dict:
        return {"source_index": self.source, "n_head": self.n_head, "n_head_kv": self.n_head_kv, "n_ff": self.n_ff,
                "attention": self.attention, "mlp": self.mlp}


@dataclass(frozen=True)
class Override:
    """A recovered tensor that replaces a base tensor's values (or gives a patch its matrix)."""

    shape: tuple[int, ...]  # numpy order, the source (unsliced) shape
    load: Callable[[], np.ndarray]  # → float32 array of ``shape`` in GGUF layout (q/k rows permuted for RoPE)


@dataclass
class TensorJob:
    """One output tensor: its info and how to produce its bytes."""

    name: str
    src: TensorRef
    shape: tuple[int, ...]  # numpy order, output
    op: str  # "copy" | "take" | "zeros" | "ones"
    axis: int | None = None
    index: np.ndarray | None = None
    data: Override | None = None  # recovered values replacing the source's (then copied / taken from)

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.src.element.itemsize


def layer_cuts(plan: Plan) -> list[LayerCut]:
    """How each written layer is written (validated plan assumed)."""
    s = plan.shape
    cuts = []
    all_heads = tuple(range(s.n_head))
    for target, lp in enumerate(lp for lp in plan.layers if lp.written):
        if lp.removed:  # a patch in place of the layer
            cuts.append(LayerCut(lp.index, target, all_heads, (), (), "patch", "inert"))
            continue
        heads = lp.kept_heads(s)
        if lp.attention_removed and lp.patch is not None:
            attention, heads = "linear", all_heads
        elif lp.attention_removed:
            attention = "inert" if target == 0 else "removed"
        else:
            attention = "kept" if lp.heads is None or len(heads) == s.n_head else "sliced"
        neurons = lp.kept_neurons(s)
        mlp = "inert" if lp.mlp_removed else ("kept" if lp.neurons is None or len(neurons) == s.n_ff else "sliced")
        cuts.append(LayerCut(lp.index, target, heads, lp.kept_kv_groups(s), neurons, attention, mlp))
    return cuts


def plan_jobs(refs: list[TensorRef], cuts: list[LayerCut], spec: archmod.ArchSpec, s: ModelShape, base: Path,
              overrides: Mapping[str, Override] | None = None,
              permute_rope: bool = False) -> tuple[list[TensorJob], list[str]]:
    """One job per output tensor, in the base's tensor order, and every problem found on the way ([] when the
    rewrite can go ahead). ``permute_rope``: q/k rows are rotate-half (NEOX) in the base and the output
    architecture applies adjacent-pair (NORM) RoPE, so every head's rows are reordered (weights and biases)."""
    planner = _JobPlanner(cuts, spec, s, base, dict(overrides or {}),
                          archmod.neox_to_norm_rows(s.head_dim) if permute_rope else None)
    for ref in refs:
        planner.add(ref)
    planner.add_new_biases(refs)
    planner.check_unused_overrides(refs)
    return planner.jobs, planner.problems


def missing_layer_tensors(jobs: list[TensorJob], cuts: list[LayerCut]) -> list[str]:
    """Output tensors every written layer needs (its FFN norm and down matrix) that no job writes."""
    expected = {f"blk.{c.target}.{sfx}" for c in cuts for sfx in ("ffn_norm.weight", "ffn_down.weight")}
    return sorted(expected - {j.name for j in jobs})


def _unit_indices(unit: str, kept: tuple[int, ...], head_dim: int, rope_order: np.ndarray | None = None) -> np.ndarray:
    """Rows (or columns) of the kept units; ``rope_order`` reorders the rows inside each head (NEOX → NORM)."""
    if unit == "neuron":
        return np.asarray(kept, dtype=np.int64)
    # a head is a contiguous block of head_dim rows/columns: (n_kept, 1) * head_dim + (head_dim,) → (n_kept * head_dim,)
    within = np.arange(head_dim) if rope_order is None else rope_order
    return (np.asarray(kept, dtype=np.int64)[:, None] * head_dim + within).reshape(-1)


@dataclass
class _JobPlanner:
    """Turns each base tensor into its job (or into nothing: a removed layer or block), collecting problems."""

    cuts: list[LayerCut]
    spec: archmod.ArchSpec
    s: ModelShape
    base: Path
    overrides: dict[str, Override]
    rope_order: np.ndarray | None  # (head_dim,) row order inside a q/k head, or None to keep it
    jobs: list[TensorJob] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)  # overrides already reported (or written)

    def __post_init__(self) -> None:
        s = self.s
        self.by_source = {c.source: c for c in self.cuts}
        self.unit_count = {"q_head": s.n_head, "kv_head": s.n_head_kv, "neuron": s.n_ff}
        self.unit_size = {"q_head": s.head_dim, "kv_head": s.head_dim, "neuron": 1}

    # --- one base tensor

    def add(self, ref: TensorRef) -> None:
        split = archmod.split_layer_name(ref.name)
        if split is None:
            self._add_global(ref)
            return
        il, suffix = split
        role = self.spec.role(suffix)
        if ref.name in self.overrides and not self._override_fits(ref, il, suffix):
            return
        if not self._layer_tensor_fits(ref, il, role):
            return
        cut = self.by_source.get(il)
        if cut is None:  # layer removed
            return
        self._add_layer_tensor(ref, cut, suffix, role)

    def _add_global(self, ref: TensorRef) -> None:
        """A tensor outside the layers (embeddings, output norm and matrix): copied, or its recovered values."""
        data = self.overrides.get(ref.name)
        if data is not None and tuple(data.shape) != tuple(ref.shape):
            self.problems.append(f"recovered tensor {ref.name!r} has numpy shape {tuple(data.shape)}, "
                                 f"expected {tuple(ref.shape)}")
            self.used.add(ref.name)  # reported
            return
        self.jobs.append(TensorJob(ref.name, ref, ref.shape, "copy", data=data))

    def _override_fits(self, ref: TensorRef, il: int, suffix: str) -> bool:
        """A recovered layer tensor has the base tensor's shape; a patch's matrix is (n_embd, n_embd)."""
        cut = self.by_source.get(il)
        want = ((self.s.n_embd, self.s.n_embd) if cut is not None and cut.attention in ("linear", "patch")
                and suffix == "attn_output.weight" else ref.shape)
        if tuple(self.overrides[ref.name].shape) != tuple(want):
            self.problems.append(f"recovered tensor {ref.name!r} has numpy shape "
                                 f"{tuple(self.overrides[ref.name].shape)}, expected {tuple(want)}")
            self.used.add(ref.name)  # reported
            return False
        return True

    def _layer_tensor_fits(self, ref: TensorRef, il: int, role: archmod.TensorRole | None) -> bool:
        """The tensor has a known role, its layer exists, and its unit axis holds what the metadata says."""
        s = self.s
        if role is None:
            self.problems.append(f"tensor {ref.name!r} has no known role in a {self.spec.name} layer "
                                 f"(known: {', '.join(self.spec.layer_tensors)})")
            return False
        if not 0 <= il < s.n_layer:
            self.problems.append(f"tensor {ref.name!r}: layer {il} is outside block_count {s.n_layer}")
            return False
        shape = ref.shape  # numpy order
        if role.unit is not None:
            count, size = self.unit_count[role.unit], self.unit_size[role.unit]
            want = count * size
            if len(shape) <= role.axis or shape[role.axis] != want:
                self.problems.append(f"tensor {ref.name!r} has numpy shape {shape} (ne {ref.ne}); axis {role.axis} "
                                     f"should hold {count} {role.unit}s × {size} = {want} according to the metadata")
                return False
        return True

    # --- one tensor of a kept layer, by what its block (attention or MLP) becomes

    def _add_layer_tensor(self, ref: TensorRef, cut: LayerCut, suffix: str, role: archmod.TensorRole) -> None:
        name = f"blk.{cut.target}.{suffix}"
        mode = cut.attention if role.block == "attention" else cut.mlp
        data = self.overrides.get(ref.name)
        shape = ref.shape  # numpy order
        if mode == "removed":
            return
        if mode in ("linear", "patch"):
            self._add_patch_tensor(ref, cut, name, suffix, mode, data)
        elif role.rope and self.rope_order is not None and mode in ("kept", "sliced"):
            kept = cut.q_heads if role.unit == "q_head" else cut.kv_heads
            self._add_take(ref, name, role, _unit_indices(role.unit, kept, self.s.head_dim, self.rope_order), data)
        elif mode == "kept" or (role.unit is None and mode == "sliced"):
            self.jobs.append(TensorJob(name, ref, shape, "copy", data=data))
        elif mode == "inert":
            self._add_inert_tensor(ref, name, suffix, role)
        else:  # sliced, with a unit axis
            kept = {"q_head": cut.q_heads, "kv_head": cut.kv_heads, "neuron": cut.neurons}[role.unit]
            if len(kept) == self.unit_count[role.unit]:  # (no RoPE reorder here: that case is above)
                self.jobs.append(TensorJob(name, ref, shape, "copy", data=data))
                return
            self._add_take(ref, name, role, _unit_indices(role.unit, kept, self.s.head_dim), data)

    def _add_patch_tensor(self, ref: TensorRef, cut: LayerCut, name: str, suffix: str, mode: str,
                          data: Override | None) -> None:
        """deci's linear attention reads attn_norm and attn_output only (no bias is added)."""
        if suffix == "attn_output.weight":
            if data is None:
                self.problems.append(f"layer {cut.source} has a linear patch in the plan but no recovered matrix for "
                                     f"{ref.name!r}: pass the directory `gguf-prune recover` wrote")
                return
            self.jobs.append(TensorJob(name, ref, (self.s.n_embd, self.s.n_embd), "copy", data=data))
        elif suffix == "attn_norm.weight":
            if mode == "patch":  # a standalone patch normalises with gain 1
                self.jobs.append(TensorJob(name, ref, ref.shape, "ones"))
            else:
                self.jobs.append(TensorJob(name, ref, ref.shape, "copy", data=data))

    def _add_inert_tensor(self, ref: TensorRef, name: str, suffix: str, role: archmod.TensorRole) -> None:
        """One zero head or one zero neuron: adds exactly nothing to the residual stream."""
        if role.unit is None:
            # norms are kept (values irrelevant but read by the loader); a bias on the output would add
            # to the residual stream, so it is zeroed
            op = "zeros" if suffix.endswith(".bias") else "copy"
            self.jobs.append(TensorJob(name, ref, ref.shape, op))
        else:
            out_shape = list(ref.shape)
            out_shape[role.axis] = self.unit_size[role.unit]  # one head / one neuron
            self.jobs.append(TensorJob(name, ref, tuple(out_shape), "zeros"))

    def _add_take(self, ref: TensorRef, name: str, role: archmod.TensorRole, idx: np.ndarray,
                  data: Override | None) -> None:
        """Rows (or columns) ``idx`` along the unit axis."""
        out_shape = list(ref.shape)
        out_shape[role.axis] = len(idx)
        self.jobs.append(TensorJob(name, ref, tuple(out_shape), "take", role.axis, idx, data=data))

    # --- after every tensor

    def add_new_biases(self, refs: list[TensorRef]) -> None:
        """A repair's output biases (``attn_output.bias``, ``ffn_down.bias``) that the base has no tensor for: new
        F32 tensors of their kept (or narrowed) layer. A removed or patched block reads no bias: left to
        :meth:`check_unused_overrides` to report."""
        names = {ref.name for ref in refs}
        for name in sorted(set(self.overrides) - names):
            split = archmod.split_layer_name(name)
            cut = None if split is None else self.by_source.get(split[0])
            if cut is None or split[1] not in NEW_BIASES:
                continue
            mode = cut.attention if split[1] == "attn_output.bias" else cut.mlp
            data = self.overrides[name]
            if mode not in ("kept", "sliced") or tuple(data.shape) != (self.s.n_embd,):
                continue
            ref = TensorRef(name, GGMLQuantizationType.F32, (self.s.n_embd,), 0, 4 * self.s.n_embd)
            self.jobs.append(TensorJob(f"blk.{cut.target}.{split[1]}", ref, ref.shape, "copy", data=data))

    def check_unused_overrides(self, refs: list[TensorRef]) -> None:
        """Every recovered tensor is written: one that names no base tensor, or a removed one, is a problem."""
        names = {ref.name for ref in refs}
        self.used |= {job.src.name for job in self.jobs if job.data is not None}
        for name in sorted(set(self.overrides) - self.used):
            split = archmod.split_layer_name(name)
            if name not in names:
                self.problems.append(f"recovered tensor {name!r} is not a tensor of {self.base.name}")
            elif split is not None and split[0] not in self.by_source:
                self.problems.append(f"recovered tensor {name!r} belongs to layer {split[0]}, which the plan removes")
            else:
                self.problems.append(f"recovered tensor {name!r} is not written: layer "
                                     f"{split[0] if split else '?'} has no such tensor in the pruned model")
