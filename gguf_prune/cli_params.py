"""The command line's plumbing: parameter types and the option helper (every value in its range, every default
from the stage's options dataclass), the command group that turns errors into one line, and the logging set-up.

Kept apart from cli.py, which holds the commands; only these two modules import click.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import click

from gguf_prune.errors import GgufPruneError, describe_os_error

class Finite(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which compare false with every bound, so pass it)."""

    def convert(self, value, param, ctx):
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number in the range {self._describe_range()}.", param, ctx)
        return super().convert(rv, param, ctx)


COUNT = click.IntRange(min=0)  # how many of something to remove or keep
POSITIVE = click.IntRange(min=1)  # sizes, steps, threads, chunks
SEQ_LEN = click.IntRange(min=2)  # next-token KL and loss need two tokens in a sequence
SEED = click.IntRange(min=0)  # numpy's generators take no negative seeds
FRACTION = Finite(0, 1, max_open=True)  # a fraction of something to remove: [0, 1)
OPEN_FRACTION = Finite(0, 1, min_open=True, max_open=True)  # a budget, a width level: (0, 1)
NONNEG = Finite(min=0)
PORT = click.IntRange(1, 65535)


class Align(click.ParamType):
    """A row-length multiple for kept FFN widths: a positive multiple of 32 (every quantized type's block along a
    row is 32 or 256 values), or 1 for no rounding (F16/BF16/F32 files only)."""

    name = "N"

    def convert(self, value, param, ctx):
        n = click.INT.convert(value, param, ctx)
        if n != 1 and (n < 32 or n % 32):
            self.fail(f"{n} is not a positive multiple of 32 (256 for k-quants; 1: no rounding, for F16/BF16/F32 "
                      "files only).", param, ctx)
        return n


class Names(click.ParamType):
    """A comma list of names from a fixed set; each bad item named, no item twice."""

    name = "LIST"

    def __init__(self, choices, example: str):
        self.choices, self.example = choices, example

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        known = tuple(self.choices)
        items = [x.strip() for x in str(value).split(",")]
        for x in items:
            if x not in known:
                self.fail(f"{x!r} is not one of {', '.join(known)} (give a comma list like {self.example}).",
                          param, ctx)
        dup = next((x for k, x in enumerate(items) if x in items[:k]), None)
        if dup is not None:
            self.fail(f"{dup!r} is given twice.", param, ctx)
        return tuple(items)


class Fractions(click.ParamType):
    """A comma list of fractions, each in (0, 1), none twice."""

    name = "LIST"

    def __init__(self, example: str):
        self.example = example

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        out = []
        for x in (x.strip() for x in str(value).split(",")):
            try:
                f = float(x)
            except ValueError:
                self.fail(f"{x!r} is not a number; give fractions like {self.example}.", param, ctx)
            if not 0 < f < 1:  # nan fails this too
                self.fail(f"{x} is not in the range 0<x<1; give fractions like {self.example}.", param, ctx)
            if f in out:
                self.fail(f"{x} is given twice.", param, ctx)
            out.append(f)
        return tuple(out)


class Depths(click.ParamType):
    """A comma list of context depths in tokens (whole numbers, 0 or more), none twice."""

    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        out = []
        for x in (x.strip() for x in str(value).split(",")):
            if not re.fullmatch(r"\d+", x):
                self.fail(f"{x!r} is not a whole number of tokens; give depths like 0,512.", param, ctx)
            if int(x) in out:
                self.fail(f"{x} is given twice.", param, ctx)
            out.append(int(x))
        return tuple(out)


class Layers(click.ParamType):
    """Layer indices and ranges, 3,5-8 (the model's own count is checked by the stage, which knows it)."""

    name = "LAYERS"

    def convert(self, value, param, ctx):
        for x in str(value).split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", x)
            if not m:
                self.fail(f"{x!r} is not a layer index or range; use indices and ranges like 3,5-8.", param, ctx)
            if m.group(2) is not None and int(m.group(2)) < int(m.group(1)):
                self.fail(f"{x!r} is a range that runs backwards; write it low-high, like 5-8.", param, ctx)
        return str(value)



def fields_of(cls, kw: dict) -> dict:
    """The entries of ``kw`` (a command's parsed flags) that are fields of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kw.items() if k in names}


def field_default(cls, name: str):
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise TypeError(f"{cls.__name__} has no field {name!r}")
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def option(cls, *decls: str, **kw):
    """A click option that sets the field of ``cls`` its name says: its default is the field's (one place).
    The field is the last declaration that is not a flag, else the first long flag (``--seq-len`` → seq_len)."""
    names = [d for d in decls if not d.startswith("-")]
    field = names[0] if names else next(d for d in decls if d.startswith("--")).split("/")[0][2:].replace("-", "_")
    default = field_default(cls, field)
    if isinstance(default, tuple):  # a comma list, shown and parsed as the user would type it
        default = ",".join(map(str, default)) or None
    kw["default"] = default
    if not kw.get("is_flag") and default is not None:
        kw.setdefault("show_default", True)
    return click.option(*decls, **kw)


def speed_options(cls):
    """--target-speedup, --speed-metric and --speed-depth of ``cls`` (PlanOptions, RunOptions), as one decorator."""
    from gguf_prune.costs import SPEED_METRICS

    def apply(f):
        for decorator in reversed((
            option(cls, "--target-speedup", type=Finite(min=1, min_open=True),
                   help="Cut until the cost file predicts this tokens/s over the base's (1.3: +30%), cheapest KL "
                        "per second saved first; with a parameter or size target the first one reached stops the "
                        "cut."),
            option(cls, "--speed-metric", type=click.Choice(SPEED_METRICS), help="tg: generation; pp: prompt "
                                                                                  "processing."),
            option(cls, "--speed-depth", type=click.IntRange(min=0),
                   help="Context depth (tokens in the KV cache) the speed is for; the cost file must have it."))):
            f = decorator(f)
        return f

    return apply


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


class Commands(click.Group):
    """Every command's errors in one place: gguf-prune's own (bad input, a failed stage) and the
    operating system's (a full disk, a read-only or forbidden path) become one line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GgufPruneError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(describe_os_error(e)) from None
