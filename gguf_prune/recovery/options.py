"""The recover stage's options: recovery (patches, held-out split) and fine-tuning, with their defaults and
the checks that need no model (the CLI builds its flags from them; nothing here imports torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf_prune.calibration import KINDS as CALIBRATION_KINDS
from gguf_prune.errors import GgufPruneError
from gguf_prune.recovered import RecoverError
from gguf_prune.values import is_real

METHODS = ("lora", "full")
LOSSES = ("distill", "nexttoken")
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32


class FinetuneError(GgufPruneError, ValueError):
    """A fine-tuning request that cannot run: what, where, what to do."""


@dataclass(frozen=True)
class FinetuneOptions:
    method: str = "lora"
    loss: str = "distill"
    steps: int = 200
    max_minutes: float | None = None  # a time budget for the training loop: the schedule shrinks to the steps that fit
    batch_size: int = 4
    lr: float | None = None  # default: DEFAULT_LR[method]
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1  # the cosine ends at lr × this
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    train_patches: bool = True  # patch matrices are trained too (fully: n_embd² each)
    eval_every: int = 25
    patience: int = 4
    checkpoint_every: int = 25
    log_every: int = 10
    seed: int = 0
    teacher_samples: int = 0  # sequences sampled from the teacher (recovery/sampled.py) added to the training set
    precision: str = "auto"  # the student's matmuls under autocast; losses and the optimizer stay float32

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


def check_options(o: FinetuneOptions) -> None:
    p = []
    if o.method not in METHODS:
        p.append(f"method {o.method!r} is not one of {', '.join(METHODS)}")
    if o.precision not in PRECISIONS:
        p.append(f"precision {o.precision!r} is not one of {', '.join(PRECISIONS)}")
    if o.loss not in LOSSES:
        p.append(f"loss {o.loss!r} is not one of {', '.join(LOSSES)}")
    for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "lora_rank", "patience", "log_every"):
        if getattr(o, name) < 1:
            p.append(f"{name} is {getattr(o, name)}; it must be at least 1")
    if isinstance(o.teacher_samples, bool) or not isinstance(o.teacher_samples, int) or o.teacher_samples < 0:
        p.append(f"teacher samples {o.teacher_samples!r}: must be a whole number of sequences, 0 or more")
    if o.learning_rate <= 0:
        p.append(f"learning rate {o.learning_rate} must be positive")
    if o.max_minutes is not None and not (is_real(o.max_minutes) and o.max_minutes > 0):
        p.append(f"time budget {o.max_minutes} minutes must be a positive number")
    if not 0 <= o.warmup < 1:
        p.append(f"warmup {o.warmup} must be a fraction of the steps in [0, 1)")
    if p:
        raise FinetuneError("fine-tuning options are invalid:\n  - " + "\n  - ".join(p))


PATCH_FITS = ("pruned", "full")


@dataclass(frozen=True)
class RecoverOptions:
    calibration: Path | None = None
    calibration_kind: str = "auto"
    seq_len: int = 128
    samples: int = 64
    seed: int = 0
    heldout: float = 0.1  # fraction of sequences held out (ridge choice, early stopping, the figures)
    patch: bool = False
    repair: bool = False  # refit the output projections of narrowed attentions and MLPs (recovery/repair.py)
    repair_bias: bool = True  # ... with a bias on each (llama and deci load one)
    patch_fit: str = "pruned"
    patch_weighting: str = "rms"
    finetune: str | None = None  # None | "lora" | "full"
    finetune_options: FinetuneOptions | None = None  # defaults when None
    device: str = "auto"

    def __post_init__(self) -> None:
        # ranges refused when the options are made, for an API user as for the CLI; recover() checks the rest
        p = []
        for flag, v, lo in (("--seq-len", self.seq_len, 2), ("--samples", self.samples, 1), ("--seed", self.seed, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                p.append(f"{flag} {v!r}: must be a whole number, {lo} or more")
        if isinstance(self.heldout, bool) or not isinstance(self.heldout, (int, float)) or not 0 <= self.heldout < 1:
            p.append(f"--heldout {self.heldout!r}: must be a fraction of the sequences in [0, 1)")
        if self.calibration_kind not in CALIBRATION_KINDS:
            p.append(f"--calibration-kind {self.calibration_kind!r}: use auto, text or chat")
        if self.patch_fit not in PATCH_FITS:
            p.append(f"--patch-fit {self.patch_fit!r} is not one of {', '.join(PATCH_FITS)}")
        if self.finetune not in (None, "lora", "full"):
            p.append(f"--finetune {self.finetune!r} is not one of lora, full")
        elif self.finetune is None and self.finetune_options and self.finetune_options.teacher_samples:
            p.append("--teacher-samples feeds fine-tuning: add --finetune lora (or full)")
        if p:
            raise RecoverError("invalid recover options: " + "; ".join(p))
