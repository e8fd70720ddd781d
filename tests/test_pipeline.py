"""The main job and the sweep, end to end on a fixture model (real scoring, llama.cpp, files)."""

from __future__ import annotations

import json
import subprocess

import pytest

from gguf_prune.pipeline.job import RunOptions, format_summary, run
from gguf_prune.pipeline.strategy import greedy_steps_for
from gguf_prune.pipeline.sweep import SweepOptions, sweep
from gguf_prune.plan import Plan


def test_run_end_to_end_on_a_fixture(tiny_tied, tmp_path):
    s = run(RunOptions(model=tiny_tied, out_dir=tmp_path / "run", samples=4, seq_len=32, heads=False,
                       eval_chunks=2, threads=2, prompts=None, bench=False, budget=0.2))
    out = tmp_path / "run"
    for name in ("scores.json", "plan.json", "base-Q4_K_M.gguf", "pruned-Q4_K_M.gguf", "report/report.json",
                 "summary.json"):
        assert (out / name).exists(), name
    plan = Plan.load(out / "plan.json")
    assert plan.removed_fraction() >= 0.2
    assert s["pruned"]["bytes_out"] < s["base"]["bytes_out"]
    assert s["quality"]["kl_mean"] > 0
    assert json.loads((out / "summary.json").read_text())["executable"] == s["executable"]
    text = format_summary(s)
    assert "KL" in text and "executable" in text
    # the executable it made answers --help without Python or the checkout
    h = subprocess.run([s["executable"], "--help"], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                       capture_output=True, text=True)
    assert h.returncode == 0 and "--port" in h.stdout


def test_sweep_on_a_fixture_marks_the_best_strategy(tiny_untied, tmp_path):
    opts = SweepOptions(budgets=(0.25,), strategies=("bi-layers", "kl-layers", "width"), samples=4, seq_len=32,
                        quant="F16", eval_chunks=2, threads=2, bench=False, out_dir=tmp_path / "sw",
                        protect_first=1, protect_last=0)
    r = sweep(tiny_untied, opts)
    assert len(r["runs"]) == 3 and all(m["quality"] for m in r["runs"])
    best = r["best"]["0.25"]
    kls = {m["label"]: m["quality"]["kl_mean"] for m in r["runs"]}
    assert kls[best] == min(kls.values())
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    assert "**best**" in (tmp_path / "sw" / "sweep.md").read_text()
    # width: no layer removed, MLPs narrowed to multiples of 256 (768 → 512 or 256), the budget met
    plan = Plan.load(tmp_path / "sw" / "plans" / "width-25.json")
    widths = [len(lp.kept_neurons(plan.shape)) for lp in plan.layers]
    assert not any(lp.removed for lp in plan.layers) and plan.removed_fraction() >= 0.25
    assert all(w % 256 == 0 for w in widths) and min(widths) < 768 and widths[0] == 768  # layer 0 protected
    # a second sweep into the same directory with the same settings reuses the scores
    stamp = (tmp_path / "sw" / "scores.json").stat().st_mtime_ns
    sweep(tiny_untied, SweepOptions(**{**opts.__dict__, "strategies": ("width",)}))
    assert (tmp_path / "sw" / "scores.json").stat().st_mtime_ns == stamp
    sweep(tiny_untied, SweepOptions(**{**opts.__dict__, "strategies": ("width",), "samples": 3}))
    assert (tmp_path / "sw" / "scores.json").stat().st_mtime_ns != stamp  # other calibration: scored again


def test_greedy_steps_reach_the_budget():
    assert greedy_steps_for(0.2, 30, ("layer",)) == 6
    assert greedy_steps_for(0.2, 30, ("layer", "attn", "mlp")) == 14


def test_unknown_strategy_is_refused(tiny_untied, tmp_path):
    with pytest.raises(ValueError, match="unknown strategy 'magic'"):
        sweep(tiny_untied, SweepOptions(strategies=("magic",), out_dir=tmp_path))


def test_run_refuses_bad_options_before_any_work(tmp_path):
    with pytest.raises(ValueError) as e:
        run(RunOptions(model=tmp_path / "nowhere", out_dir=tmp_path / "run", strategy="magic", budget=1.2))
    assert str(e.value) == ("run options are invalid:\n"
                            "  - --budget 1.2 must be a fraction of the block parameters in (0, 1)\n"
                            "  - --strategy 'magic': use one of width-mixed, greedy-mixed")
    assert not (tmp_path / "run").exists()
