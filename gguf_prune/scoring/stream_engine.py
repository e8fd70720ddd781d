"""The streamed engine's reading and running: a (possibly sharded) safetensors checkpoint read a few tensors at
a time, and decoder layers built from it one at a time and run as transformers' own LlamaDecoderLayer.

The layer-major scan that drives it is :mod:`gguf_prune.scoring.stream`.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch

from gguf_prune.models.checkpoint import (DTYPE_BYTES, TensorInfo, check_weights, expected_tensors, read_config,
                                          tied_embeddings)
from gguf_prune.models.tensors import LAYER_TENSORS
from gguf_prune.plan import ModelShape
from gguf_prune.scoring import ablate


# ----------------------------------------------------------------------------- the checkpoint


class Checkpoint:
    """Where every tensor of a (possibly sharded) safetensors checkpoint lives; reads a few at a time."""

    def __init__(self, hf_dir: Path, config: dict):
        self.hf_dir = Path(hf_dir)
        self.config = config
        # every shard present and whole, every tensor there with the config's shape (the checks every command
        # makes before any work: models.checkpoint.check_weights)
        self.tensors: dict[str, TensorInfo] = check_weights(self.hf_dir, config)
        self.bytes_read = 0

    def expected(self) -> dict[str, tuple[int, ...]]:
        return expected_tensors(ModelShape.from_hf_config(self.config), tied_embeddings(self.config))

    # --- sizes ---------------------------------------------------------------------------
    def layer_names(self, i: int) -> list[str]:
        return [f"model.layers.{i}.{k}" for k in LAYER_TENSORS]

    def head_name(self) -> str:
        return "lm_head.weight" if "lm_head.weight" in self.expected() else "model.embed_tokens.weight"

    def layer_bytes(self, i: int, elt: int | None = None) -> int:
        """Bytes of layer i's weights as stored, or at ``elt`` bytes per element."""
        ts = [self.tensors[n] for n in self.layer_names(i)]
        return sum(t.nbytes if elt is None else elt * math.prod(t.shape) for t in ts)

    def max_tensor_bytes(self) -> int:
        return max(t.nbytes for n, t in self.tensors.items() if n.startswith("model.layers."))

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # --- reads ---------------------------------------------------------------------------
    def read(self, names: Sequence[str], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors, each converted to ``dtype`` on ``device``; every shard is opened once and closed
        again, so no mapping of the checkpoint outlives the call (the page cache keeps what the OS wants)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for n in ns:
                    t = h.get_tensor(n)
                    self.bytes_read += self.tensors[n].nbytes
                    out[n] = t.to(device=device, dtype=dtype)
                    del t
        return out

    def rows(self, name: str, ids: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
        """``weight[ids]`` for a (n_vocab, d) tensor, reading only the rows the ids name."""
        from safetensors import safe_open

        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt", device="cpu") as h:
            sl = h.get_slice(name)
            rows, k = [], 0
            u = uniq.tolist()
            while k < len(u):  # contiguous runs of ids are one read each
                e = k
                while e + 1 < len(u) and u[e + 1] == u[e] + 1:
                    e += 1
                rows.append(sl[u[k]:u[e] + 1])
                k = e + 1
        table = torch.cat(rows).to(device=device, dtype=dtype)  # (n_unique, d)
        self.bytes_read += table.shape[0] * info.shape[1] * DTYPE_BYTES.get(info.dtype, 4)
        return table[inverse.to(table.device)].view(*ids.shape, -1)  # (b, T, d)


def open_checkpoint(hf_dir: Path) -> Checkpoint:
    """Index and check a checkpoint for streaming: every tensor present with the config's shape."""
    return Checkpoint(hf_dir, read_config(hf_dir))


# ----------------------------------------------------------------------------- the engine


class _Head(ablate.Engine):
    """The output head alone (final norm + output matrix), with the in-memory engine's KL arithmetic."""

    def __init__(self, norm: torch.nn.Module, W: torch.Tensor, logit_tokens: int):  # noqa: D107 - no model here
        self.core = SimpleNamespace(norm=norm)
        self.W = W  # (n_vocab, d) float32
        self.bias = None
        self.head_device = W.device
        self.n_vocab = int(W.shape[0])
        self.logit_tokens = int(logit_tokens)
        self.vocab_seconds = 0.0
        self.seq_layer_evals = 0.0
        self._h = None

    # reference() runs context → embed → run → final; here the final state is given
    def context(self, ids, mask):
        return None

    def embed(self, ids):
        return self._h

    def run(self, h, start, ctx, reps=1, modes=None):
        return h

    def reference_from(self, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> ablate.Reference:
        self._h = h
        try:
            return self.reference(ids, mask)
        finally:
            self._h = None


class StreamEngine:
    """Layers read from the checkpoint one at a time, run as transformers' own LlamaDecoderLayer."""

    def __init__(self, ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import LlamaConfig

        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = dtype
        cfg = {k: v for k, v in ckpt.config.items() if k not in ("torch_dtype", "dtype")}
        self.config = LlamaConfig(**cfg)
        self.config._attn_implementation = "sdpa"  # what from_pretrained picks, so the numbers match
        self.config.use_cache = False
        self.n_layer = int(self.config.num_hidden_layers)
        self.n_head = int(self.config.num_attention_heads)
        self.n_head_kv = int(getattr(self.config, "num_key_value_heads", None) or self.n_head)
        self.head_dim = int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_head)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.rotary = LlamaRotaryEmbedding(config=self.config, device=self.device)
        self.seq_layer_evals = 0.0

    def context(self, ids: torch.Tensor, mask: torch.Tensor) -> ablate.Context:
        """As :meth:`ablate.Engine.context`: causal mask, positions and RoPE for one token group."""
        from transformers.masking_utils import create_causal_mask

        b, T = ids.shape
        cache_position = torch.arange(T, device=self.device)
        position_ids = cache_position.unsqueeze(0)  # (1, T)
        probe = torch.empty((b, T, 1), dtype=self.dtype, device=self.device)
        attn_mask = create_causal_mask(config=self.config, input_embeds=probe,
                                       attention_mask=mask.to(self.device).long(), cache_position=cache_position,
                                       past_key_values=None, position_ids=position_ids)
        pe = self.rotary(probe, position_ids)  # (cos, sin): (1, T, head_dim)
        return ablate.Context(attention_mask=attn_mask, position_ids=position_ids, cache_position=cache_position,
                              position_embeddings=pe, batch=b)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ckpt.rows("model.embed_tokens.weight", ids, self.device, self.dtype)  # (b, T, d)

    def load_layer(self, i: int, grad: bool = False):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        prefix = f"model.layers.{i}."
        sd = {n[len(prefix):]: t for n, t in self.ckpt.read(self.ckpt.layer_names(i), self.device, self.dtype).items()}
        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, layer_idx=i)
        layer.load_state_dict(sd, strict=True, assign=True)
        for p in layer.parameters():
            p.requires_grad_(grad)
        return layer.eval()

    def load_head(self, logit_tokens: int) -> _Head:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm_w = self.ckpt.read(["model.norm.weight"], self.device, self.dtype)["model.norm.weight"]
        norm = LlamaRMSNorm(norm_w.shape[0], eps=self.config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(norm_w, requires_grad=False)
        name = self.ckpt.head_name()
        # logits in float32 whatever the compute dtype, as the in-memory engine
        W = self.ckpt.read([name], self.device, torch.float32)[name]  # (n_vocab, d)
        return _Head(norm, W, logit_tokens)

    # --- one layer on stacked states -----------------------------------------------------
    def forward(self, layer, h: torch.Tensor, ctx: ablate.Context, reps: int = 1) -> torch.Tensor:
        out = layer(h, past_key_values=None, use_cache=False, **ctx.on(self.device, reps))
        self.seq_layer_evals += h.shape[0]
        return out[0] if isinstance(out, tuple) else out

    def attn(self, layer, h, ctx, reps: int = 1):
        self.seq_layer_evals += 0.5 * h.shape[0]
        out = layer.self_attn(hidden_states=layer.input_layernorm(h), past_key_values=None, **ctx.on(self.device, reps))
        return out[0] if isinstance(out, tuple) else out

    def mlp(self, layer, h):
        self.seq_layer_evals += 0.5 * h.shape[0]
        return layer.mlp(layer.post_attention_layernorm(h))
