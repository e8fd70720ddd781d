"""One base for every error gguf-prune raises on purpose: a message that says what is wrong and what to do.

The CLI turns these, and ``OSError`` (a full disk, a read-only or forbidden path), into one line and exit code 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class GgufPruneError(Exception):
    """An error with a message for the user (bad input, a missing tool, a failed stage)."""


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space or write the output somewhere else",
    errno.EDQUOT: "disk quota exceeded; free some space or write the output somewhere else",
    errno.EACCES: "permission denied; check the file's permissions or write the output somewhere else",
    errno.EPERM: "operation not permitted; check the file's permissions or write the output somewhere else",
    errno.EROFS: "the file system is read-only; write the output somewhere else",
    errno.ENOENT: "no such file or directory; check the path",
    errno.EISDIR: "is a directory; give a file path",
    errno.ENOTDIR: "a part of the path is not a directory; check the path",
}


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the file it concerns and what to do."""
    what = _OS_ADVICE.get(e.errno, e.strerror or str(e))
    name = e.filename if e.filename is not None else None
    if name is None:
        return f"{what}" if e.errno in _OS_ADVICE else str(e)
    return f"{name}: {what}"
