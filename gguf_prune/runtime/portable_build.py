"""Build the portable llama-server that ``package`` ships, once (see ``PORTABLE_FLAGS`` in toolchain.py).

Built the way llama.cpp's releases are: no -march=native anywhere and the CPU backend once per x86-64 level
(``libggml-cpu-<level>.so``), the best one loaded at run time, so a package runs on any x86-64 CPU. Its 14
CPU variants cost about 27 CPU-minutes, so it is built the first time ``package`` needs it (or by
``python -m gguf_prune.runtime.toolchain portable``), not at set-up, with a progress line every 10%.

Like toolchain.py, this imports only the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from gguf_prune.runtime.toolchain import (LLAMA_CPP_PYTHON_VERSION, PORTABLE_FLAGS, PORTABLE_KEY, PORTABLE_TARGETS,
                                          BuildProgress, Toolchain, ToolchainError, check_build_tools, fetch_sdist,
                                          find, run_logged, source_commit, write_stamp)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _locked(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (two ``package`` runs at once build once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s", waiting)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_portable(tc: Toolchain | None = None, jobs: int | None = None) -> Toolchain:
    """Build the portable llama-server once (see PORTABLE_FLAGS); return at once when it is there.

    Needs the native build's source tree; reuses its web UI (the npm output), so npm does
    not run again.
    """
    tc = tc or find()
    if tc.portable_ready():
        return tc
    with _locked(tc.root / ".build-portable.lock",
                 f"waiting for another process that is building the portable llama-server in {tc.portable_build_dir}"):
        if tc.portable_ready():  # the other process built it while we waited
            return tc
        check_build_tools()
        fetch_sdist(tc)
        jobs = jobs or os.cpu_count() or 2
        _build(tc, jobs)
    return tc


def _build(tc: Toolchain, jobs: int) -> None:
    """Configure and build ``build-portable/`` (the native build's web UI copied in first), then stamp it."""
    out = tc.portable_build_dir
    out.mkdir(parents=True, exist_ok=True)
    tc.portable_stamp.unlink(missing_ok=True)
    ui_dist, own_dist = tc.build_dir / "tools" / "ui" / "dist", out / "tools" / "ui" / "dist"
    if (ui_dist / "index.html").exists() and not (own_dist / "index.html").exists():
        shutil.copytree(ui_dist, own_dist, dirs_exist_ok=True)  # copy2 keeps mtimes: npm sees it up to date
    log_file = out / "build.log"
    t0 = time.time()
    log.info("building the portable llama-server once, for packages that run on any %s CPU (every CPU "
             "variant: about 27 CPU-minutes, 13 min on 2 idle cores; log: %s)", platform.machine(), log_file)
    run_logged(["cmake", "-S", str(tc.llama_cpp_dir), "-B", str(out), *PORTABLE_FLAGS], log_file)
    run_logged(["cmake", "--build", str(out), "-j", str(jobs), "--target", *PORTABLE_TARGETS], log_file,
               progress=BuildProgress("portable llama-server"))
    variants = sorted(p.name[len("libggml-cpu-"):-len(".so")] for p in out.joinpath("bin").glob("libggml-cpu-*.so"))
    if not (tc.portable_bin_dir / "llama-server").exists() or not variants:
        raise ToolchainError(f"the portable llama-server build finished without llama-server or CPU "
                             f"variants in {tc.portable_bin_dir}; see {log_file}")
    stamp = {
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "commit": source_commit(tc),
        "key": PORTABLE_KEY,
        "flags": list(PORTABLE_FLAGS),
        "targets": list(PORTABLE_TARGETS),
        "cpu_variants": variants,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.time() - t0, 1),
        "jobs": jobs,
        "machine": platform.machine(),
    }
    write_stamp(tc.portable_stamp, stamp)
    log.info("portable llama-server built in %.0f s with %d CPU variants: %s",
             stamp["build_seconds"], len(variants), ", ".join(variants))
