"""Calibration data: a plain text file or a JSONL of chat conversations → token batches.

Two kinds of input:

``text``
    any UTF-8 text. It is tokenized once (no special tokens), cut into
    non-overlapping windows of ``seq_len`` tokens at multiples of ``seq_len``,
    and ``samples`` of those windows are chosen with ``seed``. Every token is real.
``chat``
    a ``.jsonl`` file, one ``{"messages": [{"role": ..., "content": ...}, ...]}``
    per line, rendered with the model's own chat template. Each conversation is
    one sequence, truncated to ``seq_len`` and right-padded; ``attention_mask``
    marks the real tokens. Right padding keeps real tokens at positions
    0..n-1, and since attention is causal no real token ever sees a pad: only the
    statistics (KL, BI, NLL, neuron counts) must skip pads, and they do.

When no file is given, the text shipped in ``gguf_prune/data/`` is used: English
prose extracted from Python's bundled ``pydoc_data.topics`` by
:func:`build_default_text` (nothing downloaded).

Every problem with the file is raised as :class:`CalibrationError` *before* a
model is loaded: :func:`check_calibration_file` needs no tokenizer;
:func:`load_calibration` needs only the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from gguf_prune.data import DATA_DIR
from gguf_prune.errors import GgufPruneError

if TYPE_CHECKING:
    import torch  # imported where tensors are made, so that the options modules load without it

log = logging.getLogger(__name__)

DEFAULT_TEXT = DATA_DIR / "pydoc_topics.txt"
DEFAULT_SEQ_LEN = 128
DEFAULT_SAMPLES = 32
DEFAULT_SEED = 0
KINDS = ("auto", "text", "chat")


class CalibrationError(GgufPruneError, ValueError):
    """Calibration data that cannot be used: what is wrong and what to do."""


@dataclass(frozen=True)
class Calibration:
    """Token sequences to score on. ``input_ids``, ``attention_mask``: (n_seq, seq_len)."""

    input_ids: torch.Tensor  # (n_seq, seq_len) int64
    attention_mask: torch.Tensor  # (n_seq, seq_len) bool; True = real token (right-padded)
    source: str
    kind: str  # "text" | "chat"
    seq_len: int
    seed: int
    fingerprint: str

    @property
    def n_seq(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "source": self.source, "kind": self.kind,
                "n_seq": self.n_seq, "seq_len": self.seq_len, "n_tokens": self.n_tokens, "seed": self.seed}

    def batches(self, seqs_per_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) slices of at most ``seqs_per_batch`` sequences."""
        step = max(1, int(seqs_per_batch))
        for s in range(0, self.n_seq, step):
            yield self.input_ids[s:s + step], self.attention_mask[s:s + step]


# ------------------------------------------------------------------ the default text


def build_default_text(max_chars: int = 300_000) -> str:
    """English prose from Python's bundled ``pydoc_data.topics``, deterministically.

    Topics are read in sorted order; from each, paragraphs of running text are
    kept and code examples (indented blocks), grammar productions, tables and
    heading underlines dropped. Text is added paragraph by paragraph until
    ``max_chars``. The result depends only on the Python version's docs.
    """
    from pydoc_data.topics import topics

    out: list[str] = []
    total = 0
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.split("\n")
            if any(ln.startswith((" ", "\t")) for ln in lines):  # code, grammar, tables, literal blocks
                continue
            if any(set(ln.strip()) <= set("*=-~^+|") for ln in lines):  # headings and their underlines
                continue
            text = " ".join(ln.strip() for ln in lines).strip()
            words = text.split()
            if len(words) < 12:
                continue
            letters = sum(c.isalpha() or c.isspace() for c in text)
            if letters < 0.85 * len(text):  # mostly symbols: not prose
                continue
            if total + len(text) + 2 > max_chars:
                return "\n\n".join(out) + "\n"
            out.append(text)
            total += len(text) + 2
    return "\n\n".join(out) + "\n"


def write_default_text(path: Path = DEFAULT_TEXT) -> Path:
    """Regenerate the shipped default calibration text (run once per Python docs change)."""
    from gguf_prune.atomic import write_text_atomic

    write_text_atomic(Path(path), build_default_text())
    Path(path).chmod(0o644)  # shipped with the package: readable by everyone
    return Path(path)


# ------------------------------------------------------------------ checks (no tokenizer)


def resolve_kind(path: Path, kind: str = "auto") -> str:
    if kind not in KINDS:
        raise CalibrationError(f"calibration kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "chat" if Path(path).suffix.lower() in (".jsonl", ".ndjson") else "text"


def check_calibration_file(path: Path | None, kind: str = "auto") -> tuple[Path, str]:
    """Check the file exists, is non-empty UTF-8 and (for chat) is well-formed JSONL.

    Returns (path, kind). Cheap: run it before loading anything.
    """
    if path is None:
        if not DEFAULT_TEXT.exists():
            raise CalibrationError(f"the default calibration text {DEFAULT_TEXT} is missing from this install; "
                                   "pass --calibration FILE or reinstall gguf-prune")
        return DEFAULT_TEXT, "text"
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration file {path} does not exist; pass a text file or a .jsonl of chats")
    if not path.is_file():
        raise CalibrationError(f"calibration path {path} is not a file; pass a text file or a .jsonl of chats")
    kind = resolve_kind(path, kind)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text (byte {e.start}); "
                               "convert it to UTF-8") from None
    if not text.strip():
        raise CalibrationError(f"calibration file {path} is empty; it must contain text "
                               "(or one chat conversation per line for .jsonl)")
    if kind == "chat":
        _parse_chat_lines(text, path)
    return path, kind


