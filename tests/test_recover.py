"""Recovery: linear patches and fine-tuning, written into GGUF, must compute what the recovered
PyTorch model computes (cuts.apply_plan with the recovered weights); bad inputs fail clearly
and overwrite nothing."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from gguf_prune.runtime import llamacpp
from gguf_prune.models import checkpoint
from gguf_prune.models import cuts
from gguf_prune.cli import main
from gguf_prune.recovery.options import FinetuneError, FinetuneOptions
from gguf_prune.recovery import sampled
from gguf_prune.recovery.student import prepare_student
from divergence import kl_per_token
from gguf_prune.plan import LayerPlan, ModelShape, Plan, PlanError, validate
from gguf_prune.planning.explain import explain
from gguf_prune.writing.prune import PruneError, prune
from gguf_prune.models.tensors import rope_permute
from gguf_prune.recovered import RecoverError, load_recovered_model, open_recovered
from gguf_prune.recovery.patches import mark_patches
from gguf_prune.recovery.options import RecoverOptions
from gguf_prune.recovery.recover import recover

log = logging.getLogger(__name__)

TEXT = ("The quick brown fox jumps over the lazy dog. In 1998, 42 engineers measured what every layer of the "
        "network did before they cut anything out of it.")
KL_MAX = 1e-4
TIE_MARGIN = 0.005  # as tests/test_fidelity.py: near-ties may break either way


def _plan(hf_dir: Path, shape: ModelShape) -> Plan:
    """Every kind of cut a patch or training meets: sliced heads and neurons, a run of two removed layers,
    a removed attention, a removed MLP."""
    L = LayerPlan
    n = shape.n_layer
    cut = {1: L(1, heads=(0, 1, 4, 5), neurons=tuple(range(0, shape.n_ff, 3))),
           2: L(2, removed=True), 3: L(3, removed=True)}
    if n >= 6:
        cut |= {4: L(4, heads=()), 5: L(5, neurons=())}
    return Plan(shape=shape, layers=tuple(cut.get(i, L(i)) for i in range(n)),
                fingerprint=checkpoint.fingerprint(hf_dir))


CALIBRATION = Path(__file__).parent / ".." / "gguf_prune" / "data" / "pydoc_topics.txt"


@pytest.fixture(scope="module", autouse=True)
def small_text(tmp_path_factory) -> Path:
    """The first 12,000 characters of the bundled calibration text (tokenizing all of it costs seconds)."""
    global SMALL_TEXT
    SMALL_TEXT = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    SMALL_TEXT.write_text(CALIBRATION.read_text()[:12000])
    return SMALL_TEXT


SMALL_TEXT: Path | None = None


def _opts(**kw) -> RecoverOptions:
    ft = kw.pop("ft", None)
    base = dict(seq_len=32, samples=12, heldout=0.2, calibration=SMALL_TEXT)
    base.update(kw)
    if ft is not None:
        base["finetune_options"] = FinetuneOptions(**({"steps": 4, "batch_size": 2, "eval_every": 2,
                                                        "checkpoint_every": 2, "log_every": 2} | ft))
    return RecoverOptions(**base)


def _compare(hf_dir: Path, rec_dir: Path, gguf: Path) -> dict:
    model = load_recovered_model(hf_dir, rec_dir)
    tokens = AutoTokenizer.from_pretrained(hf_dir)(TEXT)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    got = llamacpp.logits(gguf, tokens)
    kl = kl_per_token(ref, got)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) >= TIE_MARGIN
    top1 = float((ref[clear].argmax(-1) == got[clear].argmax(-1)).mean())
    return {"mean_kl": float(kl.mean()), "top1": top1, "ties": int((~clear).sum()), "n": len(tokens),
            "ref": ref, "got": got}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


# ----------------------------------------------------------------------------- plans with patches


def test_plan_records_patches_and_explains_their_cost(tiny_tied):
    shape = ModelShape.from_hf_dir(tiny_tied)
    plan = mark_patches(_plan(tiny_tied, shape))
    assert [lp.index for lp in plan.patches()] == [3, 4]  # the run 2-3 ends at 3; layer 4's attention
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again == plan and again.digest() == plan.digest() != plan.without_patches().digest()
    assert plan.to_dict()["layers"][3] == {"index": 3, "removed": True, "patch": "linear"}
    before, after = plan.block_params()
    _, after_cut = plan.without_patches().block_params()
    assert after - after_cut == 2 * (256 * 256 + 256)
    d = {x["source_index"]: x for x in plan.dims()}
    assert d[3] == {"source_index": 3, "n_head": 8, "n_head_kv": 0, "n_ff": 0, "patch": "linear"}
    assert 2 not in d and d[4]["n_head_kv"] == 0 and d[4]["n_ff"] == 768
    text = explain(plan)
    assert "removed, linear patch" in text and "attn → linear patch" in text
    assert "2 linear patches (layers 3-4): 65.8K parameters each (n_embd² + attn_norm), 131.6K in all" in text


def test_a_patch_stands_only_for_removed_parts(tiny_tied):
    shape = ModelShape.from_hf_dir(tiny_tied)
    L = LayerPlan
    bad = Plan(shape=shape, layers=tuple([L(0), L(1, neurons=(), patch="linear"), L(2, heads=(), patch="cubic")]
                                         + [L(i) for i in range(3, shape.n_layer)]))
    with pytest.raises(PlanError) as e:
        validate(bad, shape)
    assert e.value.problems == [
        "layer 1: a linear patch stands in for a removed layer or a removed attention sub-block, but this layer "
        "keeps its attention (llama.cpp's deci layer has no linear FFN, so a removed MLP alone cannot carry one)",
        "layer 2: patch 'cubic' is not a known kind (known: linear)",
    ]


def test_rope_permutation_is_the_converters():
    # convert_hf_to_gguf's LlamaModel.permute on 2 heads of head_dim 4: rows (0 1 2 3)(4 5 6 7) → (0 2 1 3)(4 6 5 7)
    w = np.arange(8, dtype=np.float32)[:, None]
    assert rope_permute(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# ----------------------------------------------------------------------------- fidelity


def test_patched_gguf_matches_pytorch(tiny_model, cache, tmp_path):
    """Patches for a run of removed layers and (6-layer fixture) a removed attention: llama.cpp's deci linear
    attention + a width-1 zero FFN computes the patched PyTorch model; the patch is really there."""
    shape = ModelShape.from_hf_dir(tiny_model)
    r = recover(tiny_model, _plan(tiny_model, shape), tmp_path / "rec", _opts(patch=True))
    assert [p["layer"] for p in r.manifest["patch"]["patches"]] == ([3, 4] if shape.n_layer >= 6 else [3])
    out = prune(tiny_model, None, tmp_path / "patched.gguf", quant="none", outtype="f32", cache_dir=cache,
                recovered=r.path)
    assert out.architecture == "deci"
    patched = {d["source_index"]: d for d in out.dims}[3]
    assert (patched["attention"], patched["n_head_kv"], patched["n_ff"]) == ("patch", 0, 1)  # not n_ff = 0
    c = _compare(tiny_model, r.path, out.path)
    log.info("%s patched: mean KL %.3g, top-1 %.3f, %d ties", tiny_model.name, c["mean_kl"], c["top1"], c["ties"])
    assert c["mean_kl"] < KL_MAX and c["top1"] == 1.0 and c["ties"] <= c["n"] // 10, c
    # the same file against the cut alone: had llama.cpp dropped the patches it would match this instead
    model = cuts.apply_plan(cuts.load_model(tiny_model), r.plan.without_patches())
    tokens = AutoTokenizer.from_pretrained(tiny_model)(TEXT)["input_ids"]
    with torch.no_grad():
        cut = model(torch.tensor([tokens])).logits[0].numpy()
    assert kl_per_token(cut, c["got"]).mean() > 100 * KL_MAX


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetuned_gguf_matches_pytorch(tiny_tied, cache, tmp_path, method):
    shape = ModelShape.from_hf_dir(tiny_tied)
    plan = _plan(tiny_tied, shape)
    # no held-out split: no early stopping, the 4 steps are kept whatever they did to this random model
    r = recover(tiny_tied, plan, tmp_path / "rec", _opts(patch=True, finetune=method, heldout=0, ft={}))
    ft = r.manifest["finetune"]
    assert (ft["steps_done"], ft["best_step"], ft["method"]) == (4, 4, method)
    assert not (r.path / ".recover-state").exists()
    rec = open_recovered(r.path, shape, plan.fingerprint, plan=plan)
    w = rec.weights()
    assert "model.layers.1.self_attn.q_proj.weight" in w and "model.layers.3.patch.weight" in w
    # removed heads / neurons stay out: their columns are zero in what is saved
    o = w["model.layers.1.self_attn.o_proj.weight"]  # (n_embd, n_head*head_dim); heads 2,3,6,7 removed
    assert torch.all(o[:, 2 * 32:4 * 32] == 0) and torch.all(o[:, 6 * 32:] == 0) and torch.any(o[:, :2 * 32] != 0)
    down = w["model.layers.1.mlp.down_proj.weight"]  # neurons 0, 3, 6, ... kept
    assert torch.all(down[:, 1::3] == 0) and torch.all(down[:, 2::3] == 0) and torch.any(down[:, ::3] != 0)
    assert not any(k.startswith(("model.layers.2.", "model.layers.5.mlp")) for k in w)
    out = prune(tiny_tied, plan, tmp_path / "ft.gguf", quant="none", outtype="f32", cache_dir=cache,
                recovered=r.path)
    c = _compare(tiny_tied, r.path, out.path)
    log.info("fine-tuned (%s): mean KL %.3g, top-1 %.3f, %d ties", method, c["mean_kl"], c["top1"], c["ties"])
    assert c["mean_kl"] < KL_MAX and c["top1"] == 1.0 and c["ties"] <= c["n"] // 10, c


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_cannot_revive_removed_units(tiny_tied, method):
    """The model that trains (removed heads / neurons masked at o_proj / down_proj's input, LoRA on the masked
    input too) computes exactly what apply_plan computes with the weights it hands over, whatever the weights
    became: here every trainable tensor is set at random, the removed columns included."""
    shape = ModelShape.from_hf_dir(tiny_tied)
    plan = mark_patches(_plan(tiny_tied, shape))
    model = cuts.load_model(tiny_tied)
    g = torch.Generator().manual_seed(0)
    patches = {cuts.PATCH_NAME.format(lp.index): 0.05 * torch.randn(256, 256, generator=g) for lp in plan.patches()}
    student = prepare_student(cuts.apply_plan(copy.deepcopy(model), plan, patches), plan,
                              FinetuneOptions(method=method))
    with torch.no_grad():
        for _, p in student.params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = AutoTokenizer.from_pretrained(tiny_tied)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trained = student.lm_head(student.core(input_ids=ids).last_hidden_state)
    weights = patches | student.weights()
    assert "model.layers.1.self_attn.o_proj.weight" in weights and "model.layers.3.patch.weight" in weights
    with torch.no_grad():
        handed_over = cuts.apply_plan(copy.deepcopy(model), plan, weights)(ids).logits
        cut_alone = cuts.apply_plan(copy.deepcopy(model), plan, patches)(ids).logits
    assert (trained - cut_alone).abs().max() > 0.1  # the weights did change the model
    torch.testing.assert_close(trained, handed_over, rtol=0, atol=1e-4)


def test_fine_tuning_never_leaves_the_model_worse_on_held_out_text(tiny_tied, tmp_path):
    """On this random fixture, distillation at a high rate makes held-out KL worse: the starting point is kept."""
    shape = ModelShape.from_hf_dir(tiny_tied)
    r = recover(tiny_tied, _plan(tiny_tied, shape), tmp_path / "rec",
                _opts(finetune="lora", ft={"steps": 4, "eval_every": 1, "patience": 2, "lr": 1e-2}))
    ft = r.manifest["finetune"]
    assert (ft["best_step"], ft["stopped"], ft["steps_done"]) == (0, "early", 2), ft["history"]
    assert [h["kl"] for h in ft["history"][1:]] > [ft["heldout_kl_before"]] * 2
    assert r.manifest["heldout_kl"]["finetuned"] == ft["heldout_kl_before"]
    assert r.manifest["tensors"]["count"] == 0  # nothing changed, nothing to write


def test_a_time_budget_shortens_the_schedule_to_the_steps_that_fit(tiny_tied, tmp_path, monkeypatch):
    """Steps slowed to at least 0.2 s: a 3-second budget fits at most 15 of the 1,000 asked for; the run stops
    there with the cosine schedule at its end and the last weights evaluated."""
    real_step = torch.optim.AdamW.step

    def slow_step(self, *a, **k):
        time.sleep(0.2)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", slow_step)
    shape = ModelShape.from_hf_dir(tiny_tied)
    ft_opts = {"steps": 1000, "max_minutes": 0.05, "eval_every": 5, "patience": 1000, "lr": 1e-4}
    r = recover(tiny_tied, _plan(tiny_tied, shape), tmp_path / "rec", _opts(finetune="lora", ft=ft_opts))
    ft = r.manifest["finetune"]
    assert ft["stopped"] == "time" and 2 <= ft["steps_done"] <= 15, ft
    assert ft["planned_steps"] == ft["steps_done"]
    last = ft["history"][-1]
    assert last["step"] == ft["steps_done"]
    assert last["lr"] == pytest.approx(1e-4 * FinetuneOptions().min_lr_ratio)  # the schedule ran to its end


def test_bf16_training_tracks_float32(tiny_tied, tmp_path):
    """The same four steps under bf16 autocast and in float32: the held-out KLs differ (bf16 is in effect) but
    by under 5%, and the manifest says which precision ran."""
    shape = ModelShape.from_hf_dir(tiny_tied)
    kls = {}
    for precision in ("fp32", "bf16"):
        r = recover(tiny_tied, _plan(tiny_tied, shape), tmp_path / precision,
                    _opts(finetune="lora", ft={"eval_every": 1, "patience": 10, "lr": 1e-3, "precision": precision}))
        ft = r.manifest["finetune"]
        assert ft["precision"] == precision and ft["steps_done"] == 4
        kls[precision] = [h["kl"] for h in ft["history"]]
    diff = [abs(b - f) / f for f, b in zip(kls["fp32"], kls["bf16"])]
    assert 0 < max(diff) < 0.05, kls


def test_samples_follow_the_teachers_distribution(tiny_tied):
    """Ancestral sampling at temperature 1 through the KV cache: the mean NLL of the sampled tokens under the
    teacher (one full forward, no cache) equals the mean entropy of its predictions there, within 4 standard
    errors (measured: 0.03 against 0.07). Wrong samplers miss by far: greedy tokens (too likely, 25 standard
    errors) and uniform tokens (too unlikely, 280)."""
    model = cuts.load_model(tiny_tied)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)  # peaked predictions, so that the three samplers differ (tied: the input too)
    ids = AutoTokenizer.from_pretrained(tiny_tied)(TEXT, return_tensors="pt")["input_ids"][:, :12].repeat(4, 1)
    prompts = sampled.prompts_from(ids, torch.ones_like(ids), [0, 1, 2, 3], 48, seed=0)
    assert prompts.shape == (48, sampled.PROMPT_TOKENS) and (prompts == ids[0, :sampled.PROMPT_TOKENS]).all()
    out = sampled.sample(model, prompts, 24, seed=1, device="cpu", batch_size=16)
    assert torch.equal(out, sampled.sample(model, prompts, 24, seed=1, device="cpu", batch_size=16))
    assert (out[:, :sampled.PROMPT_TOKENS] == prompts).all()

    def nll_minus_entropy(seqs):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=seqs).logits[:, sampled.PROMPT_TOKENS - 1:-1].double(), -1)
        nll = -lp.gather(-1, seqs[:, sampled.PROMPT_TOKENS:, None])[..., 0]
        d = (nll - -(lp.exp() * lp).sum(-1)).flatten()
        return float(d.mean()), float(d.std() / d.numel() ** 0.5)

    gap, se = nll_minus_entropy(out)
    assert abs(gap) < 4 * se, (gap, se)
    greedy = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=20,
                            min_new_tokens=20, pad_token_id=0)
    uniform = torch.cat([prompts, torch.randint(model.config.vocab_size, (48, 20),
                                                generator=torch.Generator().manual_seed(0))], 1)
    for control in (greedy, uniform):
        assert abs(nll_minus_entropy(control)[0]) > 20 * se


def test_sampled_sequences_join_the_training_set(tiny_tied, tmp_path):
    shape = ModelShape.from_hf_dir(tiny_tied)
    real = recover(tiny_tied, _plan(tiny_tied, shape), tmp_path / "real", _opts(finetune="lora", ft={}))
    r = recover(tiny_tied, _plan(tiny_tied, shape), tmp_path / "sampled", _opts(finetune="lora", ft={"teacher_samples": 5}))
    ft = r.manifest["finetune"]
    assert ft["teacher_samples"] == 5 and ft["sampling_seconds"] > 0
    assert ft["train_sequences"] == real.manifest["finetune"]["train_sequences"] + 5
    assert ft["heldout_sequences"] == real.manifest["finetune"]["heldout_sequences"]  # held out: real text only


def test_an_interrupted_finetune_resumes_where_it_stopped(tiny_tied, tmp_path, monkeypatch):
    shape = ModelShape.from_hf_dir(tiny_tied)
    plan = _plan(tiny_tied, shape)
    opts = _opts(finetune="full", samples=6, seq_len=16, heldout=0, ft={"steps": 4, "checkpoint_every": 2,
                                                                        "eval_every": 4, "lr": 1e-3})
    whole = recover(tiny_tied, plan, tmp_path / "whole", opts)
    assert whole.manifest["finetune"]["best_step"] == 4
    ref = open_recovered(whole.path).weights()

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_die(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # after the checkpoint at step 2
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        recover(tiny_tied, plan, tmp_path / "cut-short", opts)
    assert (tmp_path / "cut-short" / ".recover-state" / "state.pt").exists()
    assert not (tmp_path / "cut-short" / "recover.json").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    again = recover(tiny_tied, plan, tmp_path / "cut-short", opts)
    assert again.manifest["finetune"]["resumed"] is True
    got = open_recovered(again.path).weights()
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_a_plan_for_another_model_is_refused(tiny_tied, tiny_untied, tmp_path):
    plan = _plan(tiny_untied, ModelShape.from_hf_dir(tiny_untied))
    with pytest.raises(PlanError, match="the plan was made for another model: n_layer 4 in the plan vs 6"):
        recover(tiny_tied, plan, tmp_path / "rec", _opts(patch=True))
    assert not (tmp_path / "rec").exists()


def test_a_recover_directory_must_fit_the_plan_and_the_checkpoint(tiny_tied, tiny_untied, cache, tmp_path):
    shape = ModelShape.from_hf_dir(tiny_tied)
    plan = _plan(tiny_tied, shape)
    r = recover(tiny_tied, plan, tmp_path / "rec", _opts(patch=True))
    out = tmp_path / "model.gguf"
    out.write_bytes(b"earlier model")
    other = plan.with_layer(LayerPlan(0, heads=(0, 1, 2, 3)))
    with pytest.raises(RecoverError, match=r"it was made for another plan: the cuts differ at layers \[0\]"):
        prune(tiny_tied, other, out, quant="none", outtype="f32", cache_dir=cache, recovered=r.path)
    with pytest.raises(RecoverError, match="it was made from another checkpoint"):
        prune(tiny_untied, None, out, quant="none", outtype="f32", cache_dir=cache, recovered=r.path)
    with pytest.raises(PruneError, match=r"the plan has linear patches \(layers 3, 4\) whose matrices live in a "
                                         "recover directory: pass --recovered DIR"):
        prune(tiny_tied, r.path / "plan.json", out, quant="none", outtype="f32", cache_dir=cache)
    # a damaged directory: tensors replaced after recovery, or no manifest
    t = r.path / "recovered.safetensors"
    t.write_bytes(t.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RecoverError, match="recovered.safetensors is not the file recover.json records"):
        prune(tiny_tied, None, out, quant="none", outtype="f32", cache_dir=cache, recovered=r.path)
    (r.path / "recover.json").unlink()
    with pytest.raises(RecoverError, match="has no recover.json: not a \\(complete\\) recover directory"):
        prune(tiny_tied, None, out, quant="none", outtype="f32", cache_dir=cache, recovered=r.path)
    assert out.read_bytes() == b"earlier model"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.gguf")] == []


def test_training_data_shorter_than_one_batch_is_refused(tiny_tied, tmp_path):
    shape = ModelShape.from_hf_dir(tiny_tied)
    text = tmp_path / "short.txt"
    text.write_text(TEXT * 3)  # about 3 windows of 32 tokens
    out = tmp_path / "rec"
    with pytest.raises(FinetuneError, match=r"training data .*short.txt gives 3 sequence\(s\) of 32 tokens; 1 held "
                                            r"out for early stopping leaves 2, fewer than one batch of 4"):
        recover(tiny_tied, _plan(tiny_tied, shape), out,
                _opts(calibration=text, finetune="lora", heldout=0.2, ft={"batch_size": 4}))
    assert not out.exists()
    with pytest.raises(RecoverError, match="nothing to do: pass --repair"):
        recover(tiny_tied, _plan(tiny_tied, shape), out, _opts())
    assert not out.exists()


def test_cli_recover_then_prune(tiny_untied, cache, tmp_path, monkeypatch):
    shape = ModelShape.from_hf_dir(tiny_untied)
    plan = _plan(tiny_untied, shape).save(tmp_path / "plan.json")
    runner = CliRunner()
    r = runner.invoke(main, ["recover", str(tiny_untied), "--plan", str(plan), "-o", str(tmp_path / "rec"),
                             "--patch", "--seq-len", "32", "--samples", "10", "--calibration", str(SMALL_TEXT)])
    assert r.exit_code == 0, r.output
    assert "patch at layer 3 for layers [2, 3]" in r.output
    r = runner.invoke(main, ["plan", "--explain", str(tmp_path / "rec" / "plan.json")])
    assert r.exit_code == 0 and "1 linear patch (layers 3): 65.8K parameters each" in r.output, r.output
    from gguf_prune.writing import prune as prune_mod

    monkeypatch.setattr(prune_mod, "converted_cache_dir", lambda: cache)
    r = runner.invoke(main, ["prune", str(tiny_untied), "--plan", str(plan), "--recovered", str(tmp_path / "rec"),
                             "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.gguf.plan.json").read_text())["layers"][3]["patch"] == "linear"
    r = runner.invoke(main, ["prune", str(tiny_untied), "--plan", str(tmp_path / "rec" / "plan.json"),
                             "-o", str(tmp_path / "m2.gguf")])
    assert r.exit_code == 1 and "pass --recovered DIR" in r.output
