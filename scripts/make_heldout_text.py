"""Regenerate gguf_prune/data/heldout_stdlib_docs.txt, the default held-out evaluation text.

English prose from the docstrings of a fixed list of Python standard-library modules
(PSF licence), distinct from the calibration default (the language reference topics in
``pydoc_data``), so the default evaluation is on text the scoring never saw. The file is
committed so that numbers do not drift with the Python version; this script documents
where it came from.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

MODULES = [
    "collections", "itertools", "functools", "pathlib", "json", "re", "argparse", "logging", "subprocess",
    "threading", "datetime", "decimal", "fractions", "statistics", "random", "string", "textwrap",
    "unittest", "dataclasses", "enum", "heapq", "bisect", "csv", "sqlite3", "zipfile", "tarfile", "shutil",
    "tempfile", "difflib", "pprint", "contextlib", "abc", "copy", "queue", "sched", "socket", "ssl",
    "selectors", "http.client", "http.server", "urllib.request", "urllib.parse", "email.message",
    "xml.etree.ElementTree", "html.parser", "configparser", "gettext", "locale", "calendar", "timeit",
    "trace", "pdb", "doctest", "pickle", "shelve", "gzip", "bz2", "lzma", "hashlib", "hmac", "secrets",
    "uuid", "ipaddress", "mimetypes", "base64", "binascii", "struct", "codecs", "io", "os", "glob",
    "fnmatch", "filecmp", "zipapp", "venv", "ast", "dis", "tokenize", "inspect", "warnings", "weakref",
    "types", "operator", "numbers", "math", "cmath", "array", "graphlib", "asyncio.tasks", "asyncio.queues",
    "concurrent.futures", "multiprocessing.pool", "optparse", "getopt", "cmd", "shlex", "netrc",
    "plistlib", "wave", "colorsys", "turtle", "tkinter", "smtplib", "imaplib", "ftplib", "poplib",
]


def _clean(doc: str) -> str | None:
    doc = inspect.cleandoc(doc).strip()
    # keep prose: paragraphs with enough words, no doctest or code-heavy lines
    paras = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln for ln in para.splitlines() if not ln.lstrip().startswith((">>>", "...", "$"))]
        text = " ".join(ln.strip() for ln in lines)
        if len(text.split()) >= 8 and sum(c.isalpha() for c in text) > 0.6 * len(text):
            paras.append(text)
    return "\n\n".join(paras) if paras else None


def build(max_chars: int = 140_000) -> str:
    seen, out, total = set(), [], 0
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_")
                        and (inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", "") == name]
        for obj in objs:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            text = _clean(doc)
            if not text or text in seen:
                continue
            seen.add(text)
            out.append(text)
            total += len(text) + 2
            if total >= max_chars:
                return "\n\n".join(out) + "\n"
    return "\n\n".join(out) + "\n"


if __name__ == "__main__":
    dest = Path(__file__).resolve().parent.parent / "gguf_prune" / "data" / "heldout_stdlib_docs.txt"
    dest.write_text(build())
    print(f"wrote {dest} ({dest.stat().st_size} bytes) with Python {sys.version.split()[0]}", file=sys.stderr)
