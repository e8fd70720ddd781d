"""plan.json: strategies, GQA consistency, alignment, validation and --explain."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_prune.cli import main
from gguf_prune.plan import LayerPlan, ModelShape, Plan, PlanError, validate
from gguf_prune.planning.explain import explain
from gguf_prune.planning.options import PlanOptions
from gguf_prune.planning.strategies import build_plan, make_plan

SHAPE = ModelShape(architecture="llama", n_layer=8, n_embd=256, n_head=8, n_head_kv=2, head_dim=32,
                   n_ff=768, n_vocab=1000)


def _scores(seed: int = 0, heads: bool = True, greedy=None, neurons_file=None) -> dict:
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(SHAPE.n_layer):
        layers.append({"index": i, "removed": False, "bi": float(rng.uniform(0.05, 0.5)),
                       "kl": float(rng.uniform(0.01, 1.0)), "ppl": None,
                       "attn_kl": float(rng.uniform(0.01, 0.5)), "mlp_kl": float(rng.uniform(0.01, 0.5)),
                       "attn_bi": float(rng.uniform(0.01, 0.2)), "mlp_bi": float(rng.uniform(0.01, 0.2))})
    d = {"schema": "gguf-prune/scores", "version": 1,
         "model": {"fingerprint": "abc123", "shape": SHAPE.to_dict(), "path": "/x"},
         "calibration": {"fingerprint": "cal1"}, "settings": {}, "base_plan": None,
         "full": {"nll": 2.0, "ppl": 7.4}, "layers": layers, "heads": None, "neurons": None, "greedy": greedy,
         "timing": {}}
    if heads:
        d["heads"] = {"layers": list(range(SHAPE.n_layer)),
                      "kl": {str(i): [float(x) for x in rng.uniform(0, 0.2, SHAPE.n_head)] for i in range(8)},
                      "kv_kl": {str(i): [float(x) for x in rng.uniform(0, 0.5, SHAPE.n_head_kv)] for i in range(8)},
                      "norm": None, "taylor": None}
    if neurons_file:
        d["neurons"] = {"file": neurons_file, "tau": 0.01, "stats": ["freq", "mean_abs", "wxa"]}
    return d


def test_drop_layers_takes_the_lowest_kl_outside_protected():
    s = _scores()
    plan = build_plan(s, PlanOptions(drop_layers=2, metric="kl"))
    kls = {e["index"]: e["kl"] for e in s["layers"]}
    expected = sorted(range(2, 6), key=lambda i: kls[i])[:2]
    assert sorted(lp.index for lp in plan.layers if lp.removed) == sorted(expected)
    assert plan.is_uniform()  # whole layers only: the file can stay `llama`
    assert plan.predicted["block_params_removed_fraction"] == pytest.approx(2 / 8)


def test_drop_layers_by_bi_differs_from_kl_when_the_scores_disagree():
    s = _scores()
    for e in s["layers"]:  # make BI rank the opposite way from KL
        e["bi"] = 1.0 - e["kl"]
    kl = {lp.index for lp in build_plan(s, PlanOptions(drop_layers=2, metric="kl")).layers if lp.removed}
    bi = {lp.index for lp in build_plan(s, PlanOptions(drop_layers=2, metric="bi")).layers if lp.removed}
    assert kl.isdisjoint(bi)


def test_greedy_metric_follows_the_greedy_order():
    greedy = {"units": ["layer"], "by": "kl", "steps": [
        {"kind": "layer", "layer": 5, "kl": 0.1, "delta_kl": 0.1, "params_removed": 1, "candidates": 4},
        {"kind": "layer", "layer": 2, "kl": 0.3, "delta_kl": 0.2, "params_removed": 1, "candidates": 3}]}
    plan = build_plan(_scores(greedy=greedy), PlanOptions(drop_layers=2, metric="greedy"))
    assert [lp.index for lp in plan.layers if lp.removed] == [2, 5]
    assert plan.layers[5].why["greedy_step"] == 1
    with pytest.raises(PlanError, match="needs 3 greedy layer steps"):
        build_plan(_scores(greedy=greedy), PlanOptions(drop_layers=3, metric="greedy"))


def test_sub_blocks_and_a_layer_with_both_removed_becomes_removed():
    s = _scores()
    for e in s["layers"]:
        e["attn_kl"] = {2: 0.01, 3: 0.02}.get(e["index"], 1.0)
        e["mlp_kl"] = {3: 0.01, 5: 0.02}.get(e["index"], 1.0)
    plan = build_plan(s, PlanOptions(drop_attn=2, drop_mlp=2))
    assert plan.layers[2].attention_removed and not plan.layers[2].mlp_removed
    assert plan.layers[3].removed  # attention and MLP both gone: the layer goes
    assert plan.layers[5].mlp_removed and not plan.layers[5].attention_removed
    assert not plan.is_uniform()  # per-layer shapes differ: needs `deci`
    assert [d["n_head"] for d in plan.dims()] == [8, 8, 0, 8, 8, 8, 8]
    assert [d["n_ff"] for d in plan.dims()] == [768, 768, 768, 768, 0, 768, 768]
    for lp in plan.layers[:2] + plan.layers[-2:]:
        assert lp.untouched


def test_heads_are_gqa_consistent_in_every_layer():
    plan = build_plan(_scores(seed=3), PlanOptions(prune_heads=0.3, protect_first=0, protect_last=0))
    gs = SHAPE.group_size
    removed = 0
    for lp in plan.layers:
        heads = lp.kept_heads(SHAPE)
        removed += SHAPE.n_head - len(heads)
        counts = {}
        for h in heads:
            counts[h // gs] = counts.get(h // gs, 0) + 1
        assert len(set(counts.values())) <= 1, (lp.index, heads)
    total = SHAPE.n_layer * SHAPE.n_head
    assert abs(removed - 0.3 * total) <= SHAPE.n_layer  # per-layer rounding to GQA-consistent counts
    validate(plan)


def test_whole_kv_groups_can_go():
    s = _scores(seed=4)
    # Layer 3: group 1 is useless, group 0 essential -> removing 4 heads there should remove group 1.
    s["heads"]["kl"]["3"] = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    s["heads"]["kv_kl"]["3"] = [5.0, 0.0]
    for i in range(8):
        if i != 3:
            s["heads"]["kl"][str(i)] = [9.0] * 8
    plan = build_plan(s, PlanOptions(prune_heads=4 / 64, protect_first=0, protect_last=0))
    assert plan.layers[3].heads == (0, 1, 2, 3)
    assert plan.layers[3].kept_kv_groups(SHAPE) == (0,)
    assert plan.dims()[3]["n_head_kv"] == 1


def test_neurons_threshold_and_alignment(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    stats = {}
    for i in range(SHAPE.n_layer):
        freq = rng.uniform(0.1, 1, SHAPE.n_ff).astype(np.float32)
        freq[: 400] = 0.001  # 400 nearly dead neurons
        stats[f"freq.{i}"] = freq
        stats[f"mean_abs.{i}"] = freq
        stats[f"wxa.{i}"] = freq
    save_file(stats, str(tmp_path / "s.neurons.safetensors"))
    s = _scores(neurons_file="s.neurons.safetensors")
    (tmp_path / "scores.json").write_text(json.dumps(s))
    opts = PlanOptions(prune_neurons=True, neuron_threshold=0.005, align=256)
    plan = make_plan(tmp_path / "scores.json", tmp_path / "plan.json", opts)
    for lp in plan.layers[2:-2]:
        kept = lp.kept_neurons(SHAPE)
        assert len(kept) == 256  # 368 alive neurons rounded to the nearest multiple of 256
        assert all(stats[f"freq.{lp.index}"][j] > 0.001 for j in kept)  # only live neurons kept
    plan_unaligned = build_plan(s, PlanOptions(prune_neurons=True, neuron_threshold=0.005, align=1),
                                tmp_path / "scores.json")
    assert len(plan_unaligned.layers[3].kept_neurons(SHAPE)) == 368


def test_budget_meets_target_params_with_cheapest_units():
    s = _scores(seed=5)
    plan = build_plan(s, PlanOptions(target_params=0.2))
    assert plan.removed_fraction() >= 0.2
    # one unit fewer would not have met it: the budget does not overshoot by a whole layer
    assert plan.removed_fraction() < 0.2 + SHAPE.layer_params() / (SHAPE.n_layer * SHAPE.layer_params())


def test_budget_follows_greedy_steps_when_present():
    greedy = {"units": ["layer", "attn", "mlp"], "by": "kl-per-param", "steps": [
        {"kind": "mlp", "layer": 4, "kl": 0.05}, {"kind": "attn", "layer": 3, "kl": 0.08},
        {"kind": "mlp", "layer": 3, "kl": 0.12}, {"kind": "layer", "layer": 2, "kl": 0.2}]}
    plan = build_plan(_scores(greedy=greedy), PlanOptions(target_params=0.15))
    assert plan.layers[4].mlp_removed and plan.layers[3].removed
    assert plan.layers[2].untouched  # budget met before the 4th step
    # past the greedy run, one-shot KL per parameter takes the rest of the budget
    more = build_plan(_scores(greedy=greedy), PlanOptions(target_params=0.45))
    assert more.removed_fraction() >= 0.45
    assert any("budget/kl-per-param" in str(lp.why) for lp in more.layers)
    bare = _scores(greedy=greedy)
    for e in bare["layers"]:
        e["kl"] = e["attn_kl"] = e["mlp_kl"] = None
    with pytest.raises(PlanError, match="does not reach the budget"):
        build_plan(bare, PlanOptions(target_params=0.6))


def test_roundtrip_json_and_digest(tmp_path):
    plan = build_plan(_scores(), PlanOptions(drop_layers=1, prune_heads=0.25))
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_json() == plan.to_json()
    assert again.digest() == plan.digest()
    d = json.loads(path.read_text())
    assert d["schema"] == "gguf-prune/plan" and d["model"]["fingerprint"] == "abc123"


def test_validation_names_every_problem_at_once():
    layers = [LayerPlan(i) for i in range(8)]
    layers[0] = LayerPlan(0, removed=True)  # protected
    layers[3] = LayerPlan(3, heads=(0, 1, 2, 4))  # uneven: 3 in group 0, 1 in group 1
    layers[4] = LayerPlan(4, heads=(0, 9))  # out of range
    layers[5] = LayerPlan(5, neurons=(1, 1, 800))  # duplicate and out of range
    plan = Plan(shape=SHAPE, layers=tuple(layers), fingerprint="abc123",
                settings={"protect_first": 2, "protect_last": 2})
    other = ModelShape(**(SHAPE.to_dict() | {"n_layer": 8, "n_ff": 1024}))
    with pytest.raises(PlanError) as e:
        validate(plan, other, fingerprint="zzz")
    msg = str(e.value)
    assert "layer 0 is protected" in msg
    assert "layer 3: GQA groups left uneven (group 0: 3, group 1: 1 query heads)" in msg
    assert "layer 4: head indices [9] out of range 0..7" in msg
    assert "layer 5: neuron indices [800] out of range 0..767" in msg
    assert "layer 5: duplicated neuron indices" in msg
    assert "n_ff 768 in the plan vs 1024 in the model" in msg
    assert "fingerprint abc123 in the plan, zzz for this checkpoint" in msg
    assert len(e.value.problems) == 7


def test_malformed_plan_files_get_clear_errors(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(p)
    p.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(PlanError, match="not a gguf-prune plan"):
        Plan.load(p)


def test_explain_table_and_cli(tmp_path):
    s = _scores()
    (tmp_path / "scores.json").write_text(json.dumps(s))
    runner = CliRunner()
    r = runner.invoke(main, ["plan", str(tmp_path / "scores.json"), "-o", str(tmp_path / "plan.json"),
                             "--drop-layers", "1", "--prune-heads", "0.25"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["plan", "--explain", str(tmp_path / "plan.json")])
    assert r.exit_code == 0, r.output
    plan = Plan.load(tmp_path / "plan.json")
    text = explain(plan)
    assert text in r.output
    removed = [lp.index for lp in plan.layers if lp.removed][0]
    assert any(line.split()[:2] == [str(removed), "removed"] for line in text.splitlines())
    assert "block parameters:" in text and "deci" in text


def test_cli_plan_reports_bad_requests(tmp_path):
    (tmp_path / "scores.json").write_text(json.dumps(_scores(heads=False)))
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "scores.json"), "-o", str(tmp_path / "p.json"),
                                  "--prune-heads", "0.2"])
    assert r.exit_code != 0
    assert "re-run `gguf-prune score --heads`" in r.output
    assert not (tmp_path / "p.json").exists()


def test_budget_by_width_takes_the_cheapest_width_cuts_in_energy_order(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    stats = {}
    for i in range(SHAPE.n_layer):
        for k in ("freq", "mean_abs", "wxa", "energy"):
            stats[f"{k}.{i}"] = rng.uniform(0.1, 1, SHAPE.n_ff).astype(np.float32)
    save_file(stats, str(tmp_path / "s.neurons.safetensors"))
    s = _scores(neurons_file="s.neurons.safetensors")
    s["neurons"]["stats"].append("energy")
    s["width"] = {"drops": [256, 512], "order": "energy", "align": 256}
    curves = {2: [0.01, 0.5], 3: [0.2, 0.25], 4: [0.05, 0.12], 5: [1.0, 2.0]}  # layer 3: the 2nd step is cheap
    for e in s["layers"]:
        e["width_kl"] = curves.get(e["index"], [0.5, 0.6])
    (tmp_path / "scores.json").write_text(json.dumps(s))
    step = SHAPE.mlp_params(SHAPE.n_ff) - SHAPE.mlp_params(SHAPE.n_ff - 256)
    total = SHAPE.n_layer * SHAPE.layer_params()
    plan = make_plan(tmp_path / "scores.json", tmp_path / "plan.json",
                     PlanOptions(target_params=3.5 * step / total, units=("width",)))
    # cheapest per parameter: layer 2's first step, layer 4's two, then layer 3 straight to 512 (0.125 a step)
    kept = {lp.index: len(lp.kept_neurons(SHAPE)) for lp in plan.layers}
    assert kept == {0: 768, 1: 768, 2: 512, 3: 256, 4: 256, 5: 768, 6: 768, 7: 768}
    for i in (2, 3, 4):
        energy = stats[f"energy.{i}"]
        dropped = sorted(set(range(SHAPE.n_ff)) - set(plan.layers[i].kept_neurons(SHAPE)))
        assert max(energy[dropped]) < min(energy[list(plan.layers[i].kept_neurons(SHAPE))])
        assert plan.layers[i].why["width_removed_by"] == "budget/width-kl-per-param"
    assert plan.removed_fraction() == pytest.approx(5 * step / total)
    # width and whole units in one ranking: layer 5's MLP (0.01 for 768 neurons) beats every width step
    s["layers"][5]["mlp_kl"] = 0.001
    mixed = build_plan(s, PlanOptions(target_params=step / total, units=("mlp", "width")), tmp_path / "scores.json")
    assert mixed.layers[5].mlp_removed and mixed.layers[2].untouched
    with pytest.raises(PlanError, match="use a comma list of layer, attn, mlp, width"):
        build_plan(s, PlanOptions(target_params=0.1, units=("neurons",)))
    del s["width"]
    with pytest.raises(PlanError, match="needs width scores"):
        build_plan(s, PlanOptions(target_params=0.1, units=("width",)), tmp_path / "scores.json")


@pytest.mark.bad_input
def test_an_edited_scores_file_gives_a_plan_or_one_clear_error(tmp_path):
    """300 seeded random edits of a scores.json (a key deleted; a value made a string, null, -1, [] or 1e9), each
    planned three ways: a plan or one GgufPruneError, never a traceback (before: 21 kinds of KeyError / TypeError)."""
    import copy
    import random

    from gguf_prune.errors import GgufPruneError

    base = _scores(seed=6)

    def paths(d, pre=()):
        items = d.items() if isinstance(d, dict) else enumerate(d[:3]) if isinstance(d, list) else ()
        for k, v in items:
            yield pre + (k,)
            yield from paths(v, pre + (k,))

    where = [p for p in paths(base) if p[0] not in ("schema", "version")]
    rng = random.Random(0)
    outcomes = {"plan": 0, "error": 0}
    for _ in range(300):
        d = copy.deepcopy(base)
        p = rng.choice(where)
        parent = d
        for k in p[:-1]:
            parent = parent[k]
        op = rng.choice(["del", "str", "none", "neg", "list", "big"])
        if op == "del":
            del parent[p[-1]]
        else:
            parent[p[-1]] = {"str": "abc", "none": None, "neg": -1, "list": [], "big": 10**9}[op]
        (tmp_path / "scores.json").write_text(json.dumps(d))
        for opts in (PlanOptions(target_params=0.2), PlanOptions(drop_layers=2, prune_heads=0.25),
                     PlanOptions(drop_attn=1, drop_mlp=1)):
            try:
                make_plan(tmp_path / "scores.json", tmp_path / "plan.json", opts)
                outcomes["plan"] += 1
            except GgufPruneError as e:
                assert str(e) and "Traceback" not in str(e)
                outcomes["error"] += 1
    assert outcomes["plan"] > 0 and outcomes["error"] > 0, outcomes
