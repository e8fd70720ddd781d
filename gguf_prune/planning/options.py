"""What `gguf-prune plan` may be asked: the options (:class:`PlanOptions`), their ranges, and the counts a
given model can honour.

Both are checked before any planning: :func:`option_problems` when the options are made (an API user gets the
CLI's refusal), :func:`fit_problems` once the model's shape and the scores' base plan are known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf_prune.costs import speed_option_problems
from gguf_prune.plan import ModelShape, PlanError
from gguf_prune.ranges import ranges
from gguf_prune.values import is_int, is_real
from gguf_prune.writing.options import DEFAULT_QUANT

UNITS = ("layer", "attn", "mlp", "width")
DEFAULT_UNITS = ("layer", "attn", "mlp")
UNIFORM_UNITS = ("layer", "width")
METRICS = ("kl", "bi", "greedy")
HEAD_METRICS = ("kl", "norm", "taylor")
NEURON_METRICS = ("freq", "mean_abs", "wxa")
# Kept FFN widths are rounded to a multiple of ``align``: every quantized type's block is 32 (q4_0, q8_0, ...) or
# 256 (k-quants) values along a row of ffn_down; 1 (no rounding) suits F16/BF16/F32 files only.
ALIGN_BLOCK = 32


@dataclass(frozen=True)
class PlanOptions:
    drop_layers: int = 0
    metric: str = "kl"  # kl | bi | greedy
    drop_attn: int = 0
    drop_mlp: int = 0
    prune_heads: float = 0.0  # fraction of query heads
    head_metric: str = "kl"  # kl | norm | taylor
    min_heads: int = 1
    prune_neurons: bool = False
    neuron_metric: str = "freq"  # freq | mean_abs | wxa
    neuron_threshold: float | None = None
    neuron_fraction: float | None = None
    align: int = 256
    protect_first: int = 2
    protect_last: int = 2
    target_params: float | None = None  # fraction of transformer-block parameters to remove
    target_size: int | None = None  # bytes of the quantized file
    units: tuple[str, ...] = ()  # unit kinds the budget may take (UNITS); () = DEFAULT_UNITS / UNIFORM_UNITS
    quant: str = DEFAULT_QUANT  # for target_size and the predicted size
    uniform: bool = False  # one shape for every kept layer (forced for families that load nothing else)
    repair: bool = True  # rank width cuts by their KL after repair, where the scores have it (score --repair)
    # speed: cut until the cost file (`gguf-prune cost`) predicts this tokens/s over the base's, cheapest KL per
    # second saved first; with --target-params / --target-size too, the first target reached stops the cut
    target_speedup: float | None = None
    cost: str | None = None  # cost.json; with it (and no target) the plan still records its predicted speed-up
    speed_metric: str = "tg"  # tg (generation) | pp (prompt processing)
    speed_depth: int = 0  # context depth (tokens in the KV cache) the speed is for
    threads: int | None = None  # the thread count the speed is for: a cost file timed with another is refused
    patched: bool = False  # removed layers and attentions will carry linear patches (recover --repair / --patch)

    def __post_init__(self) -> None:
        # an API user gets the same refusal as the CLI: a negative count used as a slice bound removes all but
        # one layer (ranked[:-1]), a negative fraction keeps 1-4 of 8 heads; neither may reach the planner
        problems = option_problems(self)
        if problems:
            raise PlanOptionsError(problems)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["units"] = list(self.units)
        return d


class PlanOptionsError(PlanError):
    """Plan options out of range, or beyond what the model has: one line naming each option, its value and
    the allowed range."""

    def __init__(self, problems: list[str], what: str = "invalid plan options"):
        self.problems = list(problems)
        Exception.__init__(self, f"{what}: " + "; ".join(problems))


def is_align(v: Any) -> bool:
    """1 (no rounding) or a positive multiple of 32 (the smallest quantization block)."""
    return is_int(v, numpy=True) and (v == 1 or (v >= ALIGN_BLOCK and v % ALIGN_BLOCK == 0))


def aligned_width(n_keep: int, align: int, n_ff: int) -> int:
    """``n_keep`` FFN neurons rounded to the nearest multiple of ``align`` (at least one block, at most n_ff)."""
    if align <= 1:
        return n_keep
    a = int(round(n_keep / align)) * align
    return min(max(a, align), n_ff)


def option_problems(o: PlanOptions) -> list[str]:
    """Every option of ``o`` outside its range, one message each (empty: all in range). The model's own limits
    (at most the layers that are not protected, at most its heads) are checked by :func:`build_plan`."""
    from gguf_prune.writing.quantize import QUANT_TYPES

    p = []
    for flag, v, what in (("--drop-layers", o.drop_layers, "whole layers to remove"),
                          ("--drop-attn", o.drop_attn, "attention sub-blocks to remove"),
                          ("--drop-mlp", o.drop_mlp, "MLP sub-blocks to remove"),
                          ("--protect-first", o.protect_first, "layers kept at the start"),
                          ("--protect-last", o.protect_last, "layers kept at the end")):
        if not is_int(v, numpy=True) or v < 0:
            p.append(f"{flag} {v!r}: must be a whole number, 0 or more ({what})")
    if not is_int(o.min_heads, numpy=True) or o.min_heads < 1:
        p.append(f"--min-heads {o.min_heads!r}: must be a whole number, 1 or more (query heads every kept layer "
                 "keeps; --drop-attn removes attention)")
    for flag, v, choices in (("--metric", o.metric, METRICS), ("--head-metric", o.head_metric, HEAD_METRICS),
                             ("--neuron-metric", o.neuron_metric, NEURON_METRICS)):
        if v not in choices:
            p.append(f"{flag} {v!r}: must be one of {', '.join(choices)}")
    if not is_real(o.prune_heads, numpy=True) or not 0 <= o.prune_heads < 1:
        p.append(f"--prune-heads {o.prune_heads!r}: must be a fraction of the query heads in [0, 1)")
    if o.neuron_threshold is not None and (not is_real(o.neuron_threshold, numpy=True) or o.neuron_threshold < 0):
        p.append(f"--neuron-threshold {o.neuron_threshold!r}: must be a number, 0 or more (the neuron statistics "
                 "are never negative)")
    if o.neuron_fraction is not None and (not is_real(o.neuron_fraction, numpy=True) or not 0 <= o.neuron_fraction < 1):
        p.append(f"--neuron-fraction {o.neuron_fraction!r}: must be a fraction of each layer's neurons in [0, 1)")
    given = [f for f, v in (("--neuron-threshold", o.neuron_threshold), ("--neuron-fraction", o.neuron_fraction))
             if v is not None]
    if o.prune_neurons and len(given) != 1:
        p.append("--prune-neurons needs exactly one of --neuron-threshold or --neuron-fraction")
    elif given and not o.prune_neurons:
        p.append(f"{given[0]} needs --prune-neurons (without it no neuron is removed)")
    if not is_align(o.align):
        p.append(f"--align {o.align!r}: must be a positive multiple of {ALIGN_BLOCK} (256 for k-quants), or 1 for no "
                 "rounding (F16/BF16/F32 files only)")
    if o.target_params is not None and (not is_real(o.target_params, numpy=True) or not 0 < o.target_params < 1):
        p.append(f"--target-params {o.target_params!r}: must be a fraction of the block parameters in (0, 1)")
    if o.target_size is not None and (not is_int(o.target_size, numpy=True) or o.target_size < 1):
        p.append(f"--target-size {o.target_size!r}: must be a whole number of bytes, 1 or more")
    bad = [u for u in o.units if u not in UNITS]
    if bad:
        p.append(f"--units {','.join(map(str, o.units))!r}: unknown unit {bad[0]!r}; use a comma list of "
                 f"{', '.join(UNITS)}")
    p += _speed_problems(o)
    if str(o.quant).strip().upper() not in QUANT_TYPES + ("NONE",):
        p.append(f"--quant {o.quant!r}: must be a llama-quantize type ({', '.join(QUANT_TYPES)}) or none")
    return p


def _speed_problems(o: PlanOptions) -> list[str]:
    p = speed_option_problems(o.target_speedup, o.speed_metric, o.speed_depth)
    if o.target_speedup is not None and not o.cost:
        p.append("--target-speedup needs --cost cost.json, the costs measured on this machine: "
                 "`gguf-prune cost BASE.gguf -o cost.json`")
    if o.threads is not None and (not is_int(o.threads, numpy=True) or o.threads < 1):
        p.append(f"--threads {o.threads!r}: must be a whole number, 1 or more")
    return p


def fit_problems(shape: ModelShape, o: PlanOptions, alive: set[int], has_attn: set[int], has_mlp: set[int],
                 protected: set[int]) -> list[str]:
    """Counts beyond what the model has: more layers or sub-blocks than are unprotected (and not already cut by
    the scores' base plan), a --min-heads above the heads a layer has."""
    p = []
    free = sorted(i for i in alive if i not in protected)
    where = (f"the layers not protected (--protect-first {o.protect_first}, --protect-last {o.protect_last} of "
             f"{shape.n_layer}){' and not removed by the base plan' if len(alive) < shape.n_layer else ''}")
    if o.drop_layers > len(free):
        p.append(f"--drop-layers {o.drop_layers}: at most {len(free)}, "
                 f"{where}{': ' + ranges(free) if free else ''}")
    for flag, count, present in (("--drop-attn", o.drop_attn, has_attn), ("--drop-mlp", o.drop_mlp, has_mlp)):
        n = len([i for i in free if i in present])
        if count > n:
            p.append(f"{flag} {count}: at most {n}, the sub-blocks left in {where}")
    if o.min_heads > shape.n_head:
        p.append(f"--min-heads {o.min_heads}: at most {shape.n_head}, the query heads of a layer")
    return p
