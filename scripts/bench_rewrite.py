#!/usr/bin/env python
"""Benchmark the streaming GGUF rewrite on the demo model's F32 GGUF (~540 MB).

Measures, each over a few repetitions (median), with ``sync`` before every timed
run so no run pays for the previous one's writeback:
  * a plain file copy of the base (shutil.copyfile), and the same copy followed by
    fsync;
  * the rewrite of the base with a mixed plan (every kind of cut), in a subprocess,
    timed inside the child around the rewrite() call: as the library does it by
    default (fsync before the rename) and with fsync=False (what prune() uses for
    the intermediate it quantizes at once);
  * the peak RSS of the rewrite child, read with resource.getrusage(RUSAGE_CHILDREN)
    in a small launcher process whose only child it is (the benchmark process itself
    has imported torch, and a forked child's ru_maxrss starts from its parent's),
    against a baseline child that imports the same modules and does nothing.

Targets: the rewrite's throughput (bytes written per second) at least half the copy's,
like for like (no fsync vs copyfile; fsync vs copyfile + fsync); peak RSS under
3 x the largest tensor + the baseline. Prints a table; writes out/bench_rewrite.json.

    .venv/bin/python scripts/bench_rewrite.py [--reps 3] [--out out/bench_rewrite.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD_IMPORTS = "import json, sys, time; from pathlib import Path; import numpy, gguf; " \
                "from gguf_prune.plan import Plan; from gguf_prune.writing.rewrite import rewrite"
CHILD_REWRITE = CHILD_IMPORTS + "; plan = Plan.load(Path(sys.argv[2])); t = time.perf_counter(); " \
                "r = rewrite(Path(sys.argv[1]), plan, Path(sys.argv[3]), fsync=sys.argv[4] == '1'); " \
                "print(json.dumps({'seconds': time.perf_counter() - t, 'bytes_out': r.bytes_out, " \
                "'architecture': r.architecture, 'n_layer': r.n_layer}))"
# A lean parent for one child: reports the child's stdout and its peak RSS (RUSAGE_CHILDREN, KiB on Linux).
LAUNCHER = "import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); " \
           "print(json.dumps({'rc': p.returncode, 'stdout': p.stdout, 'stderr': p.stderr[-3000:], " \
           "'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"


def demo_plan(shape):
    """The mixed plan of tests/test_fidelity.py's demo check: every kind of cut."""
    import numpy as np

    from gguf_prune.plan import LayerPlan as L, Plan

    def neurons(n, seed):
        return tuple(sorted(np.random.default_rng(seed).choice(shape.n_ff, n, replace=False).tolist()))

    cut = {3: L(3, heads=()), 7: L(7, neurons=()), 10: L(10, removed=True), 12: L(12, heads=(0, 1, 3, 4, 6, 7)),
           15: L(15, heads=(0, 1, 2, 6, 7, 8)), 18: L(18, neurons=neurons(1024, 5)), 20: L(20, removed=True),
           25: L(25, heads=(3, 4, 5), neurons=neurons(768, 6))}
    return Plan(shape=shape, layers=tuple(cut.get(i, L(i)) for i in range(shape.n_layer)))


