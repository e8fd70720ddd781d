"""Layer-major streamed scoring: score a model bigger than memory, reading each layer's weights once.

The in-memory engine (:mod:`gguf_prune.scoring.ablate`) holds the whole model and, at each layer i, sends the
variants born there through layers i+1… before moving on. This engine turns the loops round: it reads
decoder layer j's tensors from the safetensors shards (memory-mapped, one layer at a time, closed after
the read), and advances through it *every* variant that needs it before reading layer j+1:

* the full model (the main path), which also yields BI, neuron statistics and head output norms;
* every variant born at an earlier layer i < j: layer i bypassed (its state at the input of layer i+1
  is the full model's input to layer i), its attention or MLP bypassed, one query head or one KV group
  zeroed. A variant is born from the main path the moment it diverges, so prefix reuse is free:
  L·(L−1)/2 layer evaluations for the layer ablation, each layer's weights read once.

After the last layer the final norm and output matrix are read once, the full model's predictions become
the reference, and each variant's KL(reference ‖ variant) is computed one variant at a time with the same
closed form as the in-memory engine (:meth:`ablate.Engine.divergence`), so the numbers are the same.

Memory: one layer's weights, the live variants' states (one (b, T, d) tensor each), the activations of one
stacked forward, the reference. When the variants' states do not fit the budget (``--max-memory``, default
what the device has free) the variants are cut into *passes*, in birth order: pass k starts at the first
layer where its variants are born, from the main path's state saved there during the first pass, so it
re-reads only the layers from there on. When even one layer's variants do not fit, the calibration
sequences are split into token groups, each scored on its own (KL sums add up). How many passes the run
made, and why, goes into scores.json (``stream``).

On CUDA the layer's weights, the live states and the output matrix sit on the GPU; the main path's saved
states and the checkpoint stay on the CPU / disk.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gguf_prune.scoring import ablate
from gguf_prune import scores as scores_io
from gguf_prune.models.checkpoint import (DTYPE_BYTES, TensorInfo, check_weights, expected_tensors, read_config,
                                          tied_embeddings)
from gguf_prune.plan import ModelShape
from gguf_prune.atomic import save_tensors_atomic
from gguf_prune.errors import GgufPruneError

log = logging.getLogger(__name__)

# a llama decoder layer's tensors, relative to model.layers.{i}.
LAYER_TENSORS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


class StreamError(GgufPruneError, ValueError):
    """A checkpoint or memory budget the streamed engine cannot work with: what is wrong and what to do."""


def fmt_bytes(n: float) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str | int | None, what: str = "--max-memory") -> int | None:
    """'24GB', '24G', '24GiB', '512MiB', '2e9' → bytes (GB and GiB both mean 2**30: memory is sold that way)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = (("TIB", 1 << 40), ("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("TB", 1 << 40),
             ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20),
             ("K", 1 << 10), ("B", 1))
    mult = 1
    for suffix, k in units:
        if s.endswith(suffix):
            s, mult = s[:-len(suffix)], k
            break
    try:
        n = float(s) * mult
    except ValueError:
        raise StreamError(f"{what} {text!r}: cannot read a size; use e.g. 24GB, 512MiB or a number of bytes") from None
    if not n > 0 or not math.isfinite(n):
        raise StreamError(f"{what} {text!r}: must be a positive size")
    return int(n)


def available_memory(device: str) -> int:
    """Bytes the device has free now: GPU free memory, or the host's available RAM."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with the environment
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return 8 << 30


# ----------------------------------------------------------------------------- the checkpoint


class Checkpoint:
    """Where every tensor of a (possibly sharded) safetensors checkpoint lives; reads a few at a time."""

    def __init__(self, hf_dir: Path, config: dict):
        self.hf_dir = Path(hf_dir)
        self.config = config
        # every shard present and whole, every tensor there with the config's shape (the checks every command
        # makes before any work: hfmodel.check_weights)
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


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One ablation unit: born from the main path at ``layer``."""

    layer: int
    kind: str  # layer | attn | mlp | head | kv
    index: int = 0  # head or KV group index
    zero: tuple[int, ...] = ()  # query heads zeroed (head, kv)


