"""Bad input gets one clear line, never a wrong model or a traceback.

Every case goes through the real CLI (click's CliRunner on ``gguf_prune.cli.main``) and checks: the exit code
(2: a value outside its range, refused by click before any work; 1: refused by the library, which knows the
model), the one ``Error:`` line to the letter (it names the option and what it may be), no traceback, and no
output written. The option dataclasses refuse the same values for an API user. `run` and `sweep` check every
input of every stage before the first starts: a bad --quant, --text or --prompts fails in seconds, before
any scoring.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_prune.cli import main
from gguf_prune.errors import GgufPruneError
from gguf_prune.recovery.options import FinetuneOptions

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.bad_input]

SHORT_TEXT = "A held-out text far too short to measure perplexity on.\n"


def refused(r, code: int, line: str | None = None, *, contains: tuple[str, ...] = ()) -> str:
    """The result failed with ``code`` and exactly one error line (``line``, when given), as its last line,
    and no traceback; returns that line."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    errors = [x for x in r.output.splitlines() if x.startswith("Error: ")]
    assert len(errors) == 1, r.output
    assert r.output.rstrip("\n").splitlines()[-1] == errors[0], r.output  # one line, nothing after it
    if line is not None:
        assert errors[0] == line
    for s in contains:
        assert s in errors[0], errors[0]
    return errors[0]


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ plan


@pytest.fixture(scope="module")
def scores(tiny_tied, tmp_path_factory) -> Path:
    """scores.json of the 6-layer tiny model (8 query heads in 2 KV groups, FFN 768), with head and neuron
    scores, measured for real."""
    from gguf_prune.scoring.options import ScoreOptions
    from gguf_prune.scoring.measure import score_model

    out = tmp_path_factory.mktemp("scores") / "scores.json"
    return score_model(tiny_tied, out, ScoreOptions(seq_len=16, samples=2, heads=True, neurons=True, plots=False,
                                                    progress=False))


def _range(option: str, value: str, what: str) -> str:
    return f"Error: Invalid value for '{option}': {value} is not in the range {what}."


PLAN_USAGE = {  # bad value class → (arguments, the error line)
    "negative layer count": (["--drop-layers", "-1"], _range("--drop-layers", "-1", "x>=0")),
    "negative attention count": (["--drop-attn", "-1"], _range("--drop-attn", "-1", "x>=0")),
    "negative MLP count": (["--drop-mlp", "-2"], _range("--drop-mlp", "-2", "x>=0")),
    "negative head fraction": (["--prune-heads", "-0.3"], _range("--prune-heads", "-0.3", "0<=x<1")),
    "head fraction of one": (["--prune-heads", "1"], _range("--prune-heads", "1.0", "0<=x<1")),
    "head fraction not a number": (["--prune-heads", "nan"],
                                   "Error: Invalid value for '--prune-heads': 'nan' is not a finite number in the "
                                   "range 0<=x<1."),
    "neuron fraction above one": (["--prune-neurons", "--neuron-fraction", "1.5"],
                                  _range("--neuron-fraction", "1.5", "0<=x<1")),
    "negative neuron threshold": (["--prune-neurons", "--neuron-threshold", "-0.1"],
                                  _range("--neuron-threshold", "-0.1", "x>=0")),
    "no head kept": (["--min-heads", "0"], _range("--min-heads", "0", "x>=1")),
    "align not a multiple of 32": (["--align", "48"],
                                   "Error: Invalid value for '--align': 48 is not a positive multiple of 32 (256 for "
                                   "k-quants; 1: no rounding, for F16/BF16/F32 files only)."),
    "align zero": (["--align", "0"],
                   "Error: Invalid value for '--align': 0 is not a positive multiple of 32 (256 for k-quants; 1: no "
                   "rounding, for F16/BF16/F32 files only)."),
    "negative protected layers": (["--protect-first", "-1"], _range("--protect-first", "-1", "x>=0")),
    "budget of everything": (["--target-params", "1.0"], _range("--target-params", "1.0", "0<x<1")),
    "budget of nothing": (["--target-params", "0"], _range("--target-params", "0.0", "0<x<1")),
    "no bytes": (["--target-size", "0"], _range("--target-size", "0", "x>=1")),
    "unknown unit": (["--target-params", "0.2", "--units", "layer,neurons"],
                     "Error: Invalid value for '--units': 'neurons' is not one of layer, attn, mlp, width (give a "
                     "comma list like layer,width)."),
    "unit twice": (["--target-params", "0.2", "--units", "layer,layer"],
                   "Error: Invalid value for '--units': 'layer' is given twice."),
    "layer count not whole": (["--drop-layers", "1.5"],
                              "Error: Invalid value for '--drop-layers': '1.5' is not a valid integer range."),
}


