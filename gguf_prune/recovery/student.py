"""The student: a pruned model made trainable with the exact structure its GGUF will have.

The student is ``cuts.apply_plan(model, plan, patches)``: removed layers are gone,
patches are in place, and removed heads / neurons are *masked at the input of o_proj
/ down_proj* by forward pre-hooks. Masking the input (not the weight columns) is what
keeps training from reviving them: whatever o_proj's removed columns or the LoRA
delta on them become, they multiply zeros, so the model trained is exactly the model
llama.cpp will run after those columns are sliced away (they are also zeroed in what
is saved). Embeddings, the final norm and the output matrix are frozen (tied in many
models; the teacher's logits are computed with the same matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gguf_prune.models.cuts import PatchLayer, ZeroAttention, ZeroMLP
from gguf_prune.models.tensors import PATCH_NAME
from gguf_prune.plan import Plan

if TYPE_CHECKING:
    from gguf_prune.recovery.options import FinetuneOptions

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _masks(model, plan: Plan) -> list:
    """Forward pre-hooks zeroing removed heads at o_proj's input and removed neurons at down_proj's."""
    s = plan.shape
    by_index = {lp.index: lp for lp in plan.layers}
    hooks = []
    for layer in model.model.layers:
        lp = by_index[layer.source_index]
        if lp.removed:
            continue
        if lp.heads and len(lp.heads) < s.n_head and hasattr(layer.self_attn, "o_proj"):
            m = torch.zeros(s.n_head * s.head_dim)  # (n_head*head_dim,): o_proj's input, head by head
            for h in lp.heads:
                m[h * s.head_dim:(h + 1) * s.head_dim] = 1
            hooks.append((layer.self_attn.o_proj, m))
        if lp.neurons and len(lp.neurons) < s.n_ff and hasattr(layer.mlp, "down_proj"):
            m = torch.zeros(s.n_ff)  # (n_ff,): down_proj's input, one per neuron
            m[list(lp.neurons)] = 1
            hooks.append((layer.mlp.down_proj, m))
    return hooks


def _install(hooks, device) -> list:
    """Register the masks as forward pre-hooks on ``device``; the handles remove them."""
    handles = []
    for module, m in hooks:
        mask = m.to(device)

        def pre(mod, args, _mask=mask):
            return (args[0] * _mask.to(args[0].dtype),) + tuple(args[1:])
        handles.append(module.register_forward_pre_hook(pre))
    return handles


def _used(layer, name: str) -> bool:
    """Does the parameter take part in the pruned model (and exist in its GGUF)?"""
    if name == "input_layernorm.weight":
        # a PatchLayer's norm gain is written as ones; a removed attention's norm is not read
        return not isinstance(layer, PatchLayer) and not isinstance(layer.self_attn, ZeroAttention)
    if name == "post_attention_layernorm.weight":
        return not isinstance(layer.mlp, ZeroMLP)
    return True


def _source_name(layer, rest: str) -> str:
    """A student layer's parameter under the source checkpoint's name (the layer's source index)."""
    if rest == "self_attn.proj.weight":  # a patch's matrix (PatchLayer or LinearAttention)
        return PATCH_NAME.format(layer.source_index)
    return f"model.layers.{layer.source_index}.{rest}"


@dataclass
class Student:
    """The pruned model made trainable: LoRA injected (or the used weights unfrozen), removed heads and
    neurons masked at the input of o_proj / down_proj. ``core``/``lm_head`` are what the loss calls."""

    model: Any  # the module to train (a peft model for LoRA)
    base: Any  # the LlamaForCausalLM inside (the same object apply_plan returned)
    params: list  # (name, parameter) that train
    handles: list
    plan: Plan
    options: FinetuneOptions

    @property
    def core(self):
        return self.base.model  # peft injects its layers in place: the same LlamaModel

    @property
    def lm_head(self):
        return self.base.lm_head

    def weights(self, trained: bool = True) -> dict:
        """Remove the masks, merge LoRA, and return the changed tensors under source names ({} if not trained)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        base = self.base
        if self.options.method == "lora" and self.model is not self.base:
            base = self.model.merge_and_unload()
        return _changed(base, self.plan, self.params, self.options, trained)


def prepare_student(student, plan: Plan, o: FinetuneOptions, device: str | torch.device = "cpu") -> Student:
    """Make ``student`` (``cuts.apply_plan(model, plan, patches)``) trainable as ``o`` says, on ``device``."""
    model, params = _prepare(student, o)
    model.to(device)
    # after LoRA is injected: the hooks sit on the wrapper, so that the LoRA path sees the mask too
    handles = _install(_masks(student, plan), device)
    return Student(model=model, base=student, params=params, handles=handles, plan=plan, options=o)


def _prepare(student, o: FinetuneOptions):
    """Freeze what does not train, add LoRA if asked; return (model to call, trainable named params)."""
    for p in student.parameters():
        p.requires_grad_(False)
    model = student
    if o.method == "lora":
        from peft import LoraConfig, get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, m in student.model.layers.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        targets = [t for t in LORA_TARGETS if t in present]
        if targets:
            cfg = LoraConfig(r=o.lora_rank, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                             target_modules=targets, bias="none")
            model = get_peft_model(student, cfg)
    else:
        for layer in student.model.layers:
            for n, p in layer.named_parameters():
                p.requires_grad_(_used(layer, n))
    if o.train_patches:
        for layer in student.model.layers:
            proj = getattr(layer.self_attn, "proj", None)
            if proj is not None:
                proj.weight.requires_grad_(True)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return model, params


def _changed(student, plan: Plan, params, o: FinetuneOptions, trained: bool) -> dict:
    """Source-named tensors that training changed (masked columns zeroed, as the GGUF slices them away)."""
    if not trained:
        return {}
    s = plan.shape
    by_index = {lp.index: lp for lp in plan.layers}
    trained_names = {n.removeprefix("base_model.model.") for n, _ in params}  # peft's prefix
    out = {}
    for p_, layer in enumerate(student.model.layers):
        lp = by_index[layer.source_index]
        for rest, p in layer.named_parameters():
            leaf = rest.rsplit(".", 2)[-2]  # "self_attn.q_proj.weight" → "q_proj"
            lora_target = o.method == "lora" and leaf in LORA_TARGETS  # merged: every one changed
            if not (lora_target or f"model.layers.{p_}.{rest}" in trained_names) or not _used(layer, rest):
                continue
            w = p.detach().float().cpu().clone()
            if rest == "self_attn.o_proj.weight" and lp.heads is not None and len(lp.heads) < s.n_head:
                keep = torch.zeros(s.n_head * s.head_dim, dtype=torch.bool)
                for h in lp.heads:
                    keep[h * s.head_dim:(h + 1) * s.head_dim] = True
                w[:, ~keep] = 0
            if rest == "mlp.down_proj.weight" and lp.neurons is not None and len(lp.neurons) < s.n_ff:
                keep = torch.zeros(s.n_ff, dtype=torch.bool)
                keep[list(lp.neurons)] = True
                w[:, ~keep] = 0
            out[_source_name(layer, rest)] = w
    return out
