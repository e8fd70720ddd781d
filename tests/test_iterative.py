"""Iterative pruning (cut a little, recover, re-score, repeat) on a fixture: every round reaches its budget on
top of the last and never revives a unit, the last round's recover directory becomes a GGUF that computes
the recovered PyTorch model, the per-round scorer measures what `score --plan` measures, and bad input fails
before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from gguf_prune.runtime import llamacpp
from gguf_prune.models import checkpoint
from gguf_prune.models import cuts
from gguf_prune.calibration import load_calibration
from gguf_prune.cli import main
from gguf_prune.recovery.options import FinetuneError, FinetuneOptions
from gguf_prune.pipeline.iterate import IterateError, IterateOptions, current_model, iterate, score_current
from divergence import kl_per_token
from gguf_prune.pipeline.job import RunOptions
from gguf_prune.plan import LayerPlan, ModelShape, Plan
from gguf_prune.planning.diff import new_cuts, revived
from gguf_prune.writing.prune import prune
from gguf_prune.recovered import RecoverError, load_recovered_model, open_recovered
from gguf_prune.recovery.patches import fit_patches
from gguf_prune.recovery.options import RecoverOptions
from gguf_prune.recovery.recover import _with_weights, carry_weights, recover
from gguf_prune.scoring.options import ScoreOptions
from gguf_prune.scoring.measure import score_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread is faster

log = logging.getLogger(__name__)

TEXT = ("The quick brown fox jumps over the lazy dog. In 1998, 42 engineers measured what every layer of the "
        "network did before they cut anything out of it.")
KL_MAX = 1e-4
CALIBRATION = Path(__file__).parent / ".." / "gguf_prune" / "data" / "pydoc_topics.txt"
FT = FinetuneOptions(steps=2, batch_size=2, eval_every=1, checkpoint_every=2, log_every=1, lr=1e-3)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    p.write_text(CALIBRATION.read_text()[:8000])
    return p


def _opts(text: Path, **kw) -> IterateOptions:
    base = dict(rounds=2, budget=0.3, recover="lora", calibration=text, samples=10, score_samples=2, seq_len=32,
                heldout=0.2, protect_first=1, protect_last=1, finetune_options=FT)
    return IterateOptions(**(base | kw))


@pytest.fixture(scope="module")
def iterated(tiny_tied, small_text, tmp_path_factory):
    """Two rounds to 30% with patches and LoRA after each (6 layers, layers 1-4 cuttable). No held-out split: on
    this random model a few steps rarely beat the start on held-out text and would be dropped, so nothing would
    carry over."""
    out = tmp_path_factory.mktemp("iterate") / "it"
    return iterate(tiny_tied, out, _opts(small_text, heldout=0, recover="patch+lora"))


def _removed_units(plan: Plan) -> set[tuple[str, int]]:
    units = set()
    for lp in plan.layers:
        if lp.removed:
            units |= {("attn", lp.index), ("mlp", lp.index)}
        if lp.attention_removed:
            units.add(("attn", lp.index))
        if lp.mlp_removed:
            units.add(("mlp", lp.index))
    return units


def test_each_round_reaches_its_budget_on_top_of_the_last(iterated, tiny_tied):
    r1, r2 = iterated.rounds
    assert (r1["target"], r2["target"]) == pytest.approx((0.15, 0.3))
    assert r1["removed_fraction"] >= 0.15 - 1e-9 and r2["removed_fraction"] >= 0.3 - 1e-9
    assert r1["cut"] and r2["cut"]  # each round cut something new
    p1 = Plan.load(Path(r1["plan"]))
    p2 = Plan.load(Path(r2["plan"]))
    assert _removed_units(p1) < _removed_units(p2)  # never revives, always adds
    assert revived(p1, p2) == []
    assert p1.fingerprint == p2.fingerprint == checkpoint.fingerprint(tiny_tied)  # made for the source checkpoint
    # round 2 scored the recovered round-1 model on top of round 1's cuts, against the unpruned model
    s2 = json.loads(Path(r2["scores"]).read_text())
    assert s2["base_plan"]["digest"] == open_recovered(Path(r1["recovered"])).plan.digest()
    assert s2["settings"]["recovered"] == r1["recovered"]
    assert s2["base_plan"]["kl"] == pytest.approx(r2["kl_in"]) and r2["kl_in"] > 0
    assert all(e["kl"] is None for e in s2["layers"] if e["removed"])
    assert r1["heldout_kl"] is None and r1["heldout_kl_stages"] == {}  # no held-out split: no figure
    assert open_recovered(Path(r1["recovered"])).plan.patches()  # patch+lora: every round is patched
    doc = json.loads((iterated.out_dir / "iterate.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2] and doc["recovered"] == str(iterated.recovered)
    assert Plan.load(iterated.plan_path).digest() == open_recovered(iterated.recovered).plan.digest()


def test_each_round_recovers_from_the_last(iterated, tiny_tied):
    r1, r2 = iterated.rounds
    m2 = open_recovered(Path(r2["recovered"])).manifest
    assert m2["start"]["path"] == r1["recovered"]
    assert m2["finetune"]["steps_done"] == 2
    # round 1's fine-tuned tensors that round 2's cut still uses were its starting point; nothing of a removed
    # layer is carried, nor any patch (the cut changed: patches are fitted afresh)
    w1 = open_recovered(Path(r1["recovered"])).weights()
    removed = {lp.index for lp in Plan.load(iterated.plan_path).layers if lp.removed}
    carried = set(m2["start"]["carried"])
    assert carried and carried <= set(w1) and any(k.endswith(".patch.weight") for k in w1)
    assert {k for k in w1 if hfmodel_layer(k) not in removed and not k.endswith(".patch.weight")} == carried
    w2 = open_recovered(iterated.recovered).weights()
    assert carried <= set(w2)
    assert not any(hfmodel_layer(k) in removed for k in w2 if not k.endswith(".patch.weight"))
    assert [lp.index for lp in open_recovered(iterated.recovered).plan.patches()] == \
        [int(k.split(".")[2]) for k in sorted(w2) if k.endswith(".patch.weight")]


def test_patches_are_fitted_on_the_weights_the_last_round_left(iterated, tiny_tied, small_text):
    """Round 2's patches were fitted on the pruned model with round 1's fine-tuned weights, not the checkpoint's."""
    r1, r2 = iterated.rounds
    rec = open_recovered(Path(r2["recovered"]))
    carried = carry_weights(open_recovered(Path(r1["recovered"])).weights(), rec.plan, tied=True)
    cal = load_calibration(small_text, AutoTokenizer.from_pretrained(tiny_tied), seq_len=32, samples=10)
    model = cuts.load_model(tiny_tied)
    _, on_carried = fit_patches(model, rec.plan, cal, set(), pruned_from=_with_weights(model, carried))
    _, on_checkpoint = fit_patches(model, rec.plan, cal, set())
    recorded = [p["train_residual"] for p in rec.manifest["patch"]["patches"]]
    assert recorded == [p["train_residual"] for p in on_carried["patches"]]
    assert recorded != [p["train_residual"] for p in on_checkpoint["patches"]]


