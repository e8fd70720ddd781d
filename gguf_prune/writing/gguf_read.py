"""Open a GGUF with clear errors: its header, metadata and tensor table, and rows of a tensor on demand.

The header, metadata and tensor table are parsed directly (gguf-py's ``GGUFReader`` builds a numpy view
per token string and takes seconds on a tokenizer of 10^5 entries); tensor *data* is never read through a
map. The writer copies it file-to-file (:mod:`gguf_prune.writing.gguf_write`) or :func:`read_rows` reads it
in bounded chunks of rows with ``os.preadv``, so a rewrite's resident memory stays near one chunk no matter
how large the model is.

Naming: ``ne`` is ggml order (ne0 = row length first); ``shape`` is numpy order.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from gguf_prune.errors import GgufPruneError
from gguf_prune.writing.gguf_format import SCALAR_FORMATS, SCALAR_SIZES, SLICEABLE_TYPES, pad_to

_SCALAR_SIZES_INT = {int(t): n for t, n in SCALAR_SIZES.items()}  # keyed by the raw type tag of the file
_U64 = struct.Struct("<Q")

# The smallest entries a count in the header can stand for: a key/value is a key length (8), a type (4)
# and a value (at least 1); a tensor info a name length (8), a rank (4), a type (4) and an offset (8).
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 13, 24
GGML_MAX_NAME = 64  # llama.cpp refuses a tensor name of this many bytes or more
_INT_TYPES = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                        GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})
# Standard keys whose type the readers rely on (``{arch}.`` is the file's architecture); llama.cpp's loader
# refuses these with another type too. per-layer: an array of integers is allowed as well (deci).
_ARCH_INT_KEYS = {"block_count": False, "context_length": False, "embedding_length": False, "vocab_size": False,
                  "feed_forward_length": True, "attention.head_count": True, "attention.head_count_kv": True,
                  "attention.key_length": False, "attention.value_length": False, "rope.dimension_count": False,
                  "attention.sliding_window": False}




class GGUFFormatError(GgufPruneError, ValueError):
    """A file that is not a readable GGUF: what is wrong, where, and what to do."""


# ------------------------------------------------------------------------- what a GGUF holds


@dataclass(frozen=True)
class KeyValue:
    """One metadata entry: its type and its encoded value bytes (type tag included), as stored."""

    key: str
    vtype: GGUFValueType
    sub_type: GGUFValueType | None  # element type of an array
    raw: bytes

    @property
    def is_array(self) -> bool:
        return self.vtype == GGUFValueType.ARRAY

    @property
    def value(self) -> Any:
        """The decoded value (str, int, float, bool, or a list for an array)."""
        try:
            return _decode(self.raw, 4, self.vtype)[0] if not self.is_array else _decode_array(self.raw)
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"the value of {self.key!r} is not UTF-8 text (byte {e.start} of a string); "
                                  "the file is damaged") from None


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie in a GGUF, and how to read them."""

    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:  # numpy order
        return tuple(reversed(self.ne))

    @property
    def sliceable(self) -> bool:
        return self.ggml_type in SLICEABLE_TYPES

    @property
    def element(self) -> np.dtype:
        return SLICEABLE_TYPES[self.ggml_type]


@dataclass(frozen=True)
class GGUFFile:
    """The metadata and tensor table of a GGUF (no tensor data is read)."""

    path: Path
    version: int
    alignment: int
    kv: dict[str, KeyValue]  # in file order
    tensors: list[TensorRef]  # in file order
    data_offset: int
    size: int

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kv.get(key)
        if kv is None:
            return default
        try:
            return kv.value
        except GGUFFormatError as e:
            raise GGUFFormatError(f"{self.path}: {e}") from None

    def is_array(self, key: str) -> bool:
        kv = self.kv.get(key)
        return kv is not None and kv.is_array

    @property
    def architecture(self) -> str | None:
        return self.get("general.architecture")


@dataclass(frozen=True)
class _TensorInfo:
    """One entry of the tensor table as declared, before its data is placed in the file."""

    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order
    offset: int  # relative to the start of the data section


# ------------------------------------------------------------------------- decoding values


