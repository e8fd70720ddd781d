#!/usr/bin/env python
"""Benchmark recovery on the demo model: the linear-patch fit, the repair of a width plan, one fine-tuning step.

    .venv/bin/python scripts/bench_recover.py                      # plan: 6 layers removed, 64 × 128 tokens
    .venv/bin/python scripts/bench_recover.py --plan plan.json --samples 32 --steps 5
    .venv/bin/python scripts/bench_recover.py --measures load,repair --repair-plan runs/…/plan.json

Each measurement runs in its own subprocess so its peak memory (max RSS) is its own:

``load``        the model and the calibration tokens only: the baseline every other row includes;
``patch``       fit_patches (both streams, the sequential ridge fits, the held-out KL), seconds and peak;
``repair``      every repair of --repair-plan (default: every MLP but the first and last two narrowed by a third,
                about 20% of the block parameters) and its patches, fitted in one walk with the strength of
                each chosen by held-out KL: seconds, peak, and the memory a fit of the same plan would need on
                an 8B model (the arithmetic, printed);
``step-lora``   LoRA (rank 16) fine-tuning steps of --batch-size sequences: the median seconds per step
                after one warm-up step, with the teacher states computed before (not timed);
``step-full``   the same, full fine-tuning of every used weight of the kept layers.

The figures go to out/bench_recover.json and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_recover")

MEASURES = ("load", "patch", "repair", "step-lora", "step-full")


def _default_plan(model_dir: Path):
    """Six layers removed in two runs (10-12 and 20-22): 20% of SmolLM2-135M's block parameters."""
    from gguf_prune.models import checkpoint
    from gguf_prune.plan import LayerPlan, ModelShape, Plan

    shape = ModelShape.from_hf_dir(model_dir)
    drop = {10, 11, 12, 20, 21, 22}
    return Plan(shape=shape, layers=tuple(LayerPlan(i, removed=i in drop) for i in range(shape.n_layer)),
                fingerprint=checkpoint.fingerprint(model_dir))


