"""The stages in order: `run` (the main job) and `sweep` (the quality-vs-size curve).

Each stage writes its file into the run directory and the next stage reads it,
so a run can be inspected, edited and resumed stage by stage:

    scores.json → plan.json → base.gguf / pruned.gguf → report/ → the executable

With recovery (``recover`` other than "none") the cut model is recovered before it is
written (``recovered/``, then ``prune --recovered``); with ``rounds`` > 1 scoring, planning
and recovery are iterated (:mod:`gguf_prune.pipeline.iterate`, files under ``rounds/``), each round
reaching budget·r/R.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf_prune.data import DATA_DIR
from gguf_prune.errors import GgufPruneError
from gguf_prune.plan import Plan, is_int
from gguf_prune.ranges import protected_layers, ranges
from gguf_prune.atomic import save_figure_atomic, write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = DATA_DIR / "prompts.jsonl"

STRATEGIES = ("bi-layers", "kl-layers", "greedy-layers", "oneshot-mixed", "greedy-mixed", "width", "width-mixed")
# Width KL levels scored for the width strategies: each MLP with 1/6, 1/3, 1/2 of its neurons removed
# (on SmolLM2-135M with align 256: 256, 512 and 768 of 1,536).
WIDTH_FRACTIONS = (1 / 6, 1 / 3, 1 / 2)
RUN_STRATEGIES = ("width-mixed", "greedy-mixed")



class RunError(GgufPruneError, ValueError):
    """Options or inputs of `run` / `sweep` that cannot work, each named; refused before the first stage."""


def _refuse(what: str, problems: list[str]) -> None:
    """Raise RunError for ``problems``: one line for one, a list for more."""
    if len(problems) == 1:
        raise RunError(f"{what}: {problems[0]}")
    if problems:
        raise RunError(f"{what}:\n  - " + "\n  - ".join(problems))



def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


def _quant_problem(quant: Any) -> list[str]:
    from gguf_prune.writing.quantize import QUANT_TYPES

    if str(quant).strip().upper() in QUANT_TYPES + ("NONE",):
        return []
    return [f"--quant {quant!r} is not a llama-quantize type; use one of {', '.join(QUANT_TYPES)}, or none"]


def _run_option_problems(o: "RunOptions") -> list[str]:
    """Every option of a run outside its range (no file is read): what RunOptions refuses on construction."""
    from gguf_prune.pipeline.iterate import RECOVER_MODES

    p = []
    if not is_int(o.rounds) or o.rounds < 1:
        p.append(f"--rounds {o.rounds!r} must be a whole number, at least 1")
    if not _is_real(o.budget) or not 0 < o.budget < 1:
        p.append(f"--budget {o.budget} must be a fraction of the block parameters in (0, 1)")
    if o.strategy not in RUN_STRATEGIES:
        p.append(f"--strategy {o.strategy!r}: use one of {', '.join(RUN_STRATEGIES)}")
    if o.recover not in RECOVER_MODES:
        p.append(f"--recover {o.recover!r} is not one of {', '.join(RECOVER_MODES)}")
    if not _is_real(o.heldout) or not 0 <= o.heldout < 1:
        p.append(f"heldout {o.heldout} must be in [0, 1)")
    p += _count_problems(o, (("samples", "--samples", 1, False), ("seq_len", "--seq-len", 2, False),
                             ("greedy_steps", "--greedy-steps", 1, True), ("greedy_pool", "--greedy-pool", 1, True),
                             ("eval_chunks", "--eval-chunks", 1, True), ("threads", "--threads", 1, True),
                             ("recover_samples", "--recover-samples", 2, False),
                             ("finetune_steps", "--finetune-steps", 1, False)))
    p += _quant_problem(o.quant)
    return p


@dataclass
class RunOptions:
    model: Path | None = None  # None: the demo model
    out_dir: Path | None = None  # None: runs/<model name>
    calibration: Path | None = None  # None: the bundled calibration text
    samples: int = 16
    seq_len: int = 128
    budget: float = 0.2  # fraction of transformer-block parameters to remove
    strategy: str = "width-mixed"  # RUN_STRATEGIES: one-shot layers, sub-blocks and MLP widths; or greedy-mixed
    greedy_steps: int | None = None  # None: enough for the budget
    greedy_pool: int | None = 8  # lazy greedy: re-measure the 8 cheapest candidates per step
    heads: bool = False  # head KL costs ~3x the rest of scoring on CPU; `--heads` turns it on
    quant: str = "Q4_K_M"
    text: Path | None = None  # held-out text for eval (None: bundled)
    prompts: Path | None = DEFAULT_PROMPTS
    eval_chunks: int | None = 24
    threads: int | None = None
    package: bool = True
    bench: bool = True
    device: str = "auto"
    rounds: int = 1  # > 1: iterative pruning (cut a little, recover, re-score, repeat)
    recover: str = "none"  # none | patch | lora | full | patch+lora | patch+full (iterate.RECOVER_MODES)
    recover_samples: int = 64  # calibration sequences for recovery (patch fit, fine-tuning, held-out split)
    finetune_steps: int = 200  # fine-tuning steps (per round when iterating)
    heldout: float = 0.1  # fraction of the recovery sequences held out (early stopping, round figures)
    uniform: bool = False  # one shape for every kept layer: the model's own architecture (forced: Qwen3, Gemma 3)

    def __post_init__(self) -> None:
        _refuse("run options are invalid", _run_option_problems(self))


def _stage(n: int, total: int, what: str) -> float:
    log.info("")
    log.info("== [%d/%d] %s", n, total, what)
    return time.time()


def greedy_steps_for(budget: float, n_layer: int, units: tuple[str, ...]) -> int:
    """Greedy steps enough to reach ``budget`` (a fraction of block parameters).

    Whole layers: one step per layer. Mixed units: a step may remove only an attention
    sub-block (a quarter of a layer in typical shapes) or an MLP (three quarters); allow
    two steps per layer-equivalent, plus two.
    """
    layers = math.ceil(budget * n_layer - 1e-9)
    return max(1, layers) if tuple(units) == ("layer",) else 2 * layers + 2


def _recovery_options(o: RunOptions, patch: bool, method: str | None):
    """The recovery settings of a run: RecoverOptions for one-shot runs and IterateOptions' parts."""
    from gguf_prune.recovery.finetune import FinetuneOptions
    from gguf_prune.recovery.recover import RecoverOptions

    fto = FinetuneOptions(method=method, steps=o.finetune_steps) if method else None
    return fto, RecoverOptions(calibration=o.calibration, seq_len=o.seq_len, samples=o.recover_samples,
                               heldout=o.heldout, patch=patch, finetune=method, finetune_options=fto,
                               device=o.device)