@pytest.mark.parametrize("case", PLAN_USAGE, ids=list(PLAN_USAGE))
def test_plan_refuses_values_out_of_range(scores, tmp_path, case):
    args, line = PLAN_USAGE[case]
    out = tmp_path / "plan.json"
    refused(invoke("plan", scores, "-o", out, *args), 2, line)
    assert not out.exists()


PLAN_MODEL = {  # counts beyond what the 6-layer model has, and options that cannot work: the library refuses
    "more layers than unprotected": (
        ["--drop-layers", "3"],
        "Error: plan options exceed this model: --drop-layers 3: at most 2, the layers not protected "
        "(--protect-first 2, --protect-last 2 of 6): 2-3"),
    "more attention than unprotected": (
        ["--drop-attn", "6", "--protect-first", "1", "--protect-last", "0"],
        "Error: plan options exceed this model: --drop-attn 6: at most 5, the sub-blocks left in the layers not "
        "protected (--protect-first 1, --protect-last 0 of 6)"),
    "more heads kept than a layer has": (
        ["--prune-heads", "0.25", "--min-heads", "9"],
        "Error: plan options exceed this model: --min-heads 9: at most 8, the query heads of a layer"),
    "neuron fraction without --prune-neurons": (
        ["--neuron-fraction", "0.3"],
        "Error: invalid plan options: --neuron-fraction needs --prune-neurons (without it no neuron is removed)"),
    "--prune-neurons without a fraction": (
        ["--prune-neurons"],
        "Error: invalid plan options: --prune-neurons needs exactly one of --neuron-threshold or --neuron-fraction"),
    "unknown quantization type": (
        ["--target-params", "0.2", "--quant", "Q9"], None),
}


@pytest.mark.parametrize("case", PLAN_MODEL, ids=list(PLAN_MODEL))
def test_plan_refuses_counts_beyond_the_model(scores, tmp_path, case):
    args, line = PLAN_MODEL[case]
    out = tmp_path / "plan.json"
    r = invoke("plan", scores, "-o", out, *args)
    if case == "unknown quantization type":
        refused(r, 1, contains=("Error: invalid plan options: --quant 'Q9': must be a llama-quantize type (Q1_0, ",
                                "Q4_K_M", ") or none"))
    else:
        refused(r, 1, line)
    assert not out.exists()


def test_the_largest_counts_the_model_has_are_taken(scores, tmp_path):
    """The limit named in the message is the real one: exactly that many is a valid plan."""
    from gguf_prune.plan import Plan

    out = tmp_path / "plan.json"
    r = invoke("plan", scores, "-o", out, "--drop-layers", "2")
    assert r.exit_code == 0, r.output
    assert [lp.index for lp in Plan.load(out).layers if lp.removed] == [2, 3]


