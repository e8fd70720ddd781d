"""The Hugging Face side: read a checkpoint directory, check it, fingerprint it,
and apply a plan's cuts to a loaded PyTorch model.

``apply_plan`` is the reference the rest of the project is checked against:
a pruned GGUF must compute what this model computes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


from gguf_prune.models import arch
from gguf_prune.models.tensors import global_shapes, layer_shapes
from gguf_prune.plan import ModelShape
from gguf_prune.errors import GgufPruneError

log = logging.getLogger(__name__)


class ModelDirError(GgufPruneError, ValueError):
    """A model directory that cannot be used: what is wrong and what to do."""


class WeightsError(GgufPruneError, ValueError):
    """Recovered weights (fine-tuned tensors, patch matrices) that do not fit the model or the plan."""


INDEX_NAME = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
_FIX = "copy or download the checkpoint again, or re-save it with save_pretrained"
# what convert_hf_to_gguf.py reads besides the weights: its own download list for --remote (LICENSE, *.json,
# *.md, *.txt, tokenizer.model) plus chat templates, other tokenizer models and remote tokenizer code
CONVERTER_INPUTS = ("LICENSE*", "*.json", "*.md", "*.txt", "*.jinja", "*.model", "*.tiktoken", "*.py",
                    "additional_chat_templates/*.jinja")
_OWN_DOCUMENT = re.compile(rb'"schema"\s*:\s*"gguf-prune/')  # plans, scores, reports gguf-prune writes
SMALL_FILE_BYTES = 64 << 20  # converter inputs up to this size are keyed by their bytes, larger ones by their stat


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives, as its safetensors header says."""

    file: Path
    dtype: str  # safetensors dtype name: F32, BF16, …
    shape: tuple[int, ...]  # torch order

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4) * math.prod(self.shape)


def read_config(hf_dir: Path) -> dict[str, Any]:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ModelDirError(f"{hf_dir} is not a directory; pass a Hugging Face checkpoint directory "
                            "(config.json, *.safetensors, tokenizer files)")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise ModelDirError(f"{hf_dir} has no config.json; pass a Hugging Face checkpoint directory")
    try:
        config = json.loads(cfg_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{cfg_path} is not valid JSON: {e}; fix it or copy the checkpoint's config.json "
                            "again") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object; fix it or copy the "
                            "checkpoint's config.json again")
    try:
        arch.family_of_config(config, where=str(hf_dir))
    except arch.ArchError as e:
        raise ModelDirError(str(e)) from None
    return config


def shape_of(config: Mapping[str, Any], hf_dir: Path) -> ModelShape:
    """The config's shape, or one ModelDirError naming the field that is missing or not a number."""
    need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    problems = [f"no {k!r}" for k in need if k not in config]
    for k in need + ("num_key_value_heads", "head_dim"):
        v = config.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            problems.append(f"{k!r} is {json.dumps(v)}, not a positive integer")
    if not problems:
        if config["hidden_size"] % config["num_attention_heads"] and not config.get("head_dim"):
            problems.append(f"'hidden_size' {config['hidden_size']} is not a multiple of 'num_attention_heads' "
                            f"{config['num_attention_heads']} and there is no 'head_dim'")
        if config["num_attention_heads"] % (config.get("num_key_value_heads") or config["num_attention_heads"]):
            problems.append(f"'num_attention_heads' {config['num_attention_heads']} is not a multiple of "
                            f"'num_key_value_heads' {config['num_key_value_heads']}")
    if problems:
        raise ModelDirError(f"{Path(hf_dir) / 'config.json'} does not describe a model: {'; '.join(problems)}; "
                            "fix it or copy the checkpoint's config.json again")
    return ModelShape.from_hf_config(config)