def _check_run(o: RunOptions) -> tuple[bool, str | None]:
    """Options that would fail late (after scoring): refuse them before any work. (RunOptions checks its ranges
    when it is made; they are checked again here because its fields can be changed after.)"""
    from gguf_prune.recovery.finetune import check_options
    from gguf_prune.pipeline.iterate import parse_recover

    _refuse("run options are invalid", _run_option_problems(o))
    patch, method = parse_recover(o.recover)
    fto, _ = _recovery_options(o, patch, method)
    if fto is not None:
        check_options(fto)
    return patch, method


def _max_removable(shape, uniform: bool) -> tuple[float, list[int]]:
    """The largest fraction of block parameters a run's plan can remove (an upper bound), and the layers it may
    remove: every layer outside the protected ones (the planner's defaults), plus, uniform, the widest width cut
    scored (WIDTH_FRACTIONS) of the protected layers' MLPs."""
    from gguf_prune.planning.strategies import PlanOptions
    from gguf_prune.scoring.measure import ScoreOptions, width_drops

    d = PlanOptions()
    n = shape.n_layer
    free = [i for i in range(n) if i not in protected_layers(n, d.protect_first, d.protect_last)]
    removable = len(free) * shape.layer_params()
    if uniform:
        drop = max(width_drops(WIDTH_FRACTIONS, shape.n_ff, ScoreOptions().width_align), default=0)
        removable += (n - len(free)) * (shape.mlp_params() - shape.mlp_params(shape.n_ff - drop))
    return removable / (n * shape.layer_params()), free


def _check_family(o: RunOptions, shape) -> bool:
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
    if o.recover != "none" and shape.architecture != "llama":
        p.append(f"--recover {o.recover}: recovery writes llama-layout tensors and patches (deci); it supports "
                 f"llama-family models (llama, mistral) only, not {shape.architecture}")
    most, free = _max_removable(shape, uniform)
    if o.budget > most + 1e-9:
        p.append(f"--budget {o.budget}: at most {most:.3f} of this model's block parameters can be removed (the "
                 f"first 2 and last 2 of its {shape.n_layer} layers are kept; layers {ranges(free) or 'none'} may go)")
    _refuse("run options do not fit this model", p)
    return uniform


