"""`run`, the main job: score → plan → [recover] → prune (base and pruned) → eval → package → summary.

Each stage writes its file into the run directory and the next stage reads it,
so a run can be inspected, edited and resumed stage by stage:

    scores.json → plan.json → base.gguf / pruned.gguf → report/ → the executable

With recovery (``recover`` other than "none") the cut model is recovered before it is
written (``recovered/``, then ``prune --recovered``); with ``rounds`` > 1 scoring, planning
and recovery are iterated (:mod:`gguf_prune.pipeline.iterate`, files under ``rounds/``), each round
reaching budget·r/R.

Every option and input is checked before the first stage (:mod:`gguf_prune.pipeline.checks`).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from gguf_prune.atomic import write_text_atomic
from gguf_prune.data import DATA_DIR
from gguf_prune.pipeline.checks import (check_family, check_inputs, check_run, check_training_data, llama_tools,
                                        refuse, run_option_problems)
from gguf_prune.pipeline.strategy import WIDTH_FRACTIONS, greedy_steps_for
from gguf_prune.writing.options import DEFAULT_QUANT

if TYPE_CHECKING:
    from gguf_prune.plan import ModelShape, Plan
    from gguf_prune.planning.options import PlanOptions
    from gguf_prune.recovery.options import FinetuneOptions
    from gguf_prune.recovery.options import RecoverOptions
    from gguf_prune.scoring.options import ScoreOptions
    from gguf_prune.writing.prune import PruneResult

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = DATA_DIR / "prompts.jsonl"
DEFAULT_BUDGET = 0.2  # --budget without a speed target
SPEED_GREEDY_REACH = 0.5  # greedy-mixed with only a speed target: steps enough to remove this much


@dataclass
class RunOptions:
    model: Path | None = None  # None: the demo model
    out_dir: Path | None = None  # None: runs/<model name>
    calibration: Path | None = None  # None: the bundled calibration text
    samples: int = 16
    seq_len: int = 128
    budget: float | None = None  # fraction of block parameters to remove; None: 0.2, or none with a speed target
    strategy: str = "width-mixed"  # RUN_STRATEGIES: one-shot layers, sub-blocks and MLP widths; or greedy-mixed
    greedy_steps: int | None = None  # None: enough for the budget
    greedy_pool: int | None = 8  # lazy greedy: re-measure the 8 cheapest candidates per step
    heads: bool = False  # head KL costs ~3x the rest of scoring on CPU; `--heads` turns it on
    quant: str = DEFAULT_QUANT
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
    finetune_lr: float | None = None  # peak learning rate for fine-tuning; None: the method's default
    finetune_minutes: float | None = None  # a time budget for fine-tuning (per round); None: none
    teacher_samples: int = 0  # sequences sampled from the unpruned model added to the fine-tuning data
    heldout: float = 0.1  # fraction of the recovery sequences held out (early stopping, round figures)
    uniform: bool = False  # one shape for every kept layer: the model's own architecture (forced: Qwen3, Gemma 3)
    # closed-form repair of every cut (width and head repairs, linear patches for removed parts), scored and
    # planned with it; None: on where recovery supports the model's family (llama, mistral), else off
    repair: bool | None = None
    # speed: cut until the cost file (measured in the run, or given) predicts this tokens/s over the base's
    target_speedup: float | None = None
    speed_metric: str = "tg"
    speed_depth: int = 0
    cost: Path | None = None  # a cost.json measured before on this machine (None: a speed target measures it)

    def __post_init__(self) -> None:
        refuse("run options are invalid", run_option_problems(self))

    @property
    def params_budget(self) -> float | None:
        """The parameter target: --budget, else 0.2 without a speed target (with one, none unless given)."""
        if self.budget is not None:
            return self.budget
        return None if self.target_speedup is not None else DEFAULT_BUDGET

    def recovery_options(self, repair: bool = False) -> tuple[FinetuneOptions | None, RecoverOptions]:
        """The recovery settings of a run: the fine-tuning options (None without fine-tuning), which
        IterateOptions takes too, and RecoverOptions for a one-shot run. ``repair``: the run repairs its cuts
        (:meth:`repairs`): every narrowed part is refitted and every removed part patched."""
        from gguf_prune.pipeline.iterate import parse_recover
        from gguf_prune.recovery.options import FinetuneOptions
        from gguf_prune.recovery.options import RecoverOptions

        patch, method = parse_recover(self.recover)
        fto = (FinetuneOptions(method=method, steps=self.finetune_steps, lr=self.finetune_lr,
                               max_minutes=self.finetune_minutes, teacher_samples=self.teacher_samples)
               if method else None)
        return fto, RecoverOptions(calibration=self.calibration, seq_len=self.seq_len, samples=self.recover_samples,
                                   heldout=self.heldout, patch=patch or repair, repair=repair, finetune=method,
                                   finetune_options=fto, device=self.device)

    def repairs(self, architecture: str) -> bool:
        """Whether a run on a model of ``architecture`` repairs its cuts: ``repair``, or by default where
        recovery supports the family."""
        return self.repair if self.repair is not None else architecture == "llama"

    def recover_label(self, repair: bool) -> str:
        """What recovery a run does, in words: "repair", "repair+lora", "patch", "none", …"""
        return self.recover if not repair else ("repair" if self.recover in ("none", "patch") else
                                                "repair+" + self.recover.split("+")[-1])


@dataclass
class _Job:
    """One run once its checks have passed: the model it cuts, where its files go, its stages and their times."""

    options: RunOptions
    repair: bool  # closed-form repair of the cuts (RunOptions.repairs for this model)
    model: Path
    shape: ModelShape  # the checkpoint's
    uniform: bool  # one shape for every kept layer (the option, or forced by the model's family)
    name: str  # the model's name: the package is <name>-pruned
    out: Path
    stages: list[str]  # the names of the stages this run goes through, in order, for the "[n/total]" headers
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, in the order they ran
    cost: Path | None = None  # cost.json: given, or measured by the run's cost stage (a speed target)

    def speed_plan(self) -> dict[str, Any]:
        """The PlanOptions fields of the run's speed target (its cost file, the patches its repair adds)."""
        o = self.options
        return dict(target_speedup=o.target_speedup, cost=str(self.cost) if self.cost else None,
                    speed_metric=o.speed_metric, speed_depth=o.speed_depth, threads=o.threads,
                    patched=self.repair or "patch" in o.recover)

    @property
    def iterative(self) -> bool:
        return self.options.rounds > 1

    def start(self, stage: str, text: str) -> float:
        """Log the header of ``stage`` ("== [n/total] text"); the time it starts."""
        log.info("")
        log.info("== [%d/%d] %s", self.stages.index(stage) + 1, len(self.stages), text)
        return time.time()

    @contextmanager
    def timed(self, stage: str, text: str) -> Iterator[None]:
        """The block is ``stage``: its header first, its seconds into ``timings`` once it is done."""
        t = self.start(stage, text)
        yield
        self.timings[stage] = time.time() - t


