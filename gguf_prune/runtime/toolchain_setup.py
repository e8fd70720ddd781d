"""Set-up: ``python -m gguf_prune.runtime.toolchain setup|path|portable`` and the Python side of the toolchain.

``setup`` builds the native llama.cpp (toolchain.py), installs the same tree's gguf-py and the llama-cpp-python
bindings into an interpreter's environment, and links the checkout's ``vendor/`` to the cache; ``portable``
builds the server packages ship (portable_build.py); ``path`` prints the build directory. scripts/setup.sh and
scripts/test.sh run it before anything else is installed, so this imports only the standard library.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gguf_prune.runtime.portable_build import build_portable
from gguf_prune.runtime.toolchain import (LLAMA_CPP_PYTHON_VERSION, Toolchain, ToolchainError, build, find,
                                          run_logged)


def install_python_packages(tc: Toolchain, python: str = sys.executable) -> None:
    """Install the tree's gguf-py and the llama-cpp-python bindings into ``python``'s env.

    The bindings are installed from the same sdist with LLAMA_BUILD=OFF (no second
    compile) and the libraries of our build are copied into ``llama_cpp/lib``, so
    ``import llama_cpp`` loads the pinned llama.cpp in every process without
    environment variables.
    """
    def installed(dist: str, version: str | None) -> bool:
        code = ("import importlib.metadata as m, sys; v = m.version(sys.argv[1]); "
                "sys.exit(0 if (sys.argv[2] == '' or v == sys.argv[2]) else 1)")
        return subprocess.run([python, "-c", code, dist, version or ""], capture_output=True).returncode == 0

    log_file = tc.build_dir / "pip.log"
    gguf_version = _read_gguf_version(tc)
    if not installed("gguf", gguf_version):
        run_logged([python, "-m", "pip", "install", "--no-deps", str(tc.gguf_py)], log_file)
    if not installed("llama_cpp_python", LLAMA_CPP_PYTHON_VERSION):
        env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
        run_logged([python, "-m", "pip", "install", "--no-deps", str(tc.sdist)], log_file, env=env)
    proc = subprocess.run(
        [python, "-c", "import importlib.util, pathlib; "
         "print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent)"],
        capture_output=True, text=True, check=True)
    _copy_libraries(tc, Path(proc.stdout.strip()) / "lib")


def _copy_libraries(tc: Toolchain, lib_dir: Path) -> None:
    """The pinned build's shared libraries into the bindings' ``lib/`` (symlinks as symlinks; a copy only
    where the one there differs or is older)."""
    lib_dir.mkdir(exist_ok=True)
    for lib in tc.libraries():
        dst = lib_dir / lib.name
        if lib.is_symlink():
            if not (dst.is_symlink() and os.readlink(dst) == os.readlink(lib)):
                dst.unlink(missing_ok=True)
                dst.symlink_to(os.readlink(lib))
        elif dst.is_symlink() or not dst.exists() or dst.stat().st_size != lib.stat().st_size or \
                dst.stat().st_mtime < lib.stat().st_mtime:
            dst.unlink(missing_ok=True)
            shutil.copy2(lib, dst)


def _read_gguf_version(tc: Toolchain) -> str | None:
    text = (tc.gguf_py / "pyproject.toml").read_text()
    for line in text.splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def link_vendor(tc: Toolchain, repo: Path) -> None:
    """Point the checkout's ignored ``vendor/llama.cpp`` and ``vendor/bin`` at the cache."""
    vendor = repo / "vendor"
    vendor.mkdir(exist_ok=True)
    for name, target in (("llama.cpp", tc.llama_cpp_dir), ("bin", tc.bin_dir)):
        link = vendor / name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            if link.is_symlink():
                link.unlink()
            else:
                continue  # a real directory put there by the user: leave it alone
        link.symlink_to(target)


def main(argv: list[str] | None = None) -> int:
    """The command line (prints the path asked for; errors go to stderr as one line and exit status 1)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gguf_prune.runtime.toolchain")
    parser.add_argument("command", choices=["setup", "path", "portable"],
                        help="setup: the native build and the Python side; path: print the build directory; "
                             "portable: build the portable llama-server that `package` ships now "
                             "(otherwise the first `package` builds it)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose environment gets gguf-py and the bindings")
    parser.add_argument("--repo", type=Path, default=None, help="checkout to link vendor/ into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[toolchain] %(message)s")
    try:
        if args.command == "path":
            print(find().build_dir)
            return 0
        if args.command == "portable":
            tc = build_portable(find())
            print(tc.portable_bin_dir)
            return 0
        tc = build()
        install_python_packages(tc, args.python)
        if args.repo:
            link_vendor(tc, args.repo)
    except ToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