def _check_text(text: Path | None, tokenizer, ctx: int) -> list[str]:
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


def _check_inputs(model: Path, out: Path, calibration: Path | None, text: Path | None, prompts: Path | None,
                  device: str, tools: tuple[str, ...]) -> list[str]:
    """Every input of every stage that can be checked before the first starts: the output directory, the
    calibration file, the tokenizer, the held-out text, the prompts, the device and the llama.cpp tools."""
    from gguf_prune.runtime import toolchain
    from gguf_prune.models import cuts
    from gguf_prune.calibration import check_calibration_file
    from gguf_prune.runtime.evaluate import EvalOptions, prompt_problems

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
        p += _check_text(text, tokenizer, EvalOptions().ctx)
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


def _check_training_data(model: Path, ropts, fto) -> None:
    """Refuse training data shorter than one batch before scoring, not after it."""
    from transformers import AutoTokenizer

    from gguf_prune.calibration import load_calibration
    from gguf_prune.recovery.finetune import check_data
    from gguf_prune.recovery.recover import split_heldout

    cal = load_calibration(ropts.calibration, AutoTokenizer.from_pretrained(str(model)), seq_len=ropts.seq_len,
                           samples=ropts.samples, seed=ropts.seed, kind=ropts.calibration_kind)
    check_data(cal, split_heldout(cal.n_seq, ropts.heldout, ropts.seed), fto)


