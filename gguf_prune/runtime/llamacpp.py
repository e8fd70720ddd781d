"""The one door to llama.cpp: its tools (as subprocesses) and its Python bindings.

Every failure becomes a :class:`LlamaCppError` that carries the command and
the end of its output, so a user sees what llama.cpp said, not a traceback
from the middle of the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from gguf_prune.runtime import toolchain
from gguf_prune.errors import GgufPruneError
from gguf_prune.writing.options import DEFAULT_OUTTYPE

log = logging.getLogger(__name__)


class LlamaCppError(GgufPruneError, RuntimeError):
    """llama.cpp refused a file or a tool failed."""


def tool_path(name: str) -> Path:
    return toolchain.find().tool(name)


def run_tool(name: str, args: Sequence[str | os.PathLike], *, timeout: float | None = None,
             check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one llama.cpp tool; raise LlamaCppError with the command and the tail of its output."""
    cmd = [str(tool_path(name)), *map(str, args)]
    log.debug("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        raise LlamaCppError(
            f"{name} failed with exit code {proc.returncode}\n  command: {' '.join(cmd)}\n  "
            + "\n  ".join(tail)
        )
    return proc


def command_line(name: str, args: Sequence[str | os.PathLike]) -> str:
    """The command as a user would type it (for reports that state what ran)."""
    return " ".join([str(tool_path(name)), *map(str, args)])


