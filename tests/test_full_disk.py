"""A real full disk: every command that writes, run through the installed CLI with its output on a
size-limited tmpfs, exits 1 with one line that names the file and says to free space, leaves no partial
file behind and does not touch its inputs.

The tmpfs is mounted in a private mount namespace of an unprivileged user namespace (``unshare -rm``), so
neither root nor a change to the machine is needed; it disappears with the command. Where user namespaces
are off and the tests run as root, a plain mount namespace (``unshare -m``) does the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_prune.plan import LayerPlan, ModelShape, Plan

pytestmark = pytest.mark.bad_input  # every test here is a case of the README's table

CLI = Path(sys.executable).parent / "gguf-prune"

# In the namespace: mount the tmpfs, run the command with its output there, then copy what it left out of
# the tmpfs (it goes away with the namespace). Arguments: size, mount point, snapshot dir, command...
SCRIPT = r'''
size=$1; mnt=$2; snap=$3; shift 3
mount -t tmpfs -o "size=$size" tmpfs "$mnt" || exit 99
"$@"
rc=$?
cp -a "$mnt" "$snap"
exit $rc
'''


def _namespace() -> list[str]:
    """The unshare prefix that gives a private mount namespace here, or a failure saying what is missing."""
    probe = Path(os.environ.get("TMPDIR", "/tmp"))
    tries = [["unshare", "-rm"]] + ([["unshare", "-m"]] if os.geteuid() == 0 else [])
    errors = []
    for prefix in tries:
        p = subprocess.run(prefix + ["sh", "-c", 'mount -t tmpfs -o size=4k tmpfs "$1"', "sh", str(probe)],
                           capture_output=True, text=True)
        if p.returncode == 0:
            return prefix
        errors.append(f"{' '.join(prefix)}: {p.stderr.strip()}")
    pytest.fail("no way to mount a small tmpfs for the full-disk tests: " + "; ".join(errors)
                + ". Enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                  "or user.max_user_namespaces > 0) or run the tests as root")


@pytest.fixture(scope="module")
def namespace() -> list[str]:
    return _namespace()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A gguf-prune cache whose llama.cpp build is the real one and whose conversions stay in the test's
    temporary directory (the CLI runs as a user would run it, so it cannot be handed a cache directory)."""
    from gguf_prune.runtime import toolchain

    root = tmp_path_factory.mktemp("cache")
    real = toolchain.find().root
    (root / real.name).symlink_to(real)
    (root / "converted").mkdir()
    return root


