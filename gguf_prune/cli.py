"""The command line: a thin click layer, one library call per command."""

from __future__ import annotations

import logging
import math
import re
import sys
from pathlib import Path

import click

from gguf_prune.errors import GgufPruneError, describe_os_error


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


class _Commands(click.Group):
    """Every command's errors in one place: gguf-prune's own (bad input, a failed stage) and the
    operating system's (a full disk, a read-only or forbidden path) become one line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GgufPruneError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(describe_os_error(e)) from None


# ------------------------------------------------------------------ option types: every value in its range


class _Finite(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which compare false with every bound, so pass it)."""

    def convert(self, value, param, ctx):
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number in the range {self._describe_range()}.", param, ctx)
        return super().convert(rv, param, ctx)


COUNT = click.IntRange(min=0)  # how many of something to remove or keep
POSITIVE = click.IntRange(min=1)  # sizes, steps, threads, chunks
SEQ_LEN = click.IntRange(min=2)  # next-token KL and loss need two tokens in a sequence
SEED = click.IntRange(min=0)  # numpy's generators take no negative seeds
FRACTION = _Finite(0, 1, max_open=True)  # a fraction of something to remove: [0, 1)
OPEN_FRACTION = _Finite(0, 1, min_open=True, max_open=True)  # a budget, a width level: (0, 1)
NONNEG = _Finite(min=0)
PORT = click.IntRange(1, 65535)


class _Align(click.ParamType):
    """A row-length multiple for kept FFN widths: a positive multiple of 32 (every quantized type's block along a
    row is 32 or 256 values), or 1 for no rounding (F16/BF16/F32 files only)."""

    name = "N"

    def convert(self, value, param, ctx):
        n = click.INT.convert(value, param, ctx)
        if n != 1 and (n < 32 or n % 32):
            self.fail(f"{n} is not a positive multiple of 32 (256 for k-quants; 1: no rounding, for F16/BF16/F32 "
                      "files only).", param, ctx)
        return n


class _Names(click.ParamType):
    """A comma list of names from a fixed set (given as a function, so the CLI imports no stage at start-up);
    each bad item named, no item twice."""

    name = "LIST"

    def __init__(self, choices, example: str):
        self.choices, self.example = choices, example

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        known = tuple(self.choices())
        items = [x.strip() for x in str(value).split(",")]
        for x in items:
            if x not in known:
                self.fail(f"{x!r} is not one of {', '.join(known)} (give a comma list like {self.example}).",
                          param, ctx)
        dup = next((x for k, x in enumerate(items) if x in items[:k]), None)
        if dup is not None:
            self.fail(f"{dup!r} is given twice.", param, ctx)
        return tuple(items)


class _Fractions(click.ParamType):
    """A comma list of fractions, each in (0, 1), none twice."""

    name = "LIST"

    def __init__(self, example: str):
        self.example = example

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        out = []
        for x in (x.strip() for x in str(value).split(",")):
            try:
                f = float(x)
            except ValueError:
                self.fail(f"{x!r} is not a number; give fractions like {self.example}.", param, ctx)
            if not 0 < f < 1:  # nan fails this too
                self.fail(f"{x} is not in the range 0<x<1; give fractions like {self.example}.", param, ctx)
            if f in out:
                self.fail(f"{x} is given twice.", param, ctx)
            out.append(f)
        return tuple(out)


class _Layers(click.ParamType):
    """Layer indices and ranges, 3,5-8 (the model's own count is checked by the stage, which knows it)."""

    name = "LAYERS"

    def convert(self, value, param, ctx):
        for x in str(value).split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", x)
            if not m:
                self.fail(f"{x!r} is not a layer index or range; use indices and ranges like 3,5-8.", param, ctx)
            if m.group(2) is not None and int(m.group(2)) < int(m.group(1)):
                self.fail(f"{x!r} is a range that runs backwards; write it low-high, like 5-8.", param, ctx)
        return str(value)


