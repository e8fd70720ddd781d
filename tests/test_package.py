"""The single executable: runs from an empty directory with a clean environment, serves the
OpenAI API and the web UI, carries its libraries, and keeps a safe per-user cache; no value
given to it (file names, flags, environment) ever runs as shell code; it binds where it says,
holds up under concurrent clients, and runs on a CPU without AVX (the portable build)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gguf_prune.runtime import llamacpp
from gguf_prune.runtime import portable_build, toolchain
from gguf_prune.runtime.package import GLIBC, PackageError, PackageOptions, build_package, describe, packed_options

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def packaged(tiny_tied, tmp_path_factory):
    d = tmp_path_factory.mktemp("pkg")
    model = llamacpp.convert_hf_to_gguf(tiny_tied, d / "tiny-f16.gguf", outtype="f16")
    exe = build_package(model, d / "tiny-chat", PackageOptions(threads=2, ctx=512))
    return exe, model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(home: Path) -> dict[str, str]:
    # no project venv, no Python, no llama.cpp build directory on PATH or in the library path
    return {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the server exited:\n" + proc.stdout.read().decode(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    raise AssertionError("the server never became healthy")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")


class Running:
    """A packaged executable serving on 127.0.0.1 at a free port."""

    def __init__(self, exe: Path, home: Path, cwd: Path, *args: str, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.proc = subprocess.Popen([str(exe), "--port", str(self.port), *args], cwd=cwd,
                                     env=env or _clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 180) -> None:
        _wait_healthy(self.proc, self.url, timeout)

    def stop(self) -> str:
        return _stop(self.proc)


def test_runs_from_an_empty_directory_with_a_clean_environment(packaged, tmp_path):
    exe, _ = packaged
    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    home.mkdir()
    srv = Running(exe, home, empty)
    try:
        srv.wait_healthy()
        body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(srv.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        assert reply["object"] == "chat.completion"
        assert reply["usage"]["completion_tokens"] > 0
        assert reply["model"] == "tiny-chat"
        assert len(_cpu_variants_mapped(srv.proc.pid)) == 1  # the launcher execs llama-server: same pid
    finally:
        log = srv.stop()
    assert "unpacking once into" in log
    assert list(empty.iterdir()) == []  # nothing written where it was started
    cache = list((home / ".cache" / "gguf-prune-app").iterdir())
    assert len(cache) == 1 and (cache[0] / "MANIFEST.sha256").exists()


def test_libraries_travel_inside_the_file(packaged, tmp_path):
    exe, _ = packaged
    home = tmp_path / "home"
    out = subprocess.run([str(exe), "--path-only"], env=_clean_env(home), capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    app = Path(out.stdout.strip())
    carried = [app / "bin" / "llama-server", *sorted((app / "bin").glob("libggml-cpu-*.so")),
               *sorted((app / "lib").iterdir())]
    assert len(carried) > 10
    for binary in carried:
        # as the launcher runs it: LD_LIBRARY_PATH is the package's lib/ and nothing else
        ldd = subprocess.run(["ldd", str(binary)], env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(app / "lib")},
                             capture_output=True, text=True, check=True).stdout
        for line in ldd.splitlines():
            name = line.split()[0]
            if "=>" not in line or name.startswith(GLIBC):
                continue
            assert "not found" not in line, line
            resolved = Path(line.split("=>")[1].split("(")[0].strip()).resolve()
            assert resolved.parent == (app / "lib").resolve(), f"{binary.name}: {name} resolves elsewhere: {line}"
        dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
        paths = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", dynamic)
        assert all(p in ("$ORIGIN", "$ORIGIN/../lib") for p in paths), (binary.name, paths)


def test_a_library_in_the_current_directory_is_never_loaded(packaged, tmp_path):
    # the build tree's RUNPATH ends in an empty element, which the loader reads as the current
    # directory; the packaged copies have $ORIGIN paths only
    exe, _ = packaged
    for name in ("libm.so.6", "libc.so.6", "libgomp.so.1", "libllama.so.0"):
        (tmp_path / name).write_bytes(b"planted, not a library")
    tc = toolchain.find()
    built = subprocess.run([str(tc.portable_bin_dir / "llama-server"), "--version"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert built.returncode == 127 and ".so.6: file too short" in built.stderr  # the control: it loads ./libc.so.6
    out = subprocess.run([str(exe), "--help-server"], env=_clean_env(tmp_path / "home"), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--ctx-size" in out.stdout


def test_set_runpath_rewrites_in_place_and_refuses_what_does_not_fit(tmp_path):
    from gguf_prune.runtime.package import set_runpath

    server = portable_build.build_portable().portable_bin_dir / "llama-server"
    before = server.read_bytes()
    after = set_runpath(before, "$ORIGIN/../lib")
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    old = re.search(rb"[^\0]*build-portable/bin:?\0", before)
    assert changed and old.start() <= changed[0] and changed[-1] < old.end()  # only the old string's bytes
    (tmp_path / "s").write_bytes(after)
    dynamic = subprocess.run(["readelf", "-d", str(tmp_path / "s")], capture_output=True, text=True, check=True).stdout
    assert "Library runpath: [$ORIGIN/../lib]" in dynamic
    with pytest.raises(PackageError) as e:
        set_runpath(before, "/" + "x" * 300)
    assert str(e.value).startswith("RUNPATH '/xxx") and "is longer than the one it replaces" in str(e.value)
    with pytest.raises(PackageError, match="^not a 64-bit little-endian ELF file; cannot set its RUNPATH$"):
        set_runpath(b"#!/bin/sh\n", "$ORIGIN")


def test_second_start_reuses_the_cache_and_a_damaged_cache_is_rebuilt(packaged, tmp_path):
    exe, _ = packaged
    home = tmp_path / "home"
    env = _clean_env(home)
    first = subprocess.run([str(exe), "--path-only"], env=env, capture_output=True, text=True, check=True)
    assert "unpacking once" in first.stderr
    app = Path(first.stdout.strip())
    second = subprocess.run([str(exe), "--path-only"], env=env, capture_output=True, text=True, check=True)
    assert second.stderr == "" and second.stdout == first.stdout
    # damage the cached model: the next start notices and unpacks again
    with open(app / "model.gguf", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 16)
    third = subprocess.run([str(exe), "--path-only"], env=env, capture_output=True, text=True, check=True)
    assert "is damaged; unpacking again" in third.stderr
    check = subprocess.run(["sha256sum", "-c", "--quiet", "MANIFEST.sha256"], cwd=app, capture_output=True)
    assert check.returncode == 0


def test_two_starts_at_once_do_not_corrupt_the_cache(packaged, tmp_path):
    exe, _ = packaged
    env = _clean_env(tmp_path / "home")
    procs = [subprocess.Popen([str(exe), "--path-only"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    dirs = {o[0].decode().strip() for o in outs}
    assert len(dirs) == 1
    app = Path(dirs.pop())
    assert subprocess.run(["sha256sum", "-c", "--quiet", "MANIFEST.sha256"], cwd=app).returncode == 0
    leftovers = [p.name for p in app.parent.iterdir() if p.name.startswith(".unpack")]
    assert leftovers == []


def test_help_and_port_options(packaged, tmp_path):
    exe, _ = packaged
    out = subprocess.run([str(exe), "--help"], env=_clean_env(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--port", "--host", "--ctx", "--threads", "--help-server"):
        assert flag in out.stdout
    assert "default 8080" in out.stdout and "127.0.0.1" in out.stdout
    missing = subprocess.run([str(exe), "--port"], env=_clean_env(tmp_path), capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr == "tiny-chat: --port needs a value\n"
    bad = subprocess.run([str(exe), "--port", "80; touch x"], env=_clean_env(tmp_path), capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr == "tiny-chat: --port takes a number, not: 80; touch x\n"
    assert not (tmp_path / "x").exists()


def test_refuses_what_llama_cpp_cannot_load_before_writing(tmp_path):
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    with pytest.raises(PackageError, match="is not a GGUF file"):
        build_package(not_gguf, tmp_path / "app")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\0" * 100)
    with pytest.raises(PackageError, match="llama.cpp cannot load"):
        build_package(broken, tmp_path / "app")
    assert not (tmp_path / "app").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf", "notes.txt"]  # nothing written


def test_system_prompt_is_used_when_the_chat_has_none(tiny_tied, tmp_path):
    from gguf_prune.runtime.package import chat_template_with_system_prompt

    model = llamacpp.convert_hf_to_gguf(tiny_tied, tmp_path / "t.gguf", outtype="f16")
    tpl = chat_template_with_system_prompt(model, 'Be "brief".')
    from jinja2 import Template

    rendered = Template(tpl).render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert '<|im_start|>system\nBe "brief".<|im_end|>' in rendered
    own = Template(tpl).render(messages=[{"role": "system", "content": "Mine."},
                                         {"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert "Be \"brief\"" not in own and "Mine." in own


def test_web_ui_in_a_real_browser(packaged, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "install chromium and chromium-driver (scripts/test.sh does)"
    exe, _ = packaged
    srv = Running(exe, tmp_path / "home", tmp_path)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1280,900"):
        opts.add_argument(flag)
    driver = None
    try:
        srv.wait_healthy()
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
        driver.get(srv.url + "/")
        wait = WebDriverWait(driver, 120)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "textarea")))
        box.send_keys("Hello from the browser test")
        box.send_keys(Keys.ENTER)
        sel = '[aria-label="Assistant message with actions"]'
        wait.until(lambda d: any(e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, sel)))
        reply = [e.text for e in driver.find_elements(By.CSS_SELECTOR, sel) if e.text.strip()][0]
        assert reply.strip()
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "web-ui-chat.png"))
        assert "Hello from the browser test" in driver.find_element(By.TAG_NAME, "body").text
    finally:
        if driver is not None:
            driver.quit()
        srv.stop()
    assert (ARTIFACTS / "web-ui-chat.png").stat().st_size > 10_000


# ------------------------------------------------------------------ hostile values

# Shell code in every form a launcher could trip over: command substitution, backticks, quotes
# that would close a quoted word, a newline that would end a comment or an assignment, spaces,
# a printf format, a placeholder of the launcher's own template and Jinja syntax. Each `touch`
# that ran would create "pwned" in the directory the launcher was started from (or in /tmp).
HOSTILE = ("a b'c\"d $(touch pwned) `touch pwned` ;touch pwned; |touch /tmp/pwned-gguf-prune\n"
           "$(touch pwned)\t%s %n @HASH@ {{ x }} {%- endif %} é")


def _pwned(*dirs: Path) -> list[Path]:
    found = [p for d in dirs for p in d.rglob("pwned")]
    return found + [p for p in (Path("/tmp/pwned-gguf-prune"),) if p.exists()]


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a UNIX socket (llama-server listens on one when --host ends in .sock)."""

    def __init__(self, path: str, timeout: float = 120):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def _unix_request(path: str, method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    conn = UnixHTTPConnection(path)
    try:
        conn.request(method, url, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def test_hostile_names_flags_and_environment_never_run_as_code(tiny_tied, tmp_path):
    # a UNIX socket path is at most 107 bytes: the socket lives in a short directory under /tmp
    short = Path(tempfile.mkdtemp(prefix="gp", dir="/tmp"))
    work, home = tmp_path / "work", tmp_path / f"home {HOSTILE.replace('/', '_')}"
    work.mkdir()
    home.mkdir()
    try:
        f16 = llamacpp.convert_hf_to_gguf(tiny_tied, tmp_path / "tiny.gguf", outtype="f16")
        model = tmp_path / f"model {HOSTILE.replace('/', '_')}.gguf"  # a file name holds no slash
        shutil.copyfile(f16, model)
        sock = str(short / "s'$(touch pwned)`touch pwned`\n;.sock")
        assert len(sock.encode()) < 108
        name = f"name {HOSTILE}\nDEFAULT_PORT=1\nPAYLOAD_LINE=1"  # lines that look like the launcher's own
        prompt = f"Prompt {HOSTILE} \\ \r \" }}] {{% raise_exception('x') %}}"
        exe = build_package(model, tmp_path / f"out {HOSTILE.replace('/', '_')}",
                            PackageOptions(name=name, host=sock, ctx=512, threads=2, system_prompt=prompt))
        assert describe(exe) == (f"{exe} — run it with: {shlex.quote(str(exe))} "
                                 f"(then it listens on the UNIX socket {sock})")
        assert packed_options(exe) == PackageOptions(host=sock, port=8080, ctx=512, threads=2)
        env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
               "XDG_CACHE_HOME": str(tmp_path / f"xdg {HOSTILE.replace('/', '_')}")}

        helped = subprocess.run([str(exe), "--help"], env=env, cwd=work, capture_output=True, text=True)
        assert helped.returncode == 0, helped.stderr
        assert helped.stdout.startswith(f"{name}: chat with {model.name} in your browser")
        assert f"--host H        address to listen on (default {sock})" in helped.stdout
        assert f"usage: {exe} [options]" in helped.stdout
        assert subprocess.run([str(exe), "--help-server"], env=env, cwd=work, capture_output=True).returncode == 0
        unpacked = subprocess.run([str(exe), "--path-only"], env=env, cwd=work, capture_output=True, text=True)
        assert unpacked.returncode == 0, unpacked.stderr
        assert unpacked.stdout.startswith(env["XDG_CACHE_HOME"] + "/gguf-prune-app/")
        # a hostile --host at run time is a host name llama-server cannot bind to, nothing more
        bad_host = subprocess.run([str(exe), "--host", HOSTILE, "--port", str(_free_port())], env=env, cwd=work,
                                  capture_output=True, text=True, timeout=120)
        assert bad_host.returncode != 0
        assert f"serving on http://{HOSTILE}:" in bad_host.stderr

        # it serves on the hostile socket path, reports the hostile name, applies the hostile system
        # prompt to the letter and passes a hostile pass-through flag to llama-server as one word
        kwargs = json.dumps({"gguf_prune_unused": HOSTILE})
        srv = subprocess.Popen([str(exe), "--chat-template-kwargs", kwargs], env=env, cwd=work,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while True:
                assert srv.poll() is None, srv.stdout.read().decode(errors="replace")[-3000:]
                assert time.time() < deadline, "the server never became healthy on its socket"
                try:
                    if _unix_request(sock, "GET", "/health")[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            status, reply = _unix_request(sock, "POST", "/v1/chat/completions",
                                          {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4})
            assert status == 200, reply
            assert reply["model"] == name and reply["usage"]["completion_tokens"] > 0
            status, applied = _unix_request(sock, "POST", "/apply-template",
                                             {"messages": [{"role": "user", "content": "Hello!"}]})
            assert status == 200, applied
            assert f"<|im_start|>system\n{prompt}<|im_end|>" in applied["prompt"]
        finally:
            srv.terminate()
            srv.wait(timeout=30)
        assert _pwned(tmp_path, short) == []
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_refuses_options_it_could_never_serve_with():
    with pytest.raises(PackageError) as e:
        PackageOptions(host="$(touch pwned)", port=0, ctx=-1, threads=0, name=" ")
    assert str(e.value) == (
        "invalid package options: --port 0: must be a whole number, 1..65535; --ctx -1: must be a whole number, "
        "0 or more; --threads 0: must be a whole number, 1 or more; --host '$(touch pwned)': not an IP address, a "
        "host name, a comma-separated list of them or a UNIX socket path ending in .sock; give e.g. 127.0.0.1 "
        "(this machine only) or 0.0.0.0 (every interface); --name ' ': give the name the server reports, or leave "
        "it out to use the file name")
    for host in ("127.0.0.1", "0.0.0.0", "::", "::1", "localhost", "my-box.lan", "127.0.0.1,::1", "/run/a b.sock"):
        assert PackageOptions(host=host).host == host
    for host in ("127.0.0.1 ", "-h", "a..b", "http://127.0.0.1", "localhost:8080", "$(x).example"):
        with pytest.raises(PackageError, match="not an IP address, a host name"):
            PackageOptions(host=host)


def test_a_planted_cache_copy_is_refused(packaged, tmp_path):
    # a copy in the cache directory whose manifest matches its own (changed) files is not ours
    exe, _ = packaged
    env = _clean_env(tmp_path / "home")
    app = Path(subprocess.run([str(exe), "--path-only"], env=env, capture_output=True, text=True,
                              check=True).stdout.strip())
    (app / "model.gguf").write_bytes(b"GGUF planted")
    lines = [ln for ln in (app / "MANIFEST.sha256").read_text().splitlines() if not ln.endswith("  model.gguf")]
    lines.append(f"{hashlib.sha256(b'GGUF planted').hexdigest()}  model.gguf")
    (app / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")
    assert subprocess.run(["sha256sum", "-c", "--quiet", "MANIFEST.sha256"], cwd=app).returncode == 0
    again = subprocess.run([str(exe), "--path-only"], env=env, capture_output=True, text=True, check=True)
    assert "is damaged; unpacking again" in again.stderr
    assert (app / "model.gguf").read_bytes()[:4] == b"GGUF" and (app / "model.gguf").stat().st_size > 1000


def test_refuses_to_start_where_ggml_would_load_a_strangers_backend(packaged, tmp_path):
    # ggml looks for libggml-<backend>-*.so in the current directory too
    exe, _ = packaged
    (tmp_path / "libggml-cpu-planted.so").write_bytes(b"not a library")
    out = subprocess.run([str(exe)], env=_clean_env(tmp_path / "home"), cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert out.stderr.endswith("tiny-chat: the current directory holds ./libggml-cpu-planted.so, which llama-server "
                               "would load; start from another directory\n")


# ---------------------------------------------------------------------- the real bind

TCP_LISTEN = "0A"


def _listening(port: int) -> list[str]:
    """Addresses listening on ``port``, read from /proc/net/tcp and tcp6 (no connection is made)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, state = fields[1], fields[3]
            host_hex, port_hex = addr.split(":")
            if state != TCP_LISTEN or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(host_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw))
    return found


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float = 180) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
        found = _listening(port)
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.parametrize("host_args, expected", [((), ["127.0.0.1"]), (("--host", "0.0.0.0"), ["0.0.0.0"])],
                         ids=["default", "all-interfaces"])
def test_binds_where_it_says(packaged, tmp_path, host_args, expected):
    exe, _ = packaged
    srv = Running(exe, tmp_path / "home", tmp_path, *host_args)
    try:
        assert _wait_listening(srv.proc, srv.port) == expected
    finally:
        log = srv.stop()
    assert f"serving on http://{expected[0]}:{srv.port}/" in log


def test_packed_host_and_port_are_what_it_binds_and_describes(packaged, tmp_path):
    _, model = packaged
    port = _free_port()
    exe = build_package(model, tmp_path / "everywhere", PackageOptions(host="0.0.0.0", port=port, ctx=256, threads=1))
    assert describe(exe) == (f"{exe} — run it with: {exe} (then open http://127.0.0.1:{port}/; "
                             "it listens on every network interface (0.0.0.0))")
    home = tmp_path / "home"
    proc = subprocess.Popen([str(exe)], env=_clean_env(home), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        assert _wait_listening(proc, port) == ["0.0.0.0"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    local = build_package(model, tmp_path / "local", PackageOptions(port=port))
    assert describe(local) == f"{local} — run it with: {local} (then open http://127.0.0.1:{port}/)"


# -------------------------------------------------------------------------- load

def test_four_clients_times_25_chats_with_parallel_4(packaged, tmp_path):
    exe, _ = packaged
    clients, per_client = 4, 25
    srv = Running(exe, tmp_path / "home", tmp_path, "--parallel", "4", "--ctx", "1024")
    results: list[tuple[int, str, int]] = []  # (client, finish reason, completion tokens)
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(per_client):
            body = json.dumps({"messages": [{"role": "user", "content": f"Client {i}, message {j}: hello!"}],
                               "max_tokens": 4, "temperature": 0}).encode()
            req = urllib.request.Request(srv.url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    reply = json.loads(r.read())
                with lock:
                    results.append((i, reply["choices"][0]["finish_reason"], reply["usage"]["completion_tokens"]))
            except Exception as e:  # every failure is counted and shown, none stops the others
                with lock:
                    errors.append(f"client {i} request {j}: {e!r}")

    try:
        srv.wait_healthy()
        with urllib.request.urlopen(srv.url + "/props", timeout=10) as r:
            assert json.loads(r.read())["total_slots"] == 4
        t0 = time.time()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, t0 + 600 - time.time()))  # 600 s for all of them together
        elapsed = time.time() - t0
        assert not any(t.is_alive() for t in threads), "clients still waiting after 600 s"
        assert errors == []
        assert len(results) == clients * per_client
        per = {i: sum(1 for r in results if r[0] == i) for i in range(clients)}
        assert per == {i: per_client for i in range(clients)}
        assert all(reason in ("length", "stop") and 1 <= n <= 4 for _, reason, n in results), results
        assert srv.proc.poll() is None, "the server died under load"
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
            assert r.status == 200
        print(f"\nload: {clients} clients x {per_client} chats in {elapsed:.1f} s")
    finally:
        log = srv.stop()
    assert "Segmentation fault" not in log and "terminate called" not in log
    # the requests were served side by side, in all four slots
    assert {int(i) for i in re.findall(r"launch_slot_: id\s+(\d+)", log)} == {0, 1, 2, 3}


# ----------------------------------------------------------- any x86-64 CPU (qemu)

def _cpu_variants_mapped(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({Path(line.split()[-1]).name for line in maps.splitlines()
                   if re.search(r"/libggml-cpu-[^/]*\.so$", line)})


OLD_CPU = "Nehalem"  # SSE4.2, no AVX, no AVX2, no AVX-512 (2008)


def test_serves_a_chat_on_a_cpu_without_avx(packaged, tmp_path):
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "install qemu-user (Debian: apt-get install qemu-user; scripts/test.sh does)"
    assert OLD_CPU in subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True).stdout
    exe, _ = packaged
    app = Path(subprocess.run([str(exe), "--path-only"], env=_clean_env(tmp_path / "home"), capture_output=True,
                              text=True, check=True).stdout.strip())
    port = _free_port()
    cmd = [qemu, "-cpu", OLD_CPU, "-E", f"LD_LIBRARY_PATH={app / 'lib'}", str(app / "bin" / "llama-server"),
           "-m", str(app / "model.gguf"), "--host", "127.0.0.1", "--port", str(port), "-c", "256", "-t", "2",
           "--alias", "old-cpu"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, timeout=300)
        body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            reply = json.loads(r.read())
        assert reply["model"] == "old-cpu" and reply["usage"]["completion_tokens"] > 0
        # ggml kept the SSE4.2 build of its CPU backend, the best this CPU can run (it opens every
        # variant to score it and keeps one mapped)
        assert _cpu_variants_mapped(proc.pid) == ["libggml-cpu-sse42.so"]
    finally:
        log = _stop(proc)
    print(f"\nqemu -cpu {OLD_CPU}: healthy and one chat in {time.time() - t0:.1f} s")
    assert "illegal instruction" not in log.lower()


def test_the_native_build_does_not_run_there(tmp_path, tiny_tied):
    # the control: the GGML_NATIVE build dies with an illegal instruction on the same emulated CPU
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "install qemu-user (Debian: apt-get install qemu-user; scripts/test.sh does)"
    tc = toolchain.find()
    model = llamacpp.convert_hf_to_gguf(tiny_tied, tmp_path / "tiny.gguf", outtype="f16")
    proc = subprocess.run([qemu, "-cpu", OLD_CPU, "-E", f"LD_LIBRARY_PATH={tc.bin_dir}", str(tc.tool("llama-bench")),
                           "-m", str(model), "-p", "8", "-n", "0", "-r", "1", "-t", "1"],
                          capture_output=True, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode in (-4, 132), (proc.returncode, proc.stderr[-2000:])  # SIGILL
