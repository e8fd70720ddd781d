"""The command line: a thin click layer, one library call per command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gguf_prune.calibration import KINDS as CALIBRATION_KINDS
from gguf_prune.cli_params import (COUNT, FRACTION, NONNEG, OPEN_FRACTION, PORT, POSITIVE, SEED, SEQ_LEN, Align, Depths,
                                   Finite, Fractions, Layers, Names, fields_of, option, speed_options,
                                   Commands, setup_logging)
# The options of every stage, with their defaults and choices. These modules import no torch (tests/test_layout.py
# checks), so `gguf-prune --help` stays fast.
from gguf_prune.pipeline.job import RunOptions
from gguf_prune.pipeline.strategy import RECOVER_MODES, RUN_STRATEGIES, STRATEGIES
from gguf_prune.pipeline.sweep import SweepOptions
from gguf_prune.planning.options import HEAD_METRICS, METRICS, NEURON_METRICS, UNITS, PlanOptions
from gguf_prune.recovery.options import LOSSES, METHODS, PATCH_FITS, PRECISIONS, FinetuneOptions, RecoverOptions
from gguf_prune.runtime.cost import CostOptions
from gguf_prune.runtime.evaluate import EvalOptions
from gguf_prune.runtime.package import PackageOptions
from gguf_prune.scoring.options import DTYPES, GREEDY_BY, GREEDY_UNITS, ScoreOptions
from gguf_prune.writing.options import DEFAULT_OUTTYPE, DEFAULT_QUANT, OUTTYPES


# ------------------------------------------------------------------ options defined once

# Every stage's options dataclass (imported above): its fields' defaults are the flags' defaults.

OPTION_CLASSES = {"plan": (PlanOptions,), "eval": (EvalOptions,), "cost": (CostOptions,), "recover": (RecoverOptions, FinetuneOptions),
                  "score": (ScoreOptions,), "package": (PackageOptions,), "run": (RunOptions,),
                  "sweep": (SweepOptions,)}
# Flags whose CLI default stands for the dataclass's on purpose: --finetune none is RecoverOptions.finetune None,
# run --prompts shows no path (the bundled prompts are RunOptions.prompts), plan --units () is "the planner picks".
CLI_ONLY_DEFAULTS = {"finetune", "prompts", "units"}


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="gguf-prune")
def main(verbose: int) -> None:
    """Measure what each part of a Hugging Face causal LM does, cut the parts that
    matter least, and write a GGUF that stock llama.cpp runs.

    Stages: score → plan → prune (or rewrite) → eval → package; `run` does them all.
    """
    setup_logging(verbose)


@main.command()
def doctor() -> None:
    """Report the pinned llama.cpp, bindings, tools, torch and the demo model."""
    from gguf_prune.runtime.doctor import diagnose

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
@option(PlanOptions, "--drop-layers", type=COUNT, help="Whole layers to remove (at most the unprotected ones).")
@option(PlanOptions, "--metric", type=click.Choice(METRICS),
        help="Layer ranking: causal ablation KL, Block Influence, or the greedy run's order.")
@option(PlanOptions, "--drop-attn", type=COUNT, help="Attention sub-blocks to remove.")
@option(PlanOptions, "--drop-mlp", type=COUNT, help="MLP sub-blocks to remove.")
@option(PlanOptions, "--prune-heads", type=FRACTION,
        help="Fraction of query heads to remove (global ranking, GQA-consistent per layer).")
@option(PlanOptions, "--head-metric", type=click.Choice(HEAD_METRICS))
@option(PlanOptions, "--min-heads", type=POSITIVE, help="Query heads every layer keeps.")
@option(PlanOptions, "--prune-neurons", is_flag=True, help="Remove MLP neurons (with --neuron-threshold or -fraction).")
@option(PlanOptions, "--neuron-metric", type=click.Choice(NEURON_METRICS))
@option(PlanOptions, "--neuron-threshold", type=NONNEG,
        help="Remove neurons whose statistic is below this (e.g. 0.005 activation frequency).")
@option(PlanOptions, "--neuron-fraction", type=FRACTION, help="Remove this fraction of neurons per layer.")
@option(PlanOptions, "--align", type=Align(),
        help="Kept FFN width is rounded to a multiple of this: a multiple of 32 (256 for k-quants), "
             "or 1 for none (F16/BF16/F32 only).")
@option(PlanOptions, "--protect-first", type=COUNT)
@option(PlanOptions, "--protect-last", type=COUNT)
@option(PlanOptions, "--target-params", type=OPEN_FRACTION,
        help="Budget: fraction of transformer-block parameters to remove, cheapest units first.")
@option(PlanOptions, "--target-size", type=POSITIVE, help="Budget: predicted quantized file size in bytes.")
@click.option("--units", type=Names(UNITS, "layer,width"), default=None,
              help="Unit kinds the budget may take (without a greedy run): layer, attn, mlp, width "
                   "(MLP neurons, priced by `score --width`).  [default: layer,attn,mlp; uniform: layer,width]")
@option(PlanOptions, "--uniform", is_flag=True,
        help="One shape for every kept layer (one FFN width, one head count), so the file stays in the "
             "model's own architecture that every llama.cpp runtime loads. Always on for Qwen3 and Gemma 3.")
@option(PlanOptions, "--repair/--no-repair",
        help="Rank width cuts by their KL after repair where the scores have it (`score --width … --repair`).")
@option(PlanOptions, "--quant", help="Target type, for predicted sizes (and the cost file's type).")
@speed_options(PlanOptions)
@option(PlanOptions, "--cost", type=click.Path(dir_okay=False),
        help="cost.json from `gguf-prune cost` (this model, this machine); the plan records its predicted speed-up.")
@option(PlanOptions, "--threads", type=POSITIVE, help="Thread count the speed is for (checked against the cost file).")
@option(PlanOptions, "--patched", is_flag=True,
        help="Price the linear patches that `recover --repair/--patch` puts where layers and attentions go.")
def plan_cmd(scores, output, explain_path, units, **kw) -> None:
    """Turn SCORES (scores.json) into plan.json, or --explain an existing plan."""
    from gguf_prune.plan import Plan, PlanError
    from gguf_prune.planning.explain import explain
    from gguf_prune.planning.strategies import make_plan

    try:
        if explain_path:
            click.echo(explain(Plan.load(explain_path)))
            return
        if scores is None or output is None:
            raise click.UsageError("give SCORES and -o plan.json (or --explain plan.json)")
        opts = PlanOptions(units=units or (), **kw)
        plan = make_plan(scores, output, opts)
    except PlanError as e:
        raise click.ClickException(str(e)) from None
    click.echo(explain(plan))
    click.echo(f"\nwrote {output}")


@main.command("eval")
@click.argument("base", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Held-out text (default: bundled Python stdlib docstrings, never the calibration text).")
@option(EvalOptions, "--prompts", type=click.Path(dir_okay=False, path_type=Path),
        help="JSONL task prompts with checks (contains, not_contains, regex, min_len, max_len).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("report"),
              show_default=True, help="Report directory.")
@option(EvalOptions, "--ctx", type=click.IntRange(min=3),
        help="Context size for perplexity/KL (each window scores its second half, so at least 3).")
@option(EvalOptions, "--chunks", type=POSITIVE, help="Limit the number of chunks (default: all).")
@option(EvalOptions, "--threads", type=POSITIVE, help="Threads for llama.cpp (default: its own choice).")
@click.option("--no-bench", is_flag=True, help="Skip llama-bench.")
@option(EvalOptions, "--bench-reps", type=POSITIVE)
@option(EvalOptions, "--label", "labels", multiple=True, help="Names for BASE and MODELS in order.")
@option(EvalOptions, "--cost", type=click.Path(dir_okay=False, path_type=Path),
        help="cost.json (`gguf-prune cost`): each model's predicted speed-up beside the measured one.")
def eval_cmd(base, models, text, prompts, output, ctx, chunks, threads, no_bench, bench_reps, labels, cost) -> None:
    """Evaluate pruned GGUFs against BASE in llama.cpp: PPL, KL, top-1, speed, size, prompts."""
    from gguf_prune.runtime.evaluate import EvalError, evaluate
    from gguf_prune.runtime.llamacpp import LlamaCppError
    from gguf_prune.runtime.report import format_table, table_rows

    opts = EvalOptions(ctx=ctx, chunks=chunks, threads=threads, bench=not no_bench, bench_reps=bench_reps,
                       prompts=prompts, labels=list(labels), cost=cost)
    try:
        result = evaluate(base, list(models), output, text=text, options=opts)
    except (EvalError, LlamaCppError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_table(table_rows(result)))
    click.echo(f"\nreport: {output / 'report.md'}, {output / 'report.json'}")
    if any("error" in e for e in result["models"]):
        sys.exit(1)


@main.command("cost")
@click.argument("base", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("cost.json"),
              show_default=True, help="cost.json to write.")
@option(CostOptions, "--threads", type=POSITIVE, help="Threads for llama.cpp (default: its own choice).")
@option(CostOptions, "--depths", type=Depths(), help="Context depths (tokens in the KV cache) to time at.")
@option(CostOptions, "--quant", help="Type the variants are written in: the type the pruned models will have "
                                      "(none: the F16 cut).")
@option(CostOptions, "--reps", type=POSITIVE, help="llama-bench repetitions of each test.")
@option(CostOptions, "--n-gen", type=POSITIVE, help="Tokens generated per tg test.")
@option(CostOptions, "--n-prompt", type=POSITIVE, help="Prompt tokens per pp test.")
def cost_cmd(base, output, **kw) -> None:
    """Measure what each part of BASE (an F16/BF16/F32 GGUF) costs per token in llama.cpp here → cost.json."""
    from gguf_prune.runtime.cost import format_table, measure_cost

    doc = measure_cost(base, output, CostOptions(**kw))
    click.echo(format_table(doc))
    click.echo(f"\nwrote {output} ({doc['threads']} threads, {doc['quant']}, {doc['seconds']:.0f} s)")


@main.command("rewrite")
@click.argument("base", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="plan.json to apply.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Pruned GGUF to write (never the input).")
def rewrite_cmd(base, plan_path, output) -> None:
    """Cut BASE (an F16/BF16/F32 GGUF of a llama-family model) as plan.json says."""
    from gguf_prune.plan import Plan, PlanError
    from gguf_prune.writing.rewrite import RewriteError, rewrite

    try:
        r = rewrite(base, Plan.load(plan_path), output)
    except (PlanError, RewriteError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {r.path}: {r.architecture}, {r.n_layer} layers, {r.n_tensors} tensors, "
               f"{r.bytes_in / 1e6:.1f} MB -> {r.bytes_out / 1e6:.1f} MB in {r.seconds:.1f} s")


@main.command("prune")
@click.argument("hf_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="plan.json to apply (without it: the uncut BASE, made the same way, to compare against).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="GGUF to write; its plan is written next to it as <output>.plan.json.")
@click.option("--quant", default=DEFAULT_QUANT, show_default=True,
              help="llama-quantize type (Q4_K_M, Q5_K_M, Q8_0, F16, ...) or 'none'.")
@click.option("--outtype", type=click.Choice(OUTTYPES), default=DEFAULT_OUTTYPE, show_default=True,
              help="Type of the converted checkpoint that is cut before quantizing.")
@click.option("--imatrix-text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration text: compute an importance matrix (llama-imatrix) for quantization.")
@click.option("--recovered", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory from `gguf-prune recover`: write its patches and fine-tuned weights "
                   "(its plan.json is used; a --plan given too must make the same cut).")
@click.option("--verify-cache", is_flag=True,
              help="Hash every byte of the weights to pick the cached conversion (a full read), instead of "
                   "trusting their size, time stamps and inode.")
def prune_cmd(hf_dir, plan_path, output, quant, outtype, imatrix_text, recovered, verify_cache) -> None:
    """Convert HF_DIR, cut it as plan.json says, quantize, and check llama.cpp loads it."""
    from gguf_prune.models.checkpoint import ModelDirError
    from gguf_prune.runtime.llamacpp import LlamaCppError
    from gguf_prune.plan import PlanError
    from gguf_prune.writing.prune import PruneError, prune
    from gguf_prune.writing.quantize import QuantizeError
    from gguf_prune.recovered import RecoverError
    from gguf_prune.writing.rewrite import RewriteError

    try:
        r = prune(hf_dir, plan_path, output, quant=quant, outtype=outtype, imatrix_text=imatrix_text,
                  recovered=recovered, verify_cache=verify_cache)
    except (ModelDirError, PlanError, PruneError, QuantizeError, RewriteError, LlamaCppError, RecoverError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {r.path}: {r.architecture}, {len(r.dims)} layers, {r.quant}, {r.bytes_out / 1e6:.1f} MB "
               f"(base {r.bytes_base / 1e6:.1f} MB, cut {r.bytes_pruned / 1e6:.1f} MB)")
    if r.fallbacks:
        click.echo(f"{r.n_fallback} tensor(s) fell back to another type: "
                   + ", ".join(f"{f['tensor']} {f['wanted']}->{f['used']}" for f in r.fallbacks))
    click.echo(f"plan: {r.plan_path}")


@main.command("recover")
@click.argument("hf_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="plan.json whose cut to recover from.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Recover directory to write (plan.json, recovered.safetensors, recover.json).")
@option(RecoverOptions, "--calibration", type=click.Path(dir_okay=False, path_type=Path),
        help="Text file, or .jsonl of chats: patch fit and training data (default: bundled English text).")
@option(RecoverOptions, "--calibration-kind", type=click.Choice(CALIBRATION_KINDS))
@option(RecoverOptions, "--seq-len", type=SEQ_LEN, help="Tokens per sequence.")
@option(RecoverOptions, "--samples", type=POSITIVE, help="Sequences (patch fit and training).")
@option(RecoverOptions, "--heldout", type=FRACTION,
        help="Fraction of sequences held out: ridge choice, early stopping, reported KL.")
@option(RecoverOptions, "--seed", type=SEED)
@option(RecoverOptions, "--patch", is_flag=True,
        help="Fit a linear patch (n_embd² parameters) for every run of removed layers and removed attention.")
@option(RecoverOptions, "--repair", is_flag=True,
        help="Refit the output projection (and a bias) of every narrowed attention and MLP, in closed form.")
@option(RecoverOptions, "--patch-fit", type=click.Choice(PATCH_FITS),
        help="pruned: fit on the pruned model's own states (sequential); full: on the full model's.")
@click.option("--finetune", type=click.Choice(("none",) + METHODS), default="none", show_default=True,
              help="Fine-tune the pruned (and patched) model; LoRA is merged before writing.")
@option(FinetuneOptions, "--loss", type=click.Choice(LOSSES),
        help="distill: KL to the unpruned model's logits; nexttoken: the data's own next tokens.")
@option(FinetuneOptions, "--steps", type=POSITIVE)
@option(FinetuneOptions, "--max-minutes", type=Finite(min=0, min_open=True),
        help="Time budget for training: fewer steps when --steps would not fit, the schedule fitted to them.")
@option(FinetuneOptions, "--batch-size", type=POSITIVE, help="Sequences per step.")
@option(FinetuneOptions, "--lr", type=Finite(min=0, min_open=True),
        help="Peak learning rate (default: 2e-4 LoRA, 2e-5 full).")
@option(FinetuneOptions, "--warmup", type=FRACTION, help="Warm-up, as a fraction of the steps.")
@option(FinetuneOptions, "--lora-rank", type=POSITIVE)
@option(FinetuneOptions, "--lora-alpha", type=Finite(min=0, min_open=True))
@option(FinetuneOptions, "--eval-every", type=POSITIVE, help="Steps between held-out evaluations.")
@option(FinetuneOptions, "--patience", type=POSITIVE, help="Stop after this many evaluations without improvement.")
@option(FinetuneOptions, "--checkpoint-every", type=POSITIVE,
        help="Steps between checkpoints (an interrupted run started again resumes).")
@option(FinetuneOptions, "--teacher-samples", type=COUNT, help="Sequences sampled from the unpruned model, "
        "added to the fine-tuning data (the held-out split stays real text).")
@option(FinetuneOptions, "--precision", type=click.Choice(PRECISIONS), help="auto: bf16 where it is native.")
@option(RecoverOptions, "--device", help="auto, cpu, cuda or cuda:N.")
def recover_cmd(hf_dir, plan_path, output, finetune, **kw) -> None:
    """Recover what a cut lost: repairs and linear patches (closed form) and/or fine-tuning; write a directory
    for `gguf-prune prune HF_DIR --recovered DIR`."""
    from gguf_prune.calibration import CalibrationError
    from gguf_prune.recovery.options import FinetuneError
    from gguf_prune.models.checkpoint import ModelDirError, WeightsError
    from gguf_prune.plan import PlanError
    from gguf_prune.recovered import RecoverError
    from gguf_prune.recovery.recover import recover

    method = None if finetune == "none" else finetune
    fto = FinetuneOptions(method=method or "lora", **fields_of(FinetuneOptions, kw))  # the seed goes to both
    opts = RecoverOptions(finetune=method, finetune_options=fto, **fields_of(RecoverOptions, kw))
    try:
        r = recover(hf_dir, plan_path, output, opts)
    except (ModelDirError, CalibrationError, PlanError, RecoverError, FinetuneError, WeightsError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(r.summary())


@main.command("score")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="HF_DIR")
@option(ScoreOptions, "--calibration", type=click.Path(dir_okay=False, path_type=Path),
        help="Text file, or .jsonl of {\"messages\": [...]} chats (default: bundled English text).")
@option(ScoreOptions, "--calibration-kind", type=click.Choice(CALIBRATION_KINDS),
        help="auto: .jsonl is chat, anything else text.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("scores.json"),
              show_default=True, help="scores.json to write (plus <name>.neurons.safetensors and PNG plots).")
@option(ScoreOptions, "--seq-len", type=SEQ_LEN, help="Tokens per calibration sequence.")
@option(ScoreOptions, "--samples", type=POSITIVE, help="Calibration sequences.")
@option(ScoreOptions, "--seed", type=SEED, help="Seed for choosing the sequences.")
@option(ScoreOptions, "--sublayers/--no-sublayers", help="Also score the attention and MLP sub-blocks of every layer.")
@option(ScoreOptions, "--ppl", is_flag=True, help="Also measure perplexity with each layer removed.")
@option(ScoreOptions, "--heads", is_flag=True, help="Score query heads and KV groups (KL, output norm, Taylor).")
@option(ScoreOptions, "--head-layers", type=Layers(), help="Layers for --heads, e.g. 3,5-8 (default: all).")
@option(ScoreOptions, "--neurons/--no-neurons",
        help="Neuron statistics (activation frequency, mean |a|, weight x activation).")
@option(ScoreOptions, "--tau", type=NONNEG,
        help="A neuron counts as active on a token when |act(gate)*up| > tau (absolute).")
@click.option("--width", "width_spec", type=Fractions("0.17,0.33,0.5"), default=None,
              help="Width KL: each MLP with these fractions of its lowest-energy neurons removed, e.g. "
                   "0.17,0.33,0.5 (what `plan --units width` cuts by).")
@option(ScoreOptions, "--repair", is_flag=True,
        help="With --width: score each width again with its closed-form repair (cross-fitted); the planner "
             "ranks width cuts by that KL.")
@option(ScoreOptions, "--width-align", type=Align(),
        help="Removed-neuron counts for --width are multiples of this (k-quants need ffn_down rows of 256).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Score on top of this plan.json's cuts (KL stays relative to the unpruned model).")
@option(ScoreOptions, "--greedy", type=COUNT, help="Greedy removal steps to run.")
@option(ScoreOptions, "--greedy-units", type=Names(GREEDY_UNITS, "layer,attn,mlp"),
        help="layer, or a comma list of layer,attn,mlp.")
@option(ScoreOptions, "--greedy-by", type=click.Choice(GREEDY_BY))
@option(ScoreOptions, "--greedy-pool", type=POSITIVE,
        help="Lazy greedy: after the first step re-measure only this many cheapest candidates per step.")
@option(ScoreOptions, "--protect-first", type=COUNT, help="First layers greedy never removes.")
@option(ScoreOptions, "--protect-last", type=COUNT, help="Last layers greedy never removes.")
@option(ScoreOptions, "--device", help="auto, cpu, cuda or cuda:N.")
@option(ScoreOptions, "--dtype", type=click.Choice(DTYPES))
@option(ScoreOptions, "--device-map", help="accelerate device_map (e.g. auto) for models larger than one device.")
@option(ScoreOptions, "--batch-tokens", type=POSITIVE, help="Max tokens per forward (default: from a memory budget).")
@click.option("--no-plots", is_flag=True, help="Do not draw PNG plots.")
@option(ScoreOptions, "--stream", is_flag=True,
        help="Layer-major from the safetensors shards: one layer in memory at a time (chosen automatically, "
             "with a message, when the model would not fit).")
@option(ScoreOptions, "--max-memory",
        help="Memory budget for scoring, e.g. 24GB or 512MiB (default: what the device has free); "
             "streamed scoring makes more passes over the weights to stay under it.")
@option(ScoreOptions, "--units",
        help="Score one slice of the ablation units: K/N (slice K of N, from 0, about equal cost) or layers "
             "like 0-9; join the slices with --merge. Implies --stream.")
@click.option("--merge", "merge", is_flag=True,
              help="Join --units slices: gguf-prune score --merge a.json b.json ... -o scores.json")
def score_cmd(inputs, output, plan_path, greedy_units, no_plots, merge, width_spec, **kw) -> None:
    """Measure what every layer, sub-block, head and neuron of HF_DIR does; write scores.json.

    With --merge, the arguments are scores slices (from --units) to join into -o.
    """
    from gguf_prune.calibration import CalibrationError
    from gguf_prune.models.checkpoint import ModelDirError
    from gguf_prune.plan import PlanError
    from gguf_prune.scoring.options import ScoreError
    from gguf_prune.scoring.measure import score_model, summary
    from gguf_prune.scoring.merge import merge_scores
    from gguf_prune.scores import ScoresError

    if merge:
        try:
            out = merge_scores(list(inputs), output)
        except (ScoreError, ScoresError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(summary(out))
        return
    if len(inputs) != 1:
        raise click.UsageError(f"give one HF_DIR (got {len(inputs)} arguments); to join scores slices use --merge")
    hf_dir = inputs[0]
    try:
        out = score_model(hf_dir, output, ScoreOptions(plan=plan_path, greedy_units=greedy_units, plots=not no_plots,
                                                       width=width_spec or (), **kw))
    except (ModelDirError, CalibrationError, PlanError, ScoreError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(summary(out))


@main.command("package")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The executable to write.")
@option(PackageOptions, "--name", help="Name shown by the server (default: the file name).")
@option(PackageOptions, "--host")
@option(PackageOptions, "--port", type=PORT)
@option(PackageOptions, "--ctx", type=COUNT, help="Context size (0: the model's own).")
@option(PackageOptions, "--threads", type=POSITIVE)
@option(PackageOptions, "--system-prompt", help="Used when a chat has no system message of its own.")
def package_cmd(model, output, name, host, port, ctx, threads, system_prompt) -> None:
    """Pack MODEL with llama-server and its web UI into one executable file."""
    from gguf_prune.runtime.package import PackageError, build_package, describe

    opts = PackageOptions(name=name, host=host, port=port, ctx=ctx, threads=threads, system_prompt=system_prompt)
    try:
        out = build_package(model, output, opts)
    except PackageError as e:
        raise click.ClickException(str(e)) from None
    click.echo(describe(out))


@main.command("run")
@option(RunOptions, "--model", type=click.Path(file_okay=False, path_type=Path),
        help="Hugging Face checkpoint directory (default: the demo model, SmolLM2-135M-Instruct).")
@option(RunOptions, "-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path),
        help="Where every stage writes its files (default: runs/<model>).")
@option(RunOptions, "--calibration", type=click.Path(dir_okay=False, path_type=Path),
        help="Calibration text or chat JSONL (default: bundled text).")
@option(RunOptions, "--samples", type=POSITIVE)
@option(RunOptions, "--seq-len", type=SEQ_LEN)
@option(RunOptions, "--budget", type=OPEN_FRACTION,
        help="Fraction of transformer-block parameters to remove.  [default: 0.2; none with --target-speedup]")
@speed_options(RunOptions)
@option(RunOptions, "--cost", type=click.Path(dir_okay=False, path_type=Path),
        help="cost.json measured before (`gguf-prune cost`); without it a speed target measures one in the run.")
@option(RunOptions, "--strategy", type=click.Choice(RUN_STRATEGIES),
        help="width-mixed: layers, sub-blocks and MLP widths, each priced by its measured KL per parameter; "
             "greedy-mixed: layers and sub-blocks, re-measured after each cut. With --rounds > 1 each round "
             "cuts layers and sub-blocks by one-shot KL instead.")
@option(RunOptions, "--greedy-steps", type=POSITIVE,
        help="Greedy steps for --strategy greedy-mixed (default: enough for the budget).")
@option(RunOptions, "--heads/--no-heads",
        help="Also score attention heads (KL per head and KV group; about 3x the scoring time on CPU).")
@option(RunOptions, "--greedy-pool", type=COUNT,
        help="Lazy greedy: re-measure only this many cheapest candidates per step (0: all).")
@option(RunOptions, "--quant")
@option(RunOptions, "--text", type=click.Path(dir_okay=False, path_type=Path),
        help="Held-out evaluation text (default: bundled, distinct from the calibration text).")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Task prompts JSONL (default: bundled simple prompts).")
@option(RunOptions, "--eval-chunks", type=POSITIVE, help="Perplexity chunks to evaluate.")
@option(RunOptions, "--threads", type=POSITIVE)
@click.option("--no-package", is_flag=True, help="Skip building the executable.")
@option(RunOptions, "--device")
@option(RunOptions, "--rounds", type=click.IntRange(min=1),
        help="Iterative pruning: cut budget/ROUNDS per round, recover, re-score on top of the cuts, repeat.")
@option(RunOptions, "--repair/--no-repair",
        help="Repair every cut in closed form (narrowed MLPs and attentions refitted, removed parts patched), "
             "and score and plan widths by their KL after repair.  [default: on for llama-family models]")
@option(RunOptions, "--recover", type=click.Choice(RECOVER_MODES),
        help="Recovery after cutting (every round when iterating): linear patches, LoRA or full fine-tuning "
             "by distillation, or both (after the repair); the pruned GGUF is written from the recovered weights.")
@option(RunOptions, "--recover-samples", type=click.IntRange(min=2),
        help="Calibration sequences for recovery (10% held out for early stopping and the round figures).")
@option(RunOptions, "--finetune-steps", type=POSITIVE, help="Fine-tuning steps (per round when iterating).")
@option(RunOptions, "--finetune-lr", type=Finite(min=0, min_open=True),
        help="Peak learning rate for fine-tuning (default: 2e-4 LoRA, 2e-5 full).")
@option(RunOptions, "--finetune-minutes", type=Finite(min=0, min_open=True),
        help="Time budget for fine-tuning (per round): fewer steps when --finetune-steps would not fit.")
@option(RunOptions, "--teacher-samples", type=COUNT, help="Sequences sampled from the unpruned model, added to "
        "the fine-tuning data (the held-out split stays real text).")
@option(RunOptions, "--uniform", is_flag=True,
        help="One shape for every kept layer, written in the model's own architecture (always on for "
             "Qwen3 and Gemma 3).")
def run_cmd(prompts, no_package, greedy_pool, **kw) -> None:
    """The main job: score, plan, [recover,] prune to Q4_K_M, evaluate against the uncut base, package."""
    from gguf_prune.pipeline.job import DEFAULT_PROMPTS, format_summary, run

    opts = RunOptions(prompts=prompts or DEFAULT_PROMPTS, package=not no_package, greedy_pool=greedy_pool or None, **kw)
    try:
        summary = run(opts)
    except Exception as e:  # every stage's error type is a ValueError/RuntimeError with a clear message
        if isinstance(e, (ValueError, RuntimeError, OSError)):
            raise click.ClickException(str(e)) from None
        raise
    click.echo("")
    click.echo(format_summary(summary))


@main.command("sweep")
@click.argument("hf_dir", type=click.Path(file_okay=False, path_type=Path))
@option(SweepOptions, "--calibration", type=click.Path(dir_okay=False, path_type=Path))
@option(SweepOptions, "--text", type=click.Path(dir_okay=False, path_type=Path))
@option(SweepOptions, "--budgets", type=Fractions("0.1,0.2,0.3"),
        help="Fractions of transformer-block parameters to remove.")
@option(SweepOptions, "--strategies", type=Names(STRATEGIES, "width,kl-layers"),
        help="bi-layers, kl-layers, greedy-layers (whole layers by Block Influence, one-shot KL, greedy KL); "
             "oneshot-mixed, greedy-mixed (layers and sub-blocks); width (MLP neurons by width KL); "
             "width-mixed (all of them in one ranking).")
@option(SweepOptions, "--samples", type=POSITIVE)
@option(SweepOptions, "--seq-len", type=SEQ_LEN)
@option(SweepOptions, "--quant", help="Type every model (and the base) is written in.")
@option(SweepOptions, "--eval-chunks", type=POSITIVE)
@option(SweepOptions, "--threads", type=POSITIVE)
@click.option("--no-bench", is_flag=True)
@option(SweepOptions, "-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path))
@option(SweepOptions, "--device")
@option(SweepOptions, "--repair", is_flag=True,
        help="A second row per point: the strategy's cut repaired in closed form (widths planned by their KL "
             "after repair, narrowed parts refitted, removed parts patched).")
@option(SweepOptions, "--recover-samples", type=click.IntRange(min=2),
        help="Calibration sequences the --repair rows are fitted on (10% held out).")
@option(SweepOptions, "--bench-reps", type=POSITIVE)
@option(SweepOptions, "--cost", type=click.Path(dir_okay=False, path_type=Path),
        help="cost.json for the predicted speed-ups (default: measured into the sweep directory).")
def sweep_cmd(hf_dir, strategies, no_bench, out_dir, **kw) -> None:
    """Prune HF_DIR at several budgets with several strategies; evaluate all; draw quality vs size."""
    from gguf_prune.pipeline.sweep import sweep, sweep_markdown

    try:
        opts = SweepOptions(strategies=strategies or STRATEGIES, bench=not no_bench, out_dir=out_dir, **kw)
        result = sweep(hf_dir, opts)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(sweep_markdown(result))
    click.echo(f"sweep: {out_dir / 'sweep.json'}, {out_dir / 'sweep.md'}, {out_dir / 'sweep.png'}")


if __name__ == "__main__":
    main()
