"""A checkpoint directory as gguf-prune reads it (issue 14).

* Its identity (``checkpoint.fingerprint``, recorded in plans, scores and recover directories) covers the model's
  own weight files only, so what gguf-prune writes into the directory does not change it, and it is what it
  was before (plans made earlier stay valid).
* Its conversion key covers every file convert_hf_to_gguf.py reads: the same weights with another tokenizer,
  chat template or rope setting, and weights edited in place, get a conversion of their own; ``--verify-cache``
  keys on every weight byte.
* A damaged directory (a missing shard, a shard without a tensor its index names, a truncated file, a broken
  config or tokenizer) ends every command that reads it in one line, exit code 1, and changes nothing.
* An interrupted or failed conversion leaves no ``.partial`` file in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from gguf_prune.runtime import toolchain
from gguf_prune.models import checkpoint
from gguf_prune.cli import main
from gguf_prune.writing.gguf_read import read_gguf
from gguf_prune.plan import ModelShape, Plan, validate
from gguf_prune.writing.prune import convert_cached, converted_cache_dir
from tiny_models import TinySpec, make_tiny_llama

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.bad_input]

WEIGHTS = "model.safetensors"
EMBED = "model.embed_tokens.weight"
FIX = "copy or download the checkpoint again, or re-save it with save_pretrained"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """2 layers, tied embeddings: 52 MB of float32 (mostly the embedding), converted in seconds."""
    return make_tiny_llama(tmp_path_factory.mktemp("base"), TinySpec(num_hidden_layers=2, seed=5))


@pytest.fixture(scope="module")
def sharded(base, tmp_path_factory) -> Path:
    """``base`` re-saved by save_pretrained in shards of at most 1 MB, with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded")
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(out, max_shard_size="1MB")
    assert (out / checkpoint.INDEX_NAME).exists() and len(list(out.glob("*.safetensors"))) > 4
    return out


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    """A cache root of this test's own ($GGUF_PRUNE_CACHE) that reaches the built llama.cpp through a link, so
    the default conversion cache (the CLI's) is a temporary directory."""
    root = tmp_path / "cache-root"
    root.mkdir()
    real = toolchain.find().root
    (root / real.name).symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("GGUF_PRUNE_CACHE", str(root))
    assert converted_cache_dir() == root / "converted"
    return root


