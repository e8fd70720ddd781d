#!/usr/bin/env python
"""Check the cost model against llama.cpp: every pruned GGUF of a sweep directory timed against its base in
interleaved llama-bench rounds, beside the speed-up that cost.json predicts from the plan the file records.

    .venv/bin/python scripts/bench_speed_predictions.py sweep/ --rounds 5 --threads 2

It times what `sweep`'s evaluation times (runtime/speed.py: base, model, base, … in each round; the speed-up is
the median over the rounds of each model's tokens/s over the base runs beside it) and predicts what `eval --cost`
predicts (costs.speedup), without the perplexity and prompt runs: on the demo sweep's 42 models, 5 rounds of
tg128 take about 12 minutes on 2 cores. Writes DIR/speed_predictions.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from gguf_prune import costs
from gguf_prune.atomic import write_text_atomic
from gguf_prune.plan import Plan
from gguf_prune.runtime.speed import bench_against_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--quant", default="F16", help="the type the sweep wrote (its file names end in it)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    d = a.sweep_dir
    doc = costs.load(d / "cost.json")
    base = d / f"base-{a.quant}.gguf"
    models = sorted(p for p in d.glob(f"*-{a.quant}.gguf") if p != base)
    plans = {p: Plan.from_dict(json.loads(Path(f"{p}.plan.json").read_text())) for p in models}
    for p in models:
        costs.check(doc, plans[p].shape, a.threads, a.quant, source=str(d / "cost.json"))
    res = bench_against_base(base, models, n_prompt=0, n_gen=a.n_gen, rounds=a.rounds, threads=a.threads)
    rows = []
    for p, timing in zip(models, res["models"]):
        t = timing["tg@0"]
        measured, predicted = statistics.median(t["ratios"]), costs.speedup(doc, plans[p], "tg", 0)
        rows.append({"model": p.name[:-len(f"-{a.quant}.gguf")], "removed": plans[p].removed_fraction(),
                     "measured": measured, "ratios": t["ratios"], "predicted": predicted,
                     "error": abs(predicted / measured - 1)})
    errs = [r["error"] for r in rows]
    out = {"rounds": a.rounds, "threads": a.threads, "n_gen": a.n_gen, "hardware": res["hardware"],
           "command": res["command"], "base": res["base"], "rows": rows,
           "error_median": statistics.median(errs), "error_max": max(errs)}
    write_text_atomic(d / "speed_predictions.json", json.dumps(out, indent=1))
    print("| model | removed | tg× measured (spread) | tg× predicted | error |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['removed']:.1%} | {r['measured']:.3f} ({max(r['ratios']) - min(r['ratios']):.3f})"
              f" | {r['predicted']:.3f} | {100 * r['error']:.1f}% |")
    print(f"prediction error over {len(rows)} models: median {100 * out['error_median']:.1f}%, "
          f"max {100 * out['error_max']:.1f}%  ({d / 'speed_predictions.json'})")


if __name__ == "__main__":
    main()
