"""Write a GGUF one tensor at a time.

The writer follows gguf-py's phases — key/values and every tensor's info first, then the header, then tensor
data in the declared order — and also accepts *raw* key/value bytes, so metadata a rewrite does not change
(tokenizer, chat template, ...) is copied byte for byte. Tensor data is copied file-to-file by the kernel
(``os.copy_file_range``) where it can be, so no tensor has to pass through Python.

Naming: ``ne`` is ggml order (ne0 = row length first); ``shape`` is numpy order.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, GGUFValueType

from gguf_prune.writing.gguf_format import CHUNK_BYTES, SCALAR_FORMATS, pad_to
from gguf_prune.writing.gguf_read import GGUFFormatError  # the input ended while a tensor was copied


# ------------------------------------------------------------------------- encoding

def encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_value(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> bytes:
    """The bytes of a typed value, type tag first (as in a GGUF key/value entry)."""
    out = struct.pack("<I", int(vtype))
    if vtype == GGUFValueType.STRING:
        return out + encode_string(value)
    if vtype == GGUFValueType.ARRAY:
        if sub_type is None or sub_type == GGUFValueType.ARRAY:
            raise ValueError("arrays need a scalar or string sub_type")
        out += struct.pack("<IQ", int(sub_type), len(value))
        if sub_type == GGUFValueType.STRING:
            return out + b"".join(encode_string(v) for v in value)
        return out + np.asarray(value, dtype=np.dtype(SCALAR_FORMATS[sub_type])).tobytes()
    return out + struct.pack(SCALAR_FORMATS[vtype], value)


# ------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _DeclaredTensor:
    name: str
    ne: tuple[int, ...]  # ggml order
    ggml_type: GGMLQuantizationType
    nbytes: int


class GGUFStreamWriter:
    """Write a GGUF to an open file descriptor in phases.

    1. ``add_kv`` / ``add_kv_raw`` and ``add_tensor`` (infos only) in any order;
    2. ``write_header()``: header, key/values, tensor infos, padding;
    3. the data of each declared tensor, in declaration order, through
       ``copy_from`` / ``write_array`` / ``write_zeros`` (any number of calls per
       tensor), closed by ``end_tensor()``;
    4. ``finish()`` checks every declared byte was written.

    Calls out of order raise; a tensor that gets more or fewer bytes than declared raises.
    """

    def __init__(self, fd: int, alignment: int = 32):
        self.fd = fd
        self.alignment = alignment
        self.kv: list[bytes] = []  # each: encoded key + encoded value
        self.infos: list[_DeclaredTensor] = []
        self.pos = 0
        self.phase = "declare"
        self._current = 0  # index of the tensor being written
        self._written = 0  # bytes of it written so far
        self._kernel_copy = hasattr(os, "copy_file_range")

    # --- phase 1
    def add_kv_raw(self, key: str, raw_value: bytes) -> None:
        self._expect("declare")
        self.kv.append(encode_string(key) + raw_value)

    def add_kv(self, key: str, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> None:
        self.add_kv_raw(key, encode_value(value, vtype, sub_type))

    def add_tensor(self, name: str, ne: Sequence[int], ggml_type: GGMLQuantizationType, nbytes: int) -> None:
        self._expect("declare")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        n = int(np.prod(ne, dtype=np.int64))
        if n * type_size // block != nbytes:
            raise ValueError(f"tensor {name!r}: ne {tuple(ne)} of {ggml_type.name} is {n * type_size // block} "
                             f"bytes, not {nbytes}")
        self.infos.append(_DeclaredTensor(name, tuple(int(x) for x in ne), ggml_type, int(nbytes)))

    # --- phase 2
    def write_header(self) -> None:
        self._expect("declare")
        head = bytearray(struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self.infos), len(self.kv)))
        for kv in self.kv:
            head += kv
        offset = 0
        for t in self.infos:
            head += encode_string(t.name)
            head += struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}Q", *t.ne)
            head += struct.pack("<IQ", int(t.ggml_type), offset)
            offset += pad_to(t.nbytes, self.alignment)
        head += bytes(pad_to(len(head), self.alignment) - len(head))
        self._write(bytes(head))
        self.phase = "data"

    # --- phase 3
    @property
    def current(self) -> str:
        return self.infos[self._current].name

    def write_bytes(self, data) -> None:
        self._expect("data")
        n = memoryview(data).nbytes
        self._account(n)
        self._write(data)

    def write_array(self, arr: np.ndarray) -> None:
        self.write_bytes(memoryview(np.ascontiguousarray(arr)).cast("B"))

    def write_zeros(self, n: int) -> None:
        self._expect("data")
        self._account(n)
        block = bytes(min(n, CHUNK_BYTES))
        while n > 0:
            k = min(n, len(block))
            self._write(block[:k])
            n -= k

    def copy_from(self, src_fd: int, offset: int, n: int) -> None:
        """Copy ``n`` bytes at ``offset`` of ``src_fd`` into the current tensor, kernel to kernel
        (``copy_file_range``; plain reads and writes where the filesystem cannot)."""
        self._expect("data")
        self._account(n)
        done = 0
        while done < n:
            k = 0
            if self._kernel_copy:
                os.lseek(self.fd, self.pos, os.SEEK_SET)
                try:
                    k = os.copy_file_range(src_fd, self.fd, min(n - done, 1 << 30), offset + done)
                    self.pos += k
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self._kernel_copy = False
                    continue
            else:
                data = os.pread(src_fd, min(n - done, CHUNK_BYTES), offset + done)
                self._write(data)
                k = len(data)
            if k == 0:
                raise GGUFFormatError(f"input ended while copying tensor {self.current!r}")
            done += k

    def end_tensor(self) -> None:
        self._expect("data")
        t = self.infos[self._current]
        if self._written != t.nbytes:
            raise ValueError(f"tensor {t.name!r}: wrote {self._written} bytes, declared {t.nbytes}")
        self._write(bytes(pad_to(t.nbytes, self.alignment) - t.nbytes))
        self._current += 1
        self._written = 0
        if self._current == len(self.infos):
            self.phase = "done"

    # --- phase 4
    def finish(self) -> int:
        if self.infos and self.phase != "done":
            raise ValueError(f"only {self._current} of {len(self.infos)} tensors were written")
        if not self.infos and self.phase == "declare":
            self.write_header()
        self.phase = "closed"
        return self.pos

    # --- helpers
    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise ValueError(f"GGUF writer: expected phase {phase!r}, in {self.phase!r}")

    def _account(self, n: int) -> None:
        if self._current >= len(self.infos):
            raise ValueError("GGUF writer: data written after the last declared tensor")
        t = self.infos[self._current]
        if self._written + n > t.nbytes:
            raise ValueError(f"tensor {t.name!r}: {self._written + n} bytes written, declared {t.nbytes}")
        self._written += n

    def _write(self, data) -> None:
        mv = memoryview(data).cast("B")
        os.lseek(self.fd, self.pos, os.SEEK_SET)
        while mv.nbytes:
            k = os.write(self.fd, mv)
            mv = mv[k:]
            self.pos += k