def _plan_units():
    from gguf_prune.planning.options import UNITS

    return UNITS


def _greedy_units():
    from gguf_prune.scoring.inputs import GREEDY_UNITS

    return GREEDY_UNITS


def _strategies():
    from gguf_prune.pipeline.strategy import STRATEGIES

    return STRATEGIES


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--drop-layers", type=COUNT, default=0, show_default=True,
              help="Whole layers to remove (at most the unprotected ones).")
@click.option("--metric", type=click.Choice(["kl", "bi", "greedy"]), default="kl", show_default=True,
              help="Layer ranking: causal ablation KL, Block Influence, or the greedy run's order.")
@click.option("--drop-attn", type=COUNT, default=0, show_default=True, help="Attention sub-blocks to remove.")
@click.option("--drop-mlp", type=COUNT, default=0, show_default=True, help="MLP sub-blocks to remove.")
@click.option("--prune-heads", type=FRACTION, default=0.0, show_default=True,
              help="Fraction of query heads to remove (global ranking, GQA-consistent per layer).")
@click.option("--head-metric", type=click.Choice(["kl", "norm", "taylor"]), default="kl", show_default=True)
@click.option("--min-heads", type=POSITIVE, default=1, show_default=True, help="Query heads every layer keeps.")
@click.option("--prune-neurons", is_flag=True, help="Remove MLP neurons (with --neuron-threshold or -fraction).")
@click.option("--neuron-metric", type=click.Choice(["freq", "mean_abs", "wxa"]), default="freq", show_default=True)
@click.option("--neuron-threshold", type=NONNEG, default=None,
              help="Remove neurons whose statistic is below this (e.g. 0.005 activation frequency).")
@click.option("--neuron-fraction", type=FRACTION, default=None, help="Remove this fraction of neurons per layer.")
@click.option("--align", type=_Align(), default=256, show_default=True,
              help="Kept FFN width is rounded to a multiple of this: a multiple of 32 (256 for k-quants), "
                   "or 1 for none (F16/BF16/F32 only).")
@click.option("--protect-first", type=COUNT, default=2, show_default=True)
@click.option("--protect-last", type=COUNT, default=2, show_default=True)
@click.option("--target-params", type=OPEN_FRACTION, default=None,
              help="Budget: fraction of transformer-block parameters to remove, cheapest units first.")
@click.option("--target-size", type=POSITIVE, default=None, help="Budget: predicted quantized file size in bytes.")
@click.option("--units", type=_Names(_plan_units, "layer,width"), default=None,
              help="Unit kinds the budget may take (without a greedy run): layer, attn, mlp, width "
                   "(MLP neurons, priced by `score --width`).  [default: layer,attn,mlp; uniform: layer,width]")
@click.option("--uniform", is_flag=True,
              help="One shape for every kept layer (one FFN width, one head count), so the file stays in the "
                   "model's own architecture that every llama.cpp runtime loads. Always on for Qwen3 and Gemma 3.")
@click.option("--quant", default="Q4_K_M", show_default=True, help="Target type, for predicted sizes.")
def plan_cmd(scores, output, explain_path, units, **kw) -> None:
    """Turn SCORES (scores.json) into plan.json, or --explain an existing plan."""
    from gguf_prune.plan import Plan, PlanError
    from gguf_prune.planning.explain import explain
    from gguf_prune.planning.options import PlanOptions
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
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL task prompts with checks (contains, not_contains, regex, min_len, max_len).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("report"),
              show_default=True, help="Report directory.")
@click.option("--ctx", type=click.IntRange(min=3), default=512, show_default=True,
              help="Context size for perplexity/KL (each window scores its second half, so at least 3).")