def variants_of(layers: Sequence[int], n_head: int, n_head_kv: int, sublayers: bool,
                head_layers: Sequence[int]) -> list[Variant]:
    """Every unit to ablate, in birth order: per layer (layer, attn, mlp), then its heads and KV groups."""
    out = []
    heads = set(head_layers)
    for i in sorted(layers):
        out.append(Variant(i, "layer"))
        if sublayers:
            out += [Variant(i, "attn"), Variant(i, "mlp")]
        if i in heads:
            for kind, idx, zs in ablate._head_zero_sets(n_head, n_head_kv, set()):
                out.append(Variant(i, kind, idx, tuple(zs)))
    return out


def slice_layers(k: int, n: int, cost: Sequence[float]) -> list[int]:
    """Slice ``k`` of ``n`` (0-based) of the layers: contiguous ranges, each cut where the running cost is
    nearest to its share (j/n of the total), and every slice at least one layer."""
    L = len(cost)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(cost, dtype=float))])  # prefix[c]: cost of layers < c
    cuts = [0]
    for j in range(1, n):
        lo, hi = cuts[-1] + 1, L - (n - j)
        target = prefix[-1] * j / n
        cuts.append(min(range(lo, hi + 1), key=lambda c: (abs(prefix[c] - target), c)))
    cuts.append(L)
    return list(range(cuts[k], cuts[k + 1]))


# ----------------------------------------------------------------------------- memory plan


@dataclass
class MemoryPlan:
    budget: int
    group_seqs: int
    batch_tokens: int
    logit_tokens: int
    layer_bytes: int  # one layer's weights in the compute dtype (+ the largest stored tensor while converting)
    head_bytes: int  # the output matrix in float32 and the final norm
    act_bytes: int  # one stacked forward's activations
    ref_bytes: int  # the reference predictions of one token group
    state_bytes: int  # one variant's state for one token group
    fixed_bytes: int  # everything but the variants' states and the main path's saved states
    passes: list[list[Variant]]  # per token group (same cut for each)
    why: str

    def to_dict(self, n_groups: int) -> dict:
        return {"budget": self.budget, "group_seqs": self.group_seqs, "token_groups": n_groups,
                "passes_per_group": len(self.passes), "passes": n_groups * len(self.passes),
                "batch_tokens": self.batch_tokens, "logit_tokens": self.logit_tokens,
                "layer_bytes": self.layer_bytes, "head_bytes": self.head_bytes, "act_bytes": self.act_bytes,
                "state_bytes": self.state_bytes, "ref_bytes": self.ref_bytes, "fixed_bytes": self.fixed_bytes,
                "pass_layers": [[p[0].layer, p[-1].layer, len(p)] for p in self.passes], "why": self.why}


