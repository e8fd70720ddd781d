"""Evaluation in llama.cpp: what pruning cost in quality, speed and size.

Everything is measured on the GGUF files users run, by the pinned llama.cpp:

- quality: ``llama-perplexity`` on held-out text; the base model's logits are saved
  once with ``--kl-divergence-base`` and each model is compared on the same tokens
  with ``--kl-divergence`` (mean / median / 99th-percentile KL, top-1 agreement,
  PPL ratio);
- speed: ``llama-bench`` (pp512 / tg128, ≥ 3 repetitions), as ratios to the base
  measured in the same run;
- size: bytes on disk, parameters per layer and in total, tensor types;
- task prompts: greedy chat completions through each model's own chat template,
  with simple checks per prompt (:mod:`gguf_prune.runtime.prompts`).

Every command that ran is recorded in the report so a user can re-run it by hand.
A failure in one model's evaluation is recorded for that model; the others finish.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf_prune.data import DATA_DIR
from gguf_prune.runtime import llamacpp
from gguf_prune.runtime.llamacpp import LlamaCppError
from gguf_prune.runtime.prompts import prompt_problems, run_prompts
from gguf_prune.errors import GgufPruneError
from gguf_prune.values import is_int

log = logging.getLogger(__name__)

DEFAULT_TEXT = DATA_DIR / "heldout_stdlib_docs.txt"


class EvalError(GgufPruneError, ValueError):
    """Bad evaluation input: what is wrong and what to do."""


@dataclass
class EvalOptions:
    ctx: int = 512
    chunks: int | None = None  # None: all chunks the text allows
    threads: int | None = None
    bench: bool = True
    bench_prompt: int = 512
    bench_gen: int = 128
    bench_reps: int = 3
    prompts: Path | None = None
    max_tokens: int = 128
    labels: list[str] = field(default_factory=list)
    cost: Path | None = None  # cost.json: each pruned model's predicted speed-up beside the measured one

    def __post_init__(self) -> None:
        # llama-perplexity scores tokens n_ctx/2 .. n_ctx-2 of each window: none below a context of 3
        p = []
        for flag, v, lo, optional in (("--ctx", self.ctx, 3, False), ("--chunks", self.chunks, 1, True),
                                      ("--threads", self.threads, 1, True),
                                      ("bench_prompt", self.bench_prompt, 1, False),
                                      ("bench_gen", self.bench_gen, 1, False),
                                      ("--bench-reps", self.bench_reps, 1, False),
                                      ("max_tokens", self.max_tokens, 1, False)):
            if v is None and optional:
                continue
            if not is_int(v) or v < lo:
                p.append(f"{flag} {v!r}: must be a whole number, {lo} or more")
        if p:
            raise EvalError("invalid eval options: " + "; ".join(p))


# ------------------------------------------------------------------ GGUF facts


def gguf_facts(path: Path) -> dict[str, Any]:
    """Size, parameters per layer, tensor types and the recorded plan of a GGUF (no tensor data read)."""
    from gguf import GGUFReader

    from gguf_prune.models.arch import split_layer_name
    from gguf_prune.writing.gguf_names import PLAN_KEY

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    per_layer: dict[int, int] = {}
    types: Counter[str] = Counter()
    total = 0
    for t in r.tensors:
        n = int(t.n_elements)
        total += n
        types[t.tensor_type.name] += 1
        layer = split_layer_name(t.name)  # (index, rest of the name); None outside the layers
        if layer:
            per_layer[layer[0]] = per_layer.get(layer[0], 0) + n

    def field_value(key: str, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    def per_layer_dim(key: str) -> list[int]:
        v = field_value(f"{arch}.{key}")
        n_layer = int(field_value(f"{arch}.block_count", 0))
        if isinstance(v, list):
            return [int(x) for x in v]
        return [int(v)] * n_layer if v is not None else []

    plan_json = field_value(PLAN_KEY)
    tokens = r.fields.get("tokenizer.ggml.tokens")
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "architecture": arch,
        "n_layer": int(field_value(f"{arch}.block_count", 0)),
        "params_total": total,
        "params_per_layer": [per_layer[i] for i in sorted(per_layer)],
        "n_head": per_layer_dim("attention.head_count"),
        "n_head_kv": per_layer_dim("attention.head_count_kv"),
        "n_ff": per_layer_dim("feed_forward_length"),
        "tensor_types": dict(sorted(types.items())),
        "n_vocab": len(tokens.data) if tokens is not None else None,
        "plan": json.loads(plan_json) if isinstance(plan_json, str) else None,
        "file_type": file_type_name(field_value("general.file_type")),
    }


def file_type_name(v: Any) -> str | None:
    """llama.cpp's file type (F16, Q4_K_M, ...) for a ``general.file_type`` value."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(v)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return None