BAD_OPTIONS = {  # the option dataclasses refuse what the CLI refuses: an API user gets the same clear error
    "PlanOptions drop_layers=-1": ("gguf_prune.planning.options", "PlanOptions", dict(drop_layers=-1),
                                   "invalid plan options: --drop-layers -1: must be a whole number, 0 or more "
                                   "(whole layers to remove)"),
    "PlanOptions prune_heads=-0.3": ("gguf_prune.planning.options", "PlanOptions", dict(prune_heads=-0.3),
                                     "invalid plan options: --prune-heads -0.3: must be a fraction of the query "
                                     "heads in [0, 1)"),
    "PlanOptions neuron_fraction=1.5": ("gguf_prune.planning.options", "PlanOptions",
                                        dict(prune_neurons=True, neuron_fraction=1.5),
                                        "invalid plan options: --neuron-fraction 1.5: must be a fraction of each "
                                        "layer's neurons in [0, 1)"),
    "PlanOptions align=48": ("gguf_prune.planning.options", "PlanOptions", dict(align=48),
                             "invalid plan options: --align 48: must be a positive multiple of 32 (256 for "
                             "k-quants), or 1 for no rounding (F16/BF16/F32 files only)"),
    "PlanOptions units=(neurons,)": ("gguf_prune.planning.options", "PlanOptions", dict(units=("neurons",)),
                                     "invalid plan options: --units 'neurons': unknown unit 'neurons'; use a comma "
                                     "list of layer, attn, mlp, width"),
    "ScoreOptions seq_len=1": ("gguf_prune.scoring.inputs", "ScoreOptions", dict(seq_len=1),
                               "invalid options: --seq-len 1: must be at least 2"),
    "ScoreOptions width_align=48": ("gguf_prune.scoring.inputs", "ScoreOptions", dict(width=(0.5,), width_align=48),
                                    "invalid options: --width-align 48: must be a positive multiple of 32 (256 for "
                                    "k-quants), or 1 for no rounding (F16/BF16/F32 files only)"),
    "RecoverOptions heldout=1": ("gguf_prune.recovery.recover", "RecoverOptions", dict(heldout=1.0),
                                 "invalid recover options: --heldout 1.0: must be a fraction of the sequences in "
                                 "[0, 1)"),
    "EvalOptions ctx=2": ("gguf_prune.runtime.evaluate", "EvalOptions", dict(ctx=2),
                          "invalid eval options: --ctx 2: must be a whole number, 3 or more"),
    "PackageOptions port=0": ("gguf_prune.runtime.package", "PackageOptions", dict(port=0),
                              "invalid package options: --port 0: must be a whole number, 1..65535"),
    "RunOptions samples=0": ("gguf_prune.pipeline.job", "RunOptions", dict(samples=0),
                             "run options are invalid: --samples 0 must be a whole number, 1 or more"),
    "RunOptions quant=Q9": ("gguf_prune.pipeline.job", "RunOptions", dict(quant="Q9"),
                            "run options are invalid: --quant 'Q9' is not a llama-quantize type; use one of Q1_0,"),
    "RunOptions target_speedup=0.8": ("gguf_prune.pipeline.job", "RunOptions", dict(target_speedup=0.8),
                                      "run options are invalid: --target-speedup 0.8: must be a number above 1"),
    "RunOptions target_speedup with rounds": ("gguf_prune.pipeline.job", "RunOptions",
                                              dict(target_speedup=1.3, rounds=2),
                                              "run options are invalid: --target-speedup with --rounds > 1"),
    "RunOptions teacher_samples without fine-tuning": (
        "gguf_prune.pipeline.job", "RunOptions", dict(teacher_samples=8),
        "run options are invalid: --teacher-samples feeds fine-tuning, which --recover none does not do: use "
        "--recover patch+lora"),
    "RecoverOptions teacher_samples without fine-tuning": (
        "gguf_prune.recovery.options", "RecoverOptions",
        dict(finetune_options=FinetuneOptions(teacher_samples=8)),
        "invalid recover options: --teacher-samples feeds fine-tuning: add --finetune lora (or full)"),
    "PlanOptions speed_metric=ttft": ("gguf_prune.planning.options", "PlanOptions", dict(speed_metric="ttft"),
                                      "invalid plan options: --speed-metric 'ttft': must be one of tg, pp"),
    "CostOptions depths=(-1,)": ("gguf_prune.runtime.cost", "CostOptions", dict(depths=(-1,)),
                                 "cost options are invalid: --depths '-1': must be whole numbers of tokens"),
    "SweepOptions budgets=(0.1, 2.0)": ("gguf_prune.pipeline.sweep", "SweepOptions", dict(budgets=(0.1, 2.0)),
                                        "sweep options are invalid: --budgets: 2.0 is not a fraction of the block "
                                        "parameters in (0, 1)"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=list(BAD_OPTIONS))
def test_the_option_dataclasses_refuse_what_the_cli_refuses(case):
    import importlib

    module, name, kw, message = BAD_OPTIONS[case]
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(GgufPruneError) as e:
        cls(**kw)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------- the other commands


def _args(tmp_path: Path, command: str) -> list:
    """The positional arguments and required options of ``command``, pointing at paths that do not exist
    (click checks option values before any stage would read them)."""
    m = tmp_path / "m"
    return {"score": ["score", m, "-o", tmp_path / "s.json"],
            "eval": ["eval", tmp_path / "a.gguf", tmp_path / "b.gguf", "-o", tmp_path / "report"],
            "recover": ["recover", m, "--plan", tmp_path / "p.json", "-o", tmp_path / "rec"],
            "package": ["package", tmp_path / "a.gguf", "-o", tmp_path / "exe"],
            "run": ["run", "--model", m, "-o", tmp_path / "run"],
            "sweep": ["sweep", m, "-o", tmp_path / "sweep"],
            "cost": ["cost", tmp_path / "a.gguf", "-o", tmp_path / "cost.json"]}[command]


USAGE = {  # (command, arguments, the error line)
    "score: one-token sequences": ("score", ["--seq-len", "1"], _range("--seq-len", "1", "x>=2")),
    "score: no samples": ("score", ["--samples", "0"], _range("--samples", "0", "x>=1")),
    "score: negative seed": ("score", ["--seed", "-1"], _range("--seed", "-1", "x>=0")),
    "score: negative greedy steps": ("score", ["--greedy", "-1"], _range("--greedy", "-1", "x>=0")),
    "score: empty greedy pool": ("score", ["--greedy-pool", "0"], _range("--greedy-pool", "0", "x>=1")),
    "score: negative tau": ("score", ["--tau", "-0.5"], _range("--tau", "-0.5", "x>=0")),
    "score: width level of one": ("score", ["--width", "0.5,1.2"],
                                  "Error: Invalid value for '--width': 1.2 is not in the range 0<x<1; give fractions "
                                  "like 0.17,0.33,0.5."),
    "score: width level not a number": ("score", ["--width", "half"],
                                        "Error: Invalid value for '--width': 'half' is not a number; give fractions "
                                        "like 0.17,0.33,0.5."),
    "score: width align not a multiple of 32": ("score", ["--width-align", "100"],
                                                "Error: Invalid value for '--width-align': 100 is not a positive "
                                                "multiple of 32 (256 for k-quants; 1: no rounding, for F16/BF16/F32 "
                                                "files only)."),
    "score: unknown greedy unit": ("score", ["--greedy-units", "layer,heads"],
                                   "Error: Invalid value for '--greedy-units': 'heads' is not one of layer, attn, mlp "
                                   "(give a comma list like layer,attn,mlp)."),
    "score: head layers not indices": ("score", ["--heads", "--head-layers", "3,x"],
                                       "Error: Invalid value for '--head-layers': 'x' is not a layer index or range; "
                                       "use indices and ranges like 3,5-8."),
    "score: head layer range backwards": ("score", ["--heads", "--head-layers", "5-3"],
                                          "Error: Invalid value for '--head-layers': '5-3' is a range that runs "
                                          "backwards; write it low-high, like 5-8."),
    "score: no batch tokens": ("score", ["--batch-tokens", "0"], _range("--batch-tokens", "0", "x>=1")),
    "eval: context below 3": ("eval", ["--ctx", "2"], _range("--ctx", "2", "x>=3")),
    "eval: no chunks": ("eval", ["--chunks", "0"], _range("--chunks", "0", "x>=1")),
    "eval: no threads": ("eval", ["--threads", "0"], _range("--threads", "0", "x>=1")),
    "eval: no bench repetitions": ("eval", ["--bench-reps", "0"], _range("--bench-reps", "0", "x>=1")),
    "recover: held-out fraction of one": ("recover", ["--heldout", "1"], _range("--heldout", "1.0", "0<=x<1")),
    "recover: warm-up fraction of one": ("recover", ["--warmup", "1.5"], _range("--warmup", "1.5", "0<=x<1")),
    "recover: zero learning rate": ("recover", ["--lr", "0"], _range("--lr", "0.0", "x>0")),
    "recover: no steps": ("recover", ["--steps", "0"], _range("--steps", "0", "x>=1")),
    "recover: no time budget": ("recover", ["--max-minutes", "0"], _range("--max-minutes", "0.0", "x>0")),
    "recover: unknown precision": ("recover", ["--precision", "fp16"],
                                   "Error: Invalid value for '--precision': 'fp16' is not one of 'auto', 'fp32', "
                                   "'bf16'."),
    "recover: negative teacher samples": ("recover", ["--teacher-samples", "-1"],
                                          _range("--teacher-samples", "-1", "x>=0")),
    "recover: no LoRA rank": ("recover", ["--lora-rank", "0"], _range("--lora-rank", "0", "x>=1")),
    "recover: one-token sequences": ("recover", ["--seq-len", "1"], _range("--seq-len", "1", "x>=2")),
    "package: port 0": ("package", ["--port", "0"], _range("--port", "0", "1<=x<=65535")),
    "package: port above 65535": ("package", ["--port", "65536"], _range("--port", "65536", "1<=x<=65535")),
    "package: negative context": ("package", ["--ctx", "-1"], _range("--ctx", "-1", "x>=0")),
    "package: no threads": ("package", ["--threads", "0"], _range("--threads", "0", "x>=1")),
    "run: budget of everything": ("run", ["--budget", "1"], _range("--budget", "1.0", "0<x<1")),
    "run: negative budget": ("run", ["--budget", "-0.2"], _range("--budget", "-0.2", "0<x<1")),
    "run: no samples": ("run", ["--samples", "0"], _range("--samples", "0", "x>=1")),
    "run: one-token sequences": ("run", ["--seq-len", "1"], _range("--seq-len", "1", "x>=2")),
    "run: no eval chunks": ("run", ["--eval-chunks", "0"], _range("--eval-chunks", "0", "x>=1")),
    "run: negative greedy pool": ("run", ["--greedy-pool", "-1"], _range("--greedy-pool", "-1", "x>=0")),
    "run: one recovery sample": ("run", ["--recover-samples", "1"], _range("--recover-samples", "1", "x>=2")),
    "run: no fine-tuning steps": ("run", ["--finetune-steps", "0"], _range("--finetune-steps", "0", "x>=1")),
    "run: negative fine-tuning time": ("run", ["--finetune-minutes", "-5"],
                                       _range("--finetune-minutes", "-5.0", "x>0")),
    "run: zero fine-tuning rate": ("run", ["--finetune-lr", "0"], _range("--finetune-lr", "0.0", "x>0")),
    "run: negative teacher samples": ("run", ["--teacher-samples", "-3"], _range("--teacher-samples", "-3", "x>=0")),
    "run: no threads": ("run", ["--threads", "0"], _range("--threads", "0", "x>=1")),
    "sweep: budget above one": ("sweep", ["--budgets", "0.1,2"],
                                "Error: Invalid value for '--budgets': 2 is not in the range 0<x<1; give fractions "
                                "like 0.1,0.2,0.3."),
    "sweep: budget not a number": ("sweep", ["--budgets", "0.1,abc"],
                                   "Error: Invalid value for '--budgets': 'abc' is not a number; give fractions like "
                                   "0.1,0.2,0.3."),
    "sweep: empty budget item": ("sweep", ["--budgets", "0.1,,0.2"],
                                 "Error: Invalid value for '--budgets': '' is not a number; give fractions like "
                                 "0.1,0.2,0.3."),
    "sweep: budget twice": ("sweep", ["--budgets", "0.1,0.1"],
                            "Error: Invalid value for '--budgets': 0.1 is given twice."),
    "sweep: unknown strategy": ("sweep", ["--strategies", "width,magic"],
                                "Error: Invalid value for '--strategies': 'magic' is not one of bi-layers, kl-layers, "
                                "greedy-layers, oneshot-mixed, greedy-mixed, width, width-mixed (give a comma list "
                                "like width,kl-layers)."),
    "sweep: no samples": ("sweep", ["--samples", "0"], _range("--samples", "0", "x>=1")),
    "sweep: no bench repetitions": ("sweep", ["--bench-reps", "0"], _range("--bench-reps", "0", "x>=1")),
    "run: speed-up of one": ("run", ["--target-speedup", "1"], _range("--target-speedup", "1.0", "x>1")),
    "run: unknown speed metric": ("run", ["--speed-metric", "ttft"],
                                  "Error: Invalid value for '--speed-metric': 'ttft' is not one of 'tg', 'pp'."),
    "run: negative speed depth": ("run", ["--speed-depth", "-1"], _range("--speed-depth", "-1", "x>=0")),
    "cost: depth not a number": ("cost", ["--depths", "0,deep"],
                                 "Error: Invalid value for '--depths': 'deep' is not a whole number of tokens; give "
                                 "depths like 0,512."),
    "cost: depth twice": ("cost", ["--depths", "0,0"], "Error: Invalid value for '--depths': 0 is given twice."),
    "cost: no repetitions": ("cost", ["--reps", "0"], _range("--reps", "0", "x>=1")),
}


@pytest.mark.parametrize("case", USAGE, ids=list(USAGE))
def test_every_command_refuses_values_out_of_range(tmp_path, case):
    command, args, line = USAGE[case]
    refused(invoke(*_args(tmp_path, command), *args), 2, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_score_refuses_head_layers_beyond_the_model(tiny_tied, tmp_path):
    """--head-layers is checked against the model's layer count by the library, before any scoring."""
    out = tmp_path / "s.json"
    refused(invoke("score", tiny_tied, "-o", out, "--heads", "--head-layers", "2,7"), 1,
            "Error: --head-layers '2,7': layer 7 is out of range 0..5 (the model has 6 layers)")
    assert not out.exists()


# ----------------------------------------------------------------- run and sweep: inputs before any work


@pytest.fixture
def small_run(tiny_tied, tmp_path):
    """`run` on the tiny model into tmp_path/run; returns (invoke with extra arguments, the out dir)."""
    out = tmp_path / "run"

    def go(*extra):
        t0 = time.time()
        r = invoke("run", "--model", tiny_tied, "-o", out, "--samples", "2", "--seq-len", "16", "--no-package",
                   *extra)
        return r, time.time() - t0

    return go, out


def _prompts(tmp_path: Path, *lines: str) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(line + "\n" for line in lines))
    return p


def test_run_refuses_an_unknown_quant_type_before_scoring(small_run):
    go, out = small_run
    r, seconds = go("--quant", "Q9")
    refused(r, 1, contains=("Error: run options are invalid: --quant 'Q9' is not a llama-quantize type; use one of "
                            "Q1_0, ", ", Q4_K_M, ", ", or none"))
    assert seconds < 60 and not out.exists()


def test_run_refuses_a_missing_text_before_scoring(small_run, tmp_path):
    go, out = small_run
    r, seconds = go("--text", tmp_path / "missing.txt")
    refused(r, 1, f"Error: run inputs are invalid: --text {tmp_path / 'missing.txt'}: no such file")
    assert seconds < 60 and not out.exists()


def test_run_refuses_a_text_too_short_for_perplexity_before_scoring(small_run, tmp_path):
    go, out = small_run
    text = tmp_path / "short.txt"
    text.write_text(SHORT_TEXT)
    r, seconds = go("--text", text)
    refused(r, 1, contains=(f"Error: run inputs are invalid: --text {text} has ",
                            " tokens; llama-perplexity needs at least 1024 (twice its context of 512): give a longer "
                            "text"))
    assert seconds < 60 and not out.exists()


PROMPT_CASES = {
    "not JSON": (['{"prompt": "Hi", "contains": ["x"]', '{"prompt": "Hi"}'],
                 "--prompts {p}:1: not valid JSON (Expecting ',' delimiter at column 35)"),
    "no prompt": (['{"contains": ["Paris"]}'], '--prompts {p}:1: each line must be an object with a "prompt" string'),
    "unknown check": (['{"prompt": "Capital of France?", "contain": ["Paris"]}'],
                      "--prompts {p}:1: unknown key 'contain'; the known ones are prompt, system, max_tokens, "
                      "contains, not_contains, regex, min_len, max_len, no_repeat"),
    "check of the wrong type": (['{"prompt": "Hi"}', '{"prompt": "Capital of France?", "contains": "Paris"}'],
                                '--prompts {p}:2: \'contains\' must be a list of strings, not "Paris"'),
    "regex that does not compile": (['{"prompt": "Hi", "regex": "(unclosed"}'],
                                    "--prompts {p}:1: regex '(unclosed' does not compile (missing ), unterminated "
                                    "subpattern at position 0)"),
    "negative length": (['{"prompt": "Hi", "min_len": -1}'],
                        "--prompts {p}:1: 'min_len' must be a whole number, 0 or more, not -1"),
    "no prompts": (["", "  "], '--prompts {p} has no prompts: write one JSON object per line, {{"prompt": "...", '
                               '"contains": [...], "not_contains": [...], "regex": "...", "min_len": N, '
                               '"max_len": N}}'),
}


@pytest.mark.parametrize("case", PROMPT_CASES, ids=list(PROMPT_CASES))
def test_run_refuses_bad_prompts_before_scoring(small_run, tmp_path, case):
    go, out = small_run
    lines, message = PROMPT_CASES[case]
    p = _prompts(tmp_path, *lines)
    r, seconds = go("--prompts", p)
    refused(r, 1, "Error: run inputs are invalid: " + message.format(p=p))
    assert seconds < 60 and not out.exists()


def test_run_refuses_a_missing_calibration_file_before_scoring(small_run, tmp_path):
    go, out = small_run
    cal = tmp_path / "cal.txt"
    r, _ = go("--calibration", cal)
    refused(r, 1, f"Error: run inputs are invalid: --calibration: calibration file {cal} does not exist; pass a text "
                  "file or a .jsonl of chats")
    assert not out.exists()


def test_run_refuses_a_budget_the_model_cannot_give_before_scoring(small_run):
    go, out = small_run
    r, _ = go("--budget", "0.5")
    refused(r, 1, "Error: run options do not fit this model: --budget 0.5: at most 0.333 of this model's block "
                  "parameters can be removed (the first 2 and last 2 of its 6 layers are kept; layers 2-3 may go)")
    assert not out.exists()


def test_run_lists_every_bad_input_at_once(small_run, tmp_path):
    go, out = small_run
    p = _prompts(tmp_path, '{"prompt": "Hi", "contain": ["x"]}')
    r, _ = go("--text", tmp_path / "missing.txt", "--prompts", p, "--calibration", tmp_path / "cal.txt")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.endswith(
        "Error: run inputs are invalid:\n"
        f"  - --calibration: calibration file {tmp_path / 'cal.txt'} does not exist; pass a text file or a .jsonl of "
        "chats\n"
        f"  - --text {tmp_path / 'missing.txt'}: no such file\n"
        f"  - --prompts {p}:1: unknown key 'contain'; the known ones are prompt, system, max_tokens, contains, "
        "not_contains, regex, min_len, max_len, no_repeat\n")
    assert not out.exists()


def test_run_refuses_an_output_path_that_is_a_file(small_run, tiny_tied, tmp_path):
    from gguf_prune.pipeline.checks import RunError
    from gguf_prune.pipeline.job import RunOptions, run

    go, out = small_run
    out.write_text("not a directory")
    r, _ = go()
    refused(r, 2, f"Error: Invalid value for '-o' / '--out-dir': Directory '{out}' is a file.")
    with pytest.raises(RunError) as e:  # the library says it too
        run(RunOptions(model=tiny_tied, out_dir=out, samples=2, seq_len=16, package=False))
    assert str(e.value) == (f"run inputs are invalid: -o/--out-dir {out} is a file; pass a directory (it is created "
                            "if missing)")
    assert out.read_text() == "not a directory"


def test_sweep_refuses_bad_inputs_before_scoring(tiny_tied, tmp_path):
    out = tmp_path / "sweep"
    r = invoke("sweep", tiny_tied, "-o", out, "--quant", "Q9")
    refused(r, 1, contains=("Error: sweep options are invalid: --quant 'Q9' is not a llama-quantize type; use one "
                            "of Q1_0, ",))
    r = invoke("sweep", tiny_tied, "-o", out, "--text", tmp_path / "missing.txt")
    refused(r, 1, f"Error: sweep inputs are invalid: --text {tmp_path / 'missing.txt'}: no such file")
    assert not out.exists()


def test_the_inputs_of_a_run_are_checked_in_the_library_too(tiny_tied, tmp_path):
    """An API user of run() gets the same refusal, before any stage."""
    from gguf_prune.pipeline.checks import RunError
    from gguf_prune.pipeline.job import RunOptions, run

    p = _prompts(tmp_path, '{"prompt": "Hi", "max_len": "600"}')
    with pytest.raises(RunError) as e:
        run(RunOptions(model=tiny_tied, out_dir=tmp_path / "run", prompts=p, samples=2, seq_len=16, package=False))
    assert str(e.value) == f"run inputs are invalid: --prompts {p}:1: 'max_len' must be a whole number, 0 or more, " \
                           'not "600"'
    assert not (tmp_path / "run").exists()
    assert json.loads(p.read_text()) == {"prompt": "Hi", "max_len": "600"}  # the input is left as it was
