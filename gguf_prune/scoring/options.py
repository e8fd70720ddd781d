"""The score stage's options: one dataclass, its defaults and the checks that need no model (the CLI builds
its flags from it; nothing here imports torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gguf_prune.calibration import DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_SEQ_LEN, KINDS as CALIBRATION_KINDS
from gguf_prune.errors import GgufPruneError

GREEDY_UNITS = ("layer", "attn", "mlp")
GREEDY_BY = ("kl", "kl-per-param")
DTYPES = ("float32", "bf16")  # the weights' type while scoring ("bfloat16" is taken for bf16 too)
# |act(gate)·up| above which a neuron counts as active on a token. Absolute, so it depends on the model's
# activation scale: on SmolLM2-135M, 0.05 spreads per-neuron frequencies over about 0.2–0.8 in middle layers,
# while at 0.01 nearly every neuron fires on 60–95 % of tokens (dense SiLU MLPs have few dead neurons).
# mean_abs and wxa do not depend on it.
DEFAULT_TAU = 0.05


class ScoreError(GgufPruneError, ValueError):
    """Options that cannot be scored: what is wrong and what to do."""


@dataclass(frozen=True)
class ScoreOptions:
    calibration: Path | None = None  # None: the shipped default text
    calibration_kind: str = "auto"  # auto (.jsonl = chat) | text | chat
    seq_len: int = DEFAULT_SEQ_LEN
    samples: int = DEFAULT_SAMPLES
    seed: int = DEFAULT_SEED
    sublayers: bool = True  # attention / MLP sub-block KL and BI
    ppl: bool = False  # perplexity with each layer removed
    heads: bool = False  # head and KV-group KL, head norms, Taylor
    head_layers: str | None = None  # "3,5-8" (source indices); None = every layer with attention
    neurons: bool = True  # activation frequency, mean |a|, weight × activation
    tau: float = DEFAULT_TAU  # |a| > tau counts a neuron as active
    width: tuple[float, ...] = ()  # width KL: each layer's MLP with these fractions of its neurons removed
    width_align: int = 256  # removed-neuron counts are multiples of this (k-quant rows of ffn_down)
    repair: bool = False  # score each width again with its closed-form repair (needs width)
    plan: Path | None = None  # score on top of this plan's cuts
    greedy: int = 0  # greedy removal steps
    greedy_units: tuple[str, ...] = ("layer",)
    greedy_by: str = "kl"
    greedy_pool: int | None = None  # lazy greedy: re-measure only this many cheapest candidates per step
    protect_first: int = 2
    protect_last: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bf16
    device_map: str | None = None  # accelerate device_map for from_pretrained (e.g. "auto")
    batch_tokens: int | None = None  # max tokens in one forward; None: from a memory budget
    plots: bool = True
    progress: bool = True
    stream: bool = False  # layer-major from the shards (scoring.stream); also chosen when the model would not fit
    max_memory: str | None = None  # memory budget, e.g. "24GB" (default: what the device has free)
    units: str | None = None  # a slice of the ablation units: "K/N" (0-based) or layers "3,5-8"; implies stream

    def __post_init__(self) -> None:
        # the same refusals for an API user as for the CLI, when the options are made (prepare checks again)
        check_options(self)
        p = []
        if self.calibration_kind not in CALIBRATION_KINDS:
            p.append(f"--calibration-kind {self.calibration_kind!r}: use auto, text or chat")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            p.append(f"--seed {self.seed!r}: must be a whole number, 0 or more")
        if self.greedy_pool is not None and (isinstance(self.greedy_pool, bool) or not isinstance(self.greedy_pool, int)
                                             or self.greedy_pool < 1):
            p.append(f"--greedy-pool {self.greedy_pool!r}: must be a whole number, 1 or more")
        if not math.isfinite(self.tau):
            p.append(f"--tau {self.tau}: must be a finite number, 0 or more")
        if self.width_align != 1 and (self.width_align < 32 or self.width_align % 32):
            p.append(f"--width-align {self.width_align}: must be a positive multiple of 32 (256 for k-quants), or 1 "
                     "for no rounding (F16/BF16/F32 files only)")
        if p:
            raise ScoreError("invalid options: " + "; ".join(p))


def check_options(o: ScoreOptions) -> None:
    p = []
    if o.seq_len < 2:
        p.append(f"--seq-len {o.seq_len}: must be at least 2")
    if o.samples < 1:
        p.append(f"--samples {o.samples}: must be at least 1")
    if o.dtype not in ("float32", "bf16", "bfloat16"):
        p.append(f"--dtype {o.dtype!r}: use float32 or bf16")
    if o.greedy < 0:
        p.append(f"--greedy {o.greedy}: must be 0 or more")
    bad = [u for u in o.greedy_units if u not in GREEDY_UNITS]
    if bad or not o.greedy_units:
        p.append(f"--greedy-units {','.join(o.greedy_units)!r}: use a comma list of {', '.join(GREEDY_UNITS)}")
    if o.greedy_by not in GREEDY_BY:
        p.append(f"--greedy-by {o.greedy_by!r}: use one of {', '.join(GREEDY_BY)}")
    if o.protect_first < 0 or o.protect_last < 0:
        p.append("--protect-first / --protect-last must be 0 or more")
    if not o.tau >= 0:
        p.append(f"--tau {o.tau}: must be 0 or more")
    if o.batch_tokens is not None and o.batch_tokens < 1:
        p.append(f"--batch-tokens {o.batch_tokens}: must be positive")
    if any(not 0 < f < 1 for f in o.width):
        p.append(f"--width {','.join(map(str, o.width))}: fractions of each MLP's neurons, each between 0 and 1")
    if o.width_align < 1:
        p.append(f"--width-align {o.width_align}: must be 1 or more")
    if o.repair and not o.width:
        p.append("--repair scores width cuts with their repair: give --width as well (e.g. --width 0.17,0.33,0.5)")
    if o.width and o.stream:
        p.append("--width is not available with --stream: width variants run on the in-memory engine")
    if p:
        raise ScoreError("invalid options: " + "; ".join(p))