def _parse_chat_lines(text: str, path: Path) -> list[list[dict]]:
    convs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); each line must be "
                                   '{"messages": [{"role": "user", "content": "..."}, ...]}') from None
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise CalibrationError(f"{where} has no \"messages\" list; each line must be "
                                   '{"messages": [{"role": "user", "content": "..."}, ...]}')
        for k, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise CalibrationError(f"{where}: messages[{k}] must be an object with string \"role\" and "
                                       f"\"content\", got {json.dumps(m)[:80]}")
        convs.append(msgs)
    if not convs:
        raise CalibrationError(f"calibration file {path} has no conversations")
    return convs


# ------------------------------------------------------------------ tokenize


def load_calibration(path: Path | None, tokenizer, seq_len: int = DEFAULT_SEQ_LEN, samples: int = DEFAULT_SAMPLES,
                     seed: int = DEFAULT_SEED, kind: str = "auto") -> Calibration:
    """Tokenize calibration data into ``samples`` sequences of ``seq_len`` tokens."""
    if seq_len < 2:
        raise CalibrationError(f"seq_len is {seq_len}; it must be at least 2 (next-token scores need two tokens)")
    if samples < 1:
        raise CalibrationError(f"samples is {samples}; it must be at least 1")
    path, kind = check_calibration_file(path, kind)
    source = "default:" + path.name if path == DEFAULT_TEXT else str(path)
    text = path.read_text(encoding="utf-8")
    if kind == "text":
        ids, mask = _text_windows(text, path, tokenizer, seq_len, samples, seed)
    else:
        ids, mask = _chat_sequences(_parse_chat_lines(text, path), path, tokenizer, seq_len, samples, seed)
    h = hashlib.sha256()
    h.update(json.dumps({"kind": kind, "seq_len": seq_len, "samples": samples, "seed": seed}, sort_keys=True).encode())
    h.update(ids.numpy().astype("<i8").tobytes())
    h.update(mask.numpy().astype("u1").tobytes())
    cal = Calibration(input_ids=ids, attention_mask=mask, source=source, kind=kind, seq_len=seq_len, seed=seed,
                      fingerprint=h.hexdigest()[:16])
    log.info("calibration: %d %s sequences × %d tokens (%d real tokens) from %s", cal.n_seq, kind, seq_len,
             cal.n_tokens, source)
    return cal


def _text_windows(text, path, tokenizer, seq_len, samples, seed):
    import torch

    tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no max-length warning
    n_windows = len(tokens) // seq_len
    if n_windows == 0:
        raise CalibrationError(f"calibration text {path} has {len(tokens)} tokens; at least {seq_len} are needed "
                               f"for one sequence of --seq-len {seq_len}: use a longer text or a smaller --seq-len")
    if n_windows < samples:
        log.warning("calibration text %s has only %d windows of %d tokens; using all of them instead of %d",
                    path, n_windows, seq_len, samples)
    chosen = sorted(random.Random(seed).sample(range(n_windows), min(samples, n_windows)))
    ids = torch.tensor([tokens[w * seq_len:(w + 1) * seq_len] for w in chosen], dtype=torch.long)  # (n_seq, seq_len)
    return ids, torch.ones_like(ids, dtype=torch.bool)


def _chat_sequences(convs, path, tokenizer, seq_len, samples, seed):
    import torch

    if getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationError(f"{path} is chat JSONL but the model's tokenizer has no chat template; "
                               "pass a plain text file instead")
    if len(convs) < samples:
        log.warning("calibration file %s has %d conversations; using all of them instead of %d",
                    path, len(convs), samples)
    chosen = sorted(random.Random(seed).sample(range(len(convs)), min(samples, len(convs))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows, masks = [], []
    for c in chosen:
        toks = tokenizer.apply_chat_template(convs[c], tokenize=True, add_generation_prompt=False)
        if isinstance(toks, dict):  # BatchEncoding on some versions
            toks = toks["input_ids"]
        toks = list(toks)[:seq_len]
        if len(toks) < 2:
            raise CalibrationError(f"{path}: conversation {c + 1} renders to {len(toks)} token(s); at least 2 needed")
        n_real = len(toks)
        rows.append(toks + [pad] * (seq_len - n_real))
        masks.append([True] * n_real + [False] * (seq_len - n_real))
    n_trunc = sum(1 for m in masks if all(m))
    if n_trunc:
        log.info("calibration: %d of %d conversations fill or exceed --seq-len %d (truncated)", n_trunc, len(masks),
                 seq_len)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)
