"""Quantize a (pruned) F16/BF16/F32 GGUF through the pinned llama.cpp's llama-quantize.

llama.cpp picks each tensor's type from the target (Q4_K_M mixes q4_K and q6_K)
and falls back per tensor when a row length does not fit the type's block
(q4_K needs ne0 % 256 == 0 and falls back to q5_0; a width-1 FFN falls back to
f16). Every fallback is parsed from llama-quantize's log and reported, with the
count, so a plan whose widths defeat the target type is visible.

An importance matrix can be computed first with llama-imatrix on a calibration
text, on the very file being quantized (so its tensor shapes match).

Output goes to a temporary file next to ``out``; it is loaded with the bindings
and renamed only when llama.cpp accepts it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gguf_prune.runtime import llamacpp
from gguf_prune.writing.gguf_read import GGUFFormatError, read_gguf
from gguf_prune.atomic import default_file_mode, fsync_path
from gguf_prune.errors import GgufPruneError
from gguf_prune.writing.options import DEFAULT_QUANT

log = logging.getLogger(__name__)

# The target names llama-quantize accepts (tools/quantize/quantize.cpp, QUANT_OPTIONS, of the pinned tree).
QUANT_TYPES: tuple[str, ...] = (
    "Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0",
    "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K", "IQ3_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L",
    "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
    "F16", "BF16", "F32", "COPY",
)

_FALLBACK = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING: must use F16 due to unusual shape\)\s*)?"
    r"-> falling back to\s+(?P<used>\S+)")
_FALLBACK_COUNT = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")


class QuantizeError(GgufPruneError, ValueError):
    """A quantization that cannot be done as asked: what, where, what to do."""


@dataclass(frozen=True)
class Fallback:
    tensor: str
    ncols: int  # the row length (ne0) that did not fit
    block: int  # the block size the wanted type needs
    wanted: str
    used: str


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    source: Path
    quant: str
    bytes_before: int
    bytes_after: int
    fallbacks: tuple[Fallback, ...] = ()
    tensor_types: dict = field(default_factory=dict)  # ggml type name -> number of tensors in the output
    imatrix: Path | None = None
    seconds: float = 0.0

    @property
    def n_fallback(self) -> int:
        return len(self.fallbacks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(path=str(self.path), source=str(self.source), imatrix=str(self.imatrix) if self.imatrix else None,
                 n_fallback=self.n_fallback)
        return d


def check_quant_type(name: str) -> str:
    """The canonical (upper-case) name of a llama-quantize target; QuantizeError listing the valid ones."""
    canon = str(name).strip().upper()
    if canon not in QUANT_TYPES:
        raise QuantizeError(f"unknown quantization type {name!r}; valid types: {', '.join(QUANT_TYPES)}")
    return canon


def parse_fallbacks(log_text: str) -> tuple[Fallback, ...]:
    """Every per-tensor fallback that llama-quantize reported, in order."""
    found = tuple(Fallback(m["tensor"], int(m["ncols"]), int(m["block"]), m["wanted"], m["used"])
                  for m in _FALLBACK.finditer(log_text))
    m = _FALLBACK_COUNT.search(log_text)
    if m and int(m.group(1)) != len(found):
        log.warning("llama-quantize reported %s fallbacks, %d were parsed from its log", m.group(1), len(found))
    return found


def compute_imatrix(model: Path, text_file: Path, out: Path, *, ctx: int = 512, chunks: int | None = None,
                    threads: int | None = None) -> Path:
    """An importance matrix of ``model`` on a calibration text (llama-imatrix), written atomically to ``out``."""
    model, text_file, out = Path(model), Path(text_file), Path(out)
    if not text_file.is_file():
        raise QuantizeError(f"calibration text {text_file} does not exist; pass a plain-text file (--imatrix-text)")
    tmp = out.with_name(f".{out.name}.partial")
    args = ["-m", model, "-f", text_file, "-o", tmp, "-c", str(ctx), "--no-ppl",
            "-t", str(threads or os.cpu_count() or 1)]
    if chunks:
        args += ["--chunks", str(chunks)]
    log.info("computing an importance matrix of %s on %s", model.name, text_file.name)
    try:
        proc = llamacpp.run_tool("llama-imatrix", args, check=False)
        if proc.returncode != 0 or not tmp.exists():
            text = proc.stdout + proc.stderr
            m = re.search(r"you need at least (\d+) tokens for a context of (\d+) tokens", text)
            if m:
                raise QuantizeError(f"calibration text {text_file} is too short for llama-imatrix: it needs at least "
                                    f"{m.group(1)} tokens for a context of {m.group(2)}; give a longer text or a "
                                    "smaller context")
            tail = "\n  ".join(text.strip().splitlines()[-15:])
            raise llamacpp.LlamaCppError(f"llama-imatrix failed with exit code {proc.returncode}\n  command: "
                                         f"{llamacpp.command_line('llama-imatrix', args)}\n  {tail}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def quantize(src: Path, out: Path, quant: str = DEFAULT_QUANT, *, imatrix: Path | None = None,
             imatrix_text: Path | None = None, imatrix_ctx: int = 512, threads: int | None = None,
             check_load: bool = True) -> QuantizeResult:
    """Quantize ``src`` to ``out`` as ``quant`` (any llama-quantize target name).

    ``imatrix``: an existing importance matrix; ``imatrix_text``: compute one from
    this calibration text first (on ``src``), kept as ``<out>.imatrix.gguf``. The
    output is loaded with llama.cpp before it is renamed into place (``check_load``).
    """
    t0 = time.time()
    quant = check_quant_type(quant)
    src, out = Path(src), Path(out)
    _check_inputs(src, out, imatrix, imatrix_text)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    made_imatrix = tmp.with_name(tmp.name + ".imatrix.gguf")  # renamed next to the output on success
    try:
        if imatrix_text is not None:
            imatrix = compute_imatrix(src, Path(imatrix_text), made_imatrix, ctx=imatrix_ctx, threads=threads)
        fallbacks = _run_llama_quantize(src, tmp, quant, imatrix, threads)
        types = _check_quantized(tmp, src, out, quant, check_load)
        os.chmod(tmp, default_file_mode())
        fsync_path(tmp)
        if imatrix_text is not None:
            imatrix = out.with_name(out.name + ".imatrix.gguf")
            os.chmod(made_imatrix, default_file_mode())
            os.replace(made_imatrix, imatrix)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        made_imatrix.unlink(missing_ok=True)
    result = QuantizeResult(path=out, source=src, quant=quant, bytes_before=src.stat().st_size,
                            bytes_after=out.stat().st_size, fallbacks=fallbacks, tensor_types=dict(sorted(types.items())),
                            imatrix=Path(imatrix) if imatrix else None,
                            seconds=round(time.time() - t0, 3))
    log.info("%s: %.1f MB → %.1f MB (%s), %d tensor(s) fell back", out.name, result.bytes_before / 1e6,
             result.bytes_after / 1e6, quant, result.n_fallback)
    return result


def _check_inputs(src: Path, out: Path, imatrix: Path | None, imatrix_text: Path | None) -> None:
    """Another output than the input, one source of importance, and a readable GGUF that llama.cpp loads."""
    if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
        raise QuantizeError(f"output {out} is the input GGUF; write the quantized model to another path")
    if imatrix is not None and imatrix_text is not None:
        raise QuantizeError("pass either an importance matrix file or a calibration text, not both")
    try:  # a readable GGUF that llama.cpp loads: llama-quantize reads it itself, and aborts on some damage
        read_gguf(src)
        llamacpp.probe(src)
    except (GGUFFormatError, llamacpp.LlamaCppError) as e:
        raise QuantizeError(str(e)) from None


def _run_llama_quantize(src: Path, tmp: Path, quant: str, imatrix: Path | None,
                        threads: int | None) -> tuple[Fallback, ...]:
    """llama-quantize ``src`` → ``tmp``; the tensors it had to write in another type."""
    args: list = []
    if imatrix is not None:
        if not Path(imatrix).is_file():
            raise QuantizeError(f"importance matrix {imatrix} does not exist")
        args += ["--imatrix", imatrix]
    args += [src, tmp, quant, str(threads or os.cpu_count() or 1)]
    log.info("quantizing %s to %s", src.name, quant)
    proc = llamacpp.run_tool("llama-quantize", args)
    fallbacks = parse_fallbacks(proc.stdout + "\n" + proc.stderr)
    for fb in fallbacks:
        log.info("fallback: %s (ncols %d not divisible by %d) %s -> %s", fb.tensor, fb.ncols, fb.block,
                 fb.wanted, fb.used)
    return fallbacks


def _check_quantized(tmp: Path, src: Path, out: Path, quant: str, check_load: bool) -> Counter:
    """The tensor types of the quantized file, which must read back and (``check_load``) load in llama.cpp."""
    try:
        types = Counter(t.ggml_type.name for t in read_gguf(tmp).tensors)
        if check_load:
            llamacpp.load(tmp, n_ctx=64).close()
    except (GGUFFormatError, llamacpp.LlamaCppError):  # the message would name the temporary file
        raise QuantizeError(f"llama.cpp cannot load the {quant} file llama-quantize made from {src}, so {out} "
                            f"was not written; `llama-cli -m {src}` shows what the loader says of the input") from None
    return types
