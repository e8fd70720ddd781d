"""Value checks shared by the hand-off files and the option dataclasses: is this a whole number, a finite
number, and how to name a bad value in an error message.

The checks refuse ``bool`` everywhere: JSON ``true`` / ``false`` (and Python's ``True``) are ints to
``isinstance`` but never a count or a fraction. ``numpy=True`` also takes numpy scalars: the planner computes
counts and fractions with numpy and passes them on; plan.json, scores.json and the pipeline's options only
ever hold Python numbers, and a numpy scalar there is refused as before.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np


def is_int(v: Any, *, numpy: bool = False) -> bool:
    """A whole number, not a bool; with ``numpy`` a numpy integer too."""
    return isinstance(v, (int, np.integer) if numpy else int) and not isinstance(v, bool)


def is_real(v: Any, *, numpy: bool = False) -> bool:
    """A finite number, not a bool; with ``numpy`` a numpy integer or float too."""
    if numpy:
        # np.isfinite, not math.isfinite: an int beyond float range raises TypeError here, as it always has
        return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                and bool(np.isfinite(v)))
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def show(v: Any) -> str:
    """A value as a message shows it: short, even for a long array."""
    text = json.dumps(v) if isinstance(v, (list, dict)) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def kind(v: Any) -> str:
    """What a JSON value is, for messages: ``missing or null``, ``an array [1, 2]``, ``a string '3'``."""
    if v is None:
        return "missing or null"
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                    (list, "an array"), (Mapping, "an object")):
        if isinstance(v, t):
            return f"{name} {show(v)}"
    return repr(v)


def python_kind(v: Any) -> str:
    """What a value is in Python's words, for scores.json messages: ``missing``, ``int 3``, ``list [1, 2]``.

    scores.json's messages have always named the Python type; :func:`kind` words the same facts for plan.json.
    Both stay, so that no existing message changes."""
    return "missing" if v is None else f"{type(v).__name__} {v!r}"[:60]
