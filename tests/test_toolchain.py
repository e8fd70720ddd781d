"""The pinned toolchain is there, complete, and set-up is idempotent."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_prune.runtime import llamacpp
from gguf_prune.runtime import portable_build, toolchain
from gguf_prune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_pinned_build_is_complete():
    tc = toolchain.find()
    info = tc.info()
    assert info["llama_cpp_python"] == toolchain.LLAMA_CPP_PYTHON_VERSION
    for name in toolchain.TOOL_TARGETS:
        assert os.access(tc.tool(name), os.X_OK), name
    assert tc.convert_script.exists()
    assert (tc.bin_dir / "libllama.so").exists()


def test_bindings_load_the_pinned_library():
    import llama_cpp

    tc = toolchain.find()
    lib = Path(llama_cpp.llama_cpp._base_path) / "libllama.so"
    assert lib.read_bytes() == (tc.bin_dir / "libllama.so").read_bytes()


def test_tools_run_and_report_the_same_build():
    proc = subprocess.run([str(toolchain.find().tool("llama-quantize")), "--help"],
                          capture_output=True, text=True)
    assert "usage" in (proc.stdout + proc.stderr).lower()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_serves_the_embedded_web_ui(tiny_tied, tmp_path):
    # llama-server built with LLAMA_BUILD_UI=ON serves its web UI from the binary, no files on disk.
    gguf_path = llamacpp.convert_hf_to_gguf(tiny_tied, tmp_path / "tiny-f16.gguf", outtype="f16")
    port = _free_port()
    server = subprocess.Popen([str(toolchain.find().tool("llama-server")), "-m", str(gguf_path),
                               "--host", "127.0.0.1", "--port", str(port), "-c", "256", "-t", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert server.poll() is None, server.stderr.read().decode(errors="replace")[-2000:]
            assert time.time() < deadline, "llama-server did not become healthy"
            time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            if r.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
        assert b"<!doctype html>" in body.lower()[:200] or b"<html" in body.lower()
        assert b"<script" in body.lower()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_help_lists_doctor():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "doctor" in result.output


def test_doctor_passes_after_setup():
    proc = subprocess.run([sys.executable, "-m", "gguf_prune.cli", "doctor"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert toolchain.LLAMA_CPP_PYTHON_VERSION in proc.stdout
    assert "llama-server" in proc.stdout


def test_doctor_names_what_is_missing(tmp_path):
    env = dict(os.environ, GGUF_PRUNE_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "-m", "gguf_prune.cli", "doctor"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 1
    assert "is not built" in proc.stdout and "scripts/setup.sh" in proc.stdout
    assert "demo model" in proc.stderr


def test_second_setup_builds_nothing():
    tc = toolchain.find()
    stamp_before = tc.stamp.read_text()
    log_size = (tc.build_dir / "build.log").stat().st_size if (tc.build_dir / "build.log").exists() else 0
    proc = subprocess.run([sys.executable, "-m", "gguf_prune.runtime.toolchain", "setup", "--python", sys.executable],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "already built" in proc.stderr
    assert tc.stamp.read_text() == stamp_before
    after = (tc.build_dir / "build.log").stat().st_size if (tc.build_dir / "build.log").exists() else 0
    assert after == log_size
    assert json.loads(stamp_before)["key"] == tc.key


# ------------------------------------------------------------------ the portable server

def _instructions(path: Path) -> str:
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_portable_server_carries_one_cpu_backend_per_x86_64_level():
    tc = portable_build.build_portable()  # built once, the first time it is needed (here or by `package`)
    info = tc.portable_info()
    assert info["key"] == toolchain.PORTABLE_KEY
    for flag in ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"):
        assert flag in info["flags"]
    names = [p.name for p in tc.cpu_variants()]
    assert names == sorted(f"libggml-cpu-{v}.so" for v in info["cpu_variants"])
    # the x86-64 levels llama.cpp's releases carry, from no SIMD beyond SSE2 to AVX-512 and AMX
    assert {"x64", "sse42", "sandybridge", "haswell", "skylakex", "icelake", "zen4", "alderlake",
            "sapphirerapids"} <= set(info["cpu_variants"])
    assert not (tc.portable_bin_dir / "libggml-cpu.so").exists()  # no one-CPU backend beside them
    # a second call builds nothing
    log_size = (tc.portable_build_dir / "build.log").stat().st_size
    stamp = tc.portable_stamp.read_text()
    portable_build.build_portable()
    assert (tc.portable_build_dir / "build.log").stat().st_size == log_size and tc.portable_stamp.read_text() == stamp


def test_portable_code_outside_the_cpu_variants_uses_no_avx():
    # everything a CPU without AVX always loads (server, llama, ggml, the baseline variants) has no
    # AVX register in it; the native build's CPU backend (the control) is full of the AVX registers this
    # machine's CPU has (zmm with AVX-512, ymm with AVX/AVX2 only, as on the AMD EPYC CI machines)
    tc = portable_build.build_portable()
    always = [tc.portable_bin_dir / n for n in ("llama-server", "libllama.so", "libggml-base.so", "libggml.so",
                                                 "libllama-common.so", "libmtmd.so", "libggml-cpu-x64.so",
                                                 "libggml-cpu-sse42.so")]
    always += sorted(tc.portable_bin_dir.glob("libllama-server*.so"))
    for path in always:
        code = _instructions(path)
        assert "%ymm" not in code and "%zmm" not in code, f"{path.name} has AVX instructions"
    flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
    if not {"avx", "avx2", "avx512f"} & flags:
        pytest.skip("this CPU has no AVX: the native build is no control")
    native = _instructions(tc.bin_dir / "libggml-cpu.so")
    assert ("%zmm" if "avx512f" in flags else "%ymm") in native


def test_doctor_says_which_build_is_which_and_lists_the_cpu_variants():
    tc = portable_build.build_portable()
    proc = subprocess.run([sys.executable, "-m", "gguf_prune.cli", "doctor"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {" ".join(line.split()[1:3]): line for line in proc.stdout.splitlines() if len(line.split()) > 2}
    assert "GGML_NATIVE" in lines["native build"] and "llama-bench" in lines["native build"]
    portable = lines["portable server"]
    assert "GGML_NATIVE=OFF, GGML_BACKEND_DL=ON, GGML_CPU_ALL_VARIANTS=ON" in portable
    variants = tc.portable_info()["cpu_variants"]
    assert portable.endswith(f"a package carries {len(variants)} CPU variants, the best loaded at run time: "
                             + ", ".join(variants))


def test_the_long_build_shows_a_progress_line_every_ten_percent(caplog):
    progress = toolchain.BuildProgress("portable llama-server")
    with caplog.at_level("INFO", logger="gguf_prune.runtime.toolchain"):
        for line in ["-- Configuring done", "[  3%] Building C object a.o", "[ 10%] Building C object b.o",
                     "[ 12%] Building C object c.o", "[ 35%] Linking CXX shared library x.so", "make: warning",
                     "[ 35%] Built target x", "[100%] Built target llama-server"]:
            progress(line + "\n")
    assert [r.getMessage() for r in caplog.records] == [
        "portable llama-server: 10% (0 min)", "portable llama-server: 30% (0 min)",
        "portable llama-server: 100% (0 min)"]
