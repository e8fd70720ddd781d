#!/usr/bin/env python
"""Benchmark layer-major streamed scoring (`score --stream`) against in-memory scoring, on a random sharded
Llama of more than 2 GB (float32) that this script writes at run time (seeded, in a temporary directory).

    .venv/bin/python scripts/bench_stream.py                 # 40 layers, hidden 1024, GQA 16/4, 4 × 32 tokens
    .venv/bin/python scripts/bench_stream.py --layers 8      # a quick look

Each scoring run is its own subprocess, so its peak memory is its own: the child's ru_maxrss from os.wait4.
Both runs use the same calibration tokens and options (layers and sub-blocks, neuron statistics, no plots).
The script prints a table and writes out/bench_stream.json: time, peak RSS, their ratios, the largest
absolute difference between the two runs' scores, and the per-layer cost the README projections use.
Targets (issue 9): peak RSS ≤ 0.4× in-memory, identical scores, time ≤ 1.2× in-memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the seeded test checkpoints


def build_model(out: Path, layers: int, hidden: int, heads: int, kv_heads: int, ff: int, seed: int,
                shard_bytes: int) -> int:
    """Write a random LlamaForCausalLM checkpoint in safetensors shards + index, one tensor at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from tiny_models import TOKENIZER_DIR

    out.mkdir(parents=True, exist_ok=True)
    vocab = 49152  # SmolLM2's tokenizer
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      torch_dtype="float32", architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(out)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy2(f, out / f.name)
    gen = torch.Generator().manual_seed(seed)
    hd = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "self_attn.q_proj.weight", (heads * hd, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * hd, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * hd, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
                   (p + "post_attention_layernorm.weight", (hidden,)), (p + "mlp.gate_proj.weight", (ff, hidden)),
                   (p + "mlp.up_proj.weight", (ff, hidden)), (p + "mlp.down_proj.weight", (hidden, ff))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    # shard boundaries first (from the sizes), then each shard generated and written in turn
    groups, cur, size, total = [], [], 0, 0
    for name, shape in shapes:
        nbytes = 4 * int(torch.Size(shape).numel())
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
        total += nbytes
    groups.append(cur)
    weight_map = {}
    for k, group in enumerate(groups):
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:  # unit-scale outputs per projection
                tensors[name] = torch.randn(shape, generator=gen) * (0.5 / shape[-1] ** 0.5)
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def child(args) -> None:
    """One scoring run in this process; writes its summary to args.result."""
    import torch

    from gguf_prune.scoring.options import ScoreOptions
    from gguf_prune.scoring.measure import score_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    out = score_model(Path(args.model), Path(args.out), ScoreOptions(
        seq_len=args.seq_len, samples=args.samples, plots=False, progress=False, stream=args.run == "stream"))
    seconds = time.perf_counter() - t
    d = json.loads(out.read_text())
    Path(args.result).write_text(json.dumps({"seconds": seconds, "timing": d["timing"],
                                             "stream": d.get("stream")}))


def run_child(args, run: str, model: Path, work: Path) -> dict:
    res = work / f"{run}.result.json"
    cmd = [sys.executable, __file__, "--child", run, "--model", str(model), "--out", str(work / f"{run}.json"),
           "--result", str(res), "--seq-len", str(args.seq_len), "--samples", str(args.samples)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t = time.perf_counter()
    p = subprocess.Popen(cmd)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"the {run} run failed (exit {p.returncode}): {' '.join(cmd)}")
    r = json.loads(res.read_text())
    r.update(wall_seconds=wall, peak_rss_bytes=usage.ru_maxrss * 1024)  # Linux: ru_maxrss in KiB
    return r


def max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for ea, eb in zip(a["layers"], b["layers"]):
        for k in ("bi", "kl", "attn_kl", "mlp_kl", "attn_bi", "mlp_bi"):
            if ea[k] is not None or eb[k] is not None:
                worst = max(worst, abs(ea[k] - eb[k]))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=2816)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each run (default: torch's)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the model and scores in this directory")
    ap.add_argument("--child", choices=["build", "memory", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "build":  # in its own process: Linux carries a parent's peak RSS into forked children
        size = build_model(Path(args.model), args.layers, args.hidden, args.heads, args.kv_heads, args.ff, args.seed,
                           args.shard_mb << 20)
        Path(args.result).write_text(json.dumps({"bytes": size}))
        return
    if args.child:
        args.run = args.child
        return child(args)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_stream."))
    try:
        model = work / "model"
        t = time.perf_counter()
        # the model is written by a child process: the parent stays small, so the scoring runs it forks start
        # with a small peak RSS (Linux carries the forking process's high-water mark into the child)
        built = work / "build.result.json"
        subprocess.run([sys.executable, __file__, "--child", "build", "--model", str(model), "--result", str(built),
                        "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads),
                        "--kv-heads", str(args.kv_heads), "--ff", str(args.ff), "--seed", str(args.seed),
                        "--shard-mb", str(args.shard_mb)], check=True)
        size = json.loads(built.read_text())["bytes"]
        print(f"wrote a random {args.layers}-layer Llama, {size / 2**30:.2f} GiB float32 in "
              f"{len(list(model.glob('*.safetensors')))} shards, in {time.perf_counter() - t:.0f} s", flush=True)
        runs = {}
        for run in ("memory", "stream"):
            runs[run] = run_child(args, run, model, work)
            print(f"{run}: {runs[run]['seconds']:.1f} s, peak RSS {runs[run]['peak_rss_bytes'] / 2**30:.2f} GiB",
                  flush=True)
        a = json.loads((work / "memory.json").read_text())
        b = json.loads((work / "stream.json").read_text())
        diff = max_diff(a, b)
        m, s = runs["memory"], runs["stream"]
        st = s["stream"]
        # per-layer cost of the streamed run: seconds per (layer evaluation × token)
        n_tok = args.samples * args.seq_len
        evals = s["timing"]["layer_evals"] * args.samples  # layer evaluations × sequences
        layer_params = (args.hidden * (args.hidden // args.heads) * (2 * args.heads + 2 * args.kv_heads)
                        + 3 * args.hidden * args.ff)
        sec_layers = s["timing"]["seconds"].get("layers", s["seconds"])
        per_token_eval = sec_layers / (evals * args.seq_len)
        result = {
            "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
                      "ff": args.ff, "vocab": 49152, "bytes": size, "layer_params": layer_params, "seed": args.seed},
            "calibration": {"samples": args.samples, "seq_len": args.seq_len, "tokens": n_tok},
            "memory": {"seconds": m["seconds"], "peak_rss_bytes": m["peak_rss_bytes"], "timing": m["timing"]},
            "stream": {"seconds": s["seconds"], "peak_rss_bytes": s["peak_rss_bytes"], "timing": s["timing"],
                       "passes": st["passes"], "bytes_read": st["bytes_read"], "why": st["why"]},
            "ratios": {"time": s["seconds"] / m["seconds"], "peak_rss": s["peak_rss_bytes"] / m["peak_rss_bytes"]},
            "max_abs_score_diff": diff,
            "per_layer_cost": {"layer_evals_x_seqs": evals, "seconds_in_layers": sec_layers,
                               "seconds_per_token_layer_eval": per_token_eval,
                               "effective_gflops": 2 * layer_params / per_token_eval / 1e9},
            "targets_met": {"peak_rss<=0.4x": s["peak_rss_bytes"] <= 0.4 * m["peak_rss_bytes"],
                            "time<=1.2x": s["seconds"] <= 1.2 * m["seconds"], "scores_identical(<=1e-5)": diff <= 1e-5},
            "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                     "threads": args.threads or None},
        }
        print()
        print("| run       | time (s) | peak RSS (GiB) | passes | read (GiB) |")
        print("|-----------|---------:|---------------:|-------:|-----------:|")
        print(f"| in memory | {m['seconds']:8.1f} | {m['peak_rss_bytes'] / 2**30:14.2f} |      - |          - |")
        print(f"| --stream  | {s['seconds']:8.1f} | {s['peak_rss_bytes'] / 2**30:14.2f} | {st['passes']:6d} | "
              f"{st['bytes_read'] / 2**30:10.2f} |")
        r = result["ratios"]
        print(f"| ratio     | {r['time']:8.2f} | {r['peak_rss']:14.2f} |        |            |")
        print(f"max |score difference| = {diff:.3g}; per layer evaluation and token {per_token_eval * 1e6:.1f} µs "
              f"(≈ {result['per_layer_cost']['effective_gflops']:.1f} GFLOP/s)")
        out = ROOT / "out" / "bench_stream.json"
        out.parent.mkdir(exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
