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

from click.testing import CliRunner

from gguf_prune import llamacpp, toolchain
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
    proc = subprocess.run([sys.executable, "-m", "gguf_prune.toolchain", "setup", "--python", sys.executable],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "already built" in proc.stderr
    assert tc.stamp.read_text() == stamp_before
    after = (tc.build_dir / "build.log").stat().st_size if (tc.build_dir / "build.log").exists() else 0
    assert after == log_size
    assert json.loads(stamp_before)["key"] == tc.key
