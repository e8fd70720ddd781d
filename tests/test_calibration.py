"""Calibration data: text windows, chat JSONL through the real chat template, errors before any model work."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer

from gguf_prune.calibration import (DEFAULT_TEXT, CalibrationError, build_default_text, check_calibration_file,
                                    load_calibration, resolve_kind)
from tiny_models import TOKENIZER_DIR


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


CHATS = [
    {"messages": [{"role": "user", "content": "What is a layer?"},
                  {"role": "assistant", "content": "A block of attention and an MLP."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
                  {"role": "assistant", "content": "Seven."}]},
    {"messages": [{"role": "user", "content": "Tell me a long story. " * 40},
                  {"role": "assistant", "content": "Once upon a time " * 40}]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------- default text


def test_default_text_is_shipped_deterministic_english_prose():
    text = DEFAULT_TEXT.read_text()
    assert len(text) > 100_000
    assert build_default_text() == build_default_text()
    paras = text.strip().split("\n\n")
    assert len(paras) > 300
    assert not any(line.startswith((" ", "\t")) for line in text.splitlines())  # no code blocks
    words = text.split()
    assert sum(w.lower() in {"the", "a", "of", "is", "to", "and"} for w in words) / len(words) > 0.1
    assert build_default_text(max_chars=5000) == text[:len(build_default_text(max_chars=5000)) - 1] + "\n"


def test_default_is_used_without_a_file(tok):
    cal = load_calibration(None, tok, seq_len=32, samples=3)
    assert cal.source == "default:pydoc_topics.txt" and cal.kind == "text"
    assert cal.input_ids.shape == (3, 32) and bool(cal.attention_mask.all())


# ----------------------------------------------------------------- text


def test_text_windows_are_seeded_slices_of_the_token_stream(tok, tmp_path):
    src = tmp_path / "cal.txt"
    src.write_text(DEFAULT_TEXT.read_text()[:20_000])
    stream = tok(src.read_text(), add_special_tokens=False)["input_ids"]
    cal = load_calibration(src, tok, seq_len=24, samples=5, seed=3)
    assert cal.input_ids.shape == (5, 24) and cal.n_tokens == 120
    for row in cal.input_ids.tolist():  # every row is a window at a multiple of seq_len
        starts = [w for w in range(0, len(stream) - 23, 24) if stream[w:w + 24] == row]
        assert starts, row
    again = load_calibration(src, tok, seq_len=24, samples=5, seed=3)
    assert torch.equal(again.input_ids, cal.input_ids) and again.fingerprint == cal.fingerprint
    other = load_calibration(src, tok, seq_len=24, samples=5, seed=4)
    assert not torch.equal(other.input_ids, cal.input_ids) and other.fingerprint != cal.fingerprint
    shorter = load_calibration(src, tok, seq_len=20, samples=5, seed=3)
    assert shorter.fingerprint != cal.fingerprint
    d = cal.to_dict()
    assert d == {"fingerprint": cal.fingerprint, "source": str(src), "kind": "text", "n_seq": 5, "seq_len": 24,
                 "n_tokens": 120, "seed": 3}


def test_fewer_windows_than_samples_uses_them_all(tok, tmp_path, caplog):
    src = tmp_path / "small.txt"
    src.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    n = len(tok(src.read_text(), add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.WARNING):
        cal = load_calibration(src, tok, seq_len=16, samples=100)
    assert cal.n_seq == n // 16
    assert "using all of them" in caplog.text


def test_text_shorter_than_one_sequence_says_how_many_tokens(tok, tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("Hello there, world.")
    n = len(tok(src.read_text(), add_special_tokens=False)["input_ids"])
    with pytest.raises(CalibrationError) as e:
        load_calibration(src, tok, seq_len=128)
    assert str(e.value) == (f"calibration text {src} has {n} tokens; at least 128 are needed for one sequence of "
                            "--seq-len 128: use a longer text or a smaller --seq-len")


# ----------------------------------------------------------------- chat


def test_chat_jsonl_uses_the_models_chat_template_and_pads_right(tok, tmp_path):
    src = _jsonl(tmp_path / "chats.jsonl", CHATS)
    cal = load_calibration(src, tok, seq_len=64, samples=10)
    assert cal.kind == "chat" and cal.n_seq == 3
    for k, conv in enumerate(CHATS):
        want = tok.apply_chat_template(conv["messages"], tokenize=True)[:64]
        n = len(want)
        assert cal.input_ids[k, :n].tolist() == want
        assert cal.attention_mask[k].tolist() == [True] * n + [False] * (64 - n)
        assert set(cal.input_ids[k, n:].tolist()) <= {tok.pad_token_id}
    assert not cal.attention_mask[0].all() and cal.attention_mask[2].all()  # short padded, long truncated
    assert cal.n_tokens == int(cal.attention_mask.sum()) < 3 * 64
    assert "<|im_start|>assistant" in tok.decode(cal.input_ids[0, :cal.attention_mask[0].sum()])


def test_kind_follows_the_suffix_unless_forced(tmp_path):
    assert resolve_kind(tmp_path / "a.jsonl") == "chat"
    assert resolve_kind(tmp_path / "a.txt") == "text"
    assert resolve_kind(tmp_path / "a.jsonl", "text") == "text"
    with pytest.raises(CalibrationError, match="calibration kind 'csv' is not one of auto, text, chat"):
        resolve_kind(tmp_path / "a.txt", "csv")


# ----------------------------------------------------------------- errors (no tokenizer needed)


def test_missing_empty_and_directory_files(tmp_path):
    with pytest.raises(CalibrationError) as e:
        check_calibration_file(tmp_path / "nope.txt")
    assert str(e.value) == (f"calibration file {tmp_path / 'nope.txt'} does not exist; "
                            "pass a text file or a .jsonl of chats")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(CalibrationError, match=r"empty.txt is empty; it must contain text"):
        check_calibration_file(empty)
    with pytest.raises(CalibrationError, match="is not a file"):
        check_calibration_file(tmp_path)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationError, match="is not UTF-8 text"):
        check_calibration_file(binary)


def test_malformed_jsonl_names_the_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(CHATS[0]) + "\n\n" + "{not json\n")
    with pytest.raises(CalibrationError) as e:
        check_calibration_file(src)
    assert str(e.value).startswith(f"{src} line 3 is not valid JSON (")
    src.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(CalibrationError, match=r'line 2 has no "messages" list'):
        check_calibration_file(src)
    src.write_text(json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    with pytest.raises(CalibrationError, match=r'line 1: messages\[0\] must be an object with string "role"'):
        check_calibration_file(src)


def test_bad_sizes(tok):
    with pytest.raises(CalibrationError, match="seq_len is 1; it must be at least 2"):
        load_calibration(None, tok, seq_len=1)
    with pytest.raises(CalibrationError, match="samples is 0; it must be at least 1"):
        load_calibration(None, tok, samples=0)