@dataclass(frozen=True)
class _Strategy:
    """How a one-shot run scores and plans (its --strategy): each stage's options and what its header says."""

    score_options: ScoreOptions
    plan_options: PlanOptions
    scored: str  # what is scored beyond layers and sub-blocks
    planned: str  # how the planner ranks the cuts


def run(options: RunOptions | None = None) -> dict[str, Any]:
    """The main job: score → plan → [recover] → prune (base and pruned) → eval → package → summary.

    ``rounds`` > 1: score → plan → recover is repeated, each round cutting on top of the last and
    recovering from its weights (:func:`gguf_prune.pipeline.iterate.iterate`); the last round's recover
    directory is what the pruned GGUF is written from. Round figures go into summary.json.
    """
    o = options if options is not None else RunOptions()
    t_start = time.time()
    job = _prepare(o)
    recovered, rounds = None, None
    fto, ropts = o.recovery_options(job.repair)
    if fto is not None and not job.iterative:  # iterate() checks its own data before any work
        check_training_data(job.model, ropts, fto)
    if job.iterative:
        plan, recovered, rounds = _iterate(job, fto)
    else:
        strategy = _strategy(job)
        if "cost" in job.stages:
            _cost(job, strategy.plan_options)
        plan = _plan(job, strategy, _score(job, strategy))
        if o.recover != "none" or job.repair:
            recovered = _recover(job, plan, ropts)
    base, pruned = _prune(job, plan, recovered)
    report = _evaluate(job, base, pruned)
    exe = _package(job, pruned) if o.package else None
    job.timings["total"] = time.time() - t_start
    return _finish(job, plan, base, pruned, report, exe, recovered, rounds)