def hfmodel_layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def test_the_last_round_becomes_a_gguf_that_computes_the_recovered_model(iterated, tiny_tied, tmp_path):
    out = prune(tiny_tied, iterated.plan, tmp_path / "it.gguf", quant="none", outtype="f32",
                cache_dir=tmp_path / "conv", recovered=iterated.recovered)
    model = load_recovered_model(tiny_tied, iterated.recovered)
    tokens = AutoTokenizer.from_pretrained(tiny_tied)(TEXT)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    got = llamacpp.logits(out.path, tokens)
    kl = kl_per_token(ref, got)
    log.info("iterated, recovered: mean KL %.3g over %d tokens", kl.mean(), len(tokens))
    assert kl.mean() < KL_MAX
    # and the recovery matters: the cut alone, with the checkpoint's own weights, is another model
    cut = cuts.apply_plan(cuts.load_model(tiny_tied), iterated.plan.without_patches())
    with torch.no_grad():
        plain = cut(torch.tensor([tokens])).logits[0].numpy()
    off = kl_per_token(plain, got).mean()
    assert off > 10 * KL_MAX and off > 100 * kl.mean(), (off, kl.mean())


@pytest.mark.parametrize("rounds", [2, 1])
def test_run_writes_the_pruned_gguf_from_the_last_recovery(tiny_tied, small_text, tmp_path, rounds):
    """`run --rounds 2 --recover patch`: the GGUF is written from the last round's recover directory, and the
    round figures land in summary.json; `--rounds 1` recovers once after the usual scoring; llama.cpp evaluates
    the recovered GGUF against the base."""
    from gguf_prune.pipeline.job import format_summary, run

    s = run(RunOptions(model=tiny_tied, out_dir=tmp_path / "run", calibration=small_text, samples=2, seq_len=32,
                       budget=0.2, eval_chunks=2, threads=2, prompts=None, bench=False, package=False, quant="F16",
                       rounds=rounds, recover="patch", recover_samples=10, heldout=0.2))
    out = tmp_path / "run"
    rec = out / "rounds" / "round-2" / "recovered" if rounds == 2 else out / "recovered"
    assert s["recovered"] == str(rec) and s["pruned"]["recovered"] == str(rec)
    assert Plan.load(s["pruned"]["plan_path"]).digest() == open_recovered(rec).plan.digest()
    assert open_recovered(rec).plan.patches()
    assert s["quality"]["kl_mean"] > 0 and Path(s["pruned"]["path"]).name == "pruned-F16.gguf"
    saved = json.loads((out / "summary.json").read_text())
    if rounds == 1:
        assert saved["rounds"] is None and (out / "scores.json").exists()
        return
    assert Plan.load(out / "plan.json").digest() == open_recovered(rec).plan.digest()
    assert [r["round"] for r in saved["rounds"]] == [1, 2]
    for r in saved["rounds"]:
        assert r["removed_fraction"] >= r["target"] - 1e-9
        assert r["heldout_kl"] > 0 and r["heldout_kl"] == pytest.approx(r["heldout_kl_stages"]["patched"], rel=1e-3)
    # the budget counts the cut; the patches that stand in for removed parts add their parameters back
    assert saved["rounds"][1]["target"] == pytest.approx(0.2)
    assert Plan.load(out / "plan.json").without_patches().removed_fraction() >= 0.2 - 1e-9
    assert s["pruned"]["architecture"] == "deci" and s["pruned"]["bytes_out"] < s["base"]["bytes_out"]
    assert "round 2" in format_summary(s)