def run_child(code: str, *args: str) -> tuple[dict | None, int]:
    """Run ``python -c code args`` under the launcher; return its JSON line (if any) and its peak RSS in bytes."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", code, *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        raise SystemExit(f"launcher failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    if report["rc"] != 0:
        raise SystemExit(f"child failed ({report['rc']}):\n{report['stderr']}")
    lines = report["stdout"].strip().splitlines()
    data = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return data, report["maxrss_kib"] * 1024


def timed_copy(src: Path, dst: Path, fsync: bool) -> float:
    os.sync()
    t = time.perf_counter()
    shutil.copyfile(src, dst)
    if fsync:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    s = time.perf_counter() - t
    dst.unlink()
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_rewrite.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where copies and rewrites are written "
                    "(default: a temporary directory next to the base GGUF, on the same disk)")
    args = ap.parse_args()

    from gguf_prune.models.demo import ensure_demo_checkpoint
    from gguf_prune.writing.gguf_read import read_gguf
    from gguf_prune.plan import ModelShape
    from gguf_prune.writing.prune import convert_cached

    hf = ensure_demo_checkpoint()
    base = convert_cached(hf, "f32")
    size = base.stat().st_size
    largest = max(read_gguf(base).tensors, key=lambda t: t.nbytes)
    plan = demo_plan(ModelShape.from_hf_dir(hf))

    work = Path(tempfile.mkdtemp(prefix="bench-rewrite-", dir=args.workdir or base.parent))
    try:
        plan_file = plan.save(work / "plan.json")
        with open(base, "rb") as f:  # warm the page cache so every run reads from memory alike
            while f.read(64 << 20):
                pass

        copy_s, copy_sync_s, rw_s, rw_sync_s, rw_rss, baseline_rss = [], [], [], [], [], []
        result = None
        pruned = work / "pruned.gguf"
        for _ in range(args.reps):
            copy_s.append(timed_copy(base, work / "copy.gguf", fsync=False))
            copy_sync_s.append(timed_copy(base, work / "copy.gguf", fsync=True))
            baseline_rss.append(run_child(CHILD_IMPORTS)[1])
            for fsync, times in (("0", rw_s), ("1", rw_sync_s)):
                os.sync()
                result, rss = run_child(CHILD_REWRITE, str(base), str(plan_file), str(pruned), fsync)
                times.append(result["seconds"])
                rw_rss.append(rss)
                pruned.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    out_bytes = result["bytes_out"]
    baseline = max(baseline_rss)
    peak = max(rw_rss)
    figures = {
        "base_gguf": str(base),
        "base_bytes": size,
        "pruned_bytes": out_bytes,
        "architecture": result["architecture"],
        "n_layer": result["n_layer"],
        "largest_tensor": {"name": largest.name, "bytes": largest.nbytes},
        "copy_seconds": med(copy_s),
        "copy_fsync_seconds": med(copy_sync_s),
        "rewrite_seconds": med(rw_s),
        "rewrite_fsync_seconds": med(rw_sync_s),
        "copy_MBps": size / med(copy_s) / 1e6,
        "copy_fsync_MBps": size / med(copy_sync_s) / 1e6,
        "rewrite_MBps": out_bytes / med(rw_s) / 1e6,  # bytes written per second
        "rewrite_fsync_MBps": out_bytes / med(rw_sync_s) / 1e6,
        "rewrite_input_MBps": size / med(rw_s) / 1e6,  # the input the user hands over, per second
        "baseline_rss_bytes": baseline,
        "rewrite_peak_rss_bytes": peak,
        "rss_budget_bytes": 3 * largest.nbytes + baseline,
        "reps": args.reps,
        "raw": {"copy": copy_s, "copy_fsync": copy_sync_s, "rewrite": rw_s, "rewrite_fsync": rw_sync_s,
                "rewrite_rss": rw_rss, "baseline_rss": baseline_rss},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg": os.getloadavg()},
    }
    figures["targets"] = {
        "rewrite_at_least_half_of_copyfile": figures["rewrite_MBps"] >= 0.5 * figures["copy_MBps"],
        "rewrite_fsync_at_least_half_of_copyfile_fsync":
            figures["rewrite_fsync_MBps"] >= 0.5 * figures["copy_fsync_MBps"],
        "peak_rss_under_3x_largest_tensor_plus_baseline": peak < figures["rss_budget_bytes"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")

    mb = 1e6
    rows = [
        ("base GGUF (F32)", f"{size / mb:.1f} MB", ""),
        ("pruned GGUF", f"{out_bytes / mb:.1f} MB", f"{result['architecture']}, {result['n_layer']} layers"),
        ("shutil.copyfile", f"{med(copy_s):.2f} s", f"{figures['copy_MBps']:.0f} MB/s"),
        ("rewrite, fsync=False", f"{med(rw_s):.2f} s",
         f"{figures['rewrite_MBps']:.0f} MB/s written ({figures['rewrite_input_MBps']:.0f} MB/s of input); "
         f"{figures['rewrite_MBps'] / figures['copy_MBps']:.0%} of copyfile"),
        ("copyfile + fsync", f"{med(copy_sync_s):.2f} s", f"{figures['copy_fsync_MBps']:.0f} MB/s"),
        ("rewrite (default: fsync)", f"{med(rw_sync_s):.2f} s",
         f"{figures['rewrite_fsync_MBps']:.0f} MB/s written; "
         f"{figures['rewrite_fsync_MBps'] / figures['copy_fsync_MBps']:.0%} of copyfile + fsync"),
        ("largest tensor", f"{largest.nbytes / mb:.1f} MB", largest.name),
        ("baseline RSS (imports only)", f"{baseline / mb:.1f} MB", ""),
        ("rewrite peak RSS", f"{peak / mb:.1f} MB", f"budget {figures['rss_budget_bytes'] / mb:.1f} MB "
                                                     f"(3 x largest + baseline); {(peak - baseline) / mb:.1f} MB "
                                                     "above the baseline"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:>{w1}}  {c}")
    for k, ok in figures["targets"].items():
        print(f"{'ok ' if ok else 'MISS'} {k}")
    print(f"wrote {args.out}")
    return 0 if all(figures["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