def _prepare(o: RunOptions) -> _Job:
    """Every check before the first stage (options, the model's family and size, every input and tool), then
    the run directory."""
    from gguf_prune.models import checkpoint
    from gguf_prune.models.demo import MODEL_NAME, ensure_demo_checkpoint

    check_run(o)
    model = Path(o.model) if o.model else ensure_demo_checkpoint()
    shape = checkpoint.check_model_dir(model)
    uniform = check_family(o, shape)
    if o.cost is not None:  # a cost file measured before: for this model, thread count and type, before any work
        from gguf_prune import costs

        costs.check(costs.load(o.cost), shape, o.threads, o.quant, source=str(o.cost))
    name = MODEL_NAME if o.model is None else model.name
    out = Path(o.out_dir) if o.out_dir else Path("runs") / name
    refuse("run inputs are invalid", check_inputs(model, out, o.calibration, o.text, o.prompts, o.device,
                                                  llama_tools(o.bench)))
    out.mkdir(parents=True, exist_ok=True)
    repair = o.repairs(shape.architecture)
    if o.repair is None and not repair:
        log.info("no closed-form repair: recovery supports llama-family models, not %s (yet)", shape.architecture)
    recovering = o.recover != "none" or repair
    measure = o.target_speedup is not None and o.cost is None
    stages = (["iterate"] if o.rounds > 1 else (["cost"] if measure else []) + ["score", "plan"]
              + (["recover"] if recovering else [])) + ["prune", "eval"] + (["package"] if o.package else []) \
        + ["summary"]
    return _Job(options=o, repair=repair, model=model, shape=shape, uniform=uniform, name=name, out=out,
                stages=stages, cost=out / "cost.json" if measure else o.cost)


def _iterate(job: _Job, fto: FinetuneOptions | None) -> tuple[Plan, Path | None, list[dict]]:
    """Score → plan → recover, round by round (files under rounds/); the final plan is saved as plan.json."""
    from gguf_prune.pipeline.iterate import IterateOptions, iterate

    o = job.options
    with job.timed("iterate", f"iterative pruning: {o.rounds} rounds to {100 * o.params_budget:.0f}% of block parameters "
                              f"(score on top of the cuts so far, extend the plan, recover: {o.recover_label(job.repair)})"):
        it = iterate(job.model, job.out / "rounds", IterateOptions(
            rounds=o.rounds, budget=o.params_budget, recover=o.recover, repair=job.repair, calibration=o.calibration,
            units=("layer", "attn", "mlp") + (("width",) if o.strategy == "width-mixed" else ()),
            samples=max(o.recover_samples, o.samples) if o.recover != "none" or job.repair else o.samples,
            score_samples=o.samples,
            seq_len=o.seq_len, heldout=o.heldout, quant=o.quant, finetune_options=fto, device=o.device))
        it.plan.save(job.out / "plan.json")
    return it.plan, it.recovered, it.rounds