def llama_bench(models: Sequence[Path], *, n_prompt: int, n_gen: int, reps: int, threads: int | None = None,
                depths: Sequence[int] = (0,)) -> tuple[list[dict], str]:
    """llama-bench on ``models`` in one invocation: its JSON rows (one per model, test and depth) and the command.
    ``n_prompt`` / ``n_gen`` 0 leaves that test out."""
    import json

    args: list[str] = []
    for m in models:
        args += ["-m", str(m)]
    args += ["-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps), "-o", "json"]
    if tuple(depths) != (0,):
        args += ["-d", ",".join(str(int(d)) for d in depths)]
    if threads:
        args += ["-t", str(threads)]
    proc = run_tool("llama-bench", args)
    try:
        rows = json.loads(proc.stdout[proc.stdout.index("["):])
    except ValueError as e:
        raise LlamaCppError(f"llama-bench wrote no JSON ({e})\n  command: {command_line('llama-bench', args)}\n  "
                            + "\n  ".join(proc.stdout.strip().splitlines()[-10:])) from None
    return rows, command_line("llama-bench", args)


def convert_hf_to_gguf(hf_dir: Path, out: Path, outtype: str = DEFAULT_OUTTYPE) -> Path:
    """Convert a Hugging Face checkpoint with the pinned convert_hf_to_gguf.py.

    Writes to a temporary name next to ``out`` and renames it when complete. The temporary file is removed
    whatever ends the conversion: a failure, an exception, Ctrl-C, or SIGTERM / SIGHUP (the converter is
    stopped, the file removed, then the signal takes its usual course).
    """
    tc = toolchain.find()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")  # unique: concurrent conversions do not collide
    cmd = [sys.executable, str(tc.convert_script), str(hf_dir), "--outtype", outtype, "--outfile", str(tmp)]
    log.info("converting %s to GGUF (%s)", hf_dir, outtype)
    proc: subprocess.Popen | None = None
    try:
        with _signals_raise(signal.SIGTERM, signal.SIGHUP):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
            output, _ = proc.communicate()
        if proc.returncode != 0:
            rc = proc.returncode
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            tail = output.strip().splitlines()[-25:]
            raise LlamaCppError(
                f"convert_hf_to_gguf.py failed on {hf_dir} ({how})\n  command: {' '.join(cmd)}\n  " + "\n  ".join(tail)
            )
        os.replace(tmp, out)
    except BaseException as e:
        if proc is not None and proc.returncode is None:
            proc.kill()  # and reaped before the file goes, so nothing writes it again
            proc.wait()
        tmp.unlink(missing_ok=True)
        if isinstance(e, _Signalled):
            e.redeliver()  # by default the process ends here; a handler of the caller's may let it go on
            raise LlamaCppError(f"the conversion of {hf_dir} was stopped by {e.name}") from None
        raise
    finally:
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
    return out


class _Signalled(BaseException):
    """A signal that would have ended the process, raised so that cleanup runs first."""

    def __init__(self, signum: int, previous):
        self.signum, self.previous, self.name = signum, previous, signal.Signals(signum).name
        super().__init__(f"received {self.name}")

    def redeliver(self) -> None:
        """The signal again, to the handler there was before (by default: the process ends by it)."""
        signal.signal(self.signum, self.previous)
        os.kill(os.getpid(), self.signum)


@contextlib.contextmanager
def _signals_raise(*signums: int):
    """While the block runs, these signals raise :class:`_Signalled` (main thread only: elsewhere Python
    cannot install handlers, and the block runs as it is). The handlers there were are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def raise_(signum, frame):
        raise _Signalled(signum, previous[signum])

    for s in signums:
        h = signal.getsignal(s)
        if h is not signal.SIG_IGN:  # an ignored signal (SIGHUP under nohup) stays ignored
            previous[s] = signal.SIG_DFL if h is None else h  # None: a handler not set from Python
            signal.signal(s, raise_)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# The loader, run on its own: llama.cpp ends the process (GGML_ASSERT → abort) on some damaged metadata
# (a block_count of 0 or over 512, an unknown RoPE scaling type, ...) instead of returning an error.
_PROBE = """
import sys
import llama_cpp
llama_cpp.llama_backend_init()
p = llama_cpp.llama_model_default_params()
p.n_gpu_layers = 0
sys.exit(0 if llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), p) else 3)
"""
_PROBED: set[tuple[int, int, int, int]] = set()  # files seen to load, by identity (as git's index decides)


def probe(path: Path, timeout: float = 600) -> None:
    """Load ``path`` once in a child process (about 0.7 s; once per file and process), so that a file on which
    llama.cpp's loader aborts is a LlamaCppError here with the loader's own words, not the end of this process."""
    st = Path(path).stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _PROBED:
        return
    from gguf_prune.writing.gguf_read import GGUFFormatError, read_gguf

    try:  # milliseconds, and says where a file is truncated or damaged in gguf-prune's words
        read_gguf(path)
    except GGUFFormatError as e:  # "PATH is truncated ..." / "PATH: tensor ..." → "...load PATH: it is truncated ..."
        said, p = str(e), str(path)
        said = said[len(p) + 2:] if said.startswith(p + ": ") else "it" + said[len(p):] if said.startswith(p) else said
        raise LlamaCppError(f"llama.cpp could not load {path}: {said}") from None
    cmd = [sys.executable, "-c", _PROBE, str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LlamaCppError(f"llama.cpp did not finish loading {path} in {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        said = [ln.strip() for ln in lines if any(w in ln for w in (
            "error", "failed", "GGML_ASSERT", "exception", "expected", "invalid", "exceeds", "must be", "wrong"))]
        how = "its loader refused it"
        if proc.returncode < 0:
            try:
                how = f"its loader stopped with {signal.Signals(-proc.returncode).name}"
            except ValueError:
                how = f"its loader stopped with signal {-proc.returncode}"
        raise LlamaCppError(f"llama.cpp could not load {path}: {how}"
                            + (":\n  " + "\n  ".join(said[-6:]) if said else f" (exit code {proc.returncode})")
                            + "\n  the file is damaged or not a model this llama.cpp runs; re-create it")
    _PROBED.add(key)


def load(path: Path, *, n_ctx: int = 512, logits_all: bool = False, n_threads: int | None = None,
         seed: int = 0, **kwargs):
    """Load a GGUF with the pinned bindings; a file llama.cpp refuses raises LlamaCppError."""
    import llama_cpp

    path = Path(path)
    if not path.is_file():
        raise LlamaCppError(f"no such model file: {path}")
    probe(path)
    from llama_cpp._utils import suppress_stdout_stderr

    try:
        with suppress_stdout_stderr(disable=False):  # llama.cpp's own loader chatter
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all,
                                   n_threads=n_threads, seed=seed, verbose=False, **kwargs)
    except ValueError as e:  # the bindings raise ValueError("Failed to load model from file")
        raise LlamaCppError(
            f"llama.cpp could not load {path}: {e}. Run `llama-cli -m {path}` (vendor/bin) to see "
            "the loader's own message."
        ) from None


GGML_TYPE_F32 = 0


def logits(path: Path, tokens: Sequence[int], *, n_threads: int | None = None, kv_f32: bool = True) -> np.ndarray:
    """Logits (n_tokens, n_vocab) float32 of llama.cpp for ``tokens`` as one sequence.

    ``kv_f32``: keep the KV cache in F32 (llama.cpp's default is F16, whose rounding of K shows as KL ~1e-4 once
    attention is sharp), so that an F32 model is compared at F32 throughout.
    """
    n = len(tokens)
    kv = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if kv_f32 else {}
    llm = load(path, n_ctx=max(n, 8), logits_all=True, n_threads=n_threads, n_batch=max(n, 8), **kv)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()