@click.option("--chunks", type=POSITIVE, default=None, help="Limit the number of chunks (default: all).")
@click.option("--threads", type=POSITIVE, default=None, help="Threads for llama.cpp (default: its own choice).")
@click.option("--no-bench", is_flag=True, help="Skip llama-bench.")
@click.option("--bench-reps", type=POSITIVE, default=3, show_default=True)
@click.option("--label", "labels", multiple=True, help="Names for BASE and MODELS in order.")
def eval_cmd(base, models, text, prompts, output, ctx, chunks, threads, no_bench, bench_reps, labels) -> None:
    """Evaluate pruned GGUFs against BASE in llama.cpp: PPL, KL, top-1, speed, size, prompts."""
    from gguf_prune.runtime.evaluate import EvalError, EvalOptions, evaluate
    from gguf_prune.runtime.llamacpp import LlamaCppError
    from gguf_prune.runtime.report import format_table, table_rows

    opts = EvalOptions(ctx=ctx, chunks=chunks, threads=threads, bench=not no_bench, bench_reps=bench_reps,
                       prompts=prompts, labels=list(labels))
    try:
        result = evaluate(base, list(models), output, text=text, options=opts)
    except (EvalError, LlamaCppError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_table(table_rows(result)))
    click.echo(f"\nreport: {output / 'report.md'}, {output / 'report.json'}")
    if any("error" in e for e in result["models"]):
        sys.exit(1)


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
@click.option("--quant", default="Q4_K_M", show_default=True,
              help="llama-quantize type (Q4_K_M, Q5_K_M, Q8_0, F16, ...) or 'none'.")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]), default="f16", show_default=True,
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
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text file, or .jsonl of chats: patch fit and training data (default: bundled English text).")
@click.option("--calibration-kind", type=click.Choice(["auto", "text", "chat"]), default="auto", show_default=True)
@click.option("--seq-len", type=SEQ_LEN, default=128, show_default=True, help="Tokens per sequence.")
@click.option("--samples", type=POSITIVE, default=64, show_default=True, help="Sequences (patch fit and training).")
@click.option("--heldout", type=FRACTION, default=0.1, show_default=True,
              help="Fraction of sequences held out: ridge choice, early stopping, reported KL.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--patch", is_flag=True,
              help="Fit a linear patch (n_embd² parameters) for every run of removed layers and removed attention.")
@click.option("--patch-fit", type=click.Choice(["pruned", "full"]), default="pruned", show_default=True,
              help="pruned: fit on the pruned model's own states (sequential); full: on the full model's.")
@click.option("--finetune", type=click.Choice(["none", "lora", "full"]), default="none", show_default=True,
              help="Fine-tune the pruned (and patched) model; LoRA is merged before writing.")
@click.option("--loss", type=click.Choice(["distill", "nexttoken"]), default="distill", show_default=True,
              help="distill: KL to the unpruned model's logits; nexttoken: the data's own next tokens.")
@click.option("--steps", type=POSITIVE, default=200, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=4, show_default=True, help="Sequences per step.")
@click.option("--lr", type=_Finite(min=0, min_open=True), default=None,
              help="Peak learning rate (default: 2e-4 LoRA, 2e-5 full).")
@click.option("--warmup", type=FRACTION, default=0.05, show_default=True, help="Warm-up, as a fraction of the steps.")
@click.option("--lora-rank", type=POSITIVE, default=16, show_default=True)
@click.option("--lora-alpha", type=_Finite(min=0, min_open=True), default=32.0, show_default=True)
@click.option("--eval-every", type=POSITIVE, default=25, show_default=True, help="Steps between held-out evaluations.")
@click.option("--patience", type=POSITIVE, default=4, show_default=True,
              help="Stop after this many evaluations without improvement.")
