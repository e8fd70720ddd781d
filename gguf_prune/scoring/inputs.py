"""The score stage's inputs: every check that needs no model weights (the options are in options.py).

    prepare(hf_dir, ScoreOptions(...)) -> ScoreInputs

Everything that can be wrong with the inputs (model directory, calibration file, --head-layers, a base plan
for another model, options) is checked here, before the model is loaded; :class:`ScoreInputs` is what the
in-memory scorer (:mod:`gguf_prune.scoring.measure`) and the streamed one (:mod:`gguf_prune.scoring.stream`)
start from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf_prune.calibration import Calibration, check_calibration_file, load_calibration
from gguf_prune.models import cuts
from gguf_prune.models.checkpoint import check_model_dir, fingerprint
from gguf_prune.models.cuts import load_tokenizer
from gguf_prune.plan import ModelShape, Plan, validate
from gguf_prune.scoring.options import ScoreError, ScoreOptions, check_options



# ----------------------------------------------------------------------------- checks


def parse_layers(spec: str, n_layer: int, what: str = "--head-layers") -> list[int]:
    """'3,5-8' → [3, 5, 6, 7, 8], each checked against 0..n_layer-1."""
    out: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                rng = range(lo, hi + 1)
            else:
                rng = range(int(part), int(part) + 1)
        except ValueError:
            raise ScoreError(f"{what} {spec!r}: cannot read {part!r}; use indices and ranges like 3,5-8") from None
        bad = [i for i in rng if not 0 <= i < n_layer]
        if bad:
            raise ScoreError(f"{what} {spec!r}: layer {bad[0]} is out of range 0..{n_layer - 1} "
                             f"(the model has {n_layer} layers)")
        out.update(rng)
    if not out:
        raise ScoreError(f"{what} {spec!r} names no layers; use indices and ranges like 3,5-8")
    return sorted(out)


def _resolve_device(device: str) -> str:
    return cuts.resolve_device(device, ScoreError)


def width_drops(fractions, n_ff: int, align: int) -> tuple[int, ...]:
    """Removed-neuron counts for width fractions: multiples of ``align``, at least one, fewer than n_ff."""
    out = set()
    for f in fractions:
        d = int(round(f * n_ff / align)) * align
        d = min(max(d, align), n_ff - 1)
        if 0 < d < n_ff:
            out.add(d)
    return tuple(sorted(out))


@dataclass
class ScoreInputs:
    """What the score stage checked and loaded before any weights: the hand-off to the in-memory and the
    streamed scorers."""

    shape: ModelShape
    fingerprint: str
    plan: Plan | None
    head_layers: list[int]  # source indices
    calibration: Calibration
    device: str  # cpu | cuda:N, or "map" with --device-map


def prepare(hf_dir: Path, options: ScoreOptions) -> ScoreInputs:
    """Every check that needs no model weights: raise before any long work."""
    o = options
    check_options(o)
    shape = check_model_dir(hf_dir)
    fp = fingerprint(hf_dir)
    device = _resolve_device(o.device) if o.device_map is None else "map"
    plan = None
    if o.plan is not None:
        plan = Plan.load(Path(o.plan))
        validate(plan, shape=shape, fingerprint=fp, source=str(o.plan))
    removed = {lp.index for lp in plan.layers if lp.removed} if plan else set()
    no_attn = {lp.index for lp in plan.layers if lp.attention_removed} if plan else set()
    if o.heads:
        if o.head_layers:
            head_layers = parse_layers(o.head_layers, shape.n_layer)
            gone = [i for i in head_layers if i in removed or i in no_attn]
            if gone:
                raise ScoreError(f"--head-layers: layer {gone[0]} has no attention left in the base plan "
                                 f"{o.plan} ({'removed' if gone[0] in removed else 'attention removed'}); "
                                 "leave it out of --head-layers")
        else:
            head_layers = [i for i in range(shape.n_layer) if i not in removed and i not in no_attn]
    elif o.head_layers:
        raise ScoreError("--head-layers needs --heads")
    else:
        head_layers = []
    check_calibration_file(o.calibration, o.calibration_kind)
    tokenizer = load_tokenizer(hf_dir)
    cal = load_calibration(o.calibration, tokenizer, seq_len=o.seq_len, samples=o.samples, seed=o.seed,
                           kind=o.calibration_kind)
    return ScoreInputs(shape=shape, fingerprint=fp, plan=plan, head_layers=head_layers, calibration=cal, device=device)