def _read_index(hf_dir: Path) -> dict[str, str] | None:
    """model.safetensors.index.json's weight_map (tensor name → shard file name), or None without an index."""
    index = Path(hf_dir) / INDEX_NAME
    if not index.exists():
        return None
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("'weight_map' is not an object of file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ModelDirError(f"{index} is not a safetensors index (no readable 'weight_map': {e}); "
                            f"{_FIX}") from None
    if not weight_map:
        raise ModelDirError(f"{index} names no tensors; {_FIX}")
    return weight_map


def weight_files(hf_dir: Path) -> list[Path]:
    """The model's own weight files, as transformers and convert_hf_to_gguf.py find them: the shards that
    model.safetensors.index.json names, else ``model*.safetensors``. Other ``*.safetensors`` in the directory
    (``score -o``'s ``<name>.neurons.safetensors``, say) are not the model's. Named shards may be missing:
    :func:`check_weights` says which."""
    hf_dir = Path(hf_dir)
    weight_map = _read_index(hf_dir)
    if weight_map is not None:
        return sorted({hf_dir / f for f in weight_map.values()})
    files = sorted(f for f in hf_dir.glob("model*.safetensors") if f.is_file())
    if files:
        return files
    others = sorted(f.name for f in hf_dir.glob("*.safetensors"))
    if others:
        raise ModelDirError(f"{hf_dir} has no model weights: transformers and convert_hf_to_gguf.py read "
                            f"model.safetensors (or the shards {INDEX_NAME} names), and {', '.join(others)} "
                            f"{'is' if len(others) == 1 else 'are'} not; rename the weight file to model.safetensors")
    extra = " (found PyTorch .bin weights: re-save them as safetensors)" if list(hf_dir.glob("*.bin")) else ""
    raise ModelDirError(f"{hf_dir} has no *.safetensors weights{extra}")


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of one safetensors file (``__metadata__`` left out), checked as the safetensors
    loader checks it: a readable header, each tensor's bytes matching its dtype and shape, and the data
    ending where the file ends. A truncated or damaged file raises one ModelDirError."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelDirError(f"{path}: not a safetensors file: {size} bytes, too short for the 8-byte header "
                                f"length; {_FIX}")
        (n,) = struct.unpack("<Q", head)  # little-endian u64: the JSON header's length
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ModelDirError(f"{path}: truncated or not a safetensors file: its header length says {n} bytes, "
                                f"the file has {size - 8} after the length field; {_FIX}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError(f"a JSON {type(header).__name__}, not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ModelDirError(f"{path}: not a safetensors file: its header is not a tensor table ({e}); {_FIX}") from None
    header.pop("__metadata__", None)
    data = size - 8 - n  # bytes after the header
    spans = []
    for name, t in header.items():
        try:
            dtype, shape, (begin, stop) = t["dtype"], [int(x) for x in t["shape"]], map(int, t["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelDirError(f"{path}: tensor {name} has no readable dtype, shape and data_offsets in the "
                                f"header; {_FIX}") from None
        want = DTYPE_BYTES.get(dtype)
        if want is not None and stop - begin != want * math.prod(shape):
            raise ModelDirError(f"{path}: tensor {name} ({dtype} {shape}) needs {want * math.prod(shape)} bytes, "
                                f"its data_offsets give {stop - begin}; {_FIX}")
        spans.append((begin, stop, name))
    end = 0
    for begin, stop, name in sorted(spans):  # the loader wants the tensors back to back from byte 0
        if begin != end:
            raise ModelDirError(f"{path}: tensor {name}'s data starts at byte {begin} after the header, where "
                                f"{'the data begins' if end == 0 else 'the previous tensor ends'} at {end}; {_FIX}")
        end = stop
    if end > data:
        raise ModelDirError(f"{path}: truncated: its tensors need {end} bytes after the header, the file has "
                            f"{data} ({size} bytes in all); {_FIX}")
    if end < data:
        raise ModelDirError(f"{path}: {data - end} bytes follow the last tensor's data, so the safetensors loader "
                            f"refuses it; {_FIX}")
    return header


# transformers' default for tie_word_embeddings where it is not False (save_pretrained leaves defaults out)
TIED_BY_DEFAULT = {"gemma3_text": True}


def tied_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether the checkpoint reuses the embedding as its output matrix (no lm_head.weight)."""
    return bool(config.get("tie_word_embeddings", TIED_BY_DEFAULT.get(config.get("model_type"), False)))


def expected_tensors(shape: ModelShape, tied: bool) -> dict[str, tuple[int, ...]]:
    """The tensors every supported family's checkpoint has, with their shapes in torch order (out, in).
    Families add their own (biases, q/k norms, Gemma's extra norms): those are not checked here."""
    out = global_shapes(shape, tied)
    per = layer_shapes(shape)
    for i in range(shape.n_layer):
        out.update({f"model.layers.{i}.{k}": v for k, v in per.items()})
    return out


def check_weights(hf_dir: Path, config: Mapping[str, Any] | None = None) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint and where it lives, after checking what loading would trip on: the
    index's shards all present and holding what it puts there, every file a whole safetensors file, every
    tensor the config implies present with its shape. All problems are reported at once."""
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir) if config is None else config
    shape = shape_of(config, hf_dir)
    weight_map = _read_index(hf_dir)
    files = weight_files(hf_dir)
    problems: list[str] = []
    tensors: dict[str, TensorInfo] = {}
    bad = set()  # missing or damaged files: their tensors are not looked for one by one
    for f in files:
        if not f.is_file():
            bad.add(f)
            names = sorted(n for n, v in (weight_map or {}).items() if hf_dir / v == f)
            problems.append(f"shard {f.name} is missing ({INDEX_NAME} puts {len(names)} tensors there, "
                            f"e.g. {names[0]})")
            continue
        try:
            header = read_safetensors_header(f)
        except ModelDirError as e:
            problems.append(str(e).removesuffix(f"; {_FIX}"))
            bad.add(f)
            continue
        for name, t in header.items():
            if name in tensors and weight_map is None:
                problems.append(f"{name} is in two files: {tensors[name].file.name} and {f.name}")
            if weight_map is None or hf_dir / weight_map.get(name, "") == f:
                tensors[name] = TensorInfo(f, t["dtype"], tuple(int(x) for x in t["shape"]))
    if weight_map is not None:
        for name, fname in sorted(weight_map.items()):
            if name not in tensors and hf_dir / fname not in bad:
                problems.append(f"shard {fname} misses {name}, which {INDEX_NAME} puts there")
    if not problems:  # a missing or damaged file already explains missing tensors
        for name, want in expected_tensors(shape, tied_embeddings(config)).items():
            t = tensors.get(name)
            if t is None:
                problems.append(f"{name} is in no weight file (transformers would fill it with random numbers)")
            elif t.shape != want:
                problems.append(f"{name} in {t.file.name} has shape {list(t.shape)}, the config says {list(want)}")
    if len(problems) == 1:  # one line; a problem of one file names the file itself
        where = "" if problems[0].startswith(f"{hf_dir}{os.sep}") else f"{hf_dir}: "
        raise ModelDirError(f"{where}{problems[0]}; {_FIX}")
    if problems:
        raise ModelDirError(f"{hf_dir}: the checkpoint cannot be loaded ({len(problems)} problems):\n  - "
                            + "\n  - ".join(problems) + f"\n{_FIX}")
    return tensors


TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json", "chat_template.json")


def check_tokenizer_files(hf_dir: Path) -> None:
    """The tokenizer's JSON files that are there parse (a cut-off download fails in the converter with a
    traceback). Parsing a large tokenizer.json takes 0.1-0.5 s: checked before a conversion, not on every
    command (:func:`load_tokenizer` gives the message where the tokenizer is loaded)."""
    for name in TOKENIZER_JSON:
        path = Path(hf_dir) / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelDirError(f"{path} is not valid JSON: {e}; copy the checkpoint's {name} again") from None


def check_model_dir(hf_dir: Path) -> ModelShape:
    """Validate a checkpoint directory up front (config, every weight file, every tensor the config implies);
    return its shape. Every command that reads a checkpoint calls this before any work."""
    config = read_config(hf_dir)
    check_weights(hf_dir, config)
    return shape_of(config, hf_dir)


def fingerprint(hf_dir: Path, sample_bytes: int = 1 << 20) -> str:
    """The checkpoint's identity, which plans, scores and recover directories record: config dimensions, every
    tensor's name/dtype/shape, and a sample of each weight file's bytes (start, middle, end), so it is cheap
    for 70B models. It covers the model's own weight files only (:func:`weight_files`), so files gguf-prune
    writes into the directory do not change it; nor do the tokenizer or the rope settings, which do not
    change what a plan cuts. The conversion cache keys on more: :func:`conversion_key`.
    """
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    h = hashlib.sha256()
    h.update(json.dumps(shape_of(config, hf_dir).to_dict(), sort_keys=True).encode())
    for path in weight_files(hf_dir):
        if not path.is_file():
            check_weights(hf_dir, config)  # says which shard is missing
        header = read_safetensors_header(path)
        h.update(json.dumps({k: [v["dtype"], v["shape"]] for k, v in header.items()}, sort_keys=True).encode())
        size = path.stat().st_size
        with open(path, "rb") as f:
            for off in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
                f.seek(off)
                h.update(f.read(sample_bytes))
    return h.hexdigest()[:16]


def converter_inputs(hf_dir: Path) -> dict[str, bytes | None]:
    """The files besides the weights that convert_hf_to_gguf.py (and the tokenizer it loads) may read, by
    path relative to ``hf_dir``: config, generation config, tokenizer files, chat templates, model card. The
    value is the file's bytes, or None for a file over 64 MiB (keyed by its stat, like the weights). Plans,
    scores and reports that gguf-prune wrote into the directory are left out."""
    hf_dir = Path(hf_dir)
    out: dict[str, bytes | None] = {}
    for path in sorted({f for pattern in CONVERTER_INPUTS for f in hf_dir.glob(pattern)}):
        if not path.is_file() or path.name.startswith("."):  # hidden: temporary files of atomic writes
            continue
        data = path.read_bytes() if path.stat().st_size <= SMALL_FILE_BYTES else None
        if data is None or not (path.suffix == ".json" and _OWN_DOCUMENT.search(data)):
            out[path.relative_to(hf_dir).as_posix()] = data
    return out


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def conversion_key(hf_dir: Path, verify: bool = False) -> str:
    """The key of a checkpoint's conversion: everything convert_hf_to_gguf.py reads.

    The bytes of the small files (config, generation config, tokenizer files, chat templates, model card:
    :func:`converter_inputs`) and the identity :func:`fingerprint`; for each weight file (and any other input
    over 64 MiB), its size, mtime_ns, ctime_ns and inode, the way git's index and ccache tell a file changed
    without reading it (an edit in place moves mtime and ctime; a copy or a replacement is another inode).
    ``verify``: the SHA-256 of those files' bytes instead of their stat, so the key names the content exactly
    (one full read of the weights).
    """
    hf_dir = Path(hf_dir)
    h = hashlib.sha256(b"gguf-prune conversion key 1\n")
    h.update(f"identity {fingerprint(hf_dir)}\n".encode())
    big = []
    for name, data in converter_inputs(hf_dir).items():
        if data is None:
            big.append(hf_dir / name)
        else:
            h.update(f"file {name} {len(data)}\n".encode())
            h.update(data)
    for path in weight_files(hf_dir) + big:
        name = path.relative_to(hf_dir).as_posix()
        if verify:
            h.update(f"large {name} sha256 {file_sha256(path)}\n".encode())
        else:
            st = path.stat()
            h.update(f"large {name} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}\n".encode())
    return h.hexdigest()[:16]


