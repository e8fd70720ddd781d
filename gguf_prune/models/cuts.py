"""The PyTorch side: load a checkpoint with transformers and apply a plan's cuts to it.

``apply_plan`` is the reference the rest of the project is checked against: a pruned GGUF must compute what
this model computes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from gguf_prune.models.checkpoint import ModelDirError, WeightsError, check_model_dir
from gguf_prune.models.tensors import PATCH_NAME  # a patch's matrix (n_embd, n_embd), by source layer index
from gguf_prune.models.tensors import REPAIR_BIASES
from gguf_prune.plan import Plan

log = logging.getLogger(__name__)


def resolve_device(device: str, error: type[Exception] = ValueError) -> str:
    """``--device`` (auto, cpu, cuda, cuda:N) → a torch device string; ``error`` names a bad choice."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {device}: no CUDA device is available to torch {torch.__version__}; "
                    "use --device cpu (or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise error(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    return device


def apply_plan(model, plan: Plan, weights: Mapping[str, torch.Tensor] | None = None):
    """Apply ``plan``'s cuts to a loaded LlamaForCausalLM, in place, and return it.

    Removed layers are deleted from the stack (the config's layer count follows);
    a removed attention or MLP sub-block is replaced by a module that adds nothing
    to the residual stream; removed query heads have their o_proj input columns
    zeroed (exactly removing the head); removed neurons have their down_proj input
    columns zeroed (exactly removing the neuron). Zeroing, not slicing, keeps the
    module shapes so the same code runs on every plan.

    ``weights`` (recovered tensors, HF names of the *source* model, e.g. from
    ``gguf-prune recover``) are loaded first; a patch's matrix is
    ``model.layers.{i}.patch.weight``. A removed layer with a patch becomes a
    :class:`PatchLayer` (h + W·rmsnorm(h)); an attention-removed layer with a patch
    gets a :class:`LinearAttention` (W on the layer's own normed input). Every kept
    module carries ``source_index``: the source layer it stands for.
    """
    shape = plan.shape
    layers = model.model.layers
    if len(layers) != shape.n_layer:
        raise ModelDirError(f"model has {len(layers)} layers but the plan is for {shape.n_layer}")
    patches = _load_weights(model, plan, weights or {}) if weights or plan.patches() else {}
    eps = float(getattr(model.config, "rms_norm_eps", 1e-6))
    keep = []
    with torch.no_grad():
        for lp in plan.layers:
            layer = layers[lp.index]
            if lp.removed:
                if lp.patch is not None:
                    patch = PatchLayer(patches[lp.index], eps)
                    patch.source_index = lp.index
                    keep.append(patch)
                continue
            layer.source_index = lp.index
            if lp.heads is not None:
                if len(lp.heads) == 0 and lp.patch is not None:
                    layer.self_attn = LinearAttention(patches[lp.index])
                elif len(lp.heads) == 0:
                    layer.self_attn = ZeroAttention()
                else:
                    hd = shape.head_dim
                    w = layer.self_attn.o_proj.weight  # (n_embd, n_head*hd): columns are head outputs
                    for h in sorted(set(range(shape.n_head)) - set(lp.heads)):
                        w[:, h * hd:(h + 1) * hd] = 0
            if lp.neurons is not None:
                if len(lp.neurons) == 0:
                    layer.mlp = ZeroMLP()
                else:
                    w = layer.mlp.down_proj.weight  # (n_embd, n_ff): columns are neurons
                    drop = sorted(set(range(shape.n_ff)) - set(lp.neurons))
                    w[:, drop] = 0
            keep.append(layer)
    model.model.layers = torch.nn.ModuleList(keep)
    for i, layer in enumerate(keep):  # cache slots follow the new order
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[lp.index] for lp in plan.layers if lp.written]
    return model