def run(options: RunOptions | None = None) -> dict[str, Any]:
    """The main job: score → plan → [recover] → prune (base and pruned) → eval → package → summary.

    ``rounds`` > 1: score → plan → recover is repeated, each round cutting on top of the last and
    recovering from its weights (:func:`gguf_prune.pipeline.iterate.iterate`); the last round's recover
    directory is what the pruned GGUF is written from. Round figures go into summary.json.
    """
    from gguf_prune.runtime import evaluate as ev
    from gguf_prune.models import checkpoint
    from gguf_prune.models.demo import MODEL_NAME, ensure_demo_checkpoint
    from gguf_prune.runtime.package import PackageOptions, build_package
    from gguf_prune.planning.strategies import UNIFORM_UNITS, UNITS, PlanOptions, make_plan
    from gguf_prune.writing.prune import prune
    from gguf_prune.scoring.measure import ScoreOptions, score_model

    o = options if options is not None else RunOptions()
    t_start = time.time()
    patch, method = _check_run(o)
    model = Path(o.model) if o.model else ensure_demo_checkpoint()
    shape = checkpoint.check_model_dir(model)
    uniform = _check_family(o, shape)
    name = MODEL_NAME if o.model is None else model.name
    out = Path(o.out_dir) if o.out_dir else Path("runs") / name
    _refuse("run inputs are invalid", _check_inputs(
        model, out, o.calibration, o.text, o.prompts, o.device,
        ("llama-quantize", "llama-perplexity") + (("llama-bench",) if o.bench else ())))
    out.mkdir(parents=True, exist_ok=True)
    units = ("layer", "attn", "mlp")
    steps = o.greedy_steps or greedy_steps_for(o.budget, shape.n_layer, units)
    timings: dict[str, float] = {}
    iterative, recovering = o.rounds > 1, o.recover != "none"
    names = (["iterate"] if iterative else ["score", "plan"] + (["recover"] if recovering else [])) \
        + ["prune", "eval"] + (["package"] if o.package else []) + ["summary"]
    total = len(names)

    def stage(what: str, text: str) -> float:
        return _stage(names.index(what) + 1, total, text)

    recovered, rounds = None, None
    fto, ropts = _recovery_options(o, patch, method)
    if fto is not None and not iterative:  # iterate() checks its own data before any work
        _check_training_data(model, ropts, fto)
    if iterative:
        from gguf_prune.pipeline.iterate import IterateOptions, iterate

        t = stage("iterate", f"iterative pruning: {o.rounds} rounds to {100 * o.budget:.0f}% of block parameters "
                             f"(score on top of the cuts so far, extend the plan, recover: {o.recover})")
        it = iterate(model, out / "rounds", IterateOptions(
            rounds=o.rounds, budget=o.budget, recover=o.recover, calibration=o.calibration, samples=max(
                o.recover_samples, o.samples) if recovering else o.samples, score_samples=o.samples,
            seq_len=o.seq_len, heldout=o.heldout, quant=o.quant, finetune_options=fto, device=o.device))
        plan, recovered, rounds = it.plan, it.recovered, it.rounds
        plan.save(out / "plan.json")
        timings["iterate"] = time.time() - t
    else:
        if o.strategy == "greedy-mixed":
            what = (f"greedy {steps} steps over {'/'.join(units)}, re-measuring the {o.greedy_pool or 'all'} "
                    "cheapest each step")
            sopts = ScoreOptions(calibration=o.calibration, samples=o.samples, seq_len=o.seq_len, heads=o.heads,
                                 neurons=True, greedy=steps, greedy_units=units, greedy_by="kl-per-param",
                                 greedy_pool=o.greedy_pool, device=o.device)
            popts = PlanOptions(target_params=o.budget, quant=o.quant)
            how = "cheapest first (greedy order)"
        else:
            what = "MLP widths " + "/".join(f"{f:.2f}" for f in WIDTH_FRACTIONS)
            sopts = ScoreOptions(calibration=o.calibration, samples=o.samples, seq_len=o.seq_len, heads=o.heads,
                                 neurons=True, width=WIDTH_FRACTIONS, device=o.device)
            popts = PlanOptions(target_params=o.budget, quant=o.quant, units=UNIFORM_UNITS if uniform else UNITS,
                                uniform=uniform)
            how = ("whole layers and one MLP width for every kept layer (uniform), by KL per parameter" if uniform
                   else "layers, sub-blocks and MLP widths by KL per parameter")
        t = stage("score", f"score {model} (layers, sub-blocks, {'heads, ' if o.heads else ''}neurons; {what})")
        scores = score_model(model, out / "scores.json", sopts)
        timings["score"] = time.time() - t

        t = stage("plan", f"plan: remove {100 * o.budget:.0f}% of block parameters, {how}")
        plan = make_plan(scores, out / "plan.json", popts)
        timings["plan"] = time.time() - t

        if recovering:
            from gguf_prune.recovery.recover import recover

            t = stage("recover", f"recover the cut model ({o.recover}) on {o.recover_samples} calibration sequences")
            rec = recover(model, plan, out / "recovered", ropts)
            recovered = rec.path
            log.info("%s", rec.summary())
            timings["recover"] = time.time() - t

    t = stage("prune", f"prune: convert, cut{', write the recovered tensors' if recovered else ''} and quantize to "
                       f"{o.quant} (and the uncut base, made the same way)")
    base = prune(model, None, out / f"base-{o.quant}.gguf", quant=o.quant, threads=o.threads)
    pruned = prune(model, plan, out / f"pruned-{o.quant}.gguf", quant=o.quant, threads=o.threads, recovered=recovered)
    timings["prune"] = time.time() - t

    t = stage("eval", "eval in llama.cpp against the base: perplexity, KL, top-1, speed, size, prompts")
    report = ev.evaluate(base.path, [pruned.path], out / "report", text=o.text, options=ev.EvalOptions(
        chunks=o.eval_chunks, threads=o.threads, prompts=o.prompts, bench=o.bench, labels=["base", "pruned"]))
    timings["eval"] = time.time() - t

    exe = None
    if o.package:
        t = stage("package", "package: one executable with llama-server, its web UI and the pruned model")
        exe = build_package(pruned.path, out / f"{name}-pruned", PackageOptions(name=f"{name}-pruned"))
        timings["package"] = time.time() - t

    timings["total"] = time.time() - t_start
    summary = {"model": str(model), "out_dir": str(out), "plan": str(out / "plan.json"),
               "removed_fraction": plan.removed_fraction(), "base": base.to_dict(), "pruned": pruned.to_dict(),
               "report": str(out / "report" / "report.md"), "executable": str(exe) if exe else None,
               "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "quality": report["models"][1].get("quality"), "speed": report["models"][1].get("speed"),
               "prompts": {e["name"]: (e.get("prompts") or {}).get("passed") for e in report["models"]},
               "recover": o.recover, "recovered": str(recovered) if recovered else None, "rounds": _round_rows(rounds)}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")
    stage("summary", "summary")
    return summary