def _width_plan(model_dir: Path):
    """Every MLP but the first and last two narrowed to its first 2/3 of neurons, aligned to 256 (1,024 of 1,536
    on the demo model): about 20% of the block parameters."""
    from dataclasses import replace

    plan = _default_plan(model_dir)
    s = plan.shape
    keep = tuple(range((2 * s.n_ff // 3) // 256 * 256 or s.n_ff // 2))
    return replace(plan, layers=tuple(replace(lp, removed=False, neurons=keep if 2 <= lp.index < s.n_layer - 2
                                              else None) for lp in plan.layers))


def projection(n_embd: int, n_ff: int, n_seq: int, seq_len: int, heldout: int) -> dict:
    """Bytes a repair fit holds besides the model, for the widest MLP repair (every neuron kept but one):
    the float64 Gram of the kept block and its Cholesky factor, one fit, the layer's captured activations
    (float32), and the residual streams (full and repaired for every sequence, the cut for the held-out)."""
    k = n_ff + 1  # kept columns and the bias
    return {"gram_and_factor": 2 * k * k * 8, "xy_and_fit": 2 * k * n_embd * 8,
            "activations": n_seq * seq_len * n_ff * 4, "streams": (2 * n_seq + heldout) * seq_len * n_embd * 4}


def _measure(args) -> dict:
    import contextlib
    import copy

    import torch
    from transformers import AutoTokenizer

    from gguf_prune.calibration import load_calibration
    from gguf_prune.models import cuts
    from gguf_prune.models.tensors import PATCH_NAME
    from gguf_prune.plan import Plan
    from gguf_prune.recovery.options import FinetuneOptions
    from gguf_prune.recovery.finetune import batch_loss, teacher_states
    from gguf_prune.recovery.patches import fit_patches, mark_patches
    from gguf_prune.recovery.recover import split_heldout
    from gguf_prune.recovery.student import prepare_student

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure == "repair":
        plan = Plan.load(args.repair_plan) if args.repair_plan else _width_plan(args.model)
    else:
        plan = Plan.load(args.plan) if args.plan else _default_plan(args.model)
    plan = mark_patches(plan.without_patches())
    model = cuts.load_model(args.model)
    cal = load_calibration(None, AutoTokenizer.from_pretrained(args.model), seq_len=args.seq_len,
                           samples=args.samples, seed=0)
    heldout = split_heldout(cal.n_seq, 0.1, 0)
    out: dict = {"tokens": cal.n_tokens, "patches": len(plan.patches())}
    if args.measure == "patch":
        t = time.perf_counter()
        _, stats = fit_patches(model, plan, cal, heldout)
        out.update(seconds=time.perf_counter() - t, heldout_kl=stats.get("heldout_kl"),
                   residuals=[p.get("heldout_residual") for p in stats["patches"]])
    elif args.measure == "repair":
        t = time.perf_counter()
        _, stats = fit_patches(model, plan, cal, heldout, repair=True)
        reps = stats["repairs"]
        out.update(seconds=time.perf_counter() - t, heldout_kl=stats.get("heldout_kl"), repairs=len(reps),
                   applied=sum(r["ridge"] is not None for r in reps), removed=plan.removed_fraction())
    elif args.measure.startswith("step-"):
        method = args.measure.split("-", 1)[1]
        patches = {PATCH_NAME.format(lp.index): torch.zeros(plan.shape.n_embd, plan.shape.n_embd)
                   for lp in plan.patches()}
        o = FinetuneOptions(method=method, batch_size=args.batch_size)
        ids, mask = cal.input_ids[:args.batch_size], cal.attention_mask[:args.batch_size].long()
        t_states = teacher_states(model, ids, mask, "cpu", args.batch_size)
        st = prepare_student(cuts.apply_plan(copy.deepcopy(model), plan, patches), plan, o)
        del model
        opt = torch.optim.AdamW([p for _, p in st.params], lr=o.learning_rate)
        times = []
        for k in range(args.steps + 1):
            t = time.perf_counter()
            loss, _ = batch_loss(st.core, st.lm_head, ids, mask, t_states, "distill", contextlib.nullcontext)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if k:  # the first step warms up (allocations, lazy init)
                times.append(time.perf_counter() - t)
        out.update(seconds_per_step=statistics.median(times), steps=args.steps,
                   tokens_per_step=int(mask.sum()), trainable_params=sum(p.numel() for _, p in st.params))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _print_table(results: dict) -> None:
    """One row per measure: seconds, peak RSS and what it adds over ``load``."""
    base = results.get("load", {}).get("peak_rss_mb")
    rows = [("measure", "seconds", "peak RSS MB", "over load MB", "note")]
    for m, r in results.items():
        secs = r.get("seconds", r.get("seconds_per_step"))
        note = ""
        if m == "patch":
            note = f"{r['patches']} patch(es) on {r['tokens']} tokens; held-out KL {r['heldout_kl']}"
        elif m == "repair":
            kl = r["heldout_kl"] or {}
            note = (f"{r['applied']}/{r['repairs']} repairs, {r['patches']} patch(es), {100 * r['removed']:.1f}% "
                    f"removed, on {r['tokens']} tokens; held-out KL {kl.get('cut', float('nan')):.4f} → "
                    f"{kl.get('patched', float('nan')):.4f}")
        elif m.startswith("step"):
            note = f"per step of {r['tokens_per_step']} tokens, {r['trainable_params'] / 1e6:.2f}M trainable"
        rows.append((m, "" if secs is None else f"{secs:.2f}", f"{r['peak_rss_mb']:.0f}",
                     "" if base is None or m == "load" else f"{r['peak_rss_mb'] - base:+.0f}", note))
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def _print_projection(args) -> None:
    """What a repair fit holds besides the model, on the demo model and on an 8B llama (Llama-3-8B's shape)."""
    from gguf_prune.plan import ModelShape

    s = ModelShape.from_hf_dir(args.model)
    n_ho = max(1, round(0.1 * args.samples))
    print(f"\nrepair memory besides the model ({args.samples} × {args.seq_len} tokens, one layer at a time, the "
          "widest repair):")
    for name, d, ff in ((args.model.name, s.n_embd, s.n_ff), ("8B llama (4096 / 14336)", 4096, 14336)):
        p = projection(d, ff, args.samples, args.seq_len, n_ho)
        print(f"  {name}: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in p.items())
              + f"; total {sum(p.values()) / 1e9:.2f} GB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF checkpoint (default: the demo model)")
    ap.add_argument("--plan", type=Path, default=None, help="plan.json (default: layers 10-12 and 20-22 removed)")
    ap.add_argument("--repair-plan", type=Path, default=None,
                    help="plan.json for the repair measure (default: every MLP but 2+2 narrowed by a third)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="Timed fine-tuning steps (after one warm-up).")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--measures", default=",".join(MEASURES))
    ap.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)  # the child's job
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "out" / "bench_recover.json")
    args = ap.parse_args()
    if args.model is None:
        from gguf_prune.models.demo import ensure_demo_checkpoint

        args.model = ensure_demo_checkpoint()
    if args.measure:
        print(json.dumps(_measure(args)))
        return 0
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    results = {}
    for m in [x.strip() for x in args.measures.split(",") if x.strip()]:
        cmd = [sys.executable, __file__, "--measure", m, "--model", str(args.model), "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        if args.plan:
            cmd += ["--plan", str(args.plan)]
        if args.repair_plan:
            cmd += ["--repair-plan", str(args.repair_plan)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        log.info("measuring %s", m)
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[m] = json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_seconds": time.perf_counter() - t}
    _print_table(results)
    if "repair" in results:
        _print_projection(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {"model": str(args.model), "plan": str(args.plan) if args.plan else "layers 10-12, 20-22 removed",
            "samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "threads": args.threads or torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__}
    args.output.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