def run_on_full_disk(namespace, cache, tmp: Path, size: str, *args: str) -> tuple[int, str, list[Path]]:
    """``gguf-prune ARGS`` (``{out}`` in them is the tmpfs); returns the exit code, stderr and what it left."""
    mnt, snap = tmp / "full", tmp / "left"
    mnt.mkdir()
    argv = [a.replace("{out}", str(mnt)) for a in args]
    env = dict(os.environ, GGUF_PRUNE_CACHE=str(cache))
    p = subprocess.run(namespace + ["sh", "-c", SCRIPT, "sh", size, str(mnt), str(snap), str(CLI), *argv],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode != 99, f"could not mount the tmpfs: {p.stderr}"
    assert list(mnt.iterdir()) == [], "wrote outside the tmpfs"
    return p.returncode, p.stderr, sorted(snap.rglob("*")) if snap.exists() else []


def assert_full_disk_handled(rc: int, stderr: str, left: list[Path], names: tuple[str, ...]) -> str:
    """Exit 1; one error line naming one of ``names`` and saying to free space; no traceback; no partial file."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error: ")]
    assert rc == 1 and len(errors) == 1, f"exit {rc}\n{stderr}"
    line = errors[0]
    assert "no space left" in line and "free some space" in line, line
    assert any(n in line for n in names), f"{line!r} names none of {names}"
    assert_nothing_partial(left)
    return line


def assert_nothing_partial(left: list[Path]) -> None:
    """No temporary file, and every file left is whole (it parses, loads, or ends where its format ends)."""
    partial = [p.name for p in left if p.name.startswith(".") or "partial" in p.name or "tmp" in p.name]
    assert partial == [], f"left partial files: {partial}"
    for p in left:
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".png":
            assert p.read_bytes().endswith(b"IEND\xaeB`\x82"), p
        elif p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt"):
                pass
        elif p.is_file():
            raise AssertionError(f"left {p.name} ({p.stat().st_size} bytes) on the full disk")


def digests(*paths: Path) -> dict[str, str]:
    out = {}
    for root in paths:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def model(tiny_tied, tmp_path_factory) -> Path:
    """A copy of the tied fixture (the tests hash it before and after)."""
    return Path(shutil.copytree(tiny_tied, tmp_path_factory.mktemp("full-disk") / "tiny"))


@pytest.fixture(scope="module")
def plan_file(model, tmp_path_factory) -> Path:
    """Layers removed, heads and neurons sliced: a cut that recover can patch (layers 2-3) and fine-tune."""
    shape = ModelShape.from_hf_dir(model)
    L = LayerPlan
    cut = {1: L(1, heads=(0, 1, 4, 5), neurons=tuple(range(0, shape.n_ff, 2))), 2: L(2, removed=True),
           3: L(3, removed=True)}
    plan = Plan(shape=shape, layers=tuple(cut.get(i, L(i)) for i in range(shape.n_layer)))
    return plan.save(tmp_path_factory.mktemp("full-disk-plan") / "plan.json")


@pytest.fixture(scope="module")
def base_gguf(model, cache) -> Path:
    from gguf_prune.writing.prune import convert_cached

    return convert_cached(model, "f16", cache_dir=cache / "converted")


# tmpfs sizes: "64k" fills up in a file's first bytes (the GGUF header is ~1.7 MB of tokenizer), "4m" after
# the header, in the tensor data
@pytest.mark.parametrize("size", ["64k", "4m"])
def test_rewrite(namespace, cache, base_gguf, plan_file, size, tmp_path):
    before = digests(base_gguf, plan_file)
    rc, err, left = run_on_full_disk(namespace, cache, tmp_path, size,
                                     "rewrite", str(base_gguf), "--plan", str(plan_file), "-o", "{out}/cut.gguf")
    assert_full_disk_handled(rc, err, left, ("cut.gguf",))
    assert left == []
    assert digests(base_gguf, plan_file) == before


def test_prune(namespace, cache, model, plan_file, tmp_path):
    before = digests(model, plan_file)
    rc, err, left = run_on_full_disk(namespace, cache, tmp_path, "4m", "prune", str(model), "--plan",
                                     str(plan_file), "-o", "{out}/pruned.gguf", "--quant", "Q8_0")
    assert_full_disk_handled(rc, err, left, ("pruned.gguf", "model-f16.gguf"))
    assert left == []
    assert digests(model, plan_file) == before


def test_package(namespace, cache, base_gguf, tmp_path):
    before = digests(base_gguf)
    rc, err, left = run_on_full_disk(namespace, cache, tmp_path, "4m", "package", str(base_gguf),
                                     "-o", "{out}/chat")
    assert_full_disk_handled(rc, err, left, ("chat",))
    assert left == []
    assert digests(base_gguf) == before


# "4k": the neuron statistics (written first, 75 KB) do not fit; "100k": they and scores.json do, the plots not
@pytest.mark.parametrize("size", ["4k", "100k"])
def test_score(namespace, cache, model, size, tmp_path):
    before = digests(model)
    rc, err, left = run_on_full_disk(namespace, cache, tmp_path, size, "score", str(model), "-o",
                                     "{out}/scores.json", "--samples", "2", "--seq-len", "16", "--device", "cpu")
    assert "o space left" in err, err  # the disk did fill up
    if size == "100k" and rc == 0:
        # plots are a convenience: score keeps the (complete) scores, says which plot it could not write, and
        # leaves no part of it
        assert "Traceback" not in err and "could not draw the score plots" in err and ".png" in err, err
        assert {"scores.json", "scores.neurons.safetensors"} <= {p.name for p in left}
        assert_nothing_partial(left)
    else:
        assert_full_disk_handled(rc, err, left, ("scores.json", "scores.neurons.safetensors", ".png"))
    assert digests(model) == before


# "64k" with a patch only: the recovered tensors do not fit; "2m" with LoRA fine-tuning: its first checkpoint
@pytest.mark.parametrize("size, finetune", [("64k", []), ("2m", ["--finetune", "lora", "--steps", "4",
                                                                  "--eval-every", "2", "--checkpoint-every", "2"])],
                         ids=["tensors", "checkpoint"])
def test_recover(namespace, cache, model, plan_file, size, finetune, tmp_path):
    before = digests(model, plan_file)
    rc, err, left = run_on_full_disk(namespace, cache, tmp_path, size, "recover", str(model), "--plan",
                                     str(plan_file), "-o", "{out}/rec", "--patch", *finetune, "--samples", "8",
                                     "--seq-len", "16", "--device", "cpu")
    line = assert_full_disk_handled(rc, err, left, ("recovered.safetensors", "state.pt"))
    assert ("state.pt" in line) == bool(finetune), line
    assert [p.name for p in left] == ["rec"]  # the directory asked for, empty
    assert digests(model, plan_file) == before