def _round_rows(rounds: list[dict] | None) -> list[dict] | None:
    """The figures of each round that summary.json keeps: budget aimed at and reached, units cut, held-out KL."""
    if rounds is None:
        return None
    keep = ("round", "target", "removed_fraction", "cut", "heldout_kl", "heldout_kl_stages", "kl_in", "recovered",
            "seconds")
    return [{k: r.get(k) for k in keep} for r in rounds]


def format_summary(s: dict[str, Any]) -> str:
    q, sp = s.get("quality") or {}, s.get("speed") or {}
    b, p = s["base"], s["pruned"]
    lines = [
        f"model        {s['model']}",
        f"plan         {s['plan']}  ({100 * s['removed_fraction']:.1f}% of block parameters removed, "
        f"{p['architecture']} architecture)",
        f"size         {b['bytes_out'] / 1e6:.1f} MB → {p['bytes_out'] / 1e6:.1f} MB "
        f"(×{p['bytes_out'] / b['bytes_out']:.3f}, {b['quant']})",
    ]
    if q:
        lines.append(f"quality      KL {q.get('kl_mean', float('nan')):.4f} mean / {q.get('kl_median', float('nan')):.4f} "
                     f"median, top-1 {100 * q.get('top1_agreement', 0):.1f}%, PPL ×{q.get('ppl_ratio', float('nan')):.3f}")
    if sp.get("tg_ratio"):
        lines.append(f"speed        prompt ×{sp.get('pp_ratio', float('nan')):.2f}, generation ×{sp['tg_ratio']:.2f} "
                     "(llama-bench, against the base in the same run)")
    if any(v is not None for v in s["prompts"].values()):
        lines.append("prompts      " + ", ".join(f"{k} {v}" for k, v in s["prompts"].items()))
    for r in s.get("rounds") or []:
        kl = r.get("heldout_kl")
        lines.append(f"round {r['round']:<6} {100 * r['target']:.1f}% aimed, "
                     f"{100 * r['removed_fraction']:.1f}% removed (cut {', '.join(r['cut']) or 'nothing'}); held-out KL after recovery "
                     + ("n/a" if kl is None else f"{kl:.4f}"))
    if s.get("recovered"):
        lines.append(f"recovered    {s['recovered']}  ({s['recover']})")
    lines.append(f"report       {s['report']}")
    if s.get("executable"):
        lines.append(f"executable   {s['executable']}  (run it, then open http://127.0.0.1:8080/)")
    lines.append(f"time         " + ", ".join(f"{k} {v:.0f}s" for k, v in s["timings_s"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------ sweep


@dataclass
class SweepOptions:
    calibration: Path | None = None
    text: Path | None = None
    budgets: tuple[float, ...] = (0.1, 0.2, 0.3)
    strategies: tuple[str, ...] = STRATEGIES
    samples: int = 16
    seq_len: int = 128
    greedy_pool: int | None = 8
    quant: str = "F16"
    eval_chunks: int | None = 24
    threads: int | None = None
    bench: bool = True
    out_dir: Path = Path("sweep")
    device: str = "auto"
    protect_first: int = 2
    protect_last: int = 2

    def __post_init__(self) -> None:
        _refuse("sweep options are invalid", _sweep_option_problems(self))


def _sweep_option_problems(o: SweepOptions) -> list[str]:
    p = []
    budgets, strategies = tuple(o.budgets), tuple(o.strategies)
    if not budgets:
        p.append("--budgets names no budget; give fractions like 0.1,0.2,0.3")
    for b in budgets:
        if not _is_real(b) or not 0 < b < 1:
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
                             ("threads", "--threads", 1, True), ("protect_first", "--protect-first", 0, False),
                             ("protect_last", "--protect-last", 0, False)))
    p += _quant_problem(o.quant)
    return p


def strategy_plan(strategy: str, budget: float, scores_one: Path, scores_greedy_layers: Path,
                  scores_greedy_mixed: Path, n_layer: int, out: Path, protect: tuple[int, int] = (2, 2)) -> Plan:
    from gguf_prune.planning.strategies import UNITS, PlanOptions, make_plan

    n = max(1, math.ceil(budget * n_layer - 1e-9))
    p = dict(protect_first=protect[0], protect_last=protect[1])
    if strategy == "bi-layers":
        return make_plan(scores_one, out, PlanOptions(drop_layers=n, metric="bi", **p))
    if strategy == "kl-layers":
        return make_plan(scores_one, out, PlanOptions(drop_layers=n, metric="kl", **p))
    if strategy == "greedy-layers":
        return make_plan(scores_greedy_layers, out, PlanOptions(drop_layers=n, metric="greedy", **p))
    if strategy == "oneshot-mixed":
        return make_plan(scores_one, out, PlanOptions(target_params=budget, **p))
    if strategy == "greedy-mixed":
        return make_plan(scores_greedy_mixed, out, PlanOptions(target_params=budget, **p))
    if strategy == "width":
        return make_plan(scores_one, out, PlanOptions(target_params=budget, units=("width",), **p))
    if strategy == "width-mixed":
        return make_plan(scores_one, out, PlanOptions(target_params=budget, units=UNITS, **p))
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def _reusable(path: Path, common: dict, width: bool = False) -> bool:
    """A scores file an earlier sweep into the same directory left, measured with the same calibration
    settings (and with width scores if they are needed): scoring is the slow part, so it is not repeated."""
    from gguf_prune.scores import ScoresError, load

    if not path.exists():
        return False
    try:
        d = load(path)
    except (ScoresError, ValueError, OSError):
        return False
    st = d.get("settings", {})
    same = all(str(st.get(k)) == str(v) for k, v in common.items() if k != "device")
    ok = same and (not width or bool(d.get("width")))
    if ok:
        log.info("reusing %s (same calibration settings)", path)
    else:
        log.info("%s was measured with other settings: scoring again", path)
    return ok


def sweep(hf_dir: Path, options: SweepOptions | None = None) -> dict[str, Any]:
    """Build a pruned GGUF per (strategy, budget), evaluate all against the base in one run, draw the curve."""
    from gguf_prune.runtime import evaluate as ev
    from gguf_prune.models import checkpoint
    from gguf_prune.writing.prune import prune
    from gguf_prune.scoring.measure import ScoreOptions, score_model

    o = options if options is not None else SweepOptions()
    hf_dir = Path(hf_dir)
    _refuse("sweep options are invalid", _sweep_option_problems(o))
    shape = checkpoint.check_model_dir(hf_dir)
    out = Path(o.out_dir)
    _refuse("sweep inputs are invalid", _check_inputs(
        hf_dir, out, o.calibration, o.text, None, o.device,
        ("llama-quantize", "llama-perplexity") + (("llama-bench",) if o.bench else ())))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    common = dict(calibration=o.calibration, samples=o.samples, seq_len=o.seq_len, device=o.device,
                  protect_first=o.protect_first, protect_last=o.protect_last)
    need_width = any(s in o.strategies for s in ("width", "width-mixed"))
    need_layers = need_width or any(s in o.strategies for s in ("bi-layers", "kl-layers", "oneshot-mixed"))
    need_gl = "greedy-layers" in o.strategies
    need_gm = "greedy-mixed" in o.strategies
    max_b = max(o.budgets)
    s_one, s_gl, s_gm = out / "scores.json", out / "scores-greedy-layers.json", out / "scores-greedy-mixed.json"
    log.info("== sweep: scoring %s", hf_dir)
    if need_layers and not _reusable(s_one, common, need_width):
        score_model(hf_dir, s_one, ScoreOptions(**common, neurons=need_width,
                                                width=WIDTH_FRACTIONS if need_width else ()))
    if need_gl and not _reusable(s_gl, common):
        score_model(hf_dir, s_gl, ScoreOptions(**common, sublayers=False, neurons=False, plots=False,
                                               greedy=greedy_steps_for(max_b, shape.n_layer, ("layer",))))
    units = ("layer", "attn", "mlp")
    if need_gm and not _reusable(s_gm, common):
        score_model(hf_dir, s_gm, ScoreOptions(**common, sublayers=False, neurons=False, plots=False,
                                               greedy=greedy_steps_for(max_b, shape.n_layer, units),
                                               greedy_units=units, greedy_by="kl-per-param",
                                               greedy_pool=o.greedy_pool))
    log.info("== sweep: building %d pruned models", len(o.budgets) * len(o.strategies))
    base = prune(hf_dir, None, out / f"base-{o.quant}.gguf", quant=o.quant, threads=o.threads)
    models, labels, meta = [], ["base"], []
    for b in o.budgets:
        for s in o.strategies:
            tag = f"{s}-{int(round(100 * b))}"
            plan = strategy_plan(s, b, s_one, s_gl, s_gm, shape.n_layer, out / "plans" / f"{tag}.json",
                                 (o.protect_first, o.protect_last))
            r = prune(hf_dir, plan, out / f"{tag}-{o.quant}.gguf", quant=o.quant, threads=o.threads)
            models.append(r.path)
            labels.append(tag)
            meta.append({"label": tag, "strategy": s, "budget": b, "removed_fraction": plan.removed_fraction(),
                         "architecture": r.architecture, "path": str(r.path)})
    log.info("== sweep: evaluating %d models against the base", len(models))
    report = ev.evaluate(base.path, models, out / "report", text=o.text, options=ev.EvalOptions(
        chunks=o.eval_chunks, threads=o.threads, bench=o.bench, labels=labels))
    by_label = {e["name"]: e for e in report["models"]}
    for m in meta:
        e = by_label.get(m["label"], {})
        m["quality"], m["speed"], m["error"] = e.get("quality"), e.get("speed"), e.get("error")
        m["size_ratio"] = e.get("size_ratio")
    best = {}
    for b in o.budgets:
        ok = [m for m in meta if m["budget"] == b and m["quality"]]
        if ok:
            best[str(b)] = min(ok, key=lambda m: m["quality"]["kl_mean"])["label"]
    result = {"schema": "gguf-prune/sweep", "version": 1, "model": str(hf_dir), "quant": o.quant,
              "budgets": list(o.budgets), "strategies": list(o.strategies), "runs": meta, "best": best,
              "base": {"path": str(base.path), "quality": by_label["base"].get("quality"),
                       "speed": by_label["base"].get("speed")},
              "text": report["text"], "seconds": round(time.time() - t0, 1)}
    write_text_atomic(out / "sweep.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_text_atomic(out / "sweep.md", sweep_markdown(result))
    try:
        plot_sweep(result, out / "sweep.png")
    except Exception as e:  # the numbers matter more than the picture
        log.warning("sweep plot failed: %s", e)
    return result


def sweep_markdown(r: dict[str, Any]) -> str:
    lines = [f"| budget | strategy | removed | size× | PPL× | KL mean | KL median | KL p99 | top-1 | tg× |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in sorted(r["runs"], key=lambda m: (m["budget"], m["strategy"])):
        q, sp = m.get("quality") or {}, m.get("speed") or {}
        star = " **best**" if r["best"].get(str(m["budget"])) == m["label"] else ""
        if m.get("error"):
            lines.append(f"| {m['budget']:.0%} | {m['strategy']} | error: {m['error'].splitlines()[0][:60]} "
                         "| | | | | | | |")
            continue
        lines.append(
            f"| {m['budget']:.0%} | {m['strategy']}{star} | {100 * m['removed_fraction']:.1f}% | "
            f"{(m.get('size_ratio') or 0):.3f} | {q.get('ppl_ratio', float('nan')):.3f} | "
            f"{q.get('kl_mean', float('nan')):.4f} | {q.get('kl_median', float('nan')):.4f} | "
            f"{q.get('kl_p99', float('nan')):.3f} | {100 * q.get('top1_agreement', 0):.1f}% | "
            f"{sp.get('tg_ratio', float('nan')):.2f} |")
    t = r["text"]
    lines.append("")
    lines.append(f"{r['quant']}, held-out text `{Path(t['path']).name}` ({t['tokens']} tokens, ctx {t['ctx']}, "
                 f"{t.get('chunks')} chunks); KL against the unpruned {r['quant']} model in llama.cpp.")
    return "\n".join(lines) + "\n"


def plot_sweep(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in r["strategies"]:
        pts = sorted((m["removed_fraction"], m["quality"]["kl_mean"]) for m in r["runs"]
                     if m["strategy"] == s and m.get("quality"))
        if pts:
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=s)
    for b, label in r["best"].items():
        m = next(m for m in r["runs"] if m["label"] == label)
        ax.scatter([100 * m["removed_fraction"]], [m["quality"]["kl_mean"]], s=160, facecolors="none",
                   edgecolors="black", zorder=5)
    ax.set_xlabel("transformer-block parameters removed (%)")
    ax.set_ylabel("mean KL to the unpruned model (nats)")
    ax.set_title("quality vs size (circled: best strategy per budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=110)  # a temporary file renamed into place: never a partial PNG
    finally:
        plt.close(fig)


