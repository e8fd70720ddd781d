"""Atomic outputs: every file gguf-prune writes appears whole under its final name, or not at all.

Each helper writes through a temporary file next to the target (same directory, so the rename cannot cross
a file system), then renames it into place; whatever ends the write early removes the temporary file. A
failed write is an ``OSError`` that names the target, so the CLI's one line says which file could not be
written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from gguf_prune.errors import GgufPruneError


class OutOfSpaceError(GgufPruneError, OSError):
    """The output disk filled up; the partial output was removed."""


def fsync_path(path: Path) -> None:
    """Flush a file that another program wrote to disk (before renaming it into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_file_mode() -> int:
    """0666 less the process umask: the mode ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(out: Path, fsync: bool = True) -> Iterator[int]:
    """Yield a file descriptor of a temporary file next to ``out``; rename it to ``out``
    when the block completes (after fsync, so a crash cannot leave a half-written file
    under the final name), remove it when the block raises. A full disk becomes
    OutOfSpaceError naming the path. ``fsync=False`` for intermediates that are read
    back at once and deleted."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        try:
            os.fchmod(fd, default_file_mode())  # mkstemp makes 0600; a model file is as readable as any other
            yield fd
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            err = OutOfSpaceError(f"no space left on the device of {out.parent} while writing {out.name}; "
                                  "free some space or write elsewhere; the partial file was removed")
            err.errno = e.errno
            raise err from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, then rename."""
    with _atomic_path(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def save_tensors_atomic(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """A safetensors file written through a temporary name in the same directory, then renamed."""
    from safetensors.torch import save_file

    with _atomic_path(Path(path)) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(metadata))


def save_torch_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary name in the same directory, then renamed. torch turns a failed write
    into a RuntimeError that has lost the OS error ("unexpected pos ..."); the writes go through a file object
    here, which keeps it, so a full disk is the OSError it is."""
    import torch

    class _Writer:
        def __init__(self, f):
            self.f, self.error = f, None

        def write(self, b) -> int:
            try:
                return self.f.write(b)
            except OSError as e:
                self.error = e
                raise

        def flush(self) -> None:
            self.f.flush()

    with _atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            w = _Writer(f)
            try:
                torch.save(obj, w)
            except RuntimeError:
                if w.error is not None:
                    raise w.error from None
                raise


def save_figure_atomic(fig, path: Path, **savefig_kwargs) -> Path:
    """A matplotlib figure saved through a temporary name in the same directory, then renamed (a PNG cut
    short by a full disk never lies under the final name). The figure is closed either way: pyplot keeps
    every open figure alive until it is."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with _atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    finally:
        plt.close(fig)
    return path


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[str]:
    """A temporary name next to ``path`` for the block to write; renamed to ``path`` when the block completes,
    removed whatever ends it otherwise. A failed write is an OSError that names ``path``, so that the CLI's one
    line says which file could not be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        yield tmp
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            if e.filename is None or e.filename == tmp:
                e.filename = str(path)
            raise
        m = re.search(r"\(os error (\d+)\)", str(e))  # safetensors reports I/O errors as SafetensorError
        if m:
            raise OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(path)) from None
        raise
