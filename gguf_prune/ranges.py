"""Layer index ranges: compact text for index lists, and the protected layers at either end of the stack."""

from __future__ import annotations

from typing import Iterable


def ranges(indices: Iterable[int]) -> str:
    """Compact text for index lists in tables: 0-3,7,9-11."""
    xs = sorted(indices)
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}" if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def protected_layers(n_layer: int, first: int, last: int) -> set[int]:
    """The layers no cut removes: the first ``first`` and the last ``last`` of ``n_layer`` (they may overlap)."""
    return set(range(min(first, n_layer))) | set(range(max(0, n_layer - last), n_layer))