def _decode(raw: bytes, pos: int, vtype: GGUFValueType) -> tuple[Any, int]:
    if vtype == GGUFValueType.STRING:
        (n,) = struct.unpack_from("<Q", raw, pos)
        return raw[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n
    fmt = SCALAR_FORMATS[vtype]
    return struct.unpack_from(fmt, raw, pos)[0], pos + SCALAR_SIZES[vtype]


def _decode_array(raw: bytes) -> list:
    sub, count = struct.unpack_from("<IQ", raw, 4)
    sub = GGUFValueType(sub)
    if sub != GGUFValueType.STRING:
        return np.frombuffer(raw, dtype=np.dtype(SCALAR_FORMATS[sub]), count=count, offset=16).tolist()
    out, pos = [], 16
    for _ in range(count):
        v, pos = _decode(raw, pos, sub)
        out.append(v)
    return out


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; running past its end is a truncated file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(f"{self.path} is truncated or damaged: {what} at byte {self.pos} needs {n} bytes "
                                  f"but the file has {self.size}; re-create it")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{self.path}: {what} at byte {start} is not UTF-8; the file is damaged") from None

    def skip_value(self, vtype: int, what: str) -> None:
        if vtype == GGUFValueType.STRING:
            (n,) = self.unpack("<Q", what)
            self.take(n, what)
        elif vtype == GGUFValueType.ARRAY:
            sub, count = self.unpack("<IQ", what)
            if sub in _SCALAR_SIZES_INT:
                self.take(_SCALAR_SIZES_INT[sub] * count, what)
            elif sub == GGUFValueType.STRING:
                self._skip_strings(count, what)
            else:
                raise GGUFFormatError(f"{self.path}: {what} is an array of unsupported type {sub}")
        elif vtype in _SCALAR_SIZES_INT:
            self.take(_SCALAR_SIZES_INT[vtype], what)
        else:
            raise GGUFFormatError(f"{self.path}: {what} has unknown value type {vtype}; the file is damaged")

    def _skip_strings(self, count: int, what: str) -> None:
        buf, pos, size, u64 = self.buf, self.pos, self.size, _U64.unpack_from
        for _k in range(count):  # a tight loop: tokenizer arrays hold ~10^5 strings
            if pos + 8 > size:
                break
            pos += 8 + u64(buf, pos)[0]
        else:
            if pos <= size:
                self.pos = pos
                return
        raise GGUFFormatError(f"{self.path} is truncated or damaged: {what} runs past the end of the file "
                              f"({size} bytes); re-create it")


# ------------------------------------------------------------------------- parsing a file


def read_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF's header, metadata and tensor table; every failure is one GGUFFormatError.

    The file is memory-mapped only while parsing; only the header pages are touched.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFFormatError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or struct.unpack("<I", head)[0] != GGUF_MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file (it does not start with the GGUF magic); pass a GGUF "
                                  "made by convert_hf_to_gguf.py (gguf-prune prune converts a checkpoint for you)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path, size)


def _parse(buf, path: Path, size: int) -> GGUFFile:
    """header → key/values (checked) → alignment → tensor table → each tensor's data placed in the file."""
    c = _Cursor(buf, path)
    version, n_tensors, n_kv = _parse_header(c, path, size)
    kv = _parse_key_values(c, buf, path, n_kv)
    _check_types(kv, path)
    alignment = _value(kv["general.alignment"], path) if "general.alignment" in kv else 32
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{path}: general.alignment {alignment} is not a power of two; the file is damaged")
    infos = _parse_tensor_infos(c, path, n_tensors)
    data_offset = pad_to(c.pos, alignment)
    tensors = _place_tensors(infos, path, data_offset, alignment, size)
    return GGUFFile(path, version, alignment, kv, tensors, data_offset, size)


def _parse_header(c: _Cursor, path: Path, size: int) -> tuple[int, int, int]:
    """(version, n_tensors, n_kv), refused when the counts cannot fit in the file."""
    _magic, version, n_tensors, n_kv = c.unpack("<IIQQ", "the header")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path} is GGUF version {version}; this reads versions 2 and 3")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > size - c.pos:
        raise GGUFFormatError(f"{path} is damaged: its header counts {n_kv} metadata entries and {n_tensors} "
                              f"tensors, more than a file of {size} bytes can hold; re-create it")
    return version, n_tensors, n_kv


def _parse_key_values(c: _Cursor, buf, path: Path, n_kv: int) -> dict[str, KeyValue]:
    """Every metadata entry in file order, kept as its raw bytes (decoded when read)."""
    kv: dict[str, KeyValue] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        if not key:
            raise GGUFFormatError(f"{path}: metadata key #{i} is empty; the file is damaged")
        start = c.pos
        (vtype,) = c.unpack("<I", f"the type of {key!r}")
        c.skip_value(vtype, f"the value of {key!r}")
        raw = bytes(buf[start:c.pos])
        try:
            vt = GGUFValueType(vtype)
            sub = GGUFValueType(struct.unpack_from("<I", raw, 4)[0]) if vt == GGUFValueType.ARRAY else None
        except ValueError:
            raise GGUFFormatError(f"{path}: {key!r} has unknown value type {vtype}; the file is damaged") from None
        if key in kv:
            raise GGUFFormatError(f"{path}: metadata key {key!r} appears twice; the file is damaged")
        kv[key] = KeyValue(key, vt, sub, raw)
        if vt == GGUFValueType.STRING:
            _value(kv[key], path)  # a few short strings: check them now (arrays of them when read)
    return kv


