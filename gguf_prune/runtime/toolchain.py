"""Find or build the one pinned llama.cpp that every stage uses.

The llama.cpp tree comes from the llama-cpp-python source distribution on
PyPI (pinned below). From that one tree we build, once, the shared libraries
that the Python bindings load, and the tools the pipeline runs
(llama-quantize, llama-perplexity, llama-bench, llama-imatrix, llama-server
with its web UI embedded, llama-cli). The same tree's convert_hf_to_gguf.py
and gguf-py are what the pipeline converts with.

Two builds of that tree, each in a cache directory outside git, keyed by
version and build flags (a second run finds the stamp and returns in seconds):

- the *native* build (``build/``, llama.cpp's default ``GGML_NATIVE``: tuned to
  this machine's CPU): the bindings and every tool that measures (llama-bench,
  llama-perplexity) or transforms (llama-quantize, llama-imatrix);
- the *portable* server (``build-portable/``), the one ``package`` ships, built
  the way llama.cpp's releases are: ``GGML_NATIVE=OFF``, ``GGML_BACKEND_DL=ON``,
  ``GGML_CPU_ALL_VARIANTS=ON``, so the CPU backend exists once per x86-64 level
  (``libggml-cpu-<level>.so``) and ggml loads the best one the running CPU has.
  Its 14 x86-64 variants cost about 27 CPU-minutes (13 min on 2 idle cores, more
  than the native build), which would take set-up past 20 minutes, so it is built
  once, the first time ``package`` needs it (with a progress line every 10%).

This module holds the pins, the paths of both builds, ``find`` and the native
build; portable_build.py builds the portable server and toolchain_setup.py is
the command line (``python -m gguf_prune.runtime.toolchain setup|path|portable``)
with the Python side of set-up. All three import only the standard library so
that set-up can run them before anything else is installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf_prune.data import cache_root
from gguf_prune.errors import GgufPruneError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"

# Tools the pipeline runs, plus the libraries the bindings load.
TOOL_TARGETS = (
    "llama-quantize",
    "llama-perplexity",
    "llama-bench",
    "llama-imatrix",
    "llama-server",
    "llama-cli",
)
LIB_TARGETS = ("llama", "mtmd")

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    # The web UI is built from source with npm (tools/ui); the prebuilt-UI
    # download is not reachable from the machines this runs on.
    "-DLLAMA_BUILD_UI=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_IS_DEV=OFF",
)


# The server ``package`` ships runs on any x86-64 CPU: no -march=native anywhere, the CPU
# backend built once per x86-64 level and chosen at run time (as llama.cpp's releases do).
# CPU only: a shipped file carries no CUDA. Only llama-server is built (its dependencies
# include every CPU variant: ggml depends on each backend module).
PORTABLE_FLAGS = CMAKE_FLAGS + (
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DGGML_CUDA=OFF",
)
PORTABLE_TARGETS = ("llama-server",)


class ToolchainError(GgufPruneError, RuntimeError):
    """The pinned llama.cpp is missing, incomplete or cannot be built."""


def _extra_cmake_flags() -> tuple[str, ...]:
    """CUDA when the build machine has nvcc and a GPU (GGUF_PRUNE_CUDA=0 turns it off)."""
    if os.environ.get("GGUF_PRUNE_CUDA", "auto") == "0":
        return ()
    if shutil.which("nvcc") and shutil.which("nvidia-smi"):
        if subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
            return ("-DGGML_CUDA=ON",)
    return ()


def build_key(flags: tuple[str, ...], targets: tuple[str, ...] = TOOL_TARGETS + LIB_TARGETS) -> str:
    h = hashlib.sha256("\n".join(flags + targets).encode()).hexdigest()
    return h[:10]


PORTABLE_KEY = build_key(PORTABLE_FLAGS, PORTABLE_TARGETS)


@dataclass(frozen=True)
class Toolchain:
    """Paths of one built llama.cpp (all derived from ``root``)."""

    root: Path  # cache dir for this version
    key: str  # build-flags key

    @property
    def sdist(self) -> Path:
        return self.root / SDIST_NAME

    @property
    def source(self) -> Path:  # the unpacked llama-cpp-python sdist
        return self.root / "src"

    @property
    def llama_cpp_dir(self) -> Path:
        return self.source / "vendor" / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def bin_dir(self) -> Path:
        return self.build_dir / "bin"

    @property
    def stamp(self) -> Path:
        return self.build_dir / "gguf-prune-build.json"

    @property
    def convert_script(self) -> Path:
        return self.llama_cpp_dir / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.llama_cpp_dir / "gguf-py"

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.exists():
            raise ToolchainError(
                f"{name} not found at {path}: the llama.cpp build is incomplete; "
                "run scripts/setup.sh (or `python -m gguf_prune.runtime.toolchain setup`)"
            )
        return path

    def libraries(self) -> list[Path]:
        """The shared libraries the bindings need (symlinks included, as the build made them)."""
        names = ("libllama.so", "libggml", "libmtmd.so")
        return sorted(p for p in self.bin_dir.glob("lib*.so*") if p.name.startswith(names))

    def info(self) -> dict:
        if self.stamp.exists():
            return json.loads(self.stamp.read_text())
        return {}

    # the portable server (see PORTABLE_FLAGS)

    @property
    def portable_build_dir(self) -> Path:
        return self.root / "build-portable"

    @property
    def portable_bin_dir(self) -> Path:
        return self.portable_build_dir / "bin"

    @property
    def portable_stamp(self) -> Path:
        return self.portable_build_dir / "gguf-prune-build.json"

    def portable_info(self) -> dict:
        if self.portable_stamp.exists():
            return json.loads(self.portable_stamp.read_text())
        return {}

    def portable_ready(self) -> bool:
        """The portable server is built with today's flags and nothing it needs is missing."""
        info = self.portable_info()
        return (info.get("key") == PORTABLE_KEY and (self.portable_bin_dir / "llama-server").exists()
                and bool(info.get("cpu_variants"))
                and all((self.portable_bin_dir / f"libggml-cpu-{v}.so").exists() for v in info["cpu_variants"]))

    def cpu_variants(self) -> list[Path]:
        """The portable build's CPU backends, one per x86-64 level (``libggml-cpu-<level>.so``)."""
        return sorted(self.portable_bin_dir.glob("libggml-cpu-*.so"))