def _vocab_digest(path: Path) -> str:
    import hashlib

    from gguf import GGUFReader

    r = GGUFReader(str(path))
    f = r.fields.get("tokenizer.ggml.tokens")
    if f is None:
        return ""
    return hashlib.sha256("\x00".join(f.contents()).encode()).hexdigest()


# ------------------------------------------------------------ llama-perplexity

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_KLD_PATTERNS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUM}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUM}",
    "ln_ppl_ratio": rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_NUM}",
    "kl_mean": rf"Mean\s+KLD:\s*{_NUM}",
    "kl_max": rf"Maximum KLD:\s*{_NUM}",
    "kl_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
    "kl_median": rf"Median\s+KLD:\s*{_NUM}",
    "top1_agreement_pct": rf"Same top p:\s*{_NUM}",
}


def parse_kld_output(text: str) -> dict[str, float]:
    out = {}
    for key, pat in _KLD_PATTERNS.items():
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1))
    if "kl_mean" not in out:
        raise LlamaCppError("llama-perplexity printed no KL statistics:\n" + "\n".join(text.splitlines()[-15:]))
    if "top1_agreement_pct" in out:
        out["top1_agreement"] = out.pop("top1_agreement_pct") / 100.0
    return out


def parse_ppl_output(text: str) -> float:
    m = re.search(rf"Final estimate: PPL = {_NUM}", text)
    if not m:
        raise LlamaCppError("llama-perplexity printed no final estimate:\n" + "\n".join(text.splitlines()[-15:]))
    return float(m.group(1))


def _ppl_args(model: Path, o: EvalOptions) -> list[str]:
    args = ["-m", str(model), "-c", str(o.ctx), "-b", str(min(o.ctx, 2048))]
    if o.chunks:
        args += ["--chunks", str(o.chunks)]
    if o.threads:
        args += ["-t", str(o.threads)]
    return args


def count_tokens(model: Path, text: str) -> int:
    llm = llamacpp.load(model, n_ctx=8, vocab_only=True)
    try:
        return len(llm.tokenize(text.encode(), add_bos=True, special=False))
    finally:
        llm.close()


# -------------------------------------------------------------------- bench


# ------------------------------------------------------------------- prompts


def load_prompts(path: Path) -> list[dict[str, Any]]:
    """The task prompts of a JSONL file; every problem (a typo'd key checks nothing) is one EvalError."""
    problems = prompt_problems(path)
    if problems:
        raise EvalError("\n".join(problems) if len(problems) == 1 else "task prompts are invalid:\n  - "
                        + "\n  - ".join(problems))
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------ evaluate


