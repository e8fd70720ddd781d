"""The single executable: runs from an empty directory with a clean environment, serves the
OpenAI API and the web UI, carries its libraries, and keeps a safe per-user cache."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gguf_prune import llamacpp
from gguf_prune.package import GLIBC, PackageError, PackageOptions, build_package

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


class Running:
    def __init__(self, exe: Path, home: Path, cwd: Path, *args: str):
        self.port = _free_port()
        self.proc = subprocess.Popen([str(exe), "--port", str(self.port), *args], cwd=cwd,
                                     env=_clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("the packaged server exited:\n" + self.proc.stdout.read().decode()[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        raise AssertionError("the packaged server never became healthy")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out.decode(errors="replace")


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
    env = {"LD_LIBRARY_PATH": str(app / "lib"), "PATH": "/usr/bin:/bin"}
    ldd = subprocess.run(["ldd", str(app / "bin" / "llama-server")], env=env, capture_output=True, text=True,
                         check=True).stdout
    for line in ldd.splitlines():
        name = line.split()[0]
        if "=>" not in line or name.startswith(GLIBC):
            continue
        assert "not found" not in line, line
        assert str(app / "lib") in line, f"{name} resolves outside the package: {line}"


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
    from gguf_prune.package import chat_template_with_system_prompt

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