def default_toolchain() -> Toolchain:
    flags = CMAKE_FLAGS + _extra_cmake_flags()
    return Toolchain(root=cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}", key=build_key(flags))


def find() -> Toolchain:
    """The built toolchain, or a ToolchainError saying how to build it.

    A build made with other flags (say, before a GPU appeared) is still used;
    ``setup`` rebuilds it in place.
    """
    tc = default_toolchain()
    if tc.stamp.exists():
        return Toolchain(root=tc.root, key=tc.info().get("key", tc.key))
    raise ToolchainError(
        f"the pinned llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) is not built "
        f"under {tc.root}; run scripts/setup.sh from the gguf-prune checkout"
    )


# --------------------------------------------------------------------------- build


def run_logged(cmd: list[str], log_file: Path, cwd: Path | None = None, env: dict | None = None,
         progress: Callable[[str], None] | None = None) -> None:
    """Run ``cmd`` with its output appended to ``log_file``; ``progress`` sees each output line."""
    log.info("$ %s", " ".join(map(str, cmd)))
    with open(log_file, "ab") as f:
        f.write(("\n$ " + " ".join(map(str, cmd)) + "\n").encode())
        f.flush()
        if progress is None:
            returncode = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        else:
            with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
                for line in proc.stdout:
                    f.write(line)
                    progress(line.decode(errors="replace"))
            returncode = proc.returncode
    if returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-40:]
        raise ToolchainError(
            f"command failed ({returncode}): {' '.join(map(str, cmd))}\n"
            f"full log: {log_file}\n" + "\n".join(tail)
        )


def check_build_tools() -> None:
    """Raise one error naming every build tool that is missing and how to get it."""
    missing = []
    if not shutil.which("cmake"):
        missing.append("cmake >= 3.21 (Debian: apt-get install cmake; or pip install cmake)")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C/C++ compiler (Debian: apt-get install build-essential)")
    if not (shutil.which("make") or shutil.which("ninja")):
        missing.append("make or ninja (Debian: apt-get install make)")
    if not shutil.which("npm") or not shutil.which("node"):
        missing.append(
            "Node.js and npm, which build llama-server's web UI (Debian: apt-get install nodejs npm)"
        )
    if missing:
        raise ToolchainError("cannot build llama.cpp; missing:\n  - " + "\n  - ".join(missing))


