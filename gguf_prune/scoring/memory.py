"""The memory budget: what a device has free, the in-memory engine's activation budget, and the streamed
engine's plan of token groups and passes that keeps one layer, the live variant states and the output head
within ``--max-memory``.

    plan_memory(ckpt, n_seq, seq_len, variants, budget, elt, store_is_compute) -> MemoryPlan
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from gguf_prune.errors import GgufPruneError
from gguf_prune.models.checkpoint import DTYPE_BYTES

if TYPE_CHECKING:  # annotations only: stream.py imports this module
    from gguf_prune.scoring.stream import Variant
    from gguf_prune.scoring.stream_engine import Checkpoint


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


def activation_budget(device: str) -> int:
    """Bytes of activations one forward of the in-memory engine may take: 30 % of a GPU's free memory, 2 GiB on
    a CPU."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.3)
    return 2 << 30  # CPU: 2 GiB of activations per forward


# ----------------------------------------------------------------------------- the streamed engine's plan


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


@dataclass(frozen=True)
class _Footprint:
    """What the model and the budget fix, whatever the size of a token group."""

    d: int  # hidden size
    ff: int  # MLP width
    n_vocab: int
    seq_len: int
    elt: int  # bytes per element in the compute dtype
    per_token: int  # one token's MLP, residual and attention-score activations
    layer_bytes: int
    head_bytes: int
    most_births: int  # the most variants born at one layer
    budget: int
    batch_tokens: int | None  # --batch-tokens (None: chosen here)

    def group(self, g: int) -> "_GroupCost":
        """The memory a token group of ``g`` sequences needs besides the variants' states."""
        tok = g * self.seq_len
        state = tok * self.d * self.elt  # one variant's (g, T, d) state
        # stacks of up to ~2048 tokens keep the matmuls efficient; a tenth of the budget bounds them
        bt = self.batch_tokens or max(tok, min(max(self.most_births * tok, 2048),
                                               int(0.1 * self.budget) // self.per_token))
        act = max(bt, tok) * self.per_token
        lt = max(16, min((256 << 20) // (4 * self.n_vocab), int(0.05 * self.budget) // (12 * self.n_vocab)))
        ref = tok * self.d * 20 + tok * 16
        main = 4 * state + tok * self.ff * self.elt  # h, h_mid, h_out, o_in and the captured MLP activations
        fixed = max(self.layer_bytes + act + main, self.head_bytes + 3 * lt * self.n_vocab * 4) + ref
        return _GroupCost(group_seqs=g, fixed=fixed, state=state, batch_tokens=bt, act=act, logit_tokens=lt, ref=ref)


@dataclass(frozen=True)
class _GroupCost:
    group_seqs: int
    fixed: int  # everything but the variants' states and the main path's saved states
    state: int  # one variant's state
    batch_tokens: int
    act: int  # one stacked forward's activations
    logit_tokens: int
    ref: int  # the reference predictions


def _footprint(ckpt: Checkpoint, seq_len: int, variants: Sequence[Variant], budget: int, elt: int,
               store_is_compute: bool, batch_tokens: int | None) -> _Footprint:
    c = ckpt.config
    d, ff, nh = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_attention_heads"])
    V = int(c["vocab_size"])
    L = int(c["num_hidden_layers"])
    # converting from the stored dtype holds the largest stored tensor next to the converted layer
    wl = max(ckpt.layer_bytes(i, elt) for i in range(L)) + (0 if store_is_compute else ckpt.max_tensor_bytes())
    head = V * d * 4 + d * 4 + (0 if store_is_compute else V * d * DTYPE_BYTES.get(
        ckpt.tensors[ckpt.head_name()].dtype, 4))
    births: dict[int, int] = {}
    for v in variants:
        births[v.layer] = births.get(v.layer, 0) + 1
    return _Footprint(d=d, ff=ff, n_vocab=V, seq_len=seq_len, elt=elt,
                      per_token=elt * (3 * ff + 8 * d + nh * seq_len) + 64,  # MLP, residual, attention scores
                      layer_bytes=wl, head_bytes=head, most_births=max(births.values(), default=1), budget=budget,
                      batch_tokens=batch_tokens)


def _choose_group(fp: _Footprint, n_seq: int) -> _GroupCost:
    """The largest token group (n_seq halved k times) where every layer's variants can be born in one pass, else
    the largest where two states fit; StreamError when not even one sequence fits."""
    sizes = sorted({max(1, n_seq >> k) for k in range(0, 20)}, reverse=True)
    for states in (fp.most_births, 2):
        for g in sizes:
            cost = fp.group(g)
            if cost.fixed + cost.state * states <= fp.budget:
                return cost
    cost = fp.group(1)
    need = cost.fixed + 2 * cost.state
    raise StreamError(
        f"--max-memory {fmt_bytes(fp.budget)} is too small to stream this model: one decoder layer needs "
        f"{fmt_bytes(need)} (its weights {fmt_bytes(fp.layer_bytes)}, the activations of one {fp.seq_len}-token "
        f"sequence, and the output matrix {fmt_bytes(fp.head_bytes)} at the end); give at least {fmt_bytes(need)}"
        + (" or use --dtype bf16" if fp.elt == 4 else ""))


def _cut_passes(variants: Sequence[Variant], budget: int, cost: _GroupCost) -> list[list[Variant]]:
    """The variants in birth order, cut into passes whose states fit; passes after the first need the main
    path's state saved where they start, which takes room from every pass."""
    n_pass = 1
    for _ in range(20):
        room = budget - cost.fixed - cost.state * (n_pass - 1)
        per_pass = max(1, room // cost.state)
        passes = [list(variants[k:k + per_pass]) for k in range(0, len(variants), per_pass)] or [[]]
        if len(passes) <= n_pass:
            break
        n_pass = len(passes)
    return passes


def plan_memory(ckpt: Checkpoint, n_seq: int, seq_len: int, variants: Sequence[Variant], budget: int,
                elt: int, store_is_compute: bool, batch_tokens: int | None = None) -> MemoryPlan:
    """Choose token groups and passes so that one layer, the live states and the output head fit ``budget``."""
    fp = _footprint(ckpt, seq_len, variants, budget, elt, store_is_compute, batch_tokens)
    cost = _choose_group(fp, n_seq)
    passes = _cut_passes(variants, budget, cost)
    n_groups = -(-n_seq // cost.group_seqs)
    s, wl, head = cost.state, fp.layer_bytes, fp.head_bytes
    if len(passes) == 1 and n_groups == 1:
        why = (f"one pass: all {len(variants)} variant states ({fmt_bytes(s * len(variants))}) fit "
               f"{fmt_bytes(budget)} next to one layer ({fmt_bytes(wl)}) and the output head ({fmt_bytes(head)})")
    else:
        why = (f"{len(variants)} variant states of {fmt_bytes(s)} each ({cost.group_seqs} sequences per token group) "
               f"need {fmt_bytes(s * len(variants))}; {fmt_bytes(budget - cost.fixed)} of the {fmt_bytes(budget)} "
               f"budget is left for them after one layer ({fmt_bytes(wl)}), activations ({fmt_bytes(cost.act)}) and "
               f"the output head ({fmt_bytes(head)}): {len(passes)} pass(es) over the weights per token group, "
               f"{n_groups} token group(s)")
    return MemoryPlan(budget=budget, group_seqs=cost.group_seqs, batch_tokens=cost.batch_tokens,
                      logit_tokens=cost.logit_tokens, layer_bytes=wl, head_bytes=head, act_bytes=cost.act,
                      ref_bytes=cost.ref, state_bytes=s, fixed_bytes=cost.fixed, passes=passes, why=why)
