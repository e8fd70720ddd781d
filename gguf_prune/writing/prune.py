"""HF checkpoint + plan → pruned (quantized) GGUF that llama.cpp loads.

convert (pinned convert_hf_to_gguf.py, cached by every file it reads and the
outtype) → rewrite (skipped without a plan: the result is then the uncut BASE,
made the same way, to compare against) → quantize (llama-quantize) → load check.
The plan is written next to the output as ``<out>.plan.json``.

With ``recovered`` (a directory ``gguf-prune recover`` wrote) the plan is the
directory's (patches included; a ``plan`` given as well must make the same cut) and
its tensors, fine-tuned weights and patch matrices, replace the converted ones as
the file is cut.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from gguf_prune.runtime import llamacpp
from gguf_prune.runtime import toolchain
from gguf_prune.models import checkpoint
from gguf_prune.atomic import OutOfSpaceError, fsync_path, write_text_atomic
from gguf_prune.data import cache_root
from gguf_prune.plan import ModelShape, Plan, validate
from gguf_prune.writing.quantize import QuantizeError, check_quant_type, quantize
from gguf_prune.models.tensors import gguf_name, to_gguf_layout
from gguf_prune.recovered import Recovered, open_recovered
from gguf_prune.writing.jobs import Override
from gguf_prune.writing.rewrite import rewrite
from gguf_prune.errors import GgufPruneError
from gguf_prune.writing.options import DEFAULT_OUTTYPE, DEFAULT_QUANT, NO_QUANT, OUTTYPES

log = logging.getLogger(__name__)



class PruneError(GgufPruneError, ValueError):
    """A prune request that cannot be carried out: what, where, what to do."""


@dataclass(frozen=True)
class PruneResult:
    path: Path  # the final GGUF
    plan_path: Path  # the plan written next to it
    base_gguf: Path  # the converted, uncut checkpoint (cached)
    quant: str  # llama-quantize target, or "NONE"
    outtype: str
    architecture: str  # "llama" or "deci"
    plan_digest: str
    bytes_base: int
    bytes_pruned: int  # the pruned file before quantization
    bytes_out: int
    fallbacks: list = field(default_factory=list)  # [{"tensor", "ncols", "block", "wanted", "used"}]
    dims: list = field(default_factory=list)  # per kept layer: source_index, n_head, n_head_kv, n_ff
    seconds: float = 0.0
    recovered: str = ""  # the recover directory whose tensors were written, if any

    @property
    def n_fallback(self) -> int:
        return len(self.fallbacks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(path=str(self.path), plan_path=str(self.plan_path), base_gguf=str(self.base_gguf),
                 n_fallback=self.n_fallback)
        return d


def plan_path_for(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".plan.json")


def converted_cache_dir() -> Path:
    return cache_root() / "converted"


def convert_cached(hf_dir: Path, outtype: str = DEFAULT_OUTTYPE, cache_dir: Path | None = None, *,
                   verify: bool = False) -> Path:
    """The checkpoint converted with the pinned convert_hf_to_gguf.py, made once per
    (conversion key, outtype, llama.cpp commit) under ``cache_dir``.

    The key (:func:`checkpoint.conversion_key`) covers every file the converter reads: the bytes of the config,
    generation config, tokenizer files and chat template, and each weight file's size, mtime, ctime and inode.
    ``verify``: key on the SHA-256 of every weight byte instead (one full read), for an edit a file's stat cannot
    show (a file system with coarse timestamps, a clock set back); the quick key is then pointed at the
    verified conversion, so later runs without ``verify`` use it too.
    """
    if outtype not in OUTTYPES:
        raise PruneError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    commit = (toolchain.find().info().get("commit") or "unknown")[:10]
    cache_dir = Path(cache_dir) if cache_dir is not None else converted_cache_dir()
    key = checkpoint.conversion_key(hf_dir)
    quick = cache_dir / f"{key}-{outtype}-{commit}.gguf"
    if not verify:
        if quick.exists():
            log.info("using the cached conversion %s", quick)
            return quick
        return _convert(hf_dir, quick, outtype, key)
    t0 = time.perf_counter()
    exact = cache_dir / f"{checkpoint.conversion_key(hf_dir, verify=True)}-{outtype}-{commit}.gguf"
    log.info("hashed every weight byte of %s in %.1f s", hf_dir, time.perf_counter() - t0)
    if exact.exists():
        log.info("using the cached conversion %s (verified)", exact)
    else:
        _convert(hf_dir, exact, outtype, key)
    _link(exact, quick)
    return exact


def _convert(hf_dir: Path, path: Path, outtype: str, key: str) -> Path:
    """Convert into the cache, keeping the result only if the checkpoint did not change while the converter read it."""
    checkpoint.check_tokenizer_files(hf_dir)  # one line, not the converter's traceback
    llamacpp.convert_hf_to_gguf(hf_dir, path, outtype=outtype)
    if checkpoint.conversion_key(hf_dir) != key:
        path.unlink(missing_ok=True)
        raise PruneError(f"{hf_dir} changed while it was being converted; run again once it is complete")
    return path


def _link(target: Path, name: Path) -> None:
    """Point ``name`` at ``target`` (a hard link, swapped in atomically); where the file system has no hard links,
    remove ``name`` so that nothing stale is found there."""
    tmp = name.with_name(f".{name.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(target, tmp)
        os.replace(tmp, name)
    except OSError as e:
        log.debug("cannot link %s to %s (%s): the next run without --verify-cache converts again", name, target, e)
        tmp.unlink(missing_ok=True)
        name.unlink(missing_ok=True)


def prune(hf_dir: Path, plan: Plan | Path | None, out: Path, quant: str = DEFAULT_QUANT, outtype: str = DEFAULT_OUTTYPE,
          imatrix_text: Path | None = None, *, cache_dir: Path | None = None, imatrix_ctx: int = 512,
          threads: int | None = None, recovered: Path | None = None, verify_cache: bool = False) -> PruneResult:
    """Convert ``hf_dir``, cut it as ``plan`` says (None: uncut base), quantize, check it loads.

    ``quant``: a llama-quantize type name (Q4_K_M, Q8_0, F16, ...) or "none".
    ``recovered``: a recover directory (its plan and tensors); see the module docstring.
    ``verify_cache``: trust a cached conversion only for the same weight bytes (see :func:`convert_cached`).
    """
    t0 = time.time()
    hf_dir, out = Path(hf_dir), Path(out)
    shape = checkpoint.check_model_dir(hf_dir)
    q = _quant_target(quant, outtype, imatrix_text)
    if out.is_dir():
        raise PruneError(f"output {out} is a directory; pass a file path such as {out / 'model-pruned.gguf'}")
    fp = checkpoint.fingerprint(hf_dir)
    plan, overrides = _resolve_plan(hf_dir, shape, fp, plan, recovered)
    the_plan = plan if plan is not None else Plan.identity(shape, fingerprint=fp)
    # convert
    base = convert_cached(hf_dir, outtype, cache_dir, verify=verify_cache)
    if out.resolve() == base.resolve():
        raise PruneError(f"output {out} is the cached conversion of the checkpoint; choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    # cut, quantize, check
    written = _cut_and_quantize(base, out, plan, overrides, shape, q, outtype, imatrix_text, imatrix_ctx, threads)
    if plan is not None:
        the_plan = replace(the_plan, gguf=written.base_identity)
    # finish: the plan next to the output
    plan_path = plan_path_for(out)
    write_text_atomic(plan_path, the_plan.to_json())
    result = PruneResult(path=out, plan_path=plan_path, base_gguf=base, quant=q, outtype=outtype,
                         architecture=written.architecture, plan_digest=the_plan.digest(),
                         bytes_base=base.stat().st_size, bytes_pruned=written.bytes_pruned,
                         bytes_out=out.stat().st_size, fallbacks=written.fallbacks, dims=written.dims,
                         seconds=round(time.time() - t0, 3), recovered=str(recovered) if recovered else "")
    log.info("pruned model: %s (%s, %s, %.1f MB; base %.1f MB)", out, written.architecture, q, result.bytes_out / 1e6,
             result.bytes_base / 1e6)
    return result


def _quant_target(quant: str, outtype: str, imatrix_text: Path | None) -> str:
    """The llama-quantize type to make, or NO_QUANT when the cut file is the result; checks the options."""
    if outtype not in OUTTYPES:
        raise PruneError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    q = str(quant).strip().upper()
    if q != NO_QUANT:
        q = check_quant_type(q)
    if q == outtype.upper() or q == "COPY":
        q = NO_QUANT  # the rewritten file already has that type
    if imatrix_text is not None and q == NO_QUANT:
        raise QuantizeError("an importance matrix only matters when quantizing; pass --quant as well")
    if imatrix_text is not None and not Path(imatrix_text).is_file():
        raise QuantizeError(f"calibration text {imatrix_text} does not exist")
    return q


def _resolve_plan(hf_dir: Path, shape: ModelShape, fp: str, plan: Plan | Path | None,
                  recovered: Path | None) -> tuple[Plan | None, dict[str, Override] | None]:
    """The plan to cut with (a recover directory's, when given) and the recovered tensors, checked against the
    checkpoint; (None, None) for the uncut base."""
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(Path(plan))
    overrides = None
    if recovered is not None:
        tied = bool(checkpoint.read_config(hf_dir).get("tie_word_embeddings", False))
        rec = open_recovered(recovered, shape, fp, plan=plan, tied=tied)
        plan, overrides = rec.plan, _overrides(rec)
    if plan is not None:
        validate(plan, shape, fp, source="plan")
        if plan.patches() and overrides is None:
            where = ", ".join(str(lp.index) for lp in plan.patches())
            raise PruneError(f"the plan has linear patches (layers {where}) "
                             "whose matrices live in a recover directory: pass --recovered DIR")
    return plan, overrides


@dataclass(frozen=True)
class _Written:
    """What the cut (or the uncut copy) and the quantization made."""

    architecture: str
    dims: list  # per written layer: LayerCut.dims()
    bytes_pruned: int  # the cut file before quantization
    fallbacks: list  # llama-quantize's fallbacks, as dicts
    base_identity: str  # the conversion's gguf_identity ("" without a plan)


def _overrides(rec: Recovered) -> dict[str, Override]:
    """A recover directory's tensors as rewrite() takes them: source GGUF names, GGUF layout, each loaded from
    recovered.safetensors only when its turn to be written comes."""
    s, path = rec.plan.shape, str(rec.tensors_path)

    def loader(hf: str):
        def load() -> np.ndarray:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                w = f.get_tensor(hf).float().numpy()
            return to_gguf_layout(hf, w, s)
        return load

    return {gguf_name(hf): Override(tuple(shape), loader(hf)) for hf, shape in rec.shapes.items()}


def _cut_and_quantize(base: Path, out: Path, plan: Plan | None, overrides: dict[str, Override] | None,
                      shape: ModelShape, q: str, outtype: str, imatrix_text: Path | None, imatrix_ctx: int,
                      threads: int | None) -> _Written:
    """Cut ``base`` (or take it uncut), quantize it to ``q`` or check it loads, and move the result to ``out``.

    Intermediates live in a temporary directory next to the output; the output itself is only ever replaced by
    a complete file that llama.cpp has loaded.
    """
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = tmpdir / f"model-{outtype}.gguf"
        identity = ""
        if plan is not None:
            # the checkpoint's fingerprint was checked above; the plan's GGUF identity (if it was applied to a
            # conversion in another type before) is replaced by the one of this conversion
            rw = rewrite(base, replace(plan, gguf=""), staged, fsync=False, overrides=overrides)
            architecture, dims, bytes_pruned, identity = rw.architecture, rw.layers, rw.bytes_out, rw.base_identity
        else:
            if q == NO_QUANT:
                shutil.copyfile(base, staged)
            architecture, bytes_pruned = shape.architecture, base.stat().st_size
            dims = [{"source_index": i, "n_head": shape.n_head, "n_head_kv": shape.n_head_kv, "n_ff": shape.n_ff,
                     "attention": "kept", "mlp": "kept"} for i in range(shape.n_layer)]
        fallbacks: list = []
        if q != NO_QUANT:
            qr = quantize(staged if plan is not None else base, out, q, imatrix_text=imatrix_text,
                          imatrix_ctx=imatrix_ctx, threads=threads)
            fallbacks = [asdict(f) for f in qr.fallbacks]
        else:
            llamacpp.load(staged, n_ctx=64).close()
            fsync_path(staged)
            os.replace(staged, out)
    except OSError as e:
        if not isinstance(e, OutOfSpaceError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise PruneError(f"no space left on the device of {out.parent} while writing {out.name} (the cut "
                         f"{outtype.upper()} intermediate and the {q} result need about "
                         f"{2 * base.stat().st_size / 1e6:.0f} MB there); free some space or write the output "
                         "somewhere else; nothing was left behind") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return _Written(architecture, dims, bytes_pruned, fallbacks, identity)