def _load_weights(model, plan: Plan, weights: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Copy recovered tensors into ``model`` (source names and shapes, checked); return the patch matrices."""
    n = plan.shape.n_embd
    state = model.state_dict()
    problems, patches = [], {}
    for lp in plan.patches():
        name = PATCH_NAME.format(lp.index)
        w = weights.get(name)
        if w is None:
            problems.append(f"layer {lp.index} has a {lp.patch} patch in the plan but {name} is not among the weights")
        elif tuple(w.shape) != (n, n):
            problems.append(f"{name} has shape {tuple(w.shape)}, expected ({n}, {n})")
        else:
            ref = model.model.embed_tokens.weight
            patches[lp.index] = w.detach().to(dtype=ref.dtype, device=ref.device)
    removed = {lp.index for lp in plan.layers if lp.removed}
    with torch.no_grad():
        for name, w in weights.items():
            if name.endswith(".patch.weight"):
                if not any(name == PATCH_NAME.format(lp.index) for lp in plan.patches()):
                    problems.append(f"{name} is a patch matrix but the plan has no patch at that layer")
                continue
            parts = name.split(".")
            if name not in state and name.endswith(tuple("." + b for b in REPAIR_BIASES)):
                add_bias(model.get_submodule(name.rsplit(".", 1)[0]))  # a repair's bias: the module had none
                state = model.state_dict()
            if name not in state:
                problems.append(f"{name} is not a tensor of this model")
                continue
            if name.startswith("model.layers.") and int(parts[2]) in removed:
                problems.append(f"{name} belongs to layer {parts[2]}, which the plan removes")
                continue
            if tuple(w.shape) != tuple(state[name].shape):
                problems.append(f"{name} has shape {tuple(w.shape)}, the model's is {tuple(state[name].shape)}")
                continue
            state[name].copy_(w.to(state[name].dtype))  # state_dict tensors share storage with the parameters
    if problems:
        raise WeightsError(f"recovered weights do not fit ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
                           "\n  - " + "\n  - ".join(problems))
    return patches


def add_bias(linear: torch.nn.Linear) -> torch.nn.Parameter:
    """Give ``linear`` a (zero) bias if it has none; return its bias. A repair's bias on o_proj or down_proj."""
    if linear.bias is None:
        w = linear.weight
        linear.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                         requires_grad=w.requires_grad)
    return linear.bias


class LinearAttention(torch.nn.Module):
    """A removed attention sub-block's stand-in: W·x on the layer's normed input x.

    llama.cpp's deci "linear attention" (n_head > 0, n_head_kv = 0): attn_norm, then
    attn_output (n_embd × n_embd), no bias, added to the residual stream.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        n_out, n_in = weight.shape
        self.proj = torch.nn.Linear(n_in, n_out, bias=False, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, hidden_states, *args, **kwargs):
        return self.proj(hidden_states), None


class PatchLayer(torch.nn.Module):
    """A run of removed layers' stand-in: h ↦ h + W·rmsnorm(h) (norm gain 1, no MLP).

    In GGUF: a deci layer with linear attention (attn_norm = 1, attn_output = W) and a
    width-1 zero FFN (n_ff = 0 would make llama.cpp skip the residual add).
    """

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        n = weight.shape[1]
        self.input_layernorm = LlamaRMSNorm(n, eps=eps).to(dtype=weight.dtype, device=weight.device)
        self.input_layernorm.weight.requires_grad_(False)  # written as ones: never trained
        self.self_attn = LinearAttention(weight)
        self.post_attention_layernorm = torch.nn.Identity()
        self.mlp = ZeroMLP()

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.self_attn(self.input_layernorm(hidden_states))[0]


class ZeroAttention(torch.nn.Module):
    """Attention removed: contributes nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class ZeroMLP(torch.nn.Module):
    """MLP removed: contributes nothing to the residual stream."""

    def forward(self, x):
        return torch.zeros_like(x)


def load_tokenizer(hf_dir: Path):
    """The checkpoint's tokenizer, or one ModelDirError (the tokenizers library raises a bare Exception on a
    damaged tokenizer.json)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelDirError(f"{hf_dir}: cannot load its tokenizer ({why}); the checkpoint directory needs "
                            "tokenizer.json / tokenizer_config.json: copy them again") from None


def load_model(hf_dir: Path, dtype: str = "float32", device: str | None = None):
    """Load a llama-family checkpoint for scoring (eval mode, no KV cache)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(hf_dir)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch_dtype)
    model.config.use_cache = False
    if device:
        model.to(device)
    return model.eval()
