"""`sweep`, the quality-vs-size curve: a pruned GGUF per (strategy, budget), all evaluated against one base.

    scores*.json → plans/<strategy>-<budget>.json → <strategy>-<budget>-<quant>.gguf → report/
    → sweep.json, sweep.md, sweep.png

Scoring is the slow part: a scores file an earlier sweep left in the same directory is reused when it was
measured with the same calibration settings, and so are its GGUFs (the same plan) and recover directories (the
same cut, calibration sequences and repair), so a sweep can be re-run with more budgets, strategies or speed.

With llama-bench on (the default), the sweep also measures the model's per-token costs in llama.cpp
(``cost.json``, :mod:`gguf_prune.runtime.cost`) and reports, for every point, the measured generation speed-up
beside the one the cost model predicts from its plan; sweep.png gets a second panel, quality against speed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gguf_prune.atomic import save_figure_atomic, write_text_atomic
from gguf_prune.pipeline.checks import check_inputs, llama_tools, refuse, sweep_option_problems
from gguf_prune.pipeline.strategy import STRATEGIES, WIDTH_FRACTIONS, greedy_steps_for, strategy_plan

log = logging.getLogger(__name__)


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
    bench_reps: int = 5  # llama-bench repetitions of each model (speed-ups within a few % need several)
    out_dir: Path = Path("sweep")
    device: str = "auto"
    protect_first: int = 2
    protect_last: int = 2
    repair: bool = False  # a second row per point: the cut repaired in closed form (planned by repaired width KL)
    recover_samples: int = 64  # calibration sequences the repairs are fitted on (10% held out)
    cost: Path | None = None  # cost.json measured before; None: measured into the sweep directory (with bench)

    def __post_init__(self) -> None:
        refuse("sweep options are invalid", sweep_option_problems(self))


@dataclass(frozen=True)
class _SweepScores:
    """The three scores files of a sweep directory (each measured only when a chosen strategy plans from it)."""

    one: Path  # one-shot: Block Influence, KL of layers and sub-blocks, and widths for the width strategies
    greedy_layers: Path  # greedy KL over whole layers
    greedy_mixed: Path  # greedy KL per parameter over layers and sub-blocks

    @classmethod
    def in_dir(cls, out: Path) -> _SweepScores:
        return cls(out / "scores.json", out / "scores-greedy-layers.json", out / "scores-greedy-mixed.json")


def sweep(hf_dir: Path, options: SweepOptions | None = None) -> dict[str, Any]:
    """Build a pruned GGUF per (strategy, budget), evaluate all against the base in one run, draw the curve."""
    from gguf_prune.models import checkpoint

    o = options if options is not None else SweepOptions()
    hf_dir = Path(hf_dir)
    refuse("sweep options are invalid", sweep_option_problems(o))
    shape = checkpoint.check_model_dir(hf_dir)
    out = Path(o.out_dir)
    refuse("sweep inputs are invalid", check_inputs(hf_dir, out, o.calibration, o.text, None, o.device,
                                                    llama_tools(o.bench)))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    scores = _score(hf_dir, out, o, shape.n_layer)
    base, runs = _build(hf_dir, out, o, shape, scores)
    cost = _cost(hf_dir, out, o, shape) if o.bench else None
    report = _evaluate(out, o, base, runs, cost)
    return _finish(hf_dir, out, o, base, runs, report, t0, cost)


def _score(hf_dir: Path, out: Path, o: SweepOptions, n_layer: int) -> _SweepScores:
    """The scores files the chosen strategies plan from, unless an earlier sweep left them (_reusable)."""
    from gguf_prune.scoring.options import ScoreOptions
    from gguf_prune.scoring.measure import score_model

    scores = _SweepScores.in_dir(out)
    common = dict(calibration=o.calibration, samples=o.samples, seq_len=o.seq_len, device=o.device,
                  protect_first=o.protect_first, protect_last=o.protect_last)
    need_width = any(s in o.strategies for s in ("width", "width-mixed"))
    need_layers = need_width or any(s in o.strategies for s in ("bi-layers", "kl-layers", "oneshot-mixed"))
    need_gl = "greedy-layers" in o.strategies
    need_gm = "greedy-mixed" in o.strategies
    max_b = max(o.budgets)  # greedy orders long enough for the largest budget serve every smaller one
    log.info("== sweep: scoring %s", hf_dir)
    if need_layers and not _reusable(scores.one, common, need_width, o.repair and need_width):
        score_model(hf_dir, scores.one, ScoreOptions(**common, neurons=need_width, repair=o.repair and need_width,
                                                     width=WIDTH_FRACTIONS if need_width else ()))
    if need_gl and not _reusable(scores.greedy_layers, common):
        score_model(hf_dir, scores.greedy_layers, ScoreOptions(
            **common, sublayers=False, neurons=False, plots=False,
            greedy=greedy_steps_for(max_b, n_layer, ("layer",))))
    units = ("layer", "attn", "mlp")
    if need_gm and not _reusable(scores.greedy_mixed, common):
        score_model(hf_dir, scores.greedy_mixed, ScoreOptions(
            **common, sublayers=False, neurons=False, plots=False, greedy=greedy_steps_for(max_b, n_layer, units),
            greedy_units=units, greedy_by="kl-per-param", greedy_pool=o.greedy_pool))
    return scores


def _reusable(path: Path, common: dict, width: bool = False, repaired: bool = False) -> bool:
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
    ok = same and (not width or bool(d.get("width"))) and (not repaired or bool((d.get("width") or {}).get("repair")))
    if ok:
        log.info("reusing %s (same calibration settings)", path)
    else:
        log.info("%s was measured with other settings: scoring again", path)
    return ok


def _build(hf_dir: Path, out: Path, o: SweepOptions, shape,
           scores: _SweepScores) -> tuple[Path, list[dict[str, Any]]]:
    """The uncut base and, budget by budget, each strategy's plan and GGUF; a row per pruned model."""
    from gguf_prune.writing.prune import prune

    log.info("== sweep: building %d pruned models", len(o.budgets) * len(o.strategies))
    n_layer = shape.n_layer
    base = out / f"base-{o.quant}.gguf"
    if not _built(base, None, shape):
        prune(hf_dir, None, base, quant=o.quant, threads=o.threads)
    runs = []
    for b in o.budgets:
        for s in o.strategies:
            tag = f"{s}-{int(round(100 * b))}"
            plan = strategy_plan(s, b, scores.one, scores.greedy_layers, scores.greedy_mixed, n_layer,
                                 out / "plans" / f"{tag}.json", (o.protect_first, o.protect_last))
            path = out / f"{tag}-{o.quant}.gguf"
            arch = _built(path, plan.digest()) or prune(hf_dir, plan, path, quant=o.quant,
                                                        threads=o.threads).architecture
            runs.append({"label": tag, "strategy": s, "budget": b, "removed_fraction": plan.removed_fraction(),
                         "architecture": arch, "path": str(path), "repaired": False})
            if o.repair:
                runs.append(_repaired_run(hf_dir, out, o, n_layer, scores, s, b, tag))
    return base, runs


