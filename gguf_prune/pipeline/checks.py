"""The checks of `run` and `sweep`: every option and every input of every stage, before the first starts.

Scoring takes minutes and evaluation needs llama.cpp, a tokenizer and a long enough text; a problem found
after scoring wastes that work. So the options are checked against their ranges (when RunOptions /
SweepOptions are made, and again when a job starts), then against the model's family and size, then every
file and tool the stages will need. Each check collects every problem it finds and refuses once, naming
the option.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf_prune.errors import GgufPruneError
from gguf_prune.pipeline.strategy import RUN_STRATEGIES, STRATEGIES, WIDTH_FRACTIONS, recover_parts
from gguf_prune.ranges import protected_layers, ranges
from gguf_prune.values import is_int, is_real

if TYPE_CHECKING:
    from gguf_prune.plan import ModelShape
    from gguf_prune.pipeline.job import RunOptions
    from gguf_prune.pipeline.sweep import SweepOptions


class RunError(GgufPruneError, ValueError):
    """Options or inputs of `run` / `sweep` that cannot work, each named; refused before the first stage."""


def refuse(what: str, problems: list[str]) -> None:
    """Raise RunError for ``problems``: one line for one, a list for more."""
    if len(problems) == 1:
        raise RunError(f"{what}: {problems[0]}")
    if problems:
        raise RunError(f"{what}:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------ option ranges (no file read)


def _count_problems(o: Any, fields: tuple[tuple[str, str, int, bool], ...]) -> list[str]:
    """(attribute, option, minimum, None allowed) → a message for each value that is not a whole number >= min."""
    p = []
    for attr, flag, lo, optional in fields:
        v = getattr(o, attr)
        if v is None and optional:
            continue
        if not is_int(v) or v < lo:
            p.append(f"{flag} {v!r} must be a whole number, {lo} or more")
    return p


def _quant_problems(quant: Any) -> list[str]:
    from gguf_prune.writing.quantize import QUANT_TYPES

    if str(quant).strip().upper() in QUANT_TYPES + ("NONE",):
        return []
    return [f"--quant {quant!r} is not a llama-quantize type; use one of {', '.join(QUANT_TYPES)}, or none"]


def run_option_problems(o: RunOptions) -> list[str]:
    """Every option of a run outside its range (no file is read): what RunOptions refuses on construction."""
    from gguf_prune.pipeline.strategy import RECOVER_MODES

    p = []
    if not is_int(o.rounds) or o.rounds < 1:
        p.append(f"--rounds {o.rounds!r} must be a whole number, at least 1")
    if o.budget is not None and (not is_real(o.budget) or not 0 < o.budget < 1):
        p.append(f"--budget {o.budget} must be a fraction of the block parameters in (0, 1)")
    p += _speed_problems(o)
    if o.strategy not in RUN_STRATEGIES:
        p.append(f"--strategy {o.strategy!r}: use one of {', '.join(RUN_STRATEGIES)}")
    if o.recover not in RECOVER_MODES:
        p.append(f"--recover {o.recover!r} is not one of {', '.join(RECOVER_MODES)}")
    elif o.teacher_samples and recover_parts(o.recover)[1] is None:
        p.append(f"--teacher-samples feeds fine-tuning, which --recover {o.recover} does not do: "
                 "use --recover patch+lora (or lora, full, patch+full)")
    if not is_real(o.heldout) or not 0 <= o.heldout < 1:
        p.append(f"heldout {o.heldout} must be in [0, 1)")
    for name, value in (("--finetune-minutes", o.finetune_minutes), ("--finetune-lr", o.finetune_lr)):
        if value is not None and (not is_real(value) or not value > 0):
            p.append(f"{name} {value} must be a positive number")
    p += _count_problems(o, (("samples", "--samples", 1, False), ("seq_len", "--seq-len", 2, False),
                             ("greedy_steps", "--greedy-steps", 1, True), ("greedy_pool", "--greedy-pool", 1, True),
                             ("eval_chunks", "--eval-chunks", 1, True), ("threads", "--threads", 1, True),
                             ("recover_samples", "--recover-samples", 2, False),
                             ("finetune_steps", "--finetune-steps", 1, False),
                             ("teacher_samples", "--teacher-samples", 0, False)))
    p += _quant_problems(o.quant)
    return p


def _speed_problems(o: RunOptions) -> list[str]:
    """A speed target out of range, or one the run cannot take."""
    from gguf_prune.costs import speed_option_problems

    p = speed_option_problems(o.target_speedup, o.speed_metric, o.speed_depth)
    if o.target_speedup is not None and is_int(o.rounds) and o.rounds > 1:
        p.append("--target-speedup with --rounds > 1: the rounds cut a parameter budget step by step; run one "
                 "round for a speed target (or give --budget instead)")
    return p


def sweep_option_problems(o: SweepOptions) -> list[str]:
    """Every option of a sweep outside its range (no file is read): what SweepOptions refuses on construction."""
    p = []
    budgets, strategies = tuple(o.budgets), tuple(o.strategies)
    if not budgets:
        p.append("--budgets names no budget; give fractions like 0.1,0.2,0.3")
    for b in budgets:
        if not is_real(b) or not 0 < b < 1:
            p.append(f"--budgets: {b!r} is not a fraction of the block parameters in (0, 1)")
    if len(set(budgets)) < len(budgets):
        p.append(f"--budgets {','.join(map(str, budgets))}: a budget is given twice")
    if not strategies:
        p.append(f"--strategies names no strategy; choose from {', '.join(STRATEGIES)}")
    for s in strategies:
        if s not in STRATEGIES:
            p.append(f"--strategies: unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    if len(set(strategies)) < len(strategies):
        p.append(f"--strategies {','.join(strategies)}: a strategy is given twice")
    p += _count_problems(o, (("samples", "--samples", 1, False), ("seq_len", "--seq-len", 2, False),
                             ("greedy_pool", "--greedy-pool", 1, True), ("eval_chunks", "--eval-chunks", 1, True),
                             ("threads", "--threads", 1, True), ("bench_reps", "--bench-reps", 1, False),
                             ("protect_first", "--protect-first", 0, False), ("protect_last", "--protect-last", 0, False)))
    p += _quant_problems(o.quant)
    return p


def check_run(o: RunOptions) -> None:
    """Options that would fail late (after scoring): refuse them before any work. (RunOptions checks its ranges
    when it is made; they are checked again here because its fields can be changed after.)"""
    from gguf_prune.recovery.options import check_options

    refuse("run options are invalid", run_option_problems(o))
    finetune, _ = o.recovery_options()
    if finetune is not None:
        check_options(finetune)


# ------------------------------------------------------------------ the model's family and size


def max_removable(shape: ModelShape, uniform: bool) -> tuple[float, list[int]]:
    """The largest fraction of block parameters a run's plan can remove (an upper bound), and the layers it may
    remove: every layer outside the protected ones (the planner's defaults), plus, uniform, the widest width cut
    scored (WIDTH_FRACTIONS) of the protected layers' MLPs."""
    from gguf_prune.planning.options import PlanOptions
    from gguf_prune.scoring.options import ScoreOptions
    from gguf_prune.scoring.inputs import width_drops

    d = PlanOptions()
    n = shape.n_layer
    free = [i for i in range(n) if i not in protected_layers(n, d.protect_first, d.protect_last)]
    removable = len(free) * shape.layer_params()
    if uniform:
        drop = max(width_drops(WIDTH_FRACTIONS, shape.n_ff, ScoreOptions().width_align), default=0)
        removable += (n - len(free)) * (shape.mlp_params() - shape.mlp_params(shape.n_ff - drop))
    return removable / (n * shape.layer_params()), free


def check_family(o: RunOptions, shape: ModelShape) -> bool:
    """Whether the run plans uniformly; options the model's family or size cannot take are refused before any
    work."""
    from gguf_prune.models import arch

    fam = arch.family_of_arch(shape.architecture)
    uniform = o.uniform or fam.uniform_only
    p = []
    why = fam.why_uniform if fam.uniform_only else "--uniform"
    if uniform and o.strategy == "greedy-mixed":
        p.append(f"--strategy greedy-mixed removes attention or MLP sub-blocks in some layers only, which a uniform "
                 f"plan cannot hold ({why}); use --strategy width-mixed")
    if uniform and o.rounds > 1:
        p.append(f"--rounds > 1 cuts sub-blocks round by round, which a uniform plan cannot hold ({why})")
    if o.repair and shape.architecture != "llama":
        p.append(f"--repair: recovery writes llama-layout tensors and patches (deci); it supports llama-family "
                 f"models (llama, mistral) only, not {shape.architecture}; run with --no-repair")
    if o.recover != "none" and shape.architecture != "llama":
        p.append(f"--recover {o.recover}: recovery writes llama-layout tensors and patches (deci); it supports "
                 f"llama-family models (llama, mistral) only, not {shape.architecture}")
    most, free = max_removable(shape, uniform)
    if o.params_budget is not None and o.params_budget > most + 1e-9:
        p.append(f"--budget {o.budget}: at most {most:.3f} of this model's block parameters can be removed (the "
                 f"first 2 and last 2 of its {shape.n_layer} layers are kept; layers {ranges(free) or 'none'} may go)")
    refuse("run options do not fit this model", p)
    return uniform


# ------------------------------------------------------------------ files, tools and devices


def llama_tools(bench: bool) -> tuple[str, ...]:
    """The llama.cpp tools a run or sweep calls: quantize and perplexity, and llama-bench when it measures speed."""
    return ("llama-quantize", "llama-perplexity") + (("llama-bench",) if bench else ())


def check_text(text: Path | None, tokenizer, ctx: int) -> list[str]:
    """The held-out text exists and holds the 2 × ctx tokens llama-perplexity needs (counted with the
    checkpoint's own tokenizer, which the GGUF carries)."""
    from gguf_prune.runtime.evaluate import DEFAULT_TEXT

    path = Path(text) if text else DEFAULT_TEXT
    if not path.is_file():
        return [f"--text {path}: {'is not a file' if path.exists() else 'no such file'}"]
    body = path.read_text(encoding="utf-8", errors="replace")
    if not body.strip():
        return [f"--text {path} is empty; give a held-out text of at least {2 * ctx} tokens"]
    head = body[:64 * ctx]  # enough characters for 2 × ctx tokens of any real text; all of it when short
    n = len(tokenizer(head, add_special_tokens=True)["input_ids"])
    if n < 2 * ctx and len(head) < len(body):
        n = len(tokenizer(body, add_special_tokens=True)["input_ids"])
    if n < 2 * ctx:
        return [f"--text {path} has {n} tokens; llama-perplexity needs at least {2 * ctx} (twice its context of "
                f"{ctx}): give a longer text"]
    return []


def check_inputs(model: Path, out: Path, calibration: Path | None, text: Path | None, prompts: Path | None,
                 device: str, tools: tuple[str, ...]) -> list[str]:
    """Every input of every stage that can be checked before the first starts: the output directory, the
    calibration file, the tokenizer, the held-out text, the prompts, the device and the llama.cpp tools."""
    from gguf_prune.runtime import toolchain
    from gguf_prune.models import cuts
    from gguf_prune.calibration import check_calibration_file
    from gguf_prune.runtime.evaluate import EvalOptions
    from gguf_prune.runtime.prompts import prompt_problems

    p = []
    if out.exists() and not out.is_dir():
        p.append(f"-o/--out-dir {out} is a file; pass a directory (it is created if missing)")
    try:
        check_calibration_file(calibration)
    except GgufPruneError as e:
        p.append(f"--calibration: {e}")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError) as e:
        p.append(f"{model}: cannot load its tokenizer ({str(e).splitlines()[0]}); the checkpoint directory needs "
                 "tokenizer.json / tokenizer_config.json")
    else:
        p += check_text(text, tokenizer, EvalOptions().ctx)
    if prompts is not None:
        p += prompt_problems(prompts)
    try:
        cuts.resolve_device(device, RunError)
    except RunError as e:
        p.append(str(e))
    try:
        tc = toolchain.find()
        for name in tools:
            tc.tool(name)
    except GgufPruneError as e:
        p.append(str(e))
    return p


def check_training_data(model: Path, ropts, fto) -> None:
    """Refuse training data shorter than one batch before scoring, not after it."""
    from transformers import AutoTokenizer

    from gguf_prune.calibration import load_calibration
    from gguf_prune.recovery.finetune import check_data
    from gguf_prune.recovery.recover import split_heldout

    cal = load_calibration(ropts.calibration, AutoTokenizer.from_pretrained(str(model)), seq_len=ropts.seq_len,
                           samples=ropts.samples, seed=ropts.seed, kind=ropts.calibration_kind)
    check_data(cal, split_heldout(cal.n_seq, ropts.heldout, ropts.seed), fto)
