"""The score stage end to end: scores.json, the neuron side file, plots, the CLI, and its errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from gguf_prune.scoring import naive
from gguf_prune import scores as scores_io
from gguf_prune.calibration import CalibrationError, load_calibration
from gguf_prune.cli import main
from gguf_prune.models.checkpoint import ModelDirError, fingerprint
from gguf_prune.models.cuts import apply_plan, load_model
from gguf_prune.plan import LayerPlan, ModelShape, Plan, PlanError
from gguf_prune.planning.options import PlanOptions
from gguf_prune.planning.strategies import build_plan
from gguf_prune.scoring.options import ScoreError, ScoreOptions
from gguf_prune.scoring.inputs import parse_layers
from gguf_prune.scoring.measure import score_model

TOL = 1e-5
SMALL = dict(seq_len=16, samples=3, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scored(tiny_tied, tmp_path_factory):
    """One full run on the 6-layer fixture: layers, sub-blocks, PPL, heads on 1,3-4, neurons, mixed greedy."""
    out = tmp_path_factory.mktemp("score") / "scores.json"
    score_model(tiny_tied, out, ScoreOptions(**SMALL, ppl=True, heads=True, head_layers="1,3-4", greedy=2,
                                             greedy_units=("layer", "attn", "mlp"), tau=0.05))
    return out


def _calibration(hf_dir, **kw):
    return load_calibration(None, AutoTokenizer.from_pretrained(hf_dir), seq_len=kw.get("seq_len", 16),
                            samples=kw.get("samples", 3), seed=kw.get("seed", 0))


def test_scores_file_has_the_schema_the_plan_stage_reads(scored, tiny_tied):
    d = json.loads(scored.read_text())
    assert d["schema"] == "gguf-prune/scores" and d["version"] == 1
    assert set(d) == {"schema", "version", "model", "calibration", "settings", "base_plan", "full", "layers", "heads",
                      "neurons", "greedy", "timing"}
    shape = ModelShape.from_hf_dir(tiny_tied)
    assert d["model"] == {"fingerprint": fingerprint(tiny_tied), "shape": shape.to_dict(), "path": str(tiny_tied)}
    cal = _calibration(tiny_tied)
    assert d["calibration"] == cal.to_dict()
    assert d["base_plan"] is None
    assert [e["index"] for e in d["layers"]] == list(range(6))
    for e in d["layers"]:
        assert set(e) == {"index", "removed", "bi", "kl", "ppl", "attn_kl", "mlp_kl", "attn_bi", "mlp_bi"}
        assert e["removed"] is False
        assert 0 < e["bi"] < 2 and e["kl"] > 0 and e["attn_kl"] > 0 and e["mlp_kl"] > 0 and e["ppl"] > 1
    assert d["full"]["ppl"] == pytest.approx(math.exp(d["full"]["nll"]))
    assert d["heads"]["layers"] == [1, 3, 4]
    for key, n in (("kl", 8), ("kv_kl", 2), ("norm", 8), ("taylor", 8)):
        assert sorted(d["heads"][key]) == ["1", "3", "4"]
        assert all(len(v) == n and min(v) > 0 for v in d["heads"][key].values())
    s = d["settings"]
    assert s["seq_len"] == 16 and s["samples"] == 3 and s["heads"] is True and s["tau"] == 0.05
    assert s["greedy_units"] == ["layer", "attn", "mlp"] and s["device_resolved"] == "cpu"
    assert set(d["timing"]["seconds"]) >= {"reference", "walk", "layers", "heads", "taylor", "greedy", "total"}
    assert d["timing"]["layer_evals"] > 6
    assert scores_io.load(scored)["layers"] == d["layers"]


def test_layer_scores_equal_the_naive_ablation(scored, tiny_tied):
    d = json.loads(scored.read_text())
    cal = _calibration(tiny_tied)
    model = load_model(tiny_tied)
    groups = list(cal.batches(cal.n_seq))
    units = [[("layer", 2)], [("attn", 4)], [("mlp", 0)], [("heads", 3, (5,))], [("heads", 1, (4, 5, 6, 7))]]
    kl, nll, _, _ = naive.naive_divergence(model, groups, units)
    got = [d["layers"][2]["kl"], d["layers"][4]["attn_kl"], d["layers"][0]["mlp_kl"], d["heads"]["kl"]["3"][5],
           d["heads"]["kv_kl"]["1"][1]]
    assert np.abs(np.array(got) - kl).max() <= TOL
    assert d["layers"][2]["ppl"] == pytest.approx(math.exp(nll[0]), rel=1e-5)
    # BI from its definition: 1 - cos(input, output) of layer 2 over the calibration tokens
    with torch.no_grad():
        hs = model(input_ids=cal.input_ids, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity(hs[2], hs[3], dim=-1)
    assert d["layers"][2]["bi"] == pytest.approx(float((1 - cos).mean()), abs=1e-5)


def test_neuron_side_file(scored, tiny_tied):
    d = json.loads(scored.read_text())
    assert d["neurons"]["file"] == "scores.neurons.safetensors" and d["neurons"]["tau"] == 0.05
    assert d["neurons"]["stats"] == ["freq", "mean_abs", "wxa", "energy"]
    t = load_file(str(scored.parent / d["neurons"]["file"]))
    assert set(t) == {f"{s}.{i}" for s in ("freq", "mean_abs", "wxa", "energy") for i in range(6)}
    # energy = ‖down_proj column‖² · mean a² over the real calibration tokens, from a plain hooked forward
    model, cal = load_model(tiny_tied), _calibration(tiny_tied)
    got = []
    hook = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    with torch.no_grad():
        model(input_ids=cal.input_ids, attention_mask=cal.attention_mask.long())
    hook.remove()
    a2 = got[0][cal.attention_mask].double().pow(2).mean(0).numpy()
    col2 = model.model.layers[2].mlp.down_proj.weight.double().pow(2).sum(0).detach().numpy()
    np.testing.assert_allclose(t["energy.2"], col2 * a2, rtol=1e-4)
    for i in range(6):
        freq, mean_abs, wxa = t[f"freq.{i}"], t[f"mean_abs.{i}"], t[f"wxa.{i}"]
        assert freq.shape == mean_abs.shape == wxa.shape == (768,) and freq.dtype == np.float32
        assert 0 <= freq.min() and freq.max() <= 1 and 0 < freq.mean() < 1
        assert (mean_abs > 0).all() and np.corrcoef(freq, mean_abs)[0, 1] > 0.3
    stats = scores_io.load_neurons(scored)
    np.testing.assert_array_equal(stats["wxa"][3], t["wxa.3"])


def test_greedy_respects_protection_and_counts_parameters(scored, tiny_tied):
    d = json.loads(scored.read_text())
    g = d["greedy"]
    assert g["units"] == ["layer", "attn", "mlp"] and g["by"] == "kl" and len(g["steps"]) == 2
    shape = ModelShape.from_hf_dir(tiny_tied)
    first, second = g["steps"]
    assert all(2 <= s["layer"] <= 3 for s in g["steps"])  # protect 2 first and 2 last of 6
    assert first["candidates"] == 6  # layers 2, 3 × (layer, attn, mlp)
    cheapest = min((e[k], k.split("_")[0] if k != "kl" else "layer", e["index"])
                   for e in d["layers"][2:4] for k in ("kl", "attn_kl", "mlp_kl"))
    assert (first["kind"], first["layer"]) == cheapest[1:] and first["kl"] == pytest.approx(cheapest[0], abs=TOL)
    assert first["delta_kl"] == pytest.approx(first["kl"], abs=1e-6)
    want = {"layer": shape.layer_params(), "attn": shape.attn_params(), "mlp": shape.mlp_params()}
    assert first["params_removed"] == want[first["kind"]]
    assert second["kl"] == pytest.approx(first["kl"] + second["delta_kl"])
    assert second["candidates"] in (3, 4)


def test_plots_are_written(scored):
    for name in ("layers", "sublayers", "heads", "neurons", "greedy"):
        png = scored.parent / f"scores.{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_scoring_on_top_of_a_plan(tiny_tied, tmp_path):
    shape = ModelShape.from_hf_dir(tiny_tied)
    plan = Plan.identity(shape, fingerprint=fingerprint(tiny_tied)) \
        .with_layer(LayerPlan(2, removed=True)) \
        .with_layer(LayerPlan(3, heads=(0, 1, 4, 5))) \
        .with_layer(LayerPlan(4, neurons=()))
    plan_path = plan.save(tmp_path / "plan.json")
    out = score_model(tiny_tied, tmp_path / "s.json",
                      ScoreOptions(**SMALL, plan=plan_path, heads=True, greedy=1, plots=False))
    d = json.loads(out.read_text())
    assert d["base_plan"]["digest"] == plan.digest() and d["base_plan"]["path"] == str(plan_path)
    assert Plan.from_dict(d["base_plan"]["plan"]).digest() == plan.digest()
    assert d["layers"][2] == {"index": 2, "removed": True, "bi": None, "kl": None, "ppl": None, "attn_kl": None,
                              "mlp_kl": None, "attn_bi": None, "mlp_bi": None}
    assert d["layers"][4]["mlp_kl"] is None and d["layers"][4]["mlp_bi"] is None and d["layers"][4]["kl"] > 0
    assert d["heads"]["layers"] == [0, 1, 3, 4, 5]
    assert d["heads"]["kl"]["3"][2] is None and d["heads"]["kl"]["3"][4] > 0
    assert d["heads"]["taylor"]["3"][3] is None and d["heads"]["taylor"]["3"][1] > 0
    assert "4" not in d["neurons"]["layers"] and d["neurons"]["layers"] == [0, 1, 3, 5]
    assert d["greedy"]["steps"][0]["layer"] == 3  # the only unprotected layer left (2 is removed)
    # source-layer 5 bypassed on the pruned model, against the unpruned model, the naive way
    cal = _calibration(tiny_tied)
    original, pruned = load_model(tiny_tied), apply_plan(load_model(tiny_tied), plan)
    kl, nll, _, _ = naive.naive_divergence(pruned, list(cal.batches(3)), [[], [("layer", 4)]],
                                            reference_model=original)
    assert d["base_plan"]["kl"] == pytest.approx(kl[0], abs=TOL) and kl[0] > 1e-3
    assert d["layers"][5]["kl"] == pytest.approx(kl[1], abs=TOL)
    assert d["base_plan"]["ppl"] == pytest.approx(math.exp(nll[0]), rel=1e-5)


def test_chat_calibration_end_to_end(tiny_untied, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {k}?"},
                                                        {"role": "assistant", "content": "Yes. " * k}]})
                               for k in range(1, 4)) + "\n")
    out = score_model(tiny_untied, tmp_path / "chat.json",
                      ScoreOptions(calibration=chats, seq_len=48, samples=3, progress=False, plots=False,
                                   greedy=1, greedy_by="kl-per-param", protect_first=1, protect_last=1))
    d = json.loads(out.read_text())
    assert d["calibration"]["kind"] == "chat" and d["calibration"]["n_tokens"] < 3 * 48
    assert d["greedy"]["by"] == "kl-per-param" and d["greedy"]["steps"][0]["layer"] in (1, 2)
    assert all(e["kl"] > 0 for e in d["layers"])


# ----------------------------------------------------------------- the CLI


def test_cli_score(tiny_untied, tmp_path):
    out = tmp_path / "cli.json"
    r = CliRunner().invoke(main, ["score", str(tiny_untied), "-o", str(out), "--seq-len", "16", "--samples", "2",
                                  "--no-sublayers", "--no-neurons", "--no-plots", "--greedy", "1",
                                  "--protect-first", "1", "--protect-last", "1"])
    assert r.exit_code == 0, r.output
    assert "full model ppl" in r.output and "lowest-KL layers:" in r.output and "greedy: layer" in r.output
    d = scores_io.load(out)
    assert d["neurons"] is None and d["heads"] is None and d["layers"][1]["attn_kl"] is None
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.safetensors"))


def test_cli_reports_errors_without_a_traceback(tiny_untied, tmp_path):
    r = CliRunner().invoke(main, ["score", str(tiny_untied), "--calibration", str(tmp_path / "none.txt"),
                                  "-o", str(tmp_path / "s.json")])
    assert r.exit_code == 1
    assert f"Error: calibration file {tmp_path / 'none.txt'} does not exist" in r.output
    assert not (tmp_path / "s.json").exists()


# ----------------------------------------------------------------- errors, before any long work


def _score(hf_dir, tmp_path, **kw):
    return score_model(hf_dir, tmp_path / "s.json", ScoreOptions(**(SMALL | kw)))


def test_unsupported_architecture_and_incomplete_model_dirs(tiny_untied, tmp_path):
    gpt = tmp_path / "gpt2"
    shutil.copytree(tiny_untied, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelDirError, match=r"model_type 'gpt2' \(GPT2LMHeadModel\) is not supported"):
        _score(gpt, tmp_path)
    (gpt / "config.json").unlink()
    with pytest.raises(ModelDirError, match="has no config.json; pass a Hugging Face checkpoint directory"):
        _score(gpt, tmp_path)
    nowt = tmp_path / "noweights"
    shutil.copytree(tiny_untied, nowt)
    (nowt / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"has no \*.safetensors weights"):
        _score(nowt, tmp_path)
    assert not (tmp_path / "s.json").exists()


def test_bad_calibration(tiny_untied, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="is empty"):
        _score(tiny_untied, tmp_path, calibration=empty)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(CalibrationError, match=r"has \d+ tokens; at least 16 are needed for one sequence"):
        _score(tiny_untied, tmp_path, calibration=short)
    with pytest.raises(CalibrationError, match="does not exist"):
        _score(tiny_untied, tmp_path, calibration=tmp_path / "missing.jsonl")


def test_head_layers_out_of_range_and_bad_options(tiny_untied, tmp_path):
    with pytest.raises(ScoreError) as e:
        _score(tiny_untied, tmp_path, heads=True, head_layers="1,3-4")
    assert str(e.value) == "--head-layers '1,3-4': layer 4 is out of range 0..3 (the model has 4 layers)"
    with pytest.raises(ScoreError, match="--head-layers 'x': cannot read 'x'"):
        _score(tiny_untied, tmp_path, heads=True, head_layers="x")
    with pytest.raises(ScoreError, match="--head-layers needs --heads"):
        _score(tiny_untied, tmp_path, head_layers="1")
    with pytest.raises(ScoreError, match="--greedy-units 'layer,ffn': use a comma list of layer, attn, mlp"):
        _score(tiny_untied, tmp_path, greedy=1, greedy_units=("layer", "ffn"))
    assert parse_layers("3,5-8", 10) == [3, 5, 6, 7, 8]


def test_plan_for_another_model(tiny_tied, tiny_untied, tmp_path):
    other = Plan.identity(ModelShape.from_hf_dir(tiny_tied), fingerprint=fingerprint(tiny_tied))
    p = other.save(tmp_path / "other.json")
    with pytest.raises(PlanError, match="the plan was made for another model: n_layer 6 in the plan vs 4 in the model"):
        _score(tiny_untied, tmp_path, plan=p)
    same_shape = Plan.identity(ModelShape.from_hf_dir(tiny_untied), fingerprint="0123456789abcdef")
    p2 = same_shape.save(tmp_path / "fp.json")
    with pytest.raises(PlanError, match="fingerprint 0123456789abcdef in the plan"):
        _score(tiny_untied, tmp_path, plan=p2)
    cut = Plan.identity(ModelShape.from_hf_dir(tiny_untied)).with_layer(LayerPlan(2, heads=()))
    p3 = cut.save(tmp_path / "cut.json")
    with pytest.raises(ScoreError, match="--head-layers: layer 2 has no attention left in the base plan"):
        _score(tiny_untied, tmp_path, plan=p3, heads=True, head_layers="1-2")


# ----------------------------------------------------------------- the scores file


def test_scores_file_errors(scored, tmp_path, tiny_tied, tiny_untied):
    d = json.loads(scored.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d | {"schema": "gguf-prune/plan"}))
    with pytest.raises(scores_io.ScoresError, match="'schema' is 'gguf-prune/plan', expected 'gguf-prune/scores'"):
        scores_io.load(bad)
    bad.write_text(json.dumps(d | {"version": 2}))
    with pytest.raises(scores_io.ScoresError, match="'version' is 2; this gguf-prune reads version 1"):
        scores_io.load(bad)
    bad.write_text(json.dumps(d | {"layers": d["layers"][:3]}))
    with pytest.raises(scores_io.ScoresError, match="'layers' must list all 6 source layers, got 3"):
        scores_io.load(bad)
    bad.write_text("{")
    with pytest.raises(scores_io.ScoresError, match="is not valid JSON"):
        scores_io.load(bad)
    with pytest.raises(scores_io.ScoresError, match="no such scores file"):
        scores_io.load(tmp_path / "nope.json")
    scores_io.check_model(d, fingerprint(tiny_tied), ModelShape.from_hf_dir(tiny_tied))
    with pytest.raises(scores_io.ScoresError, match="measured on another checkpoint: fingerprint"):
        scores_io.check_model(d, "ffffffffffffffff")
    with pytest.raises(scores_io.ScoresError, match="measured on another model: n_layer 6 in the scores vs 4"):
        scores_io.check_model(d, fingerprint(tiny_untied), ModelShape.from_hf_dir(tiny_untied))


# ----------------------------------------------------------------- the demo model


@pytest.mark.e2e
def test_demo_model_layer_and_sublayer_scores(demo_model, tmp_path):
    out = score_model(demo_model, tmp_path / "demo.json",
                      ScoreOptions(seq_len=32, samples=4, neurons=False, progress=False, plots=True))
    d = scores_io.load(out)
    assert d["model"]["shape"]["n_layer"] == 30 and len(d["layers"]) == 30
    kl = np.array([e["kl"] for e in d["layers"]])
    bi = np.array([e["bi"] for e in d["layers"]])
    assert (kl > 0).all() and d["full"]["ppl"] < 200  # a real pretrained model on English text
    assert kl[0] == kl.max()  # the first layer of a pretrained LM is the one it cannot do without
    assert np.corrcoef(np.log(kl), bi)[0, 1] > 0  # the proxy and the causal score agree in trend
    assert all(e["attn_kl"] > 0 and e["mlp_kl"] > 0 for e in d["layers"])
    assert (tmp_path / "demo.layers.png").exists()


def test_device_map_and_bf16_paths_agree_with_float32(tiny_untied, tmp_path):
    base = json.loads(_score(tiny_untied, tmp_path, plots=False, neurons=False).read_text())
    mapped = json.loads(score_model(tiny_untied, tmp_path / "map.json",
                                    ScoreOptions(**SMALL, plots=False, neurons=False, device_map="auto")).read_text())
    assert mapped["settings"]["device_resolved"] == "device_map=auto"
    for a, b in zip(base["layers"], mapped["layers"]):
        assert a["kl"] == pytest.approx(b["kl"], abs=TOL) and a["mlp_kl"] == pytest.approx(b["mlp_kl"], abs=TOL)
    bf = json.loads(score_model(tiny_untied, tmp_path / "bf16.json",
                                ScoreOptions(**SMALL, plots=False, neurons=False, dtype="bf16")).read_text())
    kl32 = np.array([e["kl"] for e in base["layers"]])
    kl16 = np.array([e["kl"] for e in bf["layers"]])
    assert np.abs(kl16 / kl32 - 1).max() < 0.1  # bf16 weights and states, float32 logits: close, not equal
    assert not np.array_equal(kl16, kl32)


def test_width_scores_equal_the_naive_ablation_and_follow_the_energy_order(tiny_tied, tmp_path):
    """score --width: KL with each MLP's d lowest-energy neurons zeroed, on top of a plan that already cut
    neurons of layer 3 (the cut neurons are not counted again), equal to the naive hooked forward."""
    shape = ModelShape.from_hf_dir(tiny_tied)  # n_ff 768
    cut = tuple(range(0, 700))  # layer 3 keeps 700 neurons: the widths count live ones
    plan = Plan.identity(shape, fingerprint=fingerprint(tiny_tied)).with_layer(LayerPlan(3, neurons=cut)) \
        .with_layer(LayerPlan(4, removed=True))
    plan_path = plan.save(tmp_path / "plan.json")
    out = score_model(tiny_tied, tmp_path / "w.json",
                      ScoreOptions(**SMALL, plan=plan_path, width=(0.25, 0.5, 0.95), width_align=64, plots=False))
    d = json.loads(out.read_text())
    assert d["width"] == {"drops": [192, 384, 704], "order": "energy", "align": 64}
    from gguf_prune.scoring.plots import plot_scores

    assert (tmp_path / "w.width.png") in plot_scores(out) and (tmp_path / "w.width.png").stat().st_size > 1000
    assert d["layers"][4].get("width_kl") is None
    assert d["layers"][3]["width_kl"][2] is None  # 704 of 700 live neurons: not a width cut
    stats = load_file(str(out.parent / d["neurons"]["file"]))
    assert set(d["neurons"]["stats"]) == {"freq", "mean_abs", "wxa", "energy"}
    assert np.all(stats["energy.3"][list(range(700, 768))] == 0)  # cut neurons carry no energy
    cal = _calibration(tiny_tied)
    original, pruned = load_model(tiny_tied), apply_plan(load_model(tiny_tied), plan)
    sets, want = [], []
    for s, pos in ((0, 0), (3, 3), (5, 4)):
        order = scores_io.energy_order(stats[f"energy.{s}"], range(700) if s == 3 else None)
        for k, dd in enumerate((192, 384)):
            sets.append([("neurons", pos, tuple(int(j) for j in order[:dd]))])
            want.append(d["layers"][s]["width_kl"][k])
    kl, _, _, _ = naive.naive_divergence(pruned, list(cal.batches(3)), sets, reference_model=original)
    assert np.allclose(kl, want, atol=TOL, rtol=0)
    assert all(a < b for a, b in zip(want[0::2], want[1::2]))  # more neurons cut, more KL
    assert d["layers"][0]["width_kl"][2] > d["layers"][0]["width_kl"][1]


def test_width_option_errors(tiny_untied, tmp_path):
    for kw, msg in ((dict(width=(0.0,)), "between 0 and 1"), (dict(width=(1.5,)), "between 0 and 1"),
                    (dict(width=(0.5,), width_align=0), "--width-align"),
                    (dict(width=(0.5,), stream=True), "not available with --stream")):
        with pytest.raises(ScoreError, match=msg):
            score_model(tiny_untied, tmp_path / "x.json", ScoreOptions(**SMALL, **kw))
    # width scores carry the neuron energies the plan needs, with --no-neurons too
    out = score_model(tiny_untied, tmp_path / "nn.json",
                      ScoreOptions(**SMALL, neurons=False, width=(0.5,), width_align=128, plots=False))
    plan = build_plan(scores_io.load(out), PlanOptions(target_params=0.05, units=("width",), protect_first=1, protect_last=0),
                      out)
    assert any(len(lp.kept_neurons(plan.shape)) < 768 for lp in plan.layers)
    r = CliRunner().invoke(main, ["score", str(tiny_untied), "--width", "half", "-o", str(tmp_path / "x.json")])
    assert r.exit_code != 0 and "fractions like" in r.output and "Traceback" not in r.output