def _strategy(job: _Job) -> _Strategy:
    """greedy-mixed: greedy KL per parameter over layers and sub-blocks, the plan in greedy order; width-mixed:
    one-shot KL of layers, sub-blocks and MLP widths, the plan by KL per parameter (uniform: one width for all)."""
    from gguf_prune.planning.options import UNIFORM_UNITS, UNITS, PlanOptions
    from gguf_prune.scoring.options import ScoreOptions

    o, uniform = job.options, job.uniform
    if o.strategy == "greedy-mixed":
        units = ("layer", "attn", "mlp")
        steps = o.greedy_steps or greedy_steps_for(o.params_budget or SPEED_GREEDY_REACH, job.shape.n_layer, units)
        return _Strategy(
            score_options=ScoreOptions(calibration=o.calibration, samples=o.samples, seq_len=o.seq_len,
                                       heads=o.heads, neurons=True, greedy=steps, greedy_units=units,
                                       greedy_by="kl-per-param", greedy_pool=o.greedy_pool, device=o.device),
            plan_options=PlanOptions(target_params=o.params_budget, quant=o.quant, **job.speed_plan()),
            scored=(f"greedy {steps} steps over {'/'.join(units)}, re-measuring the {o.greedy_pool or 'all'} "
                    "cheapest each step"),
            planned="cheapest first (greedy order)")
    return _Strategy(
        score_options=ScoreOptions(calibration=o.calibration, samples=o.samples, seq_len=o.seq_len, heads=o.heads,
                                   neurons=True, width=WIDTH_FRACTIONS, repair=job.repair, device=o.device),
        plan_options=PlanOptions(target_params=o.params_budget, quant=o.quant, units=UNIFORM_UNITS if uniform else UNITS,
                                 uniform=uniform, repair=job.repair, **job.speed_plan()),
        scored="MLP widths " + "/".join(f"{f:.2f}" for f in WIDTH_FRACTIONS) + (", each also repaired" if job.repair
                                                                                 else ""),
        planned=("whole layers and one MLP width for every kept layer (uniform), by KL per parameter" if uniform
                 else "layers, sub-blocks and MLP widths by KL per parameter")
        + (" (widths by their KL after repair)" if job.repair else ""))


def _score(job: _Job, strategy: _Strategy) -> Path:
    from gguf_prune.scoring.measure import score_model

    heads = "heads, " if job.options.heads else ""
    with job.timed("score", f"score {job.model} (layers, sub-blocks, {heads}neurons; {strategy.scored})"):
        return score_model(job.model, job.out / "scores.json", strategy.score_options)


def _plan(job: _Job, strategy: _Strategy, scores: Path) -> Plan:
    from gguf_prune.planning.strategies import make_plan

    o = job.options
    goal = " or ".join(([f"×{o.target_speedup:g} {o.speed_metric} predicted"] if o.target_speedup else [])
                       + ([f"{100 * o.params_budget:.0f}% of block parameters removed"] if o.params_budget else []))
    with job.timed("plan", f"plan: until {goal}, {strategy.planned}"):
        return make_plan(scores, job.out / "plan.json", strategy.plan_options)


def _cost(job: _Job, plan_options: PlanOptions) -> None:
    """cost.json: the model's parts timed in llama.cpp on this machine, in the run's type and thread count; a
    speed target no plan reaches is refused here, before scoring."""
    from gguf_prune.planning.draft import Draft
    from gguf_prune.planning.speed import goal_for
    from gguf_prune.ranges import protected_layers
    from gguf_prune.runtime.cost import CostOptions, format_table, measure_cost
    from gguf_prune.writing.prune import convert_cached

    o = job.options
    with job.timed("cost", f"cost: time the model's parts in llama.cpp ({o.quant}, {o.threads or 'default'} "
                           f"threads, depth {o.speed_depth}) for the speed target ×{o.target_speedup:g}"):
        doc = measure_cost(convert_cached(job.model), job.cost, CostOptions(threads=o.threads, quant=o.quant,
                                                                            depths=(o.speed_depth,)))
        log.info("%s", format_table(doc))
    goal_for(plan_options, job.shape).refuse_unreachable(Draft(job.shape), protected_layers(
        job.shape.n_layer, plan_options.protect_first, plan_options.protect_last), plan_options)


def _recover(job: _Job, plan: Plan, ropts: RecoverOptions) -> Path:
    from gguf_prune.recovery.recover import recover

    o = job.options
    with job.timed("recover", f"recover the cut model ({o.recover_label(job.repair)}) on {o.recover_samples} calibration "
                              "sequences"):
        rec = recover(job.model, plan, job.out / "recovered", ropts)
        log.info("%s", rec.summary())
    return rec.path