@click.option("--checkpoint-every", type=POSITIVE, default=25, show_default=True,
              help="Steps between checkpoints (an interrupted run started again resumes).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def recover_cmd(hf_dir, plan_path, output, calibration, calibration_kind, seq_len, samples, heldout, seed, patch,
                patch_fit, finetune, loss, steps, batch_size, lr, warmup, lora_rank, lora_alpha, eval_every, patience,
                checkpoint_every, device) -> None:
    """Recover what a cut lost: linear patches (closed form) and/or fine-tuning; write a directory
    for `gguf-prune prune HF_DIR --recovered DIR`."""
    from gguf_prune.calibration import CalibrationError
    from gguf_prune.recovery.finetune import FinetuneError, FinetuneOptions
    from gguf_prune.models.checkpoint import ModelDirError, WeightsError
    from gguf_prune.plan import PlanError
    from gguf_prune.recovered import RecoverError
    from gguf_prune.recovery.recover import RecoverOptions, recover

    method = None if finetune == "none" else finetune
    fto = FinetuneOptions(method=method or "lora", loss=loss, steps=steps, batch_size=batch_size, lr=lr,
                          warmup=warmup, lora_rank=lora_rank, lora_alpha=lora_alpha, eval_every=eval_every,
                          patience=patience, checkpoint_every=checkpoint_every, seed=seed)
    opts = RecoverOptions(calibration=calibration, calibration_kind=calibration_kind, seq_len=seq_len,
                          samples=samples, seed=seed, heldout=heldout, patch=patch, patch_fit=patch_fit,
                          finetune=method, finetune_options=fto, device=device)
    try:
        r = recover(hf_dir, plan_path, output, opts)
    except (ModelDirError, CalibrationError, PlanError, RecoverError, FinetuneError, WeightsError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(r.summary())


@main.command("score")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="HF_DIR")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text file, or .jsonl of {\"messages\": [...]} chats (default: bundled English text).")
@click.option("--calibration-kind", type=click.Choice(["auto", "text", "chat"]), default="auto", show_default=True,
              help="auto: .jsonl is chat, anything else text.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("scores.json"),
              show_default=True, help="scores.json to write (plus <name>.neurons.safetensors and PNG plots).")
@click.option("--seq-len", type=SEQ_LEN, default=128, show_default=True, help="Tokens per calibration sequence.")
@click.option("--samples", type=POSITIVE, default=32, show_default=True, help="Calibration sequences.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for choosing the sequences.")
@click.option("--sublayers/--no-sublayers", default=True, show_default=True,
              help="Also score the attention and MLP sub-blocks of every layer.")
@click.option("--ppl", is_flag=True, help="Also measure perplexity with each layer removed.")
@click.option("--heads", is_flag=True, help="Score query heads and KV groups (KL, output norm, Taylor).")
@click.option("--head-layers", type=_Layers(), default=None, help="Layers for --heads, e.g. 3,5-8 (default: all).")
@click.option("--neurons/--no-neurons", default=True, show_default=True,
              help="Neuron statistics (activation frequency, mean |a|, weight x activation).")
@click.option("--tau", type=NONNEG, default=0.05, show_default=True,
              help="A neuron counts as active on a token when |act(gate)*up| > tau (absolute).")
@click.option("--width", "width_spec", type=_Fractions("0.17,0.33,0.5"), default=None,
              help="Width KL: each MLP with these fractions of its lowest-energy neurons removed, e.g. "
                   "0.17,0.33,0.5 (what `plan --units width` cuts by).")
@click.option("--width-align", type=_Align(), default=256, show_default=True,
              help="Removed-neuron counts for --width are multiples of this (k-quants need ffn_down rows of 256).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Score on top of this plan.json's cuts (KL stays relative to the unpruned model).")
@click.option("--greedy", type=COUNT, default=0, show_default=True, help="Greedy removal steps to run.")
@click.option("--greedy-units", type=_Names(_greedy_units, "layer,attn,mlp"), default="layer", show_default=True,
              help="layer, or a comma list of layer,attn,mlp.")
@click.option("--greedy-by", type=click.Choice(["kl", "kl-per-param"]), default="kl", show_default=True)
@click.option("--greedy-pool", type=POSITIVE, default=None,
              help="Lazy greedy: after the first step re-measure only this many cheapest candidates per step.")
