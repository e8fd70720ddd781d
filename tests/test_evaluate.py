"""Evaluation in llama.cpp: numbers agree with the tools run by hand; bad input; isolation of failures."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
from click.testing import CliRunner

from gguf_prune.runtime import llamacpp
from gguf_prune.cli import main
from gguf_prune.runtime.evaluate import DEFAULT_TEXT, EvalError, EvalOptions, evaluate, load_prompts, parse_kld_output
from gguf_prune.runtime.prompts import check_output, has_repetition_loop


@pytest.fixture(scope="module")
def ggufs(tiny_tied, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-ggufs")
    f16 = llamacpp.convert_hf_to_gguf(tiny_tied, d / "tiny-f16.gguf", outtype="f16")
    q8 = d / "tiny-q8_0.gguf"
    llamacpp.run_tool("llama-quantize", [f16, q8, "Q8_0"])
    q4 = d / "tiny-q4_k_m.gguf"
    llamacpp.run_tool("llama-quantize", [f16, q4, "Q4_K_M"])
    return f16, q8, q4


OPTS = dict(ctx=128, chunks=6, threads=2, bench_reps=3, bench_prompt=128, bench_gen=32, max_tokens=24)


@pytest.fixture(scope="module")
def report(ggufs, tmp_path_factory):
    f16, q8, q4 = ggufs
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hello.", "min_len": 1}) + "\n"
                       + json.dumps({"prompt": "Name a colour.", "contains": ["zzzz-not-there"]}) + "\n")
    out = tmp_path_factory.mktemp("report")
    return evaluate(f16, [q8, q4], out, options=EvalOptions(**OPTS, prompts=prompts)), out


def test_report_files_and_quality_ordering(report):
    result, out = report
    assert (out / "report.json").exists() and (out / "report.md").exists()
    assert (out / "quality_vs_size_speed.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["models"][1]["name"] == "tiny-q8_0"
    base, q8, q4 = result["models"]
    # Q8_0 is closer to F16 than Q4_K_M, and both are smaller
    assert 0 < q8["quality"]["kl_mean"] < q4["quality"]["kl_mean"]
    assert q4["size_ratio"] < q8["size_ratio"] < 1.0
    assert 0.0 < q4["quality"]["top1_agreement"] <= 1.0
    assert q8["quality"]["kl_median"] <= q8["quality"]["kl_p99"]
    assert base["facts"]["tensor_types"]["F16"] > 0 and "Q8_0" in q8["facts"]["tensor_types"]
    assert len(base["facts"]["params_per_layer"]) == 6
    for e in (base, q8, q4):
        assert e["speed"]["pp_ts"] > 0 and e["speed"]["tg_ts"] > 0
    assert result["hardware"]["threads"] == 2


def test_prompts_are_run_through_the_chat_template_and_checked(report):
    result, _ = report
    for e in result["models"]:
        pr = e["prompts"]
        assert pr["total"] == 2
        assert pr["results"][1]["pass"] is False  # a substring the random model cannot produce
        assert "missing 'zzzz-not-there'" in pr["results"][1]["failures"]
        assert isinstance(pr["results"][0]["output"], str)


@pytest.mark.parametrize("which", [1, 2])  # Q8_0, Q4_K_M
def test_numbers_agree_with_llama_perplexity_run_by_hand(report, which, tmp_path):
    result, _ = report
    q4 = result["models"][which]
    # re-run the recorded commands ourselves: base logits, then the model's KL
    base_cmd = shlex.split(result["models"][0]["commands"]["perplexity"])
    kld = tmp_path / "by-hand.kld"
    i = base_cmd.index("--kl-divergence-base")
    base_cmd[i + 1] = str(kld)
    base_out = subprocess.run(base_cmd, capture_output=True, text=True, check=True)
    ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", base_out.stdout + base_out.stderr).group(1))
    assert ppl == pytest.approx(result["models"][0]["quality"]["ppl"], rel=1e-4)
    cmd = shlex.split(q4["commands"]["perplexity"])
    cmd[cmd.index("--kl-divergence-base") + 1] = str(kld)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    by_hand = parse_kld_output(out.stdout + out.stderr)
    assert by_hand["kl_mean"] == pytest.approx(q4["quality"]["kl_mean"], rel=1e-4, abs=1e-6)
    assert by_hand["ppl"] == pytest.approx(q4["quality"]["ppl"], rel=1e-4)


def test_bench_agrees_with_llama_bench_by_hand(report):
    """Speeds come from rounds of llama-bench (the base timed between every two models): each model's tokens/s
    is the median of its runs, its ratio the median over the rounds of its speed over the base runs beside it."""
    import statistics

    result, _ = report
    raw = result["hardware"]["rows"]  # llama-bench's own JSON from every round
    rounds = result["hardware"]["rounds"]
    assert rounds == OPTS["bench_reps"]
    per_round = len(raw) // rounds
    n = len(result["models"])
    assert per_round == 2 * (2 * (n - 1) + 1)  # pp and tg for base, m1, base, m2, ..., base
    for test, key in (("tg", lambda r: r["n_gen"] == 32 and not r["n_prompt"]),
                      ("pp", lambda r: r["n_prompt"] == 128 and not r["n_gen"])):
        for k, e in enumerate(result["models"]):
            mine = [r["avg_ts"] for r in raw if r["model_filename"] == e["facts"]["path"] and key(r)]
            assert e["speed"][f"{test}_ts"] == pytest.approx(statistics.median(mine))
            if k == 0:
                continue
            ratios = []
            for r0 in range(rounds):
                runs = [r["avg_ts"] for r in raw[r0 * per_round:(r0 + 1) * per_round] if key(r)]
                ratios.append(runs[2 * k - 1] / ((runs[2 * k - 2] + runs[2 * k]) / 2))
            assert e["speed"][f"{test}_ratio"] == pytest.approx(statistics.median(ratios), rel=1e-9)
    # the recorded command is one round, as a user re-runs it by hand: same models in the same order, tests, threads
    cmd = shlex.split(result["models"][0]["commands"]["bench"])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout[out.stdout.index("["):])
    key = lambda r: (r["model_filename"], r["n_prompt"], r["n_gen"], r["n_threads"], len(r["samples_ts"]))
    assert list(map(key, rows)) == list(map(key, raw[:per_round]))
    assert all(r["avg_ts"] > 0 for r in rows)


def test_a_failing_model_is_reported_and_the_others_finish(ggufs, tmp_path):
    f16, q8, _ = ggufs
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(q8.read_bytes()[: q8.stat().st_size // 3])
    result = evaluate(f16, [broken, q8], tmp_path / "r", options=EvalOptions(**OPTS, bench=False))
    names = {e["name"]: e for e in result["models"]}
    assert "error" in names["broken"]
    assert names["tiny-q8_0"]["quality"]["kl_mean"] > 0
    assert "broken" in (tmp_path / "r" / "report.md").read_text()


def test_different_vocabulary_is_refused_for_that_model(ggufs, tmp_path):
    from gguf import GGUFReader, GGUFWriter

    f16, q8, _ = ggufs
    r = GGUFReader(str(q8))
    other = tmp_path / "other-vocab.gguf"
    w = GGUFWriter(str(other), arch=r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = f.contents()
        if key == "tokenizer.ggml.tokens":
            value = list(value)
            value[500] = "a-token-the-base-does-not-have"
        w.add_key_value(key, value, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    result = evaluate(f16, [other], tmp_path / "r", options=EvalOptions(**OPTS, bench=False))
    assert "different vocabulary" in result["models"][1]["error"]


def test_text_shorter_than_two_contexts_is_a_clear_error(ggufs, tmp_path):
    f16, q8, _ = ggufs
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(EvalError, match=r"has \d+ tokens; llama-perplexity needs at least 256 for a context of 128"):
        evaluate(f16, [q8], tmp_path / "r", text=short, options=EvalOptions(**OPTS))
    assert not (tmp_path / "r").exists()


def test_unloadable_base_and_empty_prompts_are_clear_errors(ggufs, tmp_path):
    f16, q8, _ = ggufs
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EvalError, match="the base model cannot be loaded by llama.cpp"):
        evaluate(bad, [q8], tmp_path / "r", options=EvalOptions(**OPTS))
    empty = tmp_path / "p.jsonl"
    empty.write_text("\n")
    with pytest.raises(EvalError, match=r"--prompts .* has no prompts"):
        load_prompts(empty)
    r = CliRunner().invoke(main, ["eval", str(f16), str(q8), "--prompts", str(empty), "-o", str(tmp_path / "r")])
    assert r.exit_code == 1 and "has no prompts" in r.output
    typo = tmp_path / "typo.jsonl"  # a misspelt check would silently check nothing
    typo.write_text(json.dumps({"prompt": "Capital of France?", "contain": ["Paris"]}) + "\n")
    r = CliRunner().invoke(main, ["eval", str(f16), str(q8), "--prompts", str(typo), "-o", str(tmp_path / "r")])
    assert r.exit_code == 1 and f"Error: --prompts {typo}:1: unknown key 'contain'" in r.output
    assert not (tmp_path / "r").exists()


def test_checks_and_repetition_loops():
    assert has_repetition_loop("I think so. the end the end the end the end")
    assert not has_repetition_loop("The capital of France is Paris, a city on the Seine.")
    p = {"prompt": "x", "contains": ["paris"], "not_contains": ["london"], "regex": r"\bcity\b",
         "min_len": 10, "max_len": 100}
    assert check_output(p, "Paris is a city.") == []
    fails = check_output(p, "London!")
    assert "missing 'paris'" in fails and "contains forbidden 'london'" in fails and len(fails) == 4


def test_default_text_is_long_enough_for_the_default_context():
    text = DEFAULT_TEXT.read_text()
    assert len(text) > 100_000