def copy_model(src: Path, dst: Path, link_weights: bool = False) -> Path:
    """A copy of a checkpoint (new inodes; copy2 keeps the mtimes). ``link_weights``: hard links for the
    safetensors files, for a copy whose weights are only read."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if link_weights and f.suffix == ".safetensors":
            os.link(f, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)
    return dst


def tree_hash(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def edit_embedding_row(hf_dir: Path, row: int) -> None:
    """Negate one row of the embedding in place: the same size, shapes and tensor table, other bytes."""
    path = hf_dir / WEIGHTS
    header = checkpoint.read_safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    t = header[EMBED]
    assert t["dtype"] == "F32"
    d = t["shape"][1]
    offset = 8 + n + t["data_offsets"][0] + row * d * 4  # (n_vocab, d) float32, row-major
    size = path.stat().st_size
    sampled = [(0, 1 << 20), (size // 2 - (1 << 19), size // 2 + (1 << 19)), (size - (1 << 20), size)]
    assert all(offset + d * 4 <= a or offset >= b for a, b in sampled)  # bytes the identity does not sample
    with open(path, "r+b") as f:
        f.seek(offset)
        x = np.frombuffer(f.read(d * 4), dtype=np.float32)
        f.seek(offset)
        f.write((-x).tobytes())


def gguf_row(path: Path, name: str, row: int) -> bytes:
    """The bytes of one row (numpy order) of a GGUF tensor."""
    gf = read_gguf(path)
    t = next(t for t in gf.tensors if t.name == name)
    per_row = t.nbytes // t.shape[0]
    with open(path, "rb") as f:
        f.seek(t.offset + row * per_row)
        return f.read(per_row)


def old_fingerprint(hf_dir: Path, sample_bytes: int = 1 << 20) -> str:
    """The identity as it was computed before issue 14 (over every *.safetensors in the directory)."""
    h = hashlib.sha256()
    h.update(json.dumps(ModelShape.from_hf_dir(hf_dir).to_dict(), sort_keys=True).encode())
    for path in sorted(hf_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        h.update(json.dumps({k: [v["dtype"], v["shape"]] for k, v in header.items()}, sort_keys=True).encode())
        size = path.stat().st_size
        with open(path, "rb") as f:
            for off in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
                f.seek(off)
                h.update(f.read(sample_bytes))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- identity


def test_the_identity_is_unchanged_so_plans_made_before_stay_valid(base, sharded):
    assert checkpoint.fingerprint(base) == old_fingerprint(base)
    assert checkpoint.fingerprint(sharded) == old_fingerprint(sharded)
    assert checkpoint.weight_files(base) == [base / WEIGHTS]
    index = json.loads((sharded / checkpoint.INDEX_NAME).read_text())["weight_map"]
    assert checkpoint.weight_files(sharded) == sorted({sharded / f for f in index.values()})


def test_score_output_in_the_model_dir_changes_neither_identity_nor_conversion_key(base, tmp_path):
    d = copy_model(base, tmp_path / "m", link_weights=True)
    fp, key = checkpoint.fingerprint(d), checkpoint.conversion_key(d)
    Plan.identity(ModelShape.from_hf_dir(d), fingerprint=fp).save(d / "plan.json")  # a plan made before
    r = CliRunner().invoke(main, ["score", str(d), "-o", str(d / "scores.json"), "--seq-len", "16", "--samples", "2",
                                  "--no-plots"])
    assert r.exit_code == 0, r.output
    assert (d / "scores.neurons.safetensors").is_file() and (d / "scores.json").is_file()
    assert checkpoint.weight_files(d) == [d / WEIGHTS]
    assert checkpoint.fingerprint(d) == fp and checkpoint.conversion_key(d) == key
    validate(Plan.load(d / "plan.json"), ModelShape.from_hf_dir(d), checkpoint.fingerprint(d))  # still accepted
    assert sorted(checkpoint.converter_inputs(d)) == ["chat_template.jinja", "config.json", "special_tokens_map.json",
                                                   "tiny_spec.json", "tokenizer.json", "tokenizer_config.json"]


def test_weights_named_otherwise_are_not_the_model(base, tmp_path):
    d = copy_model(base, tmp_path / "m", link_weights=True)
    (d / WEIGHTS).rename(d / "weights.safetensors")
    with pytest.raises(checkpoint.ModelDirError) as e:
        checkpoint.weight_files(d)
    assert str(e.value) == (f"{d} has no model weights: transformers and convert_hf_to_gguf.py read "
                            "model.safetensors (or the shards model.safetensors.index.json names), and "
                            "weights.safetensors is not; rename the weight file to model.safetensors")


# ----------------------------------------------------------------------------- conversion cache


def _swap_last_two_tokens(text: str) -> str:
    tok = json.loads(text)
    vocab = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[len(vocab) - 2], by_id[len(vocab) - 1]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # merges name tokens by text: still a valid BPE
    return json.dumps(tok, ensure_ascii=False)


def _config_with(**kw):
    return lambda text: json.dumps(json.loads(text) | kw, indent=2)


EDITS = {  # what changes → (file, edit, GGUF key that must differ)
    "tokenizer": ("tokenizer.json", _swap_last_two_tokens, "tokenizer.ggml.tokens"),
    "chat template": ("chat_template.jinja", lambda t: t.replace("<|im_start|>", "<|im_start|> "),
                      "tokenizer.chat_template"),
    "rope_theta": ("config.json", _config_with(rope_theta=500000.0), "llama.rope.freq_base"),
    "rope_scaling": ("config.json", _config_with(rope_scaling={"rope_type": "linear", "factor": 2.0}),
                     "llama.rope.scaling.factor"),
}


def test_same_weights_with_another_tokenizer_template_or_rope_get_their_own_conversion(base, tmp_path):
    d = copy_model(base, tmp_path / "m", link_weights=True)
    cache = tmp_path / "cache"
    fp = checkpoint.fingerprint(d)
    first = convert_cached(d, "f16", cache)
    made = first.stat().st_mtime_ns
    seen = {first}
    for what, (name, edit, key) in EDITS.items():
        original = (d / name).read_text()
        (d / name).write_text(edit(original))
        assert checkpoint.fingerprint(d) == fp, what  # the identity (plans, scores) is the weights'
        got = convert_cached(d, "f16", cache)
        assert got not in seen, f"{what}: the cached conversion of another checkpoint was used"
        seen.add(got)
        assert read_gguf(got).get(key) != read_gguf(first).get(key), what
        (d / name).write_text(original)  # undone: the first conversion is found again, not made again
        assert convert_cached(d, "f16", cache) == first and first.stat().st_mtime_ns == made, what
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in seen)  # nothing else: no .partial


def test_weights_edited_in_place_with_the_same_shapes_are_converted_again(base, tmp_path):
    d = copy_model(base, tmp_path / "m")
    cache = tmp_path / "cache"
    fp = checkpoint.fingerprint(d)
    first = convert_cached(d, "f16", cache)
    size = (d / WEIGHTS).stat().st_size
    edit_embedding_row(d, 10000)  # a merged LoRA, say: same shapes, same size, other bytes
    assert (d / WEIGHTS).stat().st_size == size
    assert checkpoint.fingerprint(d) == fp  # outside the sampled bytes: the cheap identity cannot see it …
    second = convert_cached(d, "f16", cache)
    assert second != first  # … the conversion key can: the file's mtime and ctime moved
    assert gguf_row(second, "token_embd.weight", 10000) != gguf_row(first, "token_embd.weight", 10000)
    assert gguf_row(second, "token_embd.weight", 9999) == gguf_row(first, "token_embd.weight", 9999)


def test_verify_cache_hashes_every_weight_byte(base, tmp_path, cache_root):
    d = copy_model(base, tmp_path / "m")
    converted = cache_root / "converted"
    first = convert_cached(d, "f16")
    assert first.parent == converted
    old_key = checkpoint.conversion_key(d)
    st = (d / WEIGHTS).stat()
    edit_embedding_row(d, 20000)
    os.utime(d / WEIGHTS, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and mtime as before the edit
    now = (d / WEIGHTS).stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert checkpoint.conversion_key(d) != old_key  # the ctime still moved, and no one can set it back
    # what the stat cannot show (an edit within one tick of a coarse clock, a clock set back): the current quick
    # key's entry holds the conversion of the old bytes
    stale = converted / first.name.replace(old_key, checkpoint.conversion_key(d))
    shutil.copyfile(first, stale)
    row = gguf_row(first, "token_embd.weight", 20000)

    def prune_base(out: str, *extra: str) -> Path:
        r = CliRunner().invoke(main, ["prune", str(d), "-o", str(tmp_path / out), "--quant", "none", *extra])
        assert r.exit_code == 0, r.output
        return tmp_path / out

    assert prune_base("trusted.gguf").read_bytes() == first.read_bytes()  # the stat matches: the entry is used
    checked = prune_base("checked.gguf", "--verify-cache")
    assert gguf_row(checked, "token_embd.weight", 20000) != row  # converted from the bytes as they are
    assert os.path.samefile(stale, next(p for p in converted.glob("*.gguf") if p != stale and p != first))
    assert prune_base("later.gguf").read_bytes() == checked.read_bytes()  # the quick key now finds the checked one
    assert not list(converted.glob(".*"))


# ----------------------------------------------------------------------------- damaged directories


def _remove_tensor(path: Path, name: str) -> None:
    t = load_file(str(path))
    del t[name]
    save_file(t, str(path), metadata={"format": "pt"})


def _damage(case: str, base: Path, sharded: Path, d: Path) -> str | dict[str, str]:
    """Make the damaged directory ``d``; return the one line gguf-prune must say (per command where they differ;
    a regular expression where part of it is another library's words)."""
    if case in ("missing shard", "shard misses a tensor"):
        copy_model(sharded, d, link_weights=True)
        index = json.loads((d / checkpoint.INDEX_NAME).read_text())["weight_map"]
        name = "model.layers.1.mlp.down_proj.weight"
        shard = index[name]
        if case == "missing shard":
            (d / shard).unlink()
            n = sum(v == shard for v in index.values())
            first = sorted(k for k, v in index.items() if v == shard)[0]
            return (f"{d}: shard {shard} is missing (model.safetensors.index.json puts {n} tensors there, "
                    f"e.g. {first}); {FIX}")
        (d / shard).unlink()  # a hard link: replace it, do not write through it
        shutil.copy2(sharded / shard, d / shard)
        _remove_tensor(d / shard, name)
        return f"{d}: shard {shard} misses {name}, which model.safetensors.index.json puts there; {FIX}"
    copy_model(base, d, link_weights=True)
    w = d / WEIGHTS
    if case in ("truncated weights", "truncated header"):
        w.unlink()
        data = (base / WEIGHTS).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        if case == "truncated weights":
            w.write_bytes(data[:len(data) // 2])
            need = len(data) - 8 - n
            return (f"{w}: truncated: its tensors need {need} bytes after the header, the file has "
                    f"{len(data) // 2 - 8 - n} ({len(data) // 2} bytes in all); {FIX}")
        w.write_bytes(data[:100])
        return (f"{w}: truncated or not a safetensors file: its header length says {n} bytes, the file has 92 "
                f"after the length field; {FIX}")
    if case == "a tensor missing":
        w.unlink()
        shutil.copy2(base / WEIGHTS, w)
        _remove_tensor(w, "model.layers.1.mlp.up_proj.weight")
        return (f"{d}: model.layers.1.mlp.up_proj.weight is in no weight file (transformers would fill it with "
                f"random numbers); {FIX}")
    if case == "tokenizer.json cut off":
        tok = d / "tokenizer.json"
        tok.unlink()
        tok.write_text('{"version": "1.0", "model": {')
        # score and recover load the tokenizer (the tokenizers library's words in the parentheses); prune checks
        # the tokenizer's JSON before converting (the converter would end in a traceback)
        loads = (re.escape(f"{d}: cannot load its tokenizer (") + r"[^\n]+"
                 + re.escape("); the checkpoint directory needs tokenizer.json / tokenizer_config.json: copy them again"))
        return {"score": loads, "recover": loads,
                "prune": re.escape(f"{tok} is not valid JSON: Expecting property name enclosed in double quotes: line 1 "
                                   "column 30 (char 29); copy the checkpoint's tokenizer.json again")}
    cfg = d / "config.json"
    if case == "config.json not JSON":
        cfg.write_text(cfg.read_text()[:40])
        try:
            json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            why = str(e)
        return f"{cfg} is not valid JSON: {why}; fix it or copy the checkpoint's config.json again"
    if case == "config.json without hidden_size":
        c = json.loads(cfg.read_text())
        del c["hidden_size"]
        cfg.write_text(json.dumps(c))
        return f"{cfg} does not describe a model: no 'hidden_size'; fix it or copy the checkpoint's config.json again"
    raise AssertionError(case)


CASES = ["missing shard", "shard misses a tensor", "truncated weights", "truncated header", "a tensor missing",
         "config.json not JSON", "config.json without hidden_size", "tokenizer.json cut off"]


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_model_dir_is_one_line_from_every_command(case, base, sharded, tmp_path, cache_root):
    d = tmp_path / "model"
    message = _damage(case, base, sharded, d)
    before = tree_hash(d)
    good = tmp_path / "good-plan.json"
    Plan.identity(ModelShape.from_hf_dir(base), fingerprint=checkpoint.fingerprint(base)).save(good)
    out = tmp_path / "out"
    commands = {
        "score": ["score", str(d), "-o", str(out / "s.json"), "--seq-len", "16", "--samples", "2", "--no-plots"],
        "prune": ["prune", str(d), "-o", str(out / "p.gguf"), "--quant", "none"],
        "recover": ["recover", str(d), "--plan", str(good), "-o", str(out / "rec"), "--patch"],
    }
    for name, args in commands.items():
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (name, r.output, r.exception)
        if isinstance(message, dict):
            assert re.fullmatch(f"Error: {message[name]}", r.output.strip()), (name, r.output)
        else:
            assert r.output.strip().splitlines() == [f"Error: {message}"], name
    assert tree_hash(d) == before  # nothing in the model directory changed …
    assert not out.exists() and not (cache_root / "converted").exists()  # … and nothing was written


# ----------------------------------------------------------------------------- interrupted conversion


def _children(pid: int) -> list[int]:
    p = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in p.read_text().split()] if p.exists() else []


@pytest.mark.parametrize("who,sig", [("gguf-prune", signal.SIGINT), ("gguf-prune", signal.SIGTERM),
                                     ("converter", signal.SIGKILL)])
def test_an_interrupted_or_failed_conversion_leaves_no_partial_file(who, sig, base, tmp_path, cache_root):
    d = copy_model(base, tmp_path / "m", link_weights=True)
    converted = cache_root / "converted"
    exe = Path(sys.executable).with_name("gguf-prune")
    # Ctrl-C as at a terminal: a job started in the background by a non-interactive shell (CI) inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([str(exe), "prune", str(d), "-o", str(tmp_path / "out.gguf"), "--quant", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not list(converted.glob(".*.partial")):  # the converter is writing
            assert proc.poll() is None, f"gguf-prune ended before the converter wrote anything: {proc.stdout.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        children = _children(proc.pid)
        assert len(children) == 1
        os.kill(proc.pid if who == "gguf-prune" else children[0], sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = output.strip().splitlines()
    if who == "converter":  # a failed conversion: gguf-prune's error quotes the converter's output
        assert proc.returncode == 1 and f"Error: convert_hf_to_gguf.py failed on {d} (killed by SIGKILL)" in lines
    elif sig == signal.SIGINT:
        assert proc.returncode == 1 and lines[-1] == "Aborted!" and "Traceback" not in output, output
    else:
        assert proc.returncode == -signal.SIGTERM and "Traceback" not in output, output  # ended by the signal
    assert not Path(f"/proc/{children[0]}").exists()  # the converter is gone (run() killed and reaped it)
    assert list(converted.iterdir()) == []  # no .partial, no half conversion under the final name
    assert not (tmp_path / "out.gguf").exists()