def _repaired_run(hf_dir: Path, out: Path, o: SweepOptions, n_layer: int, scores: _SweepScores, s: str,
                  b: float, tag: str) -> dict[str, Any]:
    """The strategy's plan with widths ranked by their KL after repair, repaired in closed form (narrowed parts
    refitted, removed parts patched) and written from the recover directory."""
    from gguf_prune.recovery.options import RecoverOptions
    from gguf_prune.recovery.recover import recover
    from gguf_prune.writing.prune import prune

    tag_r = f"{tag}+repair"
    plan = strategy_plan(s, b, scores.one, scores.greedy_layers, scores.greedy_mixed, n_layer,
                         out / "plans" / f"{tag_r}.json", (o.protect_first, o.protect_last), repair=True)
    rec = _recovered_before(out / "recovered" / tag_r, plan, o) or recover(
        hf_dir, plan, out / "recovered" / tag_r, RecoverOptions(
            calibration=o.calibration, seq_len=o.seq_len, samples=o.recover_samples, patch=True, repair=True,
            device=o.device))
    path = out / f"{tag_r}-{o.quant}.gguf"
    arch = _built(path, rec.plan.digest()) or prune(hf_dir, None, path, quant=o.quant, threads=o.threads,
                                                    recovered=rec.path).architecture
    return {"label": tag_r, "strategy": s, "budget": b, "removed_fraction": rec.plan.removed_fraction(),
            "architecture": arch, "path": str(path), "repaired": True,
            "heldout_kl_pytorch": rec.manifest.get("heldout_kl")}


def _built(path: Path, digest: str | None, shape=None) -> str | None:
    """The architecture of a GGUF an earlier sweep into this directory wrote from the same plan (None: build it);
    ``digest`` None: the uncut base, of ``shape``."""
    from gguf_prune.writing.gguf_names import PLAN_DIGEST_KEY
    from gguf_prune.writing.gguf_read import GGUFFormatError, read_gguf
    from gguf_prune.writing.rewrite import RewriteError, shape_from_gguf

    if not path.is_file():
        return None
    try:
        g = read_gguf(path)
    except (GGUFFormatError, OSError):
        return None
    try:
        same = g.get(PLAN_DIGEST_KEY) == digest and (digest is not None or shape_from_gguf(g) == shape)
    except RewriteError:
        same = False
    if not same:
        return None
    log.info("reusing %s (written from the same plan)", path.name)
    return g.architecture