def plan_memory(ckpt: Checkpoint, n_seq: int, seq_len: int, variants: Sequence[Variant], budget: int,
                elt: int, store_is_compute: bool, batch_tokens: int | None = None) -> MemoryPlan:
    """Choose token groups and passes so that one layer, the live states and the output head fit ``budget``."""
    c = ckpt.config
    d, ff, nh = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_attention_heads"])
    V = int(c["vocab_size"])
    L = int(c["num_hidden_layers"])
    wl = max(ckpt.layer_bytes(i, elt) for i in range(L)) + (0 if store_is_compute else ckpt.max_tensor_bytes())
    head = V * d * 4 + d * 4 + (0 if store_is_compute else V * d * DTYPE_BYTES.get(
        ckpt.tensors[ckpt.head_name()].dtype, 4))
    per_tok = elt * (3 * ff + 8 * d + nh * seq_len) + 64  # MLP, residual and attention scores of one token
    births = {}
    for v in variants:
        births[v.layer] = births.get(v.layer, 0) + 1
    most = max(births.values(), default=1)

    def cost(g: int) -> tuple[int, int, int, int, int, int]:
        tok = g * seq_len
        s = tok * d * elt
        # stacks of up to ~2048 tokens keep the matmuls efficient; a tenth of the budget bounds them
        bt = batch_tokens or max(tok, min(max(most * tok, 2048), int(0.1 * budget) // per_tok))
        act = max(bt, tok) * per_tok
        lt = max(16, min((256 << 20) // (4 * V), int(0.05 * budget) // (12 * V)))
        ref = tok * d * 20 + tok * 16
        main = 4 * s + tok * ff * elt  # h, h_mid, h_out, o_in and the captured MLP activations
        fixed = max(wl + act + main, head + 3 * lt * V * 4) + ref
        return fixed, s, bt, act, lt, ref

    choice = None
    for g in sorted({max(1, n_seq >> k) for k in range(0, 20)}, reverse=True):
        fixed, s, *_ = cost(g)
        if fixed + s * most <= budget:  # every layer's variants can be born in one pass
            choice = g
            break
    if choice is None:
        for g in sorted({max(1, n_seq >> k) for k in range(0, 20)}, reverse=True):
            fixed, s, *_ = cost(g)
            if fixed + 2 * s <= budget:
                choice = g
                break
    if choice is None:
        fixed, s, *_ = cost(1)
        need = fixed + 2 * s
        raise StreamError(
            f"--max-memory {fmt_bytes(budget)} is too small to stream this model: one decoder layer needs "
            f"{fmt_bytes(need)} (its weights {fmt_bytes(wl)}, the activations of one {seq_len}-token sequence, "
            f"and the output matrix {fmt_bytes(head)} at the end); give at least {fmt_bytes(need)}"
            + (" or use --dtype bf16" if elt == 4 else ""))
    fixed, s, bt, act, lt, ref = cost(choice)
    # cut the variants into passes in birth order; passes after the first need the main path's saved state
    n_pass = 1
    for _ in range(20):
        room = budget - fixed - s * (n_pass - 1)
        per_pass = max(1, room // s)
        passes = [list(variants[k:k + per_pass]) for k in range(0, len(variants), per_pass)] or [[]]
        if len(passes) <= n_pass:
            break
        n_pass = len(passes)
    n_groups = -(-n_seq // choice)
    if len(passes) == 1 and n_groups == 1:
        why = (f"one pass: all {len(variants)} variant states ({fmt_bytes(s * len(variants))}) fit "
               f"{fmt_bytes(budget)} next to one layer ({fmt_bytes(wl)}) and the output head ({fmt_bytes(head)})")
    else:
        why = (f"{len(variants)} variant states of {fmt_bytes(s)} each ({choice} sequences per token group) need "
               f"{fmt_bytes(s * len(variants))}; {fmt_bytes(budget - fixed)} of the {fmt_bytes(budget)} budget is left "
               f"for them after one layer ({fmt_bytes(wl)}), activations ({fmt_bytes(act)}) and the output head "
               f"({fmt_bytes(head)}): {len(passes)} pass(es) over the weights per token group, "
               f"{n_groups} token group(s)")
    return MemoryPlan(budget=budget, group_seqs=choice, batch_tokens=bt, logit_tokens=lt, layer_bytes=wl,
                      head_bytes=head, act_bytes=act, ref_bytes=ref, state_bytes=s, fixed_bytes=fixed,
                      passes=passes, why=why)


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


@dataclass
class StreamResult:
    scan: ablate.ScanResult
    col_norm: dict = field(default_factory=dict)  # layer → (n_ff,) ‖down_proj column‖
    taylor: dict = field(default_factory=dict)  # layer → (n_head,)
    memory: MemoryPlan | None = None
    n_groups: int = 0
    bytes_read: int = 0
    layer_reads: int = 0
    full_nll: float = 0.0
    seconds: dict = field(default_factory=dict)


def _advance(eng: StreamEngine, layer, live: list, ctx: ablate.Context, per: int) -> None:
    """Every live variant state through ``layer``, stacked ``per`` at a time, in place."""
    for k in range(0, len(live), per):
        chunk = live[k:k + per]
        x = chunk[0][1] if len(chunk) == 1 else torch.cat([s for _, s in chunk], dim=0)  # (n·b, T, d)
        y = eng.forward(layer, x, ctx, reps=len(chunk))
        for j, part in enumerate(y.chunk(len(chunk), dim=0) if len(chunk) > 1 else (y,)):
            live[k + j] = (chunk[j][0], part)
        del x, y


def _births(eng: StreamEngine, layer, vs: list[Variant], h, h_mid, o_in, ctx, per: int) -> list:
    """States at the input of layer i+1 of the variants born at layer i (as ablate._layer/_head_variants)."""
    out = []
    b = h.shape[0]
    heads = [v for v in vs if v.kind in ("head", "kv")]
    for v in vs:
        if v.kind == "layer":
            out.append((v, h))
        elif v.kind == "attn":  # attention output zeroed, residual kept
            out.append((v, h + eng.mlp(layer, h)))
        elif v.kind == "mlp":
            out.append((v, h_mid))
    nh, hd = eng.n_head, eng.head_dim
    for k in range(0, len(heads), per):
        chunk = heads[k:k + per]
        n = len(chunk)
        x = o_in.repeat(n, 1, 1).view(n, b, -1, nh, hd)  # (n, b, T, n_head, hd)
        for j, v in enumerate(chunk):
            x[j, :, :, list(v.zero)] = 0
        a_v = layer.self_attn.o_proj(x.view(n * b, -1, nh * hd))  # (n·b, T, d)
        hm = h.repeat(n, 1, 1) + a_v
        y = hm + eng.mlp(layer, hm)  # the input of layer i+1 in each variant
        out += [(v, part) for v, part in zip(chunk, y.chunk(n, dim=0))]
    return out


@torch.inference_mode()
def scan_streamed(eng: StreamEngine, groups: Sequence[tuple[torch.Tensor, torch.Tensor]], mem: MemoryPlan,
                  head_norm_layers: Sequence[int], neurons: bool, tau: float,
                  bar=None) -> StreamResult:
    """Score every variant of ``mem.passes`` on every token group; main-path statistics on every layer."""
    L, nh, nkv = eng.n_layer, eng.n_head, eng.n_head_kv
    r = ablate.ScanResult(bi=np.zeros(L), attn_bi=np.zeros(L), mlp_bi=np.zeros(L), kl=np.zeros(L), nll=np.zeros(L),
                          attn_kl=np.zeros(L), mlp_kl=np.zeros(L))
    out = StreamResult(scan=r, memory=mem, n_groups=len(groups))
    norm_layers = set(head_norm_layers)
    for i in norm_layers:
        r.head_norm[i] = np.zeros(nh)
    for v in (v for p in mem.passes for v in p if v.kind in ("head", "kv")):
        r.head_kl.setdefault(v.layer, np.zeros(nh))
        r.kv_kl.setdefault(v.layer, np.zeros(nkv))
    starts = sorted({p[0].layer for p in mem.passes[1:] if p})
    t_layers = t_head = 0.0
    for ids, mask in groups:
        ctx = eng.context(ids, mask)
        b, T = ids.shape
        per = max(1, mem.batch_tokens // (b * T))
        rr = mask.bool().to(eng.device)
        saved: dict[int, torch.Tensor] = {}
        ref = None
        for p, variants in enumerate(mem.passes):
            first = p == 0
            start = 0 if first else variants[0].layer
            last_birth = variants[-1].layer if variants else -1
            by_layer: dict[int, list[Variant]] = {}
            for v in variants:
                by_layer.setdefault(v.layer, []).append(v)
            h = eng.embed(ids) if start == 0 else saved[start].to(eng.device)
            if not first and all(q[0].layer != start for q in mem.passes[p + 1:] if q):
                del saved[start]  # no later pass starts here
            live: list = []
            t0 = time.perf_counter()
            for j in range(start, L):
                main = first or j <= last_birth
                want_o = main and (j in by_layer and any(v.kind in ("head", "kv") for v in by_layer[j])
                                   or (first and j in norm_layers))
                layer = eng.load_layer(j)
                out.layer_reads += 1
                _advance(eng, layer, live, ctx, per)
                if main:
                    if first and j in starts:
                        saved[j] = h.to("cpu")  # a later pass starts here
                    got: dict = {}
                    hooks = []
                    if want_o:
                        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
                            lambda m, a: got.__setitem__("o_in", a[0])))
                    if first and neurons:
                        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                            lambda m, a: got.__setitem__("ff", a[0])))
                    try:
                        h_mid = h + eng.attn(layer, h, ctx)
                        h_out = h_mid + eng.mlp(layer, h_mid)
                    finally:
                        for hk in hooks:
                            hk.remove()
                    if first:
                        r.bi[j] += ablate._one_minus_cos(h, h_out, rr)
                        r.attn_bi[j] += ablate._one_minus_cos(h, h_mid, rr)
                        r.mlp_bi[j] += ablate._one_minus_cos(h_mid, h_out, rr)
                        if "ff" in got:
                            a = got["ff"][rr].float().abs()  # (n_real, n_ff)
                            r.ff_count[j] = r.ff_count.get(j, 0) + (a > tau).sum(0, dtype=torch.float64).cpu().numpy()
                            r.ff_abs[j] = r.ff_abs.get(j, 0) + a.sum(0, dtype=torch.float64).cpu().numpy()
                            r.ff_sq[j] = r.ff_sq.get(j, 0) + a.double().pow(2).sum(0).cpu().numpy()
                            if j not in out.col_norm:  # down_proj: (n_embd, n_ff), column j is neuron j's output
                                out.col_norm[j] = layer.mlp.down_proj.weight.float().norm(dim=0).cpu().numpy()
                        if j in norm_layers and "o_in" in got:
                            ph = got["o_in"].float().view(b, T, nh, eng.head_dim).norm(dim=-1)  # (b, T, n_head)
                            r.head_norm[j] += ph[rr].sum(0, dtype=torch.float64).cpu().numpy()
                    if j in by_layer:
                        live += _births(eng, layer, by_layer[j], h, h_mid, got.get("o_in"), ctx, per)
                    h = h_out
                    del h_mid, got
                del layer
                if bar is not None:
                    bar.update(1)
                    post = getattr(bar, "set_postfix_str", None)
                    if post:
                        post(f"pass {p + 1}/{len(mem.passes)}, {len(live)} variants in flight, "
                             f"read {fmt_bytes(eng.ckpt.bytes_read)}", refresh=False)
            t1 = time.perf_counter()
            t_layers += t1 - t0
            head = eng.load_head(mem.logit_tokens)
            if first:
                ref = head.reference_from(h, ids, mask)
                r.n_real += ref.n_real
                r.n_tgt += ref.n_tgt
                out.full_nll += ref.nll
            del h
            for k in range(len(live)):  # one variant at a time: never every variant's logits at once
                v, state = live[k]
                live[k] = (v, None)
                kl, nll = head.divergence(state, ref, 1)
                if v.kind == "layer":
                    r.kl[v.layer] += kl[0]
                    r.nll[v.layer] += nll[0]
                elif v.kind == "attn":
                    r.attn_kl[v.layer] += kl[0]
                elif v.kind == "mlp":
                    r.mlp_kl[v.layer] += kl[0]
                elif v.kind == "head":
                    r.head_kl[v.layer][v.index] += kl[0]
                else:
                    r.kv_kl[v.layer][v.index] += kl[0]
                del state
            del head, live
            t_head += time.perf_counter() - t1
    if eng.n_head == eng.n_head_kv:  # MHA: a KV group is one head
        for i in r.kv_kl:
            r.kv_kl[i] = r.head_kl[i]
    out.bytes_read = eng.ckpt.bytes_read
    out.seconds = {"layers": t_layers, "head": t_head}
    return out


def taylor_streamed(eng: StreamEngine, micro: Sequence[tuple[torch.Tensor, torch.Tensor]], layers: Sequence[int],
                    bar=None) -> dict:
    """Σ |g ⊙ w| per query head (as :func:`score.head_taylor`) with two more passes over the weights:
    forward keeping each layer's input, then backward layer by layer in reverse order."""
    want = set(layers)
    if not want:
        return {}
    L, nh, nkv, hd = eng.n_layer, eng.n_head, eng.n_head_kv, eng.head_dim
    store = "cpu"
    n_tgt = sum(int((m[:, :-1] & m[:, 1:]).sum()) for _, m in micro)
    ctxs = [eng.context(ids, mask) for ids, mask in micro]
    with torch.no_grad():
        hs = [[eng.embed(ids).to(store)] for ids, _ in micro]  # per micro-batch: inputs of layers 0..L
        for j in range(L):
            layer = eng.load_layer(j)
            for k in range(len(micro)):
                hs[k].append(eng.forward(layer, hs[k][-1].to(eng.device), ctxs[k]).to(store))
            del layer
            if bar is not None:
                bar.update(1)
    head = eng.load_head(64)
    W = head.W.to(eng.dtype)  # the model's own lm_head dtype
    grads = []
    with torch.enable_grad():
        for k, (ids, mask) in enumerate(micro):
            x = hs[k][L].to(eng.device).requires_grad_(True)
            logits = F.linear(head.core.norm(x), W)  # (b, T, V)
            tm = (mask[:, :-1] & mask[:, 1:]).to(eng.device)
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            nll = -lp.gather(-1, ids[:, 1:].to(eng.device)[..., None])[..., 0]  # (b, T-1)
            (nll[tm].sum() / n_tgt).backward()
            grads.append(x.grad.detach())
            del logits, lp, nll, x
    del head, W
    out = {}
    for j in reversed(range(L)):
        layer = eng.load_layer(j, grad=j in want)
        if j not in want:
            for p in layer.parameters():
                p.requires_grad_(False)
        with torch.enable_grad():
            for k in range(len(micro)):
                x = hs[k][j].to(eng.device).requires_grad_(True)
                y = eng.forward(layer, x, ctxs[k])
                y.backward(grads[k])
                grads[k] = x.grad.detach()
                hs[k][j + 1] = None
        if j in want:
            out[j] = ablate.taylor_per_head(layer.self_attn, nh, nkv, hd).double().cpu().numpy()
        del layer
        if bar is not None:
            bar.update(1)
    return out


# ----------------------------------------------------------------------------- the score stage, streamed


@dataclass
class StreamChoice:
    """What score.py decided: stream, on which device, within which budget, which layers this run owns."""

    device: str
    budget: int
    owned: list[int]  # layers whose ablation units this run scores
    units: str | None  # the --units text (None: every unit)
    reason: str


def _neurons_entry(name: str, tau: float, tensors: dict) -> dict:
    return {"file": name, "tau": tau, "stats": list(scores_io.NEURON_STATS),
            "layers": sorted(int(k.split(".")[1]) for k in tensors if k.startswith("freq."))}


def _write_neurons(out: Path, res: StreamResult, n_real: int, tau: float) -> dict:
    """The neuron side file in the format of score._write_neurons (one statistic per source layer)."""
    r = res.scan
    tensors = scores_io.neuron_tensors([(s, s) for s in sorted(r.ff_count)], r.ff_count, r.ff_abs, r.ff_sq,
                                       res.col_norm, n_real)
    name = scores_io.neurons_file_name(out)
    save_tensors_atomic(out.parent / name, tensors, {"tau": str(tau), "n_tokens": str(n_real)})
    return _neurons_entry(name, tau, tensors)


def score_streamed(hf_dir: Path, out: Path, o, inp, choice: StreamChoice, progress: Callable) -> dict:
    """Everything score_model measures, layer-major from the shards: the parts of the scores document
    (layers, heads, neurons, full, stream, timing) for ``choice.owned`` layers' units."""
    t_start = time.perf_counter()
    ckpt = open_checkpoint(hf_dir)  # every tensor present with its shape: before any long work
    shape, cal = inp.shape, inp.calibration
    dtype = torch.bfloat16 if o.dtype in ("bf16", "bfloat16") else torch.float32
    elt = 2 if dtype == torch.bfloat16 else 4
    stored = {t.dtype for n, t in ckpt.tensors.items() if n.startswith("model.layers.")}
    variants = variants_of(choice.owned, shape.n_head, shape.n_head_kv, o.sublayers,
                           [i for i in inp.head_layers if i in set(choice.owned)])
    mem = plan_memory(ckpt, cal.n_seq, cal.seq_len, variants, choice.budget, elt,
                      store_is_compute=stored == {"F32" if elt == 4 else "BF16"}, batch_tokens=o.batch_tokens)
    groups = list(cal.batches(mem.group_seqs))
    n_pass = len(groups) * len(mem.passes)
    log.info("streaming %s (%d layers, %s on disk) on %s, %s, within %s: %d variants, %d pass(es) over the "
             "weights (%s)", hf_dir, shape.n_layer, fmt_bytes(ckpt.total_bytes()), choice.device, o.dtype,
             fmt_bytes(choice.budget), len(variants), n_pass, mem.why)
    eng = StreamEngine(ckpt, choice.device, dtype)
    walked = sum(shape.n_layer - (0 if k == 0 else p[0].layer) for k, p in enumerate(mem.passes)) * len(groups)
    taylor_layers = [i for i in inp.head_layers if i in set(choice.owned)] if o.heads else []
    with progress(walked + (2 * shape.n_layer if taylor_layers else 0), "score (streamed)", "layer") as bar:
        res = scan_streamed(eng, groups, mem, inp.head_layers if o.heads else [], o.neurons, o.tau, bar=bar)
        t = time.perf_counter()
        if taylor_layers:
            tokens = max(cal.seq_len, min(mem.batch_tokens // 16, 1024))
            res.taylor = taylor_streamed(eng, list(cal.batches(max(1, tokens // cal.seq_len))), taylor_layers,
                                         bar=bar)
        t_taylor = time.perf_counter() - t
    r = res.scan
    n_real, n_tgt = r.n_real, r.n_tgt
    owned = set(choice.owned)
    passes_why = mem.why + (f"; +2 passes (forward and backward) for the Taylor head scores of "
                            f"{len(taylor_layers)} layer(s)" if taylor_layers else "")

    def mean(x):
        return None if x is None or not np.isfinite(x) else float(x) / n_real

    layers = []
    for s in range(shape.n_layer):
        mine = s in owned
        layers.append({
            "index": s, "removed": False, "bi": mean(r.bi[s]),
            "kl": mean(r.kl[s]) if mine else None,
            "ppl": math.exp(r.nll[s] / n_tgt) if (o.ppl and mine) else None,
            "attn_kl": mean(r.attn_kl[s]) if (mine and o.sublayers) else None,
            "mlp_kl": mean(r.mlp_kl[s]) if (mine and o.sublayers) else None,
            "attn_bi": mean(r.attn_bi[s]), "mlp_bi": mean(r.mlp_bi[s]),
        })
    heads = None
    if o.heads:
        nan_h, nan_kv = np.full(shape.n_head, np.nan), np.full(shape.n_head_kv, np.nan)
        heads = {"layers": inp.head_layers,
                 "kl": {str(s): r.head_kl[s] / n_real if s in r.head_kl else nan_h for s in inp.head_layers},
                 "kv_kl": {str(s): r.kv_kl[s] / n_real if s in r.kv_kl else nan_kv for s in inp.head_layers},
                 "norm": {str(s): r.head_norm[s] / n_real for s in inp.head_layers},
                 "taylor": {str(s): res.taylor.get(s, nan_h) for s in inp.head_layers}}
    neurons = _write_neurons(out, res, n_real, o.tau) if o.neurons else None
    full_nll = res.full_nll / n_tgt
    total_passes = n_pass + (2 if taylor_layers else 0)
    log.info("streamed %d pass(es) over the weights, %d layer reads, %s read: %s", total_passes, res.layer_reads
             + (2 * shape.n_layer if taylor_layers else 0), fmt_bytes(ckpt.bytes_read), passes_why)
    seconds = {"layers": res.seconds["layers"], "head": res.seconds["head"], "stream": time.perf_counter() - t_start}
    if taylor_layers:
        seconds["taylor"] = t_taylor
    return {
        "layers": layers, "heads": heads, "neurons": neurons,
        "full": {"nll": full_nll, "ppl": math.exp(full_nll)},
        "stream": {"engine": "layer-major", "device": choice.device, "dtype": o.dtype, "reason": choice.reason,
                   **mem.to_dict(len(groups)), "passes": total_passes, "why": passes_why,
                   "bytes_read": ckpt.bytes_read, "checkpoint_bytes": ckpt.total_bytes(),
                   "layer_reads": res.layer_reads + (2 * shape.n_layer if taylor_layers else 0),
                   "units": choice.units, "owned_layers": sorted(owned)},
        "seconds": seconds,
        "layer_evals": int(round(eng.seq_layer_evals / cal.n_seq)),
        "batch_tokens": mem.batch_tokens, "group_seqs": mem.group_seqs,
    }


# ----------------------------------------------------------------------------- merging slices

# settings that change the numbers: slices must agree on them to be joined
_SAME_SETTINGS = ("calibration", "calibration_kind", "seq_len", "samples", "seed", "sublayers", "ppl", "heads",
                  "head_layers", "neurons", "tau", "plan", "dtype")


def merge_slices(paths: Sequence[Path], out: Path) -> dict:
    """Join scores slices written with ``--units`` into one scores document (and its neuron side file).

    Refuses slices of different models, calibration data or settings, slices that overlap, and a set of
    slices that leaves layers unscored: every problem named in one error.
    """
    from safetensors.torch import load_file

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise StreamError("--merge needs at least two scores slices (written by `gguf-prune score --units …`)")
    docs = [scores_io.load(p, allow_slice=True) for p in paths]
    first, p0 = docs[0], paths[0]
    problems = []
    for p, d in zip(paths[1:], docs[1:]):
        if d["model"]["fingerprint"] != first["model"]["fingerprint"] or d["model"]["shape"] != first["model"]["shape"]:
            problems.append(f"{p} is a slice of another model (fingerprint {d['model']['fingerprint']}, "
                            f"{p0} has {first['model']['fingerprint']})")
        if d["calibration"] != first["calibration"]:
            diff = [k for k in sorted(set(d["calibration"]) | set(first["calibration"]))
                    if d["calibration"].get(k) != first["calibration"].get(k)]
            problems.append(f"{p} was scored on other calibration data than {p0} (differs in {', '.join(diff)})")
        diff = [k for k in _SAME_SETTINGS if d["settings"].get(k) != first["settings"].get(k)]
        if diff:
            problems.append(f"{p} was scored with other settings than {p0}: "
                            + ", ".join(f"{k} {d['settings'].get(k)!r} vs {first['settings'].get(k)!r}" for k in diff))
    owner: dict[int, int] = {}
    for k, (p, d) in enumerate(zip(paths, docs)):
        u = d.get("units")
        if not u:
            problems.append(f"{p} is a whole run, not a --units slice; merge only slices")
            continue
        for i in u["layers"]:
            if i in owner:
                problems.append(f"layer {i} is scored in both {paths[owner[i]]} and {p}: the slices overlap")
            else:
                owner[i] = k
    n_layer = int(first["model"]["shape"]["n_layer"])
    missing = [i for i in range(n_layer) if i not in owner]
    if missing and not problems:
        problems.append(f"no slice scores layer(s) {_ranges(missing)}: score them with --units and merge again")
    if problems:
        raise StreamError(f"cannot merge {len(paths)} scores slices ({len(problems)} problem"
                          f"{'s' if len(problems) != 1 else ''}):\n  - " + "\n  - ".join(problems))
    merged = {k: v for k, v in first.items() if k != "units"}
    merged["schema"] = scores_io.SCORES_SCHEMA
    merged["layers"] = [docs[owner[i]]["layers"][i] for i in range(n_layer)]
    if first["heads"] is not None:
        h = {"layers": first["heads"]["layers"]}
        for key in ("kl", "kv_kl", "norm", "taylor"):
            h[key] = {str(i): docs[owner[i]]["heads"][key][str(i)] for i in first["heads"]["layers"]}
        merged["heads"] = h
    if first["neurons"] is not None:
        tensors = {}
        for i in range(n_layer):
            src = paths[owner[i]].parent / docs[owner[i]]["neurons"]["file"]
            if not src.exists():
                raise StreamError(f"{src} is missing: it is written next to {paths[owner[i]].name}; "
                                  "copy both files together")
            t = load_file(str(src))
            tensors.update({k: v for k, v in t.items() if k.rsplit(".", 1)[1] == str(i)})
        name = scores_io.neurons_file_name(out)
        tau = first["neurons"]["tau"]
        save_tensors_atomic(out.parent / name, dict(sorted(tensors.items())),
                      {"tau": str(tau), "n_tokens": str(first["calibration"]["n_tokens"])})
        merged["neurons"] = _neurons_entry(name, tau, tensors)
    secs: dict[str, float] = {}
    for d in docs:
        for k, v in d["timing"]["seconds"].items():
            secs[k] = secs.get(k, 0.0) + float(v or 0)
    merged["timing"] = {"seconds": secs, "layer_evals": sum(int(d["timing"]["layer_evals"]) for d in docs)}
    merged["settings"] = dict(first["settings"], units=None)
    streams = [d.get("stream") or {} for d in docs]
    merged["stream"] = {"engine": "layer-major", "merged_from": [str(p) for p in paths],
                        "units": [d["units"]["spec"] for d in docs],
                        "passes": sum(int(s.get("passes", 0)) for s in streams),
                        "bytes_read": sum(int(s.get("bytes_read", 0)) for s in streams),
                        "why": f"{len(paths)} slices, each its own passes over the weights: "
                               + "; ".join(f"{d['units']['spec']}: {s.get('passes')}" for d, s in zip(docs, streams))}
    scores_io.save(out, merged)
    log.info("merged %d slices into %s", len(paths), out)
    return merged


def _ranges(xs: Sequence[int]) -> str:
    out, xs = [], sorted(xs)
    k = 0
    while k < len(xs):
        e = k
        while e + 1 < len(xs) and xs[e + 1] == xs[e] + 1:
            e += 1
        out.append(str(xs[k]) if e == k else f"{xs[k]}-{xs[e]}")
        k = e + 1
    return ",".join(out)
