"""What the GGUF reader and writer agree on: how scalar values are encoded, which tensor types can be
sliced row by row, alignment padding and the chunk size of streamed I/O.

Naming: ``ne`` is ggml order (ne0 = row length first); ``shape`` is numpy order.
"""

from __future__ import annotations

import struct

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

# Tensor types whose rows can be sliced element by element (and the numpy dtype of one element).
# BF16 is kept as raw 16-bit words: slicing never needs its value.
SLICEABLE_TYPES: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.BF16: np.dtype("<u2"),
}

CHUNK_BYTES = 16 << 20  # rows are read in chunks of about this size when a tensor is sliced

# struct format of each scalar value type (an array of them is these, back to back)
SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}
SCALAR_SIZES = {t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()}


def pad_to(n: int, align: int) -> int:
    return (n + align - 1) // align * align
