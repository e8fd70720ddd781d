"""Layer-major streamed scoring: the same numbers as the in-memory engine, from shards, in slices, in passes."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch, save_file

from gguf_prune import scores as scores_io
from gguf_prune.scoring import memory, stream
from gguf_prune.scoring.engine_choice import slice_layers
from gguf_prune.scoring.stream_engine import open_checkpoint
from gguf_prune.cli import main
from gguf_prune.models.checkpoint import ModelDirError, fingerprint
from gguf_prune.plan import ModelShape
from gguf_prune.planning.options import PlanOptions
from gguf_prune.planning.strategies import build_plan
from gguf_prune.scoring.options import ScoreError, ScoreOptions
from gguf_prune.scoring.measure import score_model

TOL = 1e-5  # float32, as the in-memory engine against the naive ablation
SMALL = dict(seq_len=16, samples=3, progress=False, plots=False)
FULL = dict(SMALL, heads=True, head_layers="1,3", ppl=True)  # layers, sub-blocks, heads, KV groups, neurons


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def in_memory(tiny_tied, tmp_path_factory):
    return score_model(tiny_tied, tmp_path_factory.mktemp("mem") / "scores.json", ScoreOptions(**FULL))


@pytest.fixture(scope="module")
def sharded(tiny_untied, tmp_path_factory):
    """tiny_untied re-saved by save_pretrained in shards of at most 2 MB, with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded")
    for f in tiny_untied.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    AutoModelForCausalLM.from_pretrained(tiny_untied).save_pretrained(out, max_shard_size="2MB")
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 4
    return out


def _max_diff(a: dict, b: dict, rel_taylor: bool = True) -> float:
    """Largest |a − b| over every score two documents both have (layers, heads); Taylor relative."""
    worst = 0.0
    for ea, eb in zip(a["layers"], b["layers"]):
        for k in ("bi", "kl", "attn_kl", "mlp_kl", "attn_bi", "mlp_bi"):
            assert (ea[k] is None) == (eb[k] is None), (ea["index"], k)
            if ea[k] is not None:
                worst = max(worst, abs(ea[k] - eb[k]))
        if ea["ppl"] is not None:
            worst = max(worst, abs(ea["ppl"] - eb["ppl"]) / ea["ppl"])
    if a["heads"] is not None:
        assert a["heads"]["layers"] == b["heads"]["layers"]
        for key in ("kl", "kv_kl", "norm", "taylor"):
            for i in a["heads"]["layers"]:
                x, y = np.array(a["heads"][key][str(i)]), np.array(b["heads"][key][str(i)])
                d = np.abs(x - y).max()
                worst = max(worst, d / np.abs(x).max() if key == "taylor" and rel_taylor else d)
    return worst


def test_streamed_scores_equal_in_memory_scores(tiny_tied, in_memory, tmp_path):
    out = score_model(tiny_tied, tmp_path / "s.json", ScoreOptions(**FULL, stream=True))
    a, b = json.loads(in_memory.read_text()), json.loads(out.read_text())
    assert _max_diff(a, b) <= TOL
    assert b["schema"] == "gguf-prune/scores" and b["model"] == a["model"] and b["calibration"] == a["calibration"]
    assert b["full"]["nll"] == pytest.approx(a["full"]["nll"], abs=TOL)
    assert all(e["kl"] > 0 and e["attn_kl"] > 0 and e["mlp_kl"] > 0 for e in b["layers"])
    assert sorted(b["heads"]["kl"]) == ["1", "3"] and len(b["heads"]["kv_kl"]["3"]) == 2
    # neuron statistics: the same side file
    na = load_file(str(in_memory.parent / a["neurons"]["file"]))
    nb = load_file(str(out.parent / b["neurons"]["file"]))
    assert set(na) == set(nb) and b["neurons"]["layers"] == a["neurons"]["layers"]
    for k in na:
        np.testing.assert_allclose(nb[k], na[k], rtol=1e-5, atol=1e-6)
    st = b["stream"]
    # 1 walk over the weights for every unit, 2 more (forward, backward) for the heads' Taylor scores
    assert st["passes"] == 3 and st["token_groups"] == 1 and st["passes_per_group"] == 1
    assert st["layer_reads"] == 3 * 6 and st["bytes_read"] >= 3 * 6 * st["layer_bytes"] // 1
    assert "one pass" in st["why"] and "Taylor" in st["why"]
    # the plan stage reads it as it reads an in-memory run
    assert build_plan(b, PlanOptions(drop_layers=1)).digest() == build_plan(a, PlanOptions(drop_layers=1)).digest()