def _recovered_before(path: Path, plan, o: SweepOptions):
    """A recover directory an earlier point or sweep left for the same cut, calibration sequences and repair
    (``path`` first, then any other under recovered/: two strategies often make the same plan), or None."""
    from gguf_prune.recovered import RecoverError, open_recovered

    for d in [path] + sorted(p for p in path.parent.glob("*") if p != path):
        try:
            manifest = json.loads((d / "recover.json").read_text())
            cal = manifest["calibration"]
            same = (manifest.get("cut_digest") == plan.digest() and cal.get("n_seq") == o.recover_samples
                    and cal.get("seq_len") == o.seq_len and manifest.get("patch", {}).get("repairs") is not None)
            if not same:
                continue
            rec = open_recovered(d, plan=plan)
        except (OSError, ValueError, KeyError, AttributeError, RecoverError):
            continue
        log.info("reusing %s (the same cut, calibration and repair)", d)
        return rec
    return None


def _cost(hf_dir: Path, out: Path, o: SweepOptions, shape) -> Path | None:
    """cost.json for the speed predictions: given, or one this directory holds for this model, threads and type,
    or measured now."""
    from gguf_prune import costs
    from gguf_prune.runtime.cost import CostOptions, measure_cost
    from gguf_prune.writing.prune import convert_cached

    path = Path(o.cost) if o.cost else out / "cost.json"
    if path.exists():
        try:
            costs.check(costs.load(path), shape, o.threads, o.quant, source=str(path))
            return path
        except costs.CostError as e:
            if o.cost:
                raise
            log.info("measuring the costs again: %s", e)
    log.info("== sweep: timing the model's parts in llama.cpp for the speed predictions")
    measure_cost(convert_cached(hf_dir), path, CostOptions(threads=o.threads, quant=o.quant))
    return path


def _evaluate(out: Path, o: SweepOptions, base: Path, runs: list[dict[str, Any]],
              cost: Path | None = None) -> dict[str, Any]:
    """Every pruned model against the base in one evaluation; each run's row gets its figures (or error)."""
    from gguf_prune.runtime import evaluate as ev

    log.info("== sweep: evaluating %d models against the base", len(runs))
    report = ev.evaluate(base, [Path(m["path"]) for m in runs], out / "report", text=o.text,
                         options=ev.EvalOptions(chunks=o.eval_chunks, threads=o.threads, bench=o.bench,
                                                bench_reps=o.bench_reps, labels=["base"] + [m["label"] for m in runs],
                                                cost=cost))
    by_label = {e["name"]: e for e in report["models"]}
    for m in runs:
        e = by_label.get(m["label"], {})
        m["quality"], m["speed"], m["error"] = e.get("quality"), e.get("speed"), e.get("error")
        m["size_ratio"] = e.get("size_ratio")
    return report


def _best(runs: list[dict[str, Any]], budgets: tuple[float, ...]) -> dict[str, str]:
    """Per budget (as a string: a JSON key), the label of the run with the lowest mean KL."""
    best = {}
    for b in budgets:
        ok = [m for m in runs if m["budget"] == b and m["quality"]]
        if ok:
            best[str(b)] = min(ok, key=lambda m: m["quality"]["kl_mean"])["label"]
    return best