def evaluate(base: Path, models: list[Path], out_dir: Path, text: Path | None = None,
             options: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate ``models`` against ``base`` in llama.cpp; write report.json/.md/PNGs to ``out_dir``.

    The base is run once with its logits saved; each model is compared with them token by token, then all
    are timed in one llama-bench run and given the task prompts. A model that fails is recorded as failed.
    """
    from gguf_prune.runtime import report

    o = options or EvalOptions()
    base = Path(base)
    models = [Path(m) for m in models]
    text = Path(text) if text else DEFAULT_TEXT
    out_dir = Path(out_dir)
    n_tokens = _check_inputs(base, models, text, o)
    prompts = load_prompts(o.prompts) if o.prompts else None
    labels = o.labels or []
    names = [labels[k] if k < len(labels) else m.stem for k, m in enumerate([base, *models])]
    out_dir.mkdir(parents=True, exist_ok=True)
    base_vocab = _vocab_digest(base)

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix=".eval-", dir=out_dir))  # the base's saved logits: large, temporary
    try:
        kld_base = work / "base.kld"
        log.info("[eval 1/%d] %s (base): perplexity and saved logits", len(models) + 1, names[0])
        base_entry, chunks = _measure_base(base, names[0], text, kld_base, o)
        entries = [base_entry]
        for k, (m, name) in enumerate(zip(models, names[1:]), start=2):
            log.info("[eval %d/%d] %s: KL divergence against the base", k, len(models) + 1, name)
            entries.append(_measure_against_base(m, name, base, base_vocab, kld_base, o))
        measured = [(Path(e["facts"]["path"]), e) for e in entries if "error" not in e]
        hardware = _measure_speed(measured, base_entry, o) if o.bench and measured else {}
        if prompts:
            _run_task_prompts(measured, prompts, o)
        _add_ratios(entries, base_entry)
        result = {
            "schema": "gguf-prune/report", "version": 1,
            "text": {"path": str(text), "tokens": n_tokens, "ctx": o.ctx, "chunks": chunks,
                     "note": "KL and top-1 are over the second half of each chunk, as llama-perplexity scores"},
            "hardware": hardware | {"machine": platform.machine(), "cpu_count": os.cpu_count()},
            "bench": {"pp": o.bench_prompt, "tg": o.bench_gen, "reps": o.bench_reps} if o.bench else None,
            "models": entries,
            "seconds": round(time.time() - t0, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.write_report(result, out_dir)
    return result


def _check_inputs(base: Path, models: list[Path], text: Path, o: EvalOptions) -> int:
    """Refuse what would fail after long work: a missing text or model, a base llama.cpp cannot load, a text
    too short for perplexity. The text's length in the base's tokens."""
    if not text.exists() or text.stat().st_size == 0:
        raise EvalError(f"evaluation text {text} is missing or empty")
    for m in [base, *models]:
        if not m.is_file():
            raise EvalError(f"no such model file: {m}")
    try:
        llamacpp.load(base, n_ctx=8, vocab_only=True).close()
    except LlamaCppError as e:
        raise EvalError(f"the base model cannot be loaded by llama.cpp: {e}") from None
    if o.cost is not None:
        from gguf_prune.costs import CostError, load

        try:
            load(o.cost)
        except CostError as e:
            raise EvalError(str(e)) from None
    n_tokens = count_tokens(base, text.read_text(errors="replace"))
    if n_tokens < 2 * o.ctx:
        raise EvalError(f"evaluation text {text} has {n_tokens} tokens; llama-perplexity needs at least "
                        f"{2 * o.ctx} for a context of {o.ctx}: give a longer text or a smaller --ctx")
    return n_tokens


def _measure_base(base: Path, name: str, text: Path, kld_base: Path,
                  o: EvalOptions) -> tuple[dict[str, Any], int | None]:
    """The base's perplexity, its logits saved to ``kld_base``; its report entry and the chunks scored."""
    args = _ppl_args(base, o) + ["-f", str(text), "--kl-divergence-base", str(kld_base)]
    proc = llamacpp.run_tool("llama-perplexity", args)
    said = proc.stdout + proc.stderr
    entry = {"name": name, "role": "base", "facts": gguf_facts(base),
             "quality": {"ppl": parse_ppl_output(said), "kl_mean": 0.0, "ppl_ratio": 1.0, "top1_agreement": 1.0},
             "commands": {"perplexity": llamacpp.command_line("llama-perplexity", args)}}
    chunk_info = re.search(r"calculating perplexity over (\d+) chunks", said)
    return entry, int(chunk_info.group(1)) if chunk_info else o.chunks


def _measure_against_base(model: Path, name: str, base: Path, base_vocab: str, kld_base: Path,
                          o: EvalOptions) -> dict[str, Any]:
    """One model's report entry: its facts and its KL, PPL and top-1 against the base's saved logits, or the
    error that stopped them."""
    entry: dict[str, Any] = {"name": name, "role": "pruned", "commands": {}}
    try:
        entry["facts"] = gguf_facts(model)
        if _vocab_digest(model) != base_vocab:
            raise EvalError(f"{model} has a different vocabulary from the base {base}: KL and perplexity "
                            "cannot be compared token by token")
        args = _ppl_args(model, o) + ["--kl-divergence-base", str(kld_base), "--kl-divergence"]
        entry["commands"]["perplexity"] = llamacpp.command_line("llama-perplexity", args)
        proc = llamacpp.run_tool("llama-perplexity", args)
        entry["quality"] = parse_kld_output(proc.stdout + proc.stderr)
    except (LlamaCppError, EvalError, OSError, ValueError) as e:
        entry["error"] = str(e)
        log.error("%s failed: %s", name, str(e).splitlines()[0])
    return entry


def _measure_speed(measured: list[tuple[Path, dict[str, Any]]], base_entry: dict[str, Any],
                   o: EvalOptions) -> dict[str, Any]:
    """llama-bench on every model measured, in rounds with the base between the models (runtime/speed.py): speeds
    and their ratios to the base into each entry; the hardware it ran on (or the error that stopped it)."""
    from gguf_prune.runtime.speed import bench_against_base

    base = Path(base_entry["facts"]["path"])
    others = [(p, e) for p, e in measured if e is not base_entry]
    log.info("[eval] speed: llama-bench pp%d/tg%d, %d rounds of %d model(s) with the base between them",
             o.bench_prompt, o.bench_gen, o.bench_reps, len(others))
    try:
        res = bench_against_base(base, [p for p, _ in others], n_prompt=o.bench_prompt, n_gen=o.bench_gen,
                                 rounds=o.bench_reps, threads=o.threads)
    except LlamaCppError as err:
        log.error("llama-bench failed: %s", str(err).splitlines()[0])
        return {"error": str(err)}
    for e, timings in [(base_entry, res["base"])] + [(e, t) for (_, e), t in zip(others, res["models"])]:
        e["speed"] = {}
        for metric in ("pp", "tg"):
            t = timings.get(f"{metric}@0")
            if t:
                e["speed"] |= {f"{metric}_ts": t["ts"], f"{metric}_ts_std": t["ts_std"], f"{metric}_ratio": t["ratio"],
                               f"{metric}_ratio_spread": t["ratio_spread"]}
        e["commands"]["bench"] = res["command"]  # one round; the run repeats it bench_reps times
    hardware = res["hardware"] | {"rows": res["rows"], "rounds": o.bench_reps}
    if o.cost is not None:
        _predict_speed(measured, o.cost, hardware.get("threads"))
    return hardware


def _predict_speed(measured: list[tuple[Path, dict[str, Any]]], cost: Path, threads: int | None) -> None:
    """Each pruned model's speed-up as the cost file predicts it from the plan the GGUF records, beside the
    measured one (depth 0, like the llama-bench run above); a cost file that does not fit the model is noted."""
    from gguf_prune import costs
    from gguf_prune.plan import Plan

    doc = costs.load(cost)
    for _, e in measured:
        plan_d, ftype = e["facts"].get("plan"), e["facts"].get("file_type")
        if not plan_d:
            continue
        try:
            plan = Plan.from_dict(plan_d)
            costs.check(doc, plan.shape, threads, ftype, source=str(cost))
        except costs.CostError as err:
            e["speed"]["predicted_error"] = str(err)
            continue
        for metric in costs.SPEED_METRICS:
            if costs.key(metric, 0) in doc["fits"]:
                e["speed"][f"{metric}_ratio_predicted"] = costs.speedup(doc, plan, metric, 0)


def _run_task_prompts(measured: list[tuple[Path, dict[str, Any]]], prompts: list[dict[str, Any]],
                      o: EvalOptions) -> None:
    """The task prompts on every model measured, the results (or the error) into each entry."""
    for p, e in measured:
        log.info("[eval] task prompts on %s", e["name"])
        try:
            e["prompts"] = run_prompts(p, prompts, o)
        except (LlamaCppError, ValueError) as err:
            e["prompts"] = {"error": str(err)}


def _add_ratios(entries: list[dict[str, Any]], base_entry: dict[str, Any]) -> None:
    """Size on disk and parameters of each model as ratios to the base's."""
    for e in entries:
        if "facts" in e and "bytes" in e["facts"]:
            e["size_ratio"] = e["facts"]["bytes"] / base_entry["facts"]["bytes"]
            e["params_ratio"] = e["facts"]["params_total"] / base_entry["facts"]["params_total"]
