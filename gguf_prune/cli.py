"""The command line: a thin click layer, one library call per command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="gguf-prune")
def main(verbose: int) -> None:
    """Measure what each part of a Hugging Face causal LM does, cut the parts that
    matter least, and write a GGUF that stock llama.cpp runs.

    Stages: score → plan → prune (or rewrite) → eval → package; `run` does them all.
    """
    _setup_logging(verbose)


@main.command()
def doctor() -> None:
    """Report the pinned llama.cpp, bindings, tools, torch and the demo model."""
    from .doctor import diagnose

    report = diagnose()
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        click.echo(f"{'ok' if c.ok else 'BAD':3}  {c.name:<{width}}  {c.detail}")
    if not report.ok:
        names = ", ".join(c.name for c in report.problems())
        click.echo(f"\nerror: not ready: {names}. Run scripts/setup.sh from the gguf-prune checkout.", err=True)
        sys.exit(1)


@main.command("plan")
@click.argument("scores", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="plan.json to write.")
@click.option("--explain", "explain_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Print what an existing plan.json removes and why, then exit.")
@click.option("--drop-layers", type=int, default=0, show_default=True, help="Whole layers to remove.")
@click.option("--metric", type=click.Choice(["kl", "bi", "greedy"]), default="kl", show_default=True,
              help="Layer ranking: causal ablation KL, Block Influence, or the greedy run's order.")
@click.option("--drop-attn", type=int, default=0, show_default=True, help="Attention sub-blocks to remove.")
@click.option("--drop-mlp", type=int, default=0, show_default=True, help="MLP sub-blocks to remove.")
@click.option("--prune-heads", type=float, default=0.0, show_default=True,
              help="Fraction of query heads to remove (global ranking, GQA-consistent per layer).")
@click.option("--head-metric", type=click.Choice(["kl", "norm", "taylor"]), default="kl", show_default=True)
@click.option("--min-heads", type=int, default=1, show_default=True, help="Query heads every layer keeps.")
@click.option("--prune-neurons", is_flag=True, help="Remove MLP neurons (with --neuron-threshold or -fraction).")
@click.option("--neuron-metric", type=click.Choice(["freq", "mean_abs", "wxa"]), default="freq", show_default=True)
@click.option("--neuron-threshold", type=float, default=None,
              help="Remove neurons whose statistic is below this (e.g. 0.005 activation frequency).")
@click.option("--neuron-fraction", type=float, default=None, help="Remove this fraction of neurons per layer.")
@click.option("--align", type=int, default=256, show_default=True,
              help="Kept FFN width is rounded to a multiple of this (256 for k-quants, at least 32).")
@click.option("--protect-first", type=int, default=2, show_default=True)
@click.option("--protect-last", type=int, default=2, show_default=True)
@click.option("--target-params", type=float, default=None,
              help="Budget: fraction of transformer-block parameters to remove, cheapest units first.")
@click.option("--target-size", type=int, default=None, help="Budget: predicted quantized file size in bytes.")
@click.option("--units", default="layer,attn,mlp", show_default=True,
              help="Unit kinds the budget may take (without a greedy run).")
@click.option("--quant", default="Q4_K_M", show_default=True, help="Target type, for predicted sizes.")
def plan_cmd(scores, output, explain_path, units, **kw) -> None:
    """Turn SCORES (scores.json) into plan.json, or --explain an existing plan."""
    from .plan import Plan, PlanError
    from .planner import PlanOptions, explain, make_plan

    try:
        if explain_path:
            click.echo(explain(Plan.load(explain_path)))
            return
        if scores is None or output is None:
            raise click.UsageError("give SCORES and -o plan.json (or --explain plan.json)")
        opts = PlanOptions(units=tuple(u.strip() for u in units.split(",") if u.strip()), **kw)
        plan = make_plan(scores, output, opts)
    except PlanError as e:
        raise click.ClickException(str(e)) from None
    click.echo(explain(plan))
    click.echo(f"\nwrote {output}")


if __name__ == "__main__":
    main()