@click.option("--protect-first", type=COUNT, default=2, show_default=True, help="First layers greedy never removes.")
@click.option("--protect-last", type=COUNT, default=2, show_default=True, help="Last layers greedy never removes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "bf16"]), default="float32", show_default=True)
@click.option("--device-map", default=None, help="accelerate device_map (e.g. auto) for models larger than one device.")
@click.option("--batch-tokens", type=POSITIVE, default=None,
              help="Max tokens per forward (default: from a memory budget).")
@click.option("--no-plots", is_flag=True, help="Do not draw PNG plots.")
@click.option("--stream", is_flag=True,
              help="Layer-major from the safetensors shards: one layer in memory at a time (chosen automatically, "
                   "with a message, when the model would not fit).")
@click.option("--max-memory", default=None,
              help="Memory budget for scoring, e.g. 24GB or 512MiB (default: what the device has free); "
                   "streamed scoring makes more passes over the weights to stay under it.")
@click.option("--units", default=None,
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
    from gguf_prune.scoring.inputs import ScoreError, ScoreOptions
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
@click.option("--name", default=None, help="Name shown by the server (default: the file name).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=PORT, default=8080, show_default=True)
@click.option("--ctx", type=COUNT, default=4096, show_default=True, help="Context size (0: the model's own).")
@click.option("--threads", type=POSITIVE, default=None)
@click.option("--system-prompt", default=None, help="Used when a chat has no system message of its own.")
def package_cmd(model, output, name, host, port, ctx, threads, system_prompt) -> None:
    """Pack MODEL with llama-server and its web UI into one executable file."""
    from gguf_prune.runtime.package import PackageError, PackageOptions, build_package, describe

    opts = PackageOptions(name=name, host=host, port=port, ctx=ctx, threads=threads, system_prompt=system_prompt)
    try:
        out = build_package(model, output, opts)
    except PackageError as e:
        raise click.ClickException(str(e)) from None
    click.echo(describe(out))


@main.command("run")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Hugging Face checkpoint directory (default: the demo model, SmolLM2-135M-Instruct).")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where every stage writes its files (default: runs/<model>).")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration text or chat JSONL (default: bundled text).")
@click.option("--samples", type=POSITIVE, default=16, show_default=True)
@click.option("--seq-len", type=SEQ_LEN, default=128, show_default=True)
@click.option("--budget", type=OPEN_FRACTION, default=0.2, show_default=True,
              help="Fraction of transformer-block parameters to remove.")
@click.option("--strategy", type=click.Choice(["width-mixed", "greedy-mixed"]), default="width-mixed",
              show_default=True,
              help="width-mixed: layers, sub-blocks and MLP widths, each priced by its measured KL per parameter; "
                   "greedy-mixed: layers and sub-blocks, re-measured after each cut. With --rounds > 1 each round "
                   "cuts layers and sub-blocks by one-shot KL instead.")
@click.option("--greedy-steps", type=POSITIVE, default=None,
              help="Greedy steps for --strategy greedy-mixed (default: enough for the budget).")
@click.option("--heads/--no-heads", default=False, show_default=True,
              help="Also score attention heads (KL per head and KV group; about 3x the scoring time on CPU).")
@click.option("--greedy-pool", type=COUNT, default=8, show_default=True,
              help="Lazy greedy: re-measure only this many cheapest candidates per step (0: all).")
@click.option("--quant", default="Q4_K_M", show_default=True)
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Held-out evaluation text (default: bundled, distinct from the calibration text).")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Task prompts JSONL (default: bundled simple prompts).")
@click.option("--eval-chunks", type=POSITIVE, default=24, show_default=True, help="Perplexity chunks to evaluate.")
@click.option("--threads", type=POSITIVE, default=None)
@click.option("--no-package", is_flag=True, help="Skip building the executable.")
@click.option("--device", default="auto", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Iterative pruning: cut budget/ROUNDS per round, recover, re-score on top of the cuts, repeat.")
@click.option("--recover", "recover_mode",
              type=click.Choice(["none", "patch", "lora", "full", "patch+lora", "patch+full"]), default="none",
              show_default=True,
              help="Recovery after cutting (every round when iterating): linear patches, LoRA or full fine-tuning "
                   "by distillation, or both; the pruned GGUF is written from the recovered weights.")
@click.option("--recover-samples", type=click.IntRange(min=2), default=64, show_default=True,
              help="Calibration sequences for recovery (10% held out for early stopping and the round figures).")
@click.option("--finetune-steps", type=POSITIVE, default=200, show_default=True,
              help="Fine-tuning steps (per round when iterating).")
@click.option("--uniform", is_flag=True,
              help="One shape for every kept layer, written in the model's own architecture (always on for "
                   "Qwen3 and Gemma 3).")
def run_cmd(model, out_dir, calibration, samples, seq_len, budget, strategy, greedy_steps, heads, greedy_pool, quant, text,
            prompts, eval_chunks, threads, no_package, device, rounds, recover_mode, recover_samples,
            finetune_steps, uniform) -> None:
    """The main job: score, plan, [recover,] prune to Q4_K_M, evaluate against the uncut base, package."""
    from gguf_prune.pipeline.job import DEFAULT_PROMPTS, RunOptions, format_summary, run

    opts = RunOptions(model=model, out_dir=out_dir, calibration=calibration, samples=samples, seq_len=seq_len,
                      budget=budget, strategy=strategy, greedy_steps=greedy_steps, heads=heads, greedy_pool=greedy_pool or None,
                      quant=quant, text=text,
                      prompts=prompts or DEFAULT_PROMPTS, eval_chunks=eval_chunks, threads=threads,
                      package=not no_package, device=device, rounds=rounds, recover=recover_mode,
                      recover_samples=recover_samples, finetune_steps=finetune_steps, uniform=uniform)
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
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--budgets", type=_Fractions("0.1,0.2,0.3"), default="0.1,0.2,0.3", show_default=True,
              help="Fractions of transformer-block parameters to remove.")
@click.option("--strategies", type=_Names(_strategies, "width,kl-layers"), default=None,
              help="bi-layers, kl-layers, greedy-layers (whole layers by Block Influence, one-shot KL, greedy KL); "
                   "oneshot-mixed, greedy-mixed (layers and sub-blocks); width (MLP neurons by width KL); "
                   "width-mixed (all of them in one ranking).  [default: all of them]")
@click.option("--samples", type=POSITIVE, default=16, show_default=True)
@click.option("--seq-len", type=SEQ_LEN, default=128, show_default=True)
@click.option("--quant", default="F16", show_default=True, help="Type every model (and the base) is written in.")
@click.option("--eval-chunks", type=POSITIVE, default=24, show_default=True)
@click.option("--threads", type=POSITIVE, default=None)
@click.option("--no-bench", is_flag=True)
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("sweep"),
              show_default=True)
@click.option("--device", default="auto", show_default=True)
def sweep_cmd(hf_dir, calibration, text, budgets, strategies, samples, seq_len, quant, eval_chunks, threads,
              no_bench, out_dir, device) -> None:
    """Prune HF_DIR at several budgets with several strategies; evaluate all; draw quality vs size."""
    from gguf_prune.pipeline.strategy import STRATEGIES
    from gguf_prune.pipeline.sweep import SweepOptions, sweep, sweep_markdown

    try:
        opts = SweepOptions(calibration=calibration, text=text, budgets=budgets, strategies=strategies or STRATEGIES,
                            samples=samples, seq_len=seq_len, quant=quant, eval_chunks=eval_chunks,
                            threads=threads, bench=not no_bench, out_dir=out_dir, device=device)
        result = sweep(hf_dir, opts)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(sweep_markdown(result))
    click.echo(f"sweep: {out_dir / 'sweep.json'}, {out_dir / 'sweep.md'}, {out_dir / 'sweep.png'}")


if __name__ == "__main__":
    main()