def test_the_round_scorer_measures_what_score_with_a_plan_measures(tiny_tied, small_text, tmp_path):
    """No recovered weights: scoring the cut model against the unpruned one is `score --plan`."""
    shape = ModelShape.from_hf_dir(tiny_tied)
    L = LayerPlan
    plan = Plan(shape=shape, layers=(L(0), L(1), L(2, removed=True), L(3, heads=()), L(4), L(5)),
                fingerprint=checkpoint.fingerprint(tiny_tied)).save(tmp_path / "plan.json")
    plan = Plan.load(plan)
    ref = json.loads(score_model(tiny_tied, tmp_path / "ref.json", ScoreOptions(
        calibration=small_text, samples=2, seq_len=32, plan=tmp_path / "plan.json", neurons=False, plots=False,
        progress=False, device="cpu")).read_text())
    cal = load_calibration(small_text, AutoTokenizer.from_pretrained(tiny_tied), seq_len=32, samples=2)
    teacher = cuts.load_model(tiny_tied)
    got = json.loads(score_current(teacher, current_model(tiny_tied, plan, None), plan, cal, [0, 1],
                                   tmp_path / "got.json", tiny_tied, plan.fingerprint, {}).read_text())
    assert got["base_plan"]["kl"] == pytest.approx(ref["base_plan"]["kl"], rel=1e-5)
    for a, b in zip(got["layers"], ref["layers"]):
        for k in ("removed", "kl", "attn_kl", "mlp_kl", "bi"):
            assert (a[k] is None) == (b[k] is None), (a["index"], k)
            if a[k] is not None and not isinstance(a[k], bool):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (a["index"], k)
    assert got["layers"][3]["attn_kl"] is None and got["layers"][2]["removed"]


def test_new_cuts_names_what_a_round_added(tiny_tied):
    shape = ModelShape.from_hf_dir(tiny_tied)
    a = Plan.identity(shape).with_layer(LayerPlan(2, removed=True))
    b = a.with_layer(LayerPlan(3, heads=())).with_layer(LayerPlan(4, neurons=()))
    assert new_cuts(None, a) == ["layer 2"]
    assert new_cuts(a, b) == ["attn 3", "mlp 4"]
    assert revived(b, a) == ["layer 3: attention removed before and kept after",
                             "layer 4: MLP removed before and kept after"]


# ----------------------------------------------------------------------------- bad input


def test_bad_options_are_refused_before_anything_is_written(tiny_tied, small_text, tmp_path):
    out = tmp_path / "it"
    with pytest.raises(IterateError) as e:
        iterate(tiny_tied, out, _opts(small_text, rounds=0, budget=1.5, recover="magic"))
    assert str(e.value) == (
        "iterative pruning options are invalid:\n"
        "  - rounds is 0; it must be a whole number, at least 1\n"
        "  - budget 1.5 must be a fraction of the block parameters in (0, 1)\n"
        "  - recover 'magic' is not one of none, patch, lora, full, patch+lora, patch+full")
    short = tmp_path / "short.txt"
    short.write_text(TEXT * 3)  # about 3 windows of 32 tokens
    with pytest.raises(FinetuneError, match=r"gives 3 sequence\(s\) of 32 tokens; 1 held out for early stopping "
                                            r"leaves 2, fewer than one batch of 4"):
        iterate(tiny_tied, out, _opts(short, finetune_options=FinetuneOptions(batch_size=4)))
    assert not out.exists()