def _prune(job: _Job, plan: Plan, recovered: Path | None) -> tuple[PruneResult, PruneResult]:
    """The uncut base and the pruned model, written and quantized the same way."""
    from gguf_prune.writing.prune import prune

    o = job.options
    with job.timed("prune", f"prune: convert, cut{', write the recovered tensors' if recovered else ''} and "
                            f"quantize to {o.quant} (and the uncut base, made the same way)"):
        base = prune(job.model, None, job.out / f"base-{o.quant}.gguf", quant=o.quant, threads=o.threads)
        pruned = prune(job.model, plan, job.out / f"pruned-{o.quant}.gguf", quant=o.quant, threads=o.threads,
                       recovered=recovered)
    return base, pruned


def _evaluate(job: _Job, base: PruneResult, pruned: PruneResult) -> dict[str, Any]:
    from gguf_prune.runtime import evaluate as ev

    o = job.options
    with job.timed("eval", "eval in llama.cpp against the base: perplexity, KL, top-1, speed, size, prompts"):
        return ev.evaluate(base.path, [pruned.path], job.out / "report", text=o.text, options=ev.EvalOptions(
            chunks=o.eval_chunks, threads=o.threads, prompts=o.prompts, bench=o.bench, labels=["base", "pruned"],
            cost=job.cost))


def _package(job: _Job, pruned: PruneResult) -> Path:
    from gguf_prune.runtime.package import PackageOptions, build_package

    with job.timed("package", "package: one executable with llama-server, its web UI and the pruned model"):
        return build_package(pruned.path, job.out / f"{job.name}-pruned", PackageOptions(name=f"{job.name}-pruned"))


def _finish(job: _Job, plan: Plan, base: PruneResult, pruned: PruneResult, report: dict[str, Any],
            exe: Path | None, recovered: Path | None, rounds: list[dict] | None) -> dict[str, Any]:
    """summary.json: where every file of the run is, what it cost in quality and speed, each stage's seconds."""
    out = job.out
    summary = {"model": str(job.model), "out_dir": str(out), "plan": str(out / "plan.json"),
               "removed_fraction": plan.removed_fraction(), "base": base.to_dict(), "pruned": pruned.to_dict(),
               "report": str(out / "report" / "report.md"), "executable": str(exe) if exe else None,
               "timings_s": {k: round(v, 1) for k, v in job.timings.items()},
               "quality": report["models"][1].get("quality"), "speed": report["models"][1].get("speed"),
               "prompts": {e["name"]: (e.get("prompts") or {}).get("passed") for e in report["models"]},
               "recover": job.options.recover_label(job.repair), "recovered": str(recovered) if recovered else None,
               "rounds": _round_rows(rounds), "cost": str(job.cost) if job.cost else None,
               "predicted_speedup": plan.predicted.get("speedup")}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")
    job.start("summary", "summary")
    return summary


def _round_rows(rounds: list[dict] | None) -> list[dict] | None:
    """The figures of each round that summary.json keeps: budget aimed at and reached, units cut, held-out KL."""
    if rounds is None:
        return None
    keep = ("round", "target", "removed_fraction", "cut", "heldout_kl", "heldout_kl_stages", "kl_in", "recovered",
            "seconds")
    return [{k: r.get(k) for k in keep} for r in rounds]


def format_summary(s: dict[str, Any]) -> str:
    """summary.json for the terminal: one line per figure."""
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
        pred = (f"; predicted ×{sp['pp_ratio_predicted']:.2f} / ×{sp['tg_ratio_predicted']:.2f} from {s['cost']}"
                if sp.get("tg_ratio_predicted") else "")
        lines.append(f"speed        prompt ×{sp.get('pp_ratio', float('nan')):.2f}, generation ×{sp['tg_ratio']:.2f} "
                     f"(llama-bench, against the base in the same run{pred})")
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
    lines.append("time         " + ", ".join(f"{k} {v:.0f}s" for k, v in s["timings_s"].items()))
    return "\n".join(lines)