def fetch_sdist(tc: Toolchain, python: str = sys.executable) -> None:
    """Download the pinned llama-cpp-python sdist (once) and unpack it."""
    tc.root.mkdir(parents=True, exist_ok=True)
    if not tc.sdist.exists():
        with tempfile.TemporaryDirectory(dir=tc.root) as tmp:
            cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
            log.info("downloading the llama-cpp-python %s source distribution", LLAMA_CPP_PYTHON_VERSION)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ToolchainError(
                    f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} from PyPI:\n"
                    + proc.stderr[-2000:]
                )
            os.replace(Path(tmp) / SDIST_NAME, tc.sdist)
    if not (tc.llama_cpp_dir / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory(dir=tc.root) as tmp:
            with tarfile.open(tc.sdist) as tar:
                tar.extractall(tmp, filter="tar")
            top = next(Path(tmp).iterdir())
            if tc.source.exists():
                shutil.rmtree(tc.source)
            os.replace(top, tc.source)


def source_commit(tc: Toolchain) -> str:
    proc = subprocess.run(["git", "-C", str(tc.llama_cpp_dir), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def build(tc: Toolchain | None = None, jobs: int | None = None) -> Toolchain:
    """Build the pinned llama.cpp once; return at once when the stamp is there."""
    tc = tc or default_toolchain()
    if (tc.stamp.exists() and tc.info().get("key") == tc.key
            and all((tc.bin_dir / t).exists() for t in TOOL_TARGETS)):
        log.info("llama.cpp %s already built in %s", tc.info().get("commit", "")[:10], tc.build_dir)
        return tc
    check_build_tools()
    fetch_sdist(tc)
    flags = CMAKE_FLAGS + _extra_cmake_flags()
    jobs = jobs or os.cpu_count() or 2
    tc.build_dir.mkdir(parents=True, exist_ok=True)
    log_file = tc.build_dir / "build.log"
    t0 = time.time()
    log.info("building llama.cpp from %s (a few minutes per target on 2 cores; log: %s)",
             tc.llama_cpp_dir, log_file)
    run_logged(["cmake", "-S", str(tc.llama_cpp_dir), "-B", str(tc.build_dir), *flags], log_file)
    targets = [*LIB_TARGETS, *TOOL_TARGETS]
    run_logged(["cmake", "--build", str(tc.build_dir), "-j", str(jobs), "--target", *targets], log_file)
    missing = [t for t in TOOL_TARGETS if not (tc.bin_dir / t).exists()]
    if missing:
        raise ToolchainError(f"llama.cpp build finished without {missing}; see {log_file}")
    stamp = {
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "commit": source_commit(tc),
        "key": tc.key,
        "flags": list(flags),
        "targets": targets,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.time() - t0, 1),
        "machine": platform.machine(),
    }
    write_stamp(tc.stamp, stamp)
    log.info("llama.cpp built in %.0f s", stamp["build_seconds"])
    return tc


def write_stamp(path: Path, stamp: dict) -> None:
    """A build's stamp (what was built, from which commit, with which flags), written whole or not at all."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True))
    os.replace(tmp, path)


class BuildProgress:
    """Turns the build's ``[ 42%]`` lines into a log line every 10%, with the elapsed time."""

    def __init__(self, what: str):
        self.what, self.t0, self.shown = what, time.time(), 0

    def __call__(self, line: str) -> None:
        m = re.match(r"\[\s*(\d+)%\]", line)
        if m and int(m.group(1)) >= self.shown + 10:
            self.shown = int(m.group(1)) // 10 * 10
            log.info("%s: %d%% (%.0f min)", self.what, self.shown, (time.time() - self.t0) / 60)


if __name__ == "__main__":
    # `python -m gguf_prune.runtime.toolchain setup|path|portable` (scripts/setup.sh, scripts/test.sh). The
    # command line lives in toolchain_setup, which imports this module by its name: everything then runs in
    # that one copy, so the ToolchainError the command line catches is the one the builders raise.
    from gguf_prune.runtime.toolchain_setup import main

    sys.exit(main())