def _budget_for(hf_dir, want_groups: bool) -> int:
    """A --max-memory that makes the streamed run cut its variants into passes (and token groups)."""
    shape = ModelShape.from_hf_dir(hf_dir)
    ckpt = open_checkpoint(hf_dir)
    vs = stream.variants_of(range(shape.n_layer), shape.n_head, shape.n_head_kv, True, [1, 3])
    for budget in range(40 << 20, 200 << 20, 1 << 18):
        try:
            m = memory.plan_memory(ckpt, 3, 16, vs, budget, 4, True, batch_tokens=32)
        except memory.StreamError:
            continue
        groups = -(-3 // m.group_seqs)
        if len(m.passes) > 2 and (groups > 1) == want_groups:
            return budget
    raise AssertionError("no budget gives several passes")


@pytest.mark.parametrize("groups", [False, True], ids=["passes", "passes+token-groups"])
def test_sharded_checkpoint_in_passes_equals_in_memory(sharded, tiny_untied, tmp_path, groups):
    kw = dict(FULL, batch_tokens=32)
    mem = score_model(tiny_untied, tmp_path / "mem.json", ScoreOptions(**kw))
    budget = _budget_for(sharded, groups)
    out = score_model(sharded, tmp_path / "s.json", ScoreOptions(**kw, stream=True, max_memory=str(budget)))
    a, b = json.loads(mem.read_text()), json.loads(out.read_text())
    assert _max_diff(a, b) <= TOL
    st = b["stream"]
    assert st["budget"] == budget and st["passes_per_group"] > 2 and (st["token_groups"] > 1) == groups
    assert st["passes"] == st["passes_per_group"] * st["token_groups"] + 2
    assert f"{st['passes_per_group']} pass(es) over the weights per token group" in st["why"]
    # later passes start where their first variant is born: fewer layer reads than passes × layers
    assert st["layer_reads"] < st["passes"] * 4


def test_units_slices_merge_into_the_whole_run(tiny_tied, tmp_path):
    whole = score_model(tiny_tied, tmp_path / "whole.json", ScoreOptions(**FULL, stream=True))
    slices = []
    for k, spec in enumerate(["0/3", "1/3", "2/3"]):
        slices.append(score_model(tiny_tied, tmp_path / f"s{k}" / "part.json", ScoreOptions(**FULL, units=spec)))
    owned = [json.loads(p.read_text())["units"]["layers"] for p in slices]
    assert sorted(sum(owned, [])) == list(range(6)) and all(owned)
    d0 = json.loads(slices[0].read_text())
    assert d0["schema"] == "gguf-prune/scores-slice" and d0["units"]["spec"] == "0/3"
    assert all(d0["layers"][i]["kl"] is None for i in range(6) if i not in owned[0])
    # a slice alone is not a scores file for the plan stage
    with pytest.raises(scores_io.ScoresError, match=r"one slice \(--units 0/3\) of a split scoring run; join"):
        scores_io.load(slices[0])
    merged = tmp_path / "merged.json"
    r = CliRunner().invoke(main, ["score", "--merge", *map(str, slices[::-1]), "-o", str(merged)])
    assert r.exit_code == 0, r.output
    a, b = json.loads(whole.read_text()), scores_io.load(merged)
    assert _max_diff(a, b) <= TOL and b["schema"] == "gguf-prune/scores" and "units" not in b
    assert b["stream"]["units"] == ["2/3", "1/3", "0/3"]
    na, nb = load_file(str(whole.parent / a["neurons"]["file"])), load_file(str(merged.parent / b["neurons"]["file"]))
    assert set(na) == set(nb) and all(np.array_equal(na[k], nb[k]) for k in na)
    assert build_plan(b, PlanOptions(drop_layers=2)).digest() == build_plan(a, PlanOptions(drop_layers=2)).digest()


def test_units_as_layer_lists_and_balanced_slices(tiny_tied, tmp_path):
    cost = [6, 5, 4, 3, 2, 1]
    parts = [slice_layers(k, 3, cost) for k in range(3)]
    assert sum(parts, []) == list(range(6)) and all(parts)
    assert sum(cost[i] for i in parts[0]) <= 9  # the early, costly layers get a short slice
    p = score_model(tiny_tied, tmp_path / "p.json", ScoreOptions(**SMALL, units="2,4-5", neurons=False))
    d = json.loads(p.read_text())
    assert d["units"]["layers"] == [2, 4, 5] and d["stream"]["owned_layers"] == [2, 4, 5]
    assert [e["kl"] is not None for e in d["layers"]] == [False, False, True, False, True, True]
    with pytest.raises(ScoreError, match=r"--units '3/3': K must be in 0\.\.N-1"):
        score_model(tiny_tied, tmp_path / "q.json", ScoreOptions(**SMALL, units="3/3"))
    with pytest.raises(ScoreError, match=r"--units '0/7': 7 slices of a 6-layer model"):
        score_model(tiny_tied, tmp_path / "q.json", ScoreOptions(**SMALL, units="0/7"))


def test_merge_refuses_slices_of_other_models_data_or_overlaps(tiny_tied, tiny_untied, tmp_path):
    a = score_model(tiny_tied, tmp_path / "a" / "a.json", ScoreOptions(**SMALL, units="0/2", neurons=False))
    b = score_model(tiny_tied, tmp_path / "b" / "b.json", ScoreOptions(**SMALL, units="1/2", neurons=False))
    other = score_model(tiny_untied, tmp_path / "o" / "o.json", ScoreOptions(**SMALL, units="1/2", neurons=False))
    seed = score_model(tiny_tied, tmp_path / "s" / "s.json", ScoreOptions(**SMALL, units="1/2", neurons=False, seed=3))
    out = tmp_path / "m.json"

    def merge(*paths):
        return CliRunner().invoke(main, ["score", "--merge", *map(str, paths), "-o", str(out)])

    r = merge(a, other)
    assert r.exit_code == 1 and f"{other} is a slice of another model (fingerprint {fingerprint(tiny_untied)}" \
        in r.output, r.output
    r = merge(a, seed)
    assert r.exit_code == 1 and f"{seed} was scored on other calibration data than {a} (differs in fingerprint" \
        in r.output
    r = merge(a, a, b)
    assert r.exit_code == 1 and re.search(r"layer 0 is scored in both .*a\.json and .*a\.json: the slices overlap",
                                          r.output)
    r = merge(a)
    assert r.exit_code == 1 and "--merge needs at least two scores slices" in r.output
    whole = score_model(tiny_tied, tmp_path / "w.json", ScoreOptions(**SMALL, stream=True, neurons=False))
    r = merge(a, whole)
    assert r.exit_code == 1 and f"{whole} is a whole run, not a --units slice" in r.output
    r = merge(b, b)
    assert r.exit_code == 1 and "the slices overlap" in r.output
    c = score_model(tiny_tied, tmp_path / "c" / "c.json", ScoreOptions(**SMALL, units="0", neurons=False))
    r = merge(c, b)
    assert r.exit_code == 1 and "no slice scores layer(s) 1: score them with --units" in r.output
    assert not out.exists()
    assert merge(a, b).exit_code == 0 and scores_io.load(out)["layers"][5]["kl"] > 0


def test_max_memory_below_one_layer_is_one_clear_error(tiny_tied, tmp_path):
    with pytest.raises(ScoreError, match=r"--max-memory 1\.00 MiB is too small to stream this model: one decoder "
                                         r"layer needs \d+\.\d\d MiB \(its weights 2\.88 MiB, .*; give at least"):
        score_model(tiny_tied, tmp_path / "s.json", ScoreOptions(**SMALL, stream=True, max_memory="1MiB"))
    with pytest.raises(ScoreError, match=r"--max-memory 'lots': cannot read a size"):
        score_model(tiny_tied, tmp_path / "s.json", ScoreOptions(**SMALL, stream=True, max_memory="lots"))
    assert not (tmp_path / "s.json").exists()


def test_shards_missing_a_tensor_or_a_file_fail_before_any_work(sharded, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.down_proj.weight"
    shard = bad / index["weight_map"][name]
    t = load_torch(str(shard))
    del t[name]
    save_file(t, str(shard), metadata={"format": "pt"})
    caplog.set_level(logging.INFO)
    # the checks every command makes (checkpoint.check_weights), before the streamed engine starts
    with pytest.raises(ModelDirError, match=rf"shard {shard.name} misses {re.escape(name)}, which "
                                            r"model.safetensors.index.json puts there"):
        score_model(bad, tmp_path / "s.json", ScoreOptions(**SMALL, stream=True))
    assert "streaming" not in caplog.text  # nothing ran
    other = sorted({v for v in index["weight_map"].values()} - {shard.name})[0]
    (bad / other).unlink()
    with pytest.raises(ModelDirError, match=rf"shard {re.escape(other)} is missing \(model.safetensors.index.json "
                                            r"puts \d+ tensors there"):
        score_model(bad, tmp_path / "s.json", ScoreOptions(**SMALL, stream=True))
    assert not (tmp_path / "s.json").exists()


def test_automatic_switch_when_the_model_does_not_fit(tiny_tied, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = score_model(tiny_tied, tmp_path / "s.json", ScoreOptions(**SMALL, max_memory="300MB", neurons=False))
    d = json.loads(out.read_text())
    assert "would need about" in caplog.text and "scoring layer-major from the shards instead" in caplog.text
    assert d["stream"]["reason"].startswith("the model would need about") and d["stream"]["budget"] == 300 << 20
    with pytest.raises(ScoreError, match=r"--stream: --greedy is not supported by the streamed engine yet"):
        score_model(tiny_tied, tmp_path / "g.json", ScoreOptions(**SMALL, stream=True, greedy=1))


def test_cli_stream_and_progress(tiny_tied, tmp_path):
    out = tmp_path / "cli.json"
    r = CliRunner().invoke(main, ["score", str(tiny_tied), "-o", str(out), "--seq-len", "16", "--samples", "2",
                                  "--stream", "--max-memory", "4GB", "--no-neurons", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "streamed layer-major: 1 pass(es) over the weights" in r.output and "lowest-KL layers:" in r.output
    r = CliRunner().invoke(main, ["score", str(tiny_tied), str(tiny_tied)])
    assert r.exit_code == 2 and "give one HF_DIR (got 2 arguments)" in r.output