def _parse_tensor_infos(c: _Cursor, path: Path, n_tensors: int) -> list[_TensorInfo]:
    """The tensor table: each tensor's name, ne, type and offset, as declared."""
    infos = []
    for i in range(n_tensors):
        name = c.string(f"the name of tensor #{i}")
        if len(name.encode()) >= GGML_MAX_NAME:
            raise GGUFFormatError(f"{path}: the name of tensor #{i} is {len(name.encode())} bytes long (llama.cpp "
                                  f"reads at most {GGML_MAX_NAME - 1}); the file is damaged")
        (n_dims,) = c.unpack("<I", f"tensor {name!r}")
        if n_dims > 4:
            raise GGUFFormatError(f"{path}: tensor {name!r} has {n_dims} dimensions (at most 4); the file is damaged")
        ne = c.unpack(f"<{n_dims}Q", f"tensor {name!r}")
        ttype, offset = c.unpack("<IQ", f"tensor {name!r}")
        try:
            gtype = GGMLQuantizationType(ttype)
            GGML_QUANT_SIZES[gtype]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"{path}: tensor {name!r} has unknown ggml type {ttype}; the file is damaged") from None
        infos.append(_TensorInfo(name, gtype, tuple(int(x) for x in ne), int(offset)))
    return infos


def _place_tensors(infos: list[_TensorInfo], path: Path, data_offset: int, alignment: int,
                   size: int) -> list[TensorRef]:
    """Where each tensor's data lies: in declaration order, each at the aligned end of the one before (as
    llama.cpp checks), all of it inside the file."""
    tensors, seen = [], set()
    expected = 0
    for info in infos:
        name, gtype, ne, offset = info.name, info.ggml_type, info.ne, info.offset
        if name in seen:
            raise GGUFFormatError(f"{path}: tensor {name!r} appears twice; the file is damaged")
        seen.add(name)
        block, type_size = GGML_QUANT_SIZES[gtype]
        n = 1
        for x in ne:
            n *= x
        if n >= 1 << 63 or any(x >= 1 << 63 for x in ne):
            raise GGUFFormatError(f"{path}: tensor {name!r} has ne {ne}: more elements than any file can hold; "
                                  "the file is damaged")
        if ne and ne[0] % block:
            raise GGUFFormatError(f"{path}: tensor {name!r} ne0 {ne[0]} is not a multiple of {gtype.name}'s block {block}")
        nbytes = n // block * type_size
        if offset != expected:
            raise GGUFFormatError(f"{path}: tensor {name!r} has data offset {offset}, expected {expected} (right "
                                  "after the tensor before it); the file is damaged")
        expected = pad_to(offset + nbytes, alignment)
        ref = TensorRef(name, gtype, ne, data_offset + offset, nbytes)
        if ref.offset + nbytes > size:
            raise GGUFFormatError(f"{path} is truncated: tensor {name!r} ends at byte {ref.offset + nbytes} but the "
                                  f"file has {size} bytes; re-create it")
        tensors.append(ref)
    return tensors


def _value(kv: KeyValue, path: Path) -> Any:
    try:
        return kv.value
    except GGUFFormatError as e:
        raise GGUFFormatError(f"{path}: {e}") from None


def _check_types(kv: dict[str, KeyValue], path: Path) -> None:
    """The standard keys gguf-prune and llama.cpp read as numbers are numbers (and not negative)."""
    def refuse(key: str, what: str) -> None:
        raise GGUFFormatError(f"{path}: metadata {key} is {what}; the file is damaged (re-create it)")

    def kind(v: KeyValue) -> str:
        if v.is_array:
            return f"an array of {v.sub_type.name}"
        return f"a {v.vtype.name}"

    a = kv.get("general.alignment")
    if a is not None and a.vtype != GGUFValueType.UINT32:
        refuse("general.alignment", f"{kind(a)}, not a UINT32")
    arch = kv.get("general.architecture")
    if arch is None:
        return
    if arch.vtype != GGUFValueType.STRING:
        refuse("general.architecture", f"{kind(arch)}, not a string")
    prefix = _value(arch, path) + "."
    for suffix, per_layer in _ARCH_INT_KEYS.items():
        v = kv.get(prefix + suffix)
        if v is None:
            continue
        if v.vtype in _INT_TYPES or (per_layer and v.is_array and v.sub_type in _INT_TYPES):
            value = _value(v, path)
            if min(value if isinstance(value, list) else [value], default=0) < 0:
                refuse(prefix + suffix, f"negative ({_short(value)})")
            continue
        refuse(prefix + suffix, f"{kind(v)}, not an integer" + (" or an array of them" if per_layer else ""))


def _short(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------- tensor data


def read_rows(src_fd: int, ref: TensorRef, row_start: int, row_stop: int) -> np.ndarray:
    """Rows [row_start, row_stop) of a 1-D or 2-D tensor as a numpy array (n_rows, row_len)."""
    row_len = ref.ne[0] if len(ref.ne) > 1 else 1
    rows_total = int(np.prod(ref.ne[1:], dtype=np.int64)) if len(ref.ne) > 1 else ref.ne[0]
    assert 0 <= row_start <= row_stop <= rows_total
    itemsize = ref.element.itemsize
    n = (row_stop - row_start) * row_len * itemsize
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    off = ref.offset + row_start * row_len * itemsize
    while got < n:
        k = os.preadv(src_fd, [mv[got:]], off + got)
        if k == 0:
            raise GGUFFormatError(f"input ended while reading tensor {ref.name!r}")
        got += k
    return np.frombuffer(buf, dtype=ref.element).reshape(row_stop - row_start, row_len)  # (n_rows, row_len)
