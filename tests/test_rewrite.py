"""The streaming GGUF rewriter: bytes, metadata, layout, and one clear error per bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from gguf_prune.writing.gguf_read import read_gguf
from gguf_prune.writing.gguf_write import GGUFStreamWriter
from gguf_prune.atomic import OutOfSpaceError
from gguf_prune.plan import LayerPlan, Plan, PlanError, ModelShape
from gguf_prune.writing.prune import convert_cached
from gguf_prune.writing.gguf_names import PLAN_DIGEST_KEY, PLAN_KEY
from gguf_prune.writing.rewrite import RewriteError, rewrite

HD = 32  # the fixtures' head_dim


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    """One conversion cache for the whole session (shared by the test modules through the disk)."""
    return tmp_path_factory.getbasetemp() / "converted"


@pytest.fixture(scope="session")
def tied_f32(tiny_tied, converted) -> Path:
    return convert_cached(tiny_tied, "f32", cache_dir=converted)


@pytest.fixture(scope="session")
def tied_shape(tiny_tied) -> ModelShape:
    return ModelShape.from_hf_dir(tiny_tied)


def mixed_plan(shape: ModelShape, fingerprint: str = "") -> Plan:
    """Every kind of cut on the 6-layer fixture: a dropped layer, attention and MLP removal,
    query heads, a whole KV group, neurons; layer 0 loses its attention (the inert-head case)."""
    rng = np.random.default_rng(0)
    neurons = tuple(sorted(rng.choice(shape.n_ff, 512, replace=False).tolist()))
    L = LayerPlan
    return Plan(shape=shape, fingerprint=fingerprint, layers=(
        L(0, heads=()),
        L(1, heads=(0, 1, 4, 5), neurons=neurons),  # 2 query heads in each KV group
        L(2, removed=True),
        L(3, heads=(4, 5, 6, 7)),  # KV group 0 removed
        L(4, neurons=()),  # MLP removed
        L(5, heads=(), neurons=tuple(range(256))),
    ))


def _tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def _reader(path: Path) -> dict[str, gguf.ReaderTensor]:
    return _tensors(gguf.GGUFReader(path))


@pytest.fixture(scope="session")
def tied_f32_tensors(tied_f32) -> dict[str, gguf.ReaderTensor]:
    """The base read with gguf-py (an independent reader), once: it takes seconds on a 49k-token vocabulary."""
    return _reader(tied_f32)


def _rows(heads, hd=HD) -> list[int]:
    return [h * hd + i for h in heads for i in range(hd)]


# ----------------------------------------------------------------------------- bytes


def test_sliced_tensors_equal_the_numpy_slice_and_the_rest_is_byte_identical(tied_f32, tied_f32_tensors, tied_shape,
                                                                              tmp_path):
    plan = mixed_plan(tied_shape)
    out = tmp_path / "pruned.gguf"
    result = rewrite(tied_f32, plan, out)
    reader = gguf.GGUFReader(out)
    src, dst = tied_f32_tensors, _tensors(reader)
    assert reader.fields["deci.feed_forward_length"].contents() == [768, 512, 768, 1, 256]

    # what the output must hold, computed here from the plan (numpy order: rows = ne1)
    neurons1 = list(plan.layers[1].neurons)
    expected: dict[str, np.ndarray | tuple] = {}
    for name in ("token_embd.weight", "output_norm.weight"):
        expected[name] = src[name].data
    # layer 0 -> blk.0: attention written as one inert head (zeros), MLP untouched
    expected["blk.0.attn_norm.weight"] = src["blk.0.attn_norm.weight"].data
    for t in ("attn_q", "attn_k", "attn_v"):
        expected[f"blk.0.{t}.weight"] = np.zeros((HD, 256), np.float32)
    expected["blk.0.attn_output.weight"] = np.zeros((256, HD), np.float32)
    for t in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
        expected[f"blk.0.{t}.weight"] = src[f"blk.0.{t}.weight"].data
    # layer 1 -> blk.1: heads 0,1,4,5 (both groups kept), neurons sliced
    s = "blk.1."
    expected[s + "attn_norm.weight"] = src[s + "attn_norm.weight"].data
    expected[s + "attn_q.weight"] = src[s + "attn_q.weight"].data[_rows([0, 1, 4, 5])]  # (n_head*hd, n_embd): rows
    expected[s + "attn_k.weight"] = src[s + "attn_k.weight"].data
    expected[s + "attn_v.weight"] = src[s + "attn_v.weight"].data
    expected[s + "attn_output.weight"] = src[s + "attn_output.weight"].data[:, _rows([0, 1, 4, 5])]  # columns
    expected[s + "ffn_norm.weight"] = src[s + "ffn_norm.weight"].data
    expected[s + "ffn_gate.weight"] = src[s + "ffn_gate.weight"].data[neurons1]  # (n_ff, n_embd): rows
    expected[s + "ffn_up.weight"] = src[s + "ffn_up.weight"].data[neurons1]
    expected[s + "ffn_down.weight"] = src[s + "ffn_down.weight"].data[:, neurons1]  # (n_embd, n_ff): columns
    # layer 3 -> blk.2: KV group 0 gone
    s, o = "blk.2.", "blk.3."
    for t in ("attn_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
        expected[f"{s}{t}.weight"] = src[f"{o}{t}.weight"].data
    expected[s + "attn_q.weight"] = src[o + "attn_q.weight"].data[_rows([4, 5, 6, 7])]
    expected[s + "attn_k.weight"] = src[o + "attn_k.weight"].data[_rows([1])]
    expected[s + "attn_v.weight"] = src[o + "attn_v.weight"].data[_rows([1])]
    expected[s + "attn_output.weight"] = src[o + "attn_output.weight"].data[:, _rows([4, 5, 6, 7])]
    # layer 4 -> blk.3: MLP as one zero neuron
    s, o = "blk.3.", "blk.4."
    for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"):
        expected[f"{s}{t}.weight"] = src[f"{o}{t}.weight"].data
    expected[s + "ffn_gate.weight"] = np.zeros((1, 256), np.float32)
    expected[s + "ffn_up.weight"] = np.zeros((1, 256), np.float32)
    expected[s + "ffn_down.weight"] = np.zeros((256, 1), np.float32)
    # layer 5 -> blk.4: no attention tensors at all (not even attn_norm), first 256 neurons
    s, o = "blk.4.", "blk.5."
    expected[s + "ffn_norm.weight"] = src[o + "ffn_norm.weight"].data
    expected[s + "ffn_gate.weight"] = src[o + "ffn_gate.weight"].data[:256]
    expected[s + "ffn_up.weight"] = src[o + "ffn_up.weight"].data[:256]
    expected[s + "ffn_down.weight"] = src[o + "ffn_down.weight"].data[:, :256]

    assert sorted(dst) == sorted(expected)
    for name, want in expected.items():
        got = dst[name]
        assert got.data.dtype == want.dtype, name
        assert got.data.shape == want.shape, name
        assert got.data.tobytes() == np.ascontiguousarray(want).tobytes(), name
        assert tuple(int(x) for x in got.shape) == tuple(reversed(want.shape)), name  # .shape is ggml order
    assert result.architecture == "deci"
    assert result.n_tensors == len(expected)
    assert result.bytes_out == out.stat().st_size


def test_metadata_is_per_layer_deci_and_everything_else_is_kept(tied_f32, tied_shape, tmp_path):
    plan = mixed_plan(tied_shape)
    out = tmp_path / "pruned.gguf"
    rewrite(tied_f32, plan, out)
    src, dst = read_gguf(tied_f32), read_gguf(out)
    assert dst.get("general.architecture") == "deci"
    assert not [k for k in dst.kv if k.startswith("llama.")]
    assert dst.get("deci.block_count") == 5
    assert dst.get("deci.attention.head_count") == [1, 4, 4, 8, 0]
    assert dst.get("deci.attention.head_count_kv") == [1, 2, 1, 2, 0]
    assert dst.get("deci.feed_forward_length") == [768, 512, 768, 1, 256]
    for key in ("deci.attention.head_count", "deci.attention.head_count_kv", "deci.feed_forward_length"):
        assert dst.kv[key].sub_type == gguf.GGUFValueType.UINT32
    assert dst.get("deci.attention.key_length") == 32 and dst.get("deci.attention.value_length") == 32
    changed = {"block_count", "attention.head_count", "attention.head_count_kv", "feed_forward_length",
               "attention.key_length", "attention.value_length"}
    # the pruned model says what it is: its name and its own parameter count (counted here from the tensors)
    pct = round(100 * plan.removed_fraction())
    assert dst.get("general.name") == f"{src.get('general.name')} pruned {pct}%" and pct > 0
    n_params = sum(int(np.prod(t.ne)) for t in dst.tensors)
    assert dst.get("general.size_label") == gguf.size_label(n_params, 0, 0, 0) != src.get("general.size_label")
    for key, kv in src.kv.items():
        if key in ("general.architecture", "general.name", "general.size_label"):
            continue
        if key.startswith("llama."):
            if key[len("llama."):] not in changed:
                assert dst.kv["deci." + key[len("llama."):]].raw == kv.raw, key
        else:
            assert dst.kv[key].raw == kv.raw, key  # tokenizer, chat template, ...: byte for byte
    assert dst.get("tokenizer.chat_template") == src.get("tokenizer.chat_template")
    assert json.loads(dst.get(PLAN_KEY)) == plan.to_dict()
    assert dst.get(PLAN_DIGEST_KEY) == plan.digest()


def test_a_plan_that_keeps_every_layer_whole_stays_llama(tied_f32, tied_f32_tensors, tied_shape, tmp_path):
    L = LayerPlan
    plan = Plan(shape=tied_shape, layers=(L(0), L(1, removed=True), L(2), L(3), L(4, removed=True), L(5)))
    out = tmp_path / "fewer-layers.gguf"
    result = rewrite(tied_f32, plan, out)
    src, dst = read_gguf(tied_f32), read_gguf(out)
    assert result.architecture == "llama" and dst.get("general.architecture") == "llama"
    assert dst.get("llama.block_count") == 4
    assert dst.get("llama.feed_forward_length") == 768 and not dst.is_array("llama.feed_forward_length")
    assert dst.get("llama.attention.head_count") == 8
    assert dst.kv["llama.rope.dimension_count"].raw == src.kv["llama.rope.dimension_count"].raw
    s, d = tied_f32_tensors, _reader(out)
    renumber = {0: 0, 2: 1, 3: 2, 5: 3}
    for name, t in s.items():
        parts = name.split(".")
        if parts[0] == "blk":
            if int(parts[1]) not in renumber:
                continue
            name = ".".join(["blk", str(renumber[int(parts[1])])] + parts[2:])
        assert d[name].data.tobytes() == t.data.tobytes(), name
    assert len(d) == len(s) - 2 * 9


def test_uniform_slices_stay_llama_with_new_global_sizes(tied_f32, tied_shape, tmp_path):
    plan = Plan(shape=tied_shape, layers=tuple(
        LayerPlan(i, heads=(0, 1, 4, 5), neurons=tuple(range(0, 768, 3))) for i in range(6)))
    dst = read_gguf(rewrite(tied_f32, plan, tmp_path / "u.gguf").path)
    assert dst.get("general.architecture") == "llama"
    assert (dst.get("llama.attention.head_count"), dst.get("llama.attention.head_count_kv"),
            dst.get("llama.feed_forward_length"), dst.get("llama.attention.key_length")) == (4, 2, 256, 32)


def test_the_writer_refuses_calls_out_of_order(tmp_path):
    with open(tmp_path / "x.gguf", "wb") as f:
        w = GGUFStreamWriter(f.fileno())
        w.add_tensor("a", (4,), gguf.GGMLQuantizationType.F32, 16)
        with pytest.raises(ValueError, match="expected phase 'data', in 'declare'"):
            w.write_zeros(16)
        w.write_header()
        with pytest.raises(ValueError, match="expected phase 'declare', in 'data'"):
            w.add_tensor("b", (4,), gguf.GGMLQuantizationType.F32, 16)
        with pytest.raises(ValueError, match="tensor 'a': 20 bytes written, declared 16"):
            w.write_zeros(20)


def test_the_rewrite_command(tied_f32, tied_shape, tmp_path):
    from gguf_prune.cli import main

    plan_file = mixed_plan(tied_shape).save(tmp_path / "plan.json")
    out = tmp_path / "cli.gguf"
    res = CliRunner().invoke(main, ["rewrite", str(tied_f32), "--plan", str(plan_file), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.exists() and "deci" in res.output and "5 layers" in res.output
    res = CliRunner().invoke(main, ["rewrite", str(tied_f32), "--plan", str(plan_file), "-o", str(tied_f32)])
    assert res.exit_code == 1
    assert f"Error: output {tied_f32} is the input GGUF" in res.output


# ----------------------------------------------------------------------------- a small hand-made GGUF


def write_small_llama(path: Path, arch: str = "llama", ttype: str = "F32", n_layer: int = 2,
                      extra_rows: int = 0) -> ModelShape:
    """A small llama-shaped GGUF written with gguf-py: n_embd 64, 4 heads in 2 KV groups of head_dim 16,
    FFN 96, vocab 32. ``ttype`` F32/F16/BF16 for every matrix, or Q8_0 for the FFN matrices."""
    shape = ModelShape(architecture=arch, n_layer=n_layer, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_ff=96,
                       n_vocab=32 + extra_rows)
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_layer)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(32 + extra_rows)
    w.add_string("tokenizer.ggml.model", "gpt2")

    def mat(name, rows, cols, quant_ok=False):  # numpy (rows, cols) = ne (cols, rows)
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        if ttype == "F16":
            w.add_tensor(name, x.astype(np.float16))
        elif ttype == "BF16":
            bits = (x.view(np.uint32) >> 16).astype(np.uint16)
            w.add_tensor(name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif ttype == "Q8_0" and quant_ok:
            w.add_tensor(name, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x)

    mat("token_embd.weight", 32 + extra_rows, 64)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, np.float32))
        mat(f"blk.{i}.attn_q.weight", 64, 64)
        mat(f"blk.{i}.attn_k.weight", 32, 64)
        mat(f"blk.{i}.attn_v.weight", 32, 64)
        mat(f"blk.{i}.attn_output.weight", 64, 64)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(64, np.float32))
        mat(f"blk.{i}.ffn_gate.weight", 96, 64, quant_ok=True)
        mat(f"blk.{i}.ffn_up.weight", 96, 64, quant_ok=True)
        mat(f"blk.{i}.ffn_down.weight", 64, 96)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shape


@pytest.mark.parametrize("ttype", ["F16", "BF16"])
def test_f16_and_bf16_rows_are_sliced_exactly(ttype, tmp_path):
    base = tmp_path / f"small-{ttype}.gguf"
    shape = write_small_llama(base, ttype=ttype)
    plan = Plan(shape=shape, layers=(LayerPlan(0, heads=(2, 3), neurons=(1, 5, 6, 7, 90)), LayerPlan(1)))
    out = tmp_path / "out.gguf"
    rewrite(base, plan, out)
    src, dst = _reader(base), _reader(out)
    # gguf-py hands BF16 over as raw bytes, (rows, 2*ne0) uint8: view them as 16-bit words
    def words(t):
        return t.data.view(np.uint16) if t.data.dtype == np.uint8 else t.data

    assert dst["blk.0.attn_q.weight"].tensor_type.name == ttype
    assert words(dst["blk.0.attn_q.weight"]).tobytes() == words(src["blk.0.attn_q.weight"])[32:64].tobytes()
    assert words(dst["blk.0.attn_k.weight"]).tobytes() == words(src["blk.0.attn_k.weight"])[16:32].tobytes()
    assert (words(dst["blk.0.attn_output.weight"]).tobytes()
            == np.ascontiguousarray(words(src["blk.0.attn_output.weight"])[:, 32:64]).tobytes())
    keep = [1, 5, 6, 7, 90]
    assert words(dst["blk.0.ffn_up.weight"]).tobytes() == words(src["blk.0.ffn_up.weight"])[keep].tobytes()
    assert (words(dst["blk.0.ffn_down.weight"]).tobytes()
            == np.ascontiguousarray(words(src["blk.0.ffn_down.weight"])[:, keep]).tobytes())
    assert words(dst["blk.1.ffn_down.weight"]).tobytes() == words(src["blk.1.ffn_down.weight"]).tobytes()


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def existing_out(tmp_path) -> Path:
    """An output path that already holds a file, which every failure must leave as it was."""
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(b"the previous model, which must survive")
    return out


def _assert_untouched(files: dict[Path, bytes], out_dir: Path) -> None:
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path} changed"
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.gguf"], "a partial file was left behind"


def _expect_failure(base: Path, plan: Plan, out: Path, error, message: str) -> None:
    before = {base: base.read_bytes(), out: out.read_bytes()}
    with pytest.raises(error) as e:
        rewrite(base, plan, out)
    assert str(e.value) == message
    _assert_untouched(before, out.parent)


@pytest.mark.bad_input
def test_not_a_gguf(tied_shape, existing_out, tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    _expect_failure(bad, Plan.identity(tied_shape), existing_out, RewriteError,
                    f"{bad} is not a GGUF file (it does not start with the GGUF magic); pass a GGUF made by "
                    "convert_hf_to_gguf.py (gguf-prune prune converts a checkpoint for you)")


@pytest.mark.bad_input
def test_a_truncated_gguf(tied_f32, tied_shape, existing_out, tmp_path):
    cut = tmp_path / "truncated.gguf"
    size = tied_f32.stat().st_size
    with open(tied_f32, "rb") as f:
        cut.write_bytes(f.read(size - 1000))
    last = max(read_gguf(tied_f32).tensors, key=lambda t: t.offset)
    _expect_failure(cut, Plan.identity(tied_shape), existing_out, RewriteError,
                    f"{cut} is truncated: tensor {last.name!r} ends at byte {last.offset + last.nbytes} but the "
                    f"file has {size - 1000} bytes; re-create it")
    # cut inside the metadata
    head = tmp_path / "head-only.gguf"
    with open(tied_f32, "rb") as f:
        head.write_bytes(f.read(100_000))
    with pytest.raises(RewriteError, match=r"is truncated or damaged: the value of 'tokenizer.ggml.tokens' runs past "
                                           r"the end of the file \(100000 bytes\); re-create it"):
        rewrite(head, Plan.identity(tied_shape), existing_out)


@pytest.mark.bad_input
def test_an_architecture_outside_the_llama_family(existing_out, tmp_path):
    base = tmp_path / "gpt2.gguf"
    shape = write_small_llama(base, arch="gpt2")
    _expect_failure(base, Plan.identity(shape), existing_out, RewriteError,
                    f"{base}: architecture 'gpt2' is not supported; supported: llama, qwen2, qwen3, gemma3 (checkpoints "
                    "converted with convert_hf_to_gguf.py)")


@pytest.mark.bad_input
def test_a_file_already_cut(tied_f32, tied_shape, existing_out, tmp_path):
    cut = rewrite(tied_f32, mixed_plan(tied_shape), tmp_path / "cut.gguf").path
    _expect_failure(cut, Plan.identity(tied_shape), existing_out, RewriteError,
                    f"{cut}: architecture 'deci' is not supported (this file was already cut by gguf-prune; rewrite "
                    "the GGUF of the original checkpoint); supported: llama, qwen2, qwen3, gemma3 (checkpoints converted "
                    "with convert_hf_to_gguf.py)")


@pytest.mark.bad_input
def test_a_quantized_input(existing_out, tmp_path):
    base = tmp_path / "q8.gguf"
    shape = write_small_llama(base, ttype="Q8_0")
    _expect_failure(base, Plan.identity(shape), existing_out, RewriteError,
                    f"{base} is quantized (blk.0.ffn_gate.weight (Q8_0), blk.0.ffn_up.weight (Q8_0), "
                    "blk.1.ffn_gate.weight (Q8_0) and 1 more): rows of quantized blocks cannot be sliced. Convert "
                    "the checkpoint with --outtype f16 (or bf16/f32), prune, and quantize after pruning "
                    "(gguf-prune prune does all three)")


@pytest.mark.bad_input
def test_a_plan_for_another_model(tied_f32, tiny_untied, existing_out):
    other = Plan.identity(ModelShape.from_hf_dir(tiny_untied))
    _expect_failure(tied_f32, other, existing_out, PlanError,
                    f"plan for {tied_f32.name} is invalid (1 problem):\n"
                    "  - the plan was made for another model: n_layer 4 in the plan vs 6 in the model")


@pytest.mark.bad_input
def test_a_plan_applied_to_one_gguf_is_refused_for_another_of_the_same_shape(tied_f32, tied_shape, converted,
                                                                             tmp_path_factory, tmp_path):
    """Same shape, other weights (another seed): the identity recorded in the plan tells them apart."""
    from tiny_models import TinySpec, make_tiny_llama

    twin = convert_cached(make_tiny_llama(tmp_path_factory.mktemp("twin"), TinySpec(tie_word_embeddings=True, seed=7)),
                          "f32", cache_dir=converted)
    plan = mixed_plan(tied_shape)
    made = rewrite(tied_f32, plan, tmp_path / "a.gguf")
    recorded = replace(plan, gguf=made.base_identity)
    assert Plan.from_dict(json.loads(recorded.to_json())).gguf == made.base_identity
    assert rewrite(tied_f32, recorded, tmp_path / "b.gguf").base_identity == made.base_identity  # same file: fine
    with pytest.raises(PlanError, match=f"the plan was applied to another GGUF \\(identity {made.base_identity}; "
                                        "this file is [0-9a-f]{16}\\): the same shape, other weights"):
        rewrite(twin, recorded, tmp_path / "c.gguf")
    assert not (tmp_path / "c.gguf").exists()
    assert rewrite(twin, plan, tmp_path / "d.gguf")  # a plan without an identity applies to any file of its shape


@pytest.mark.bad_input
def test_a_plan_that_breaks_gqa(tied_f32, tied_shape, existing_out):
    plan = Plan.identity(tied_shape).with_layer(LayerPlan(2, heads=(0, 1, 2, 4)))
    _expect_failure(tied_f32, plan, existing_out, PlanError,
                    f"plan for {tied_f32.name} is invalid (1 problem):\n"
                    "  - layer 2: GQA groups left uneven (group 0: 3, group 1: 1 query heads); llama.cpp maps query "
                    "head h to KV head h*n_head_kv/n_head, so every kept KV group must keep the same number of "
                    "query heads (or remove whole groups)")


@pytest.mark.bad_input
def test_output_equal_to_input(tied_f32, tied_shape, tmp_path):
    base = tmp_path / "base.gguf"
    shutil.copyfile(tied_f32, base)
    before = base.read_bytes()
    for out in (base, tmp_path / "." / "base.gguf"):
        with pytest.raises(RewriteError) as e:
            rewrite(base, Plan.identity(tied_shape), out)
        assert str(e.value) == (f"output {out} is the input GGUF; write the pruned model to another path "
                                "(the input is never overwritten)")
    link = tmp_path / "link.gguf"
    os.link(base, link)
    with pytest.raises(RewriteError, match="is the input GGUF"):
        rewrite(base, Plan.identity(tied_shape), link)
    assert base.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "link.gguf"]


@pytest.mark.bad_input
def test_a_full_disk_leaves_nothing_behind(tmp_path):
    base = tmp_path / "small.gguf"
    shape = write_small_llama(base, n_layer=2, extra_rows=4000)  # ~1.1 MB
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("needs a small tmpfs (mount, as root) to fill a disk for real")
    try:
        out = disk / "model.gguf"
        out.write_bytes(b"the previous model, which must survive")
        before = {base: base.read_bytes(), out: out.read_bytes()}
        with pytest.raises(OutOfSpaceError) as e:
            rewrite(base, Plan.identity(shape), out)
        assert str(e.value) == (f"no space left on the device of {disk} while writing model.gguf; free some "
                                "space or write elsewhere; the partial file was removed")
        _assert_untouched(before, disk)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
