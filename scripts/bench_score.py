#!/usr/bin/env python
"""Benchmark the scoring engine: naive (one whole hooked forward pass per unit) vs fast
(prefix-cached, stacked variants, KL without a per-variant log-softmax), on the demo model.

    .venv/bin/python scripts/bench_score.py                        # 32 × 128 tokens, every layer, heads on 5 layers
    .venv/bin/python scripts/bench_score.py --samples 8 --head-layers 0,15,29 --parts heads

Each measurement runs in its own subprocess so its peak memory (max RSS) is its own.
Both paths compute the same scores; the script checks they agree (max |Δ KL|) and
prints a table; the figures go to out/bench_score.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_score")


def _measure(args) -> dict:
    """One measurement in this process: {"seconds", "kl", "peak_rss_mb", "layer_evals"}."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from gguf_prune.scoring import ablate, naive, oneshot
    from gguf_prune.calibration import load_calibration
    from gguf_prune.models.cuts import load_model
    from gguf_prune.scoring.inputs import parse_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    cal = load_calibration(None, tok, seq_len=args.seq_len, samples=args.samples, seed=0)
    L = model.config.num_hidden_layers
    nh, nkv = model.config.num_attention_heads, model.config.num_key_value_heads
    gs = nh // nkv
    head_layers = parse_layers(args.head_layers, L) if args.head_layers else list(range(L))
    kind, path = args.measure.split("-")
    t = time.perf_counter()
    if path == "naive":
        groups = list(cal.batches(args.naive_seqs))
        if kind == "layers":
            units = [[("layer", i)] for i in range(L)]
        else:
            units = ([[("heads", i, (q,))] for i in head_layers for q in range(nh)]
                     + [[("heads", i, tuple(range(g * gs, (g + 1) * gs)))] for i in head_layers for g in range(nkv)])
        split: dict = {}
        kl, _, _, _ = naive.naive_divergence(model, groups, units, timing=split)
        vocab_s = split["vocab"]
        evals = len(units) * L + L  # every variant runs the whole model (the bypassed layer too), plus the reference
        if kind == "heads":
            n = len(head_layers)
            kl = np.concatenate([kl[:n * nh], kl[n * nh:]])
    else:
        eng = ablate.Engine(model, batch_tokens=args.batch_tokens)
        groups = list(cal.batches(max(1, min(cal.n_seq, (args.batch_tokens // 4) // cal.seq_len))))
        refs = [eng.reference(i, m) for i, m in groups]
        spec = ablate.ScanSpec(layers=kind == "layers", sublayers=False,
                               head_layers=tuple(head_layers) if kind == "heads" else ())
        r = oneshot.scan(eng, groups, refs, spec)
        if kind == "layers":
            kl = r.kl / r.n_real
        else:
            kl = np.concatenate([np.concatenate([r.head_kl[i] for i in head_layers]),
                                 np.concatenate([r.kv_kl[i] for i in head_layers])]) / r.n_real
        evals = eng.seq_layer_evals / cal.n_seq
        vocab_s = eng.vocab_seconds
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "kl": [float(x) for x in kl],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "layer_evals": int(round(evals)), "vocab_seconds": vocab_s, "n_tokens": cal.n_tokens,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF checkpoint (default: the demo model)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--parts", default="layers,heads", help="layers, heads or both")
    ap.add_argument("--head-layers", default="0,7,14,21,28", help="layers for the head benchmark (bounds its time)")
    ap.add_argument("--batch-tokens", type=int, default=49152, help="fast path: max tokens per forward")
    ap.add_argument("--naive-seqs", type=int, default=4, help="naive path: sequences per forward")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "out" / "bench_score.json")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON to stdout
    args = ap.parse_args()
    if args.model is None:
        from gguf_prune.models.demo import ensure_demo_checkpoint

        args.model = ensure_demo_checkpoint()
    if args.measure:
        print(json.dumps(_measure(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import numpy as np
    import torch

    results = {}
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        for path in ("naive", "fast"):
            cmd = [sys.executable, __file__, "--measure", f"{part}-{path}", "--model", str(args.model),
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--head-layers", args.head_layers,
                   "--batch-tokens", str(args.batch_tokens), "--naive-seqs", str(args.naive_seqs),
                   "--threads", str(args.threads)]
            log.info("running %s ablation, %s path ...", part, path)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{part}-{path} failed:\n{proc.stderr[-3000:]}")
            results[(part, path)] = json.loads(proc.stdout.strip().splitlines()[-1])
            log.info("  %.1f s", results[(part, path)]["seconds"])
    rows = []
    for part in dict.fromkeys(p for p, _ in results):
        nv, fa = results[(part, "naive")], results[(part, "fast")]
        rows.append({"part": part, "naive_s": nv["seconds"], "fast_s": fa["seconds"],
                     "speedup": nv["seconds"] / fa["seconds"],
                     "naive_layer_evals": nv["layer_evals"], "fast_layer_evals": fa["layer_evals"],
                     "naive_vocab_s": nv["vocab_seconds"], "fast_vocab_s": fa["vocab_seconds"],
                     "naive_peak_rss_mb": nv["peak_rss_mb"], "fast_peak_rss_mb": fa["peak_rss_mb"],
                     "max_abs_kl_diff": float(np.abs(np.array(nv["kl"]) - np.array(fa["kl"])).max()),
                     "units": len(nv["kl"])})
    doc = {"model": str(args.model), "samples": args.samples, "seq_len": args.seq_len,
           "n_tokens": next(iter(results.values()))["n_tokens"], "head_layers": args.head_layers,
           "threads": next(iter(results.values()))["threads"], "batch_tokens": args.batch_tokens,
           "naive_seqs": args.naive_seqs, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'part':<8}{'units':>6}{'naive s':>10}{'fast s':>10}{'speedup':>9}{'layer evals n/f':>17}"
          f"{'vocab s n/f':>15}{'RSS MB n/f':>14}{'max|ΔKL|':>11}")
    for r in rows:
        print(f"{r['part']:<8}{r['units']:>6}{r['naive_s']:>10.1f}{r['fast_s']:>10.1f}{r['speedup']:>8.2f}x"
              f"{r['naive_layer_evals']:>10}/{r['fast_layer_evals']:<6}"
              f"{r['naive_vocab_s']:>8.0f}/{r['fast_vocab_s']:<6.0f}"
              f"{r['naive_peak_rss_mb']:>7.0f}/{r['fast_peak_rss_mb']:<6.0f}{r['max_abs_kl_diff']:>11.1e}")
    print("vocab s: time in the vocabulary projection (lm_head) and the KL's reductions over the vocabulary")
    print(f"\n{doc['samples']} sequences x {doc['seq_len']} tokens, {doc['threads']} threads; wrote {args.output}")


if __name__ == "__main__":
    main()