def _finish(hf_dir: Path, out: Path, o: SweepOptions, base: Path, runs: list[dict[str, Any]],
            report: dict[str, Any], t0: float, cost: Path | None = None) -> dict[str, Any]:
    """sweep.json, sweep.md and sweep.png."""
    base_entry = {e["name"]: e for e in report["models"]}["base"]
    result = {"schema": "gguf-prune/sweep", "version": 1, "model": str(hf_dir), "quant": o.quant,
              "budgets": list(o.budgets), "strategies": list(o.strategies), "runs": runs,
              "best": _best(runs, o.budgets),
              "base": {"path": str(base), "quality": base_entry.get("quality"),
                       "speed": base_entry.get("speed")},
              "text": report["text"], "cost": str(cost) if cost else None, "seconds": round(time.time() - t0, 1)}
    write_text_atomic(out / "sweep.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_text_atomic(out / "sweep.md", sweep_markdown(result))
    try:
        plot_sweep(result, out / "sweep.png")
    except Exception as e:  # the numbers matter more than the picture
        log.warning("sweep plot failed: %s", e)
    return result


def sweep_markdown(r: dict[str, Any]) -> str:
    """sweep.md: a row per (budget, strategy), the best strategy of each budget in bold; measured and predicted
    generation speed-ups when llama-bench ran."""
    lines = ["| budget | strategy | removed | size× | PPL× | KL mean | KL median | KL p99 | top-1 | tg× | tg× pred |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in sorted(r["runs"], key=lambda m: (m["budget"], m["strategy"], m.get("repaired", False))):
        q, sp = m.get("quality") or {}, m.get("speed") or {}
        star = " **best**" if r["best"].get(str(m["budget"])) == m["label"] else ""
        name = m["strategy"] + (" + repair" if m.get("repaired") else "")
        if m.get("error"):
            lines.append(f"| {m['budget']:.0%} | {name} | error: {m['error'].splitlines()[0][:60]} "
                         "| | | | | | | | |")
            continue
        lines.append(
            f"| {m['budget']:.0%} | {name}{star} | {100 * m['removed_fraction']:.1f}% | "
            f"{(m.get('size_ratio') or 0):.3f} | {q.get('ppl_ratio', float('nan')):.3f} | "
            f"{q.get('kl_mean', float('nan')):.4f} | {q.get('kl_median', float('nan')):.4f} | "
            f"{q.get('kl_p99', float('nan')):.3f} | {100 * q.get('top1_agreement', 0):.1f}% | "
            f"{_ratio(sp.get('tg_ratio'))} | {_ratio(sp.get('tg_ratio_predicted'))} |")
    t = r["text"]
    lines.append("")
    lines.append(f"{r['quant']}, held-out text `{Path(t['path']).name}` ({t['tokens']} tokens, ctx {t['ctx']}, "
                 f"{t.get('chunks')} chunks); KL against the unpruned {r['quant']} model in llama.cpp.")
    errs = prediction_errors(r)
    if errs:
        lines.append(f"tg×: llama-bench against the base in the same run; tg× pred: the cost model "
                     f"({r.get('cost')}); prediction error median {100 * float(np.median(errs)):.1f}%, "
                     f"max {100 * max(errs):.1f}% over {len(errs)} models.")
    return "\n".join(lines) + "\n"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def prediction_errors(r: dict[str, Any]) -> list[float]:
    """|predicted / measured − 1| of the generation speed-up, for every run that has both."""
    out = []
    for m in r["runs"]:
        sp = m.get("speed") or {}
        if sp.get("tg_ratio") and sp.get("tg_ratio_predicted"):
            out.append(abs(sp["tg_ratio_predicted"] / sp["tg_ratio"] - 1))
    return out


def plot_sweep(r: dict[str, Any], path: Path) -> None:
    """sweep.png: mean KL against the fraction removed, a line per strategy, the best per budget circled; and,
    when speeds were measured, mean KL against the measured generation speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = any((m.get("speed") or {}).get("tg_ratio") for m in r["runs"])
    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(13 if speed else 7, 4.5), squeeze=False)
    _curves(axes[0][0], r, lambda m: 100 * m["removed_fraction"])
    for b, label in r["best"].items():
        m = next(m for m in r["runs"] if m["label"] == label)
        axes[0][0].scatter([100 * m["removed_fraction"]], [m["quality"]["kl_mean"]], s=160, facecolors="none",
                           edgecolors="black", zorder=5)
    axes[0][0].set_xlabel("transformer-block parameters removed (%)")
    axes[0][0].set_title("quality vs size (circled: best strategy per budget)")
    if speed:
        _curves(axes[0][1], r, lambda m: (m.get("speed") or {}).get("tg_ratio"))
        axes[0][1].set_xlabel("measured generation speed-up (× the base, llama-bench)")
        axes[0][1].set_title("quality vs speed")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)  # a temporary file renamed into place: never a partial PNG


def _curves(ax, r: dict[str, Any], x_of) -> None:
    """Mean KL against ``x_of(run)``, a line per strategy (dashed: repaired)."""
    for k, s in enumerate(r["strategies"]):
        for repaired in (False, True):
            pts = sorted((x_of(m), m["quality"]["kl_mean"]) for m in r["runs"]
                         if m["strategy"] == s and m.get("quality") and bool(m.get("repaired")) == repaired
                         and x_of(m) is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=f"C{k % 10}",
                        linestyle="--" if repaired else "-", label=s + (" + repair" if repaired else ""))
    ax.set_ylabel("mean KL to the unpruned model (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