def test_one_shot_recovery_checks_its_data_before_scoring(tiny_tied, tmp_path):
    from gguf_prune.pipeline.job import run

    short = tmp_path / "short.txt"
    short.write_text(TEXT * 3)
    with pytest.raises(FinetuneError, match="fewer than one batch of 4"):
        run(RunOptions(model=tiny_tied, out_dir=tmp_path / "run", calibration=short, seq_len=32, recover="lora"))
    assert not (tmp_path / "run" / "scores.json").exists()


def test_a_start_directory_whose_cut_the_plan_undoes_is_refused(iterated, tiny_tied, small_text, tmp_path):
    """recover(start=...) continues an earlier round only if the plan keeps cutting what it cut."""
    shape = ModelShape.from_hf_dir(tiny_tied)
    first = Plan.load(Path(iterated.rounds[0]["plan"]))
    keeps_all = Plan.identity(shape, fingerprint=first.fingerprint)
    out = tmp_path / "rec"
    with pytest.raises(RecoverError, match=r"the plan keeps parts that the start directory .*round-1/recovered "
                                           r"removed \(a later round may only cut more\):\n  - layer \d"):
        recover(tiny_tied, keeps_all, out, RecoverOptions(calibration=small_text, seq_len=32, samples=10,
                                                          patch=True), start=Path(iterated.rounds[0]["recovered"]))
    assert not out.exists()


def test_cli_run_takes_rounds_and_recover(monkeypatch, tmp_path):
    seen = {}

    def fake_run(opts):
        seen["opts"] = opts
        return {}

    import gguf_prune.pipeline.job as pipeline

    monkeypatch.setattr(pipeline, "run", fake_run)
    monkeypatch.setattr(pipeline, "format_summary", lambda s: "ok")
    r = CliRunner().invoke(main, ["run", "--rounds", "3", "--recover", "patch+lora", "--finetune-steps", "50",
                                  "--finetune-lr", "1e-3", "--finetune-minutes", "10", "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    o = seen["opts"]
    assert (o.rounds, o.recover, o.finetune_steps, o.recover_samples) == (3, "patch+lora", 50, 64)
    fto, ropts = o.recovery_options()
    assert (fto.method, fto.steps, fto.learning_rate, fto.max_minutes) == ("lora", 50, 1e-3, 10.0)
    assert ropts.finetune_options is fto
    r = CliRunner().invoke(main, ["run", "--rounds", "0"])
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.output
    r = CliRunner().invoke(main, ["run", "--recover", "magic"])
    assert r.exit_code == 2 and "'magic' is not one of 'none', 'patch'" in r.output


def test_a_finished_run_is_reused_round_by_round(iterated, tiny_tied, small_text, caplog):
    """Started again with the same inputs, every complete round is taken as it is (nothing re-scored or re-trained)."""
    before = {p: p.stat().st_mtime_ns for p in iterated.out_dir.rglob("*") if "round-" in str(p)}
    with caplog.at_level(logging.INFO, logger="gguf_prune.pipeline.iterate"):
        again = iterate(tiny_tied, iterated.out_dir, _opts(small_text, heldout=0, recover="patch+lora"))
    assert sum("(same inputs): reusing it" in m for m in caplog.messages) == 2
    assert again.rounds == iterated.rounds and again.recovered == iterated.recovered
    assert {p: p.stat().st_mtime_ns for p in iterated.out_dir.rglob("*") if "round-" in str(p)} == before


def test_rounds_re_measure_width_cuts_with_their_repair(tiny_tied, small_text, tmp_path):
    """units with width and repair: every round scores each live MLP's widths (and their repairs) on the current,
    repaired model, the plan narrows MLPs further round by round without reviving a neuron, and each round's
    recover directory holds the repaired projections."""
    from gguf_prune.planning.diff import revived

    it = iterate(tiny_tied, tmp_path / "it", _opts(small_text, recover="none", repair=True, units=("width",),
                                                   heldout=0, samples=8, score_samples=4))
    plans = [Plan.load(Path(r["plan"])) for r in it.rounds]
    assert all(p.without_patches().removed_fraction() >= r["target"] - 1e-9 for p, r in zip(plans, it.rounds))
    s = plans[0].shape
    widths = [[len(lp.kept_neurons(s)) for lp in p.layers] for p in plans]
    assert widths[1] != widths[0] and all(b <= a for a, b in zip(*widths))  # round 2 narrowed further
    assert not revived(plans[0], plans[1])
    for r in it.rounds:
        doc = json.loads(Path(r["scores"]).read_text())
        assert doc["width"]["repair"] and any(e.get("width_kl_repaired") for e in doc["layers"])
        names = json.loads((Path(r["recovered"]) / "recover.json").read_text())["tensors"]["names"]
        assert any(n.endswith("mlp.down_proj.bias") for n in names)
    # round 2 scored the model round 1 left: its live neurons only
    doc2 = json.loads(Path(it.rounds[1]["scores"]).read_text())
    assert doc2["base_plan"] is not None
