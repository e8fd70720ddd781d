"""plan + base GGUF (F16/BF16/F32) → pruned GGUF that stock llama.cpp loads.

What is written, per kept layer of the plan (source layers are renumbered 0..n-1):

* kept whole: every tensor byte for byte;
* query heads removed: ``attn_q`` rows and ``attn_output`` columns of the removed
  heads go; ``attn_k``/``attn_v`` rows of KV groups left with no query head go;
* neurons removed: ``ffn_gate``/``ffn_up`` rows and ``ffn_down`` columns go;
* attention removed: ``n_head = n_head_kv = 0`` and no attention tensors (deci's
  loader creates none, not even ``attn_norm``, for such a layer). Exception: in
  the *first* kept layer llama.cpp reads the head size only when that layer has
  heads (``n_embd_head_k`` is 0 otherwise, breaking every later layer), so there
  the attention is written as one inert head: q/k/v/output all zero, which adds
  exactly nothing to the residual stream;
* MLP removed: a width-1 FFN whose gate/up/down are zero (adds exactly nothing).
  ``n_ff = 0`` is NOT used: deci's graph then skips the residual add and silently
  drops the layer's attention too.
* a linear patch (plan ``"patch": "linear"``, matrix from ``gguf-prune recover``):
  deci's "linear attention", ``n_head > 0, n_head_kv = 0`` with only ``attn_norm``
  and ``attn_output`` (ne ``(n_embd, n_embd)``, no bias: the graph adds none);
  llama.cpp computes ``attn_output · rmsnorm(h)·attn_norm`` and adds it to h.
  In place of a removed layer (``attention = "patch"``) ``attn_norm`` is all ones
  and the MLP is the width-1 zero FFN; on an attention-removed layer
  (``attention = "linear"``) the layer's own ``attn_norm`` and MLP stay.

``overrides`` (recovered tensors: fine-tuned weights, patch matrices) replace the
bytes of a base tensor (source names, GGUF layout, float32) before it is sliced, and
are cast to the base tensor's type; each is loaded only when written.

When every kept layer ends up with the same n_head/n_head_kv/n_ff and nothing is
removed inside a layer, the file stays ``llama`` (its global sizes describe every
layer). Otherwise it becomes ``deci``: every ``llama.*`` key is renamed and
``feed_forward_length``, ``attention.head_count`` and ``attention.head_count_kv``
become per-layer arrays of block_count entries. ``attention.key_length`` /
``value_length`` are always written. All other metadata (tokenizer, chat template,
...) is copied byte for byte; the plan itself is recorded under ``gguf_prune.*``.

The output is written to a temporary file in its directory and renamed when
complete; the input is only read. Which bytes make each output tensor is planned
in :mod:`gguf_prune.writing.jobs`; this module checks the inputs, writes the
metadata and streams the tensors.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from gguf_prune.atomic import OutOfSpaceError, atomic_output
from gguf_prune.errors import GgufPruneError
from gguf_prune.models import arch as archmod
from gguf_prune.plan import ModelShape, Plan, validate
from gguf_prune.writing.gguf_format import CHUNK_BYTES, SLICEABLE_TYPES
from gguf_prune.writing.gguf_names import OWN_KEY_PREFIX, PLAN_DIGEST_KEY, PLAN_KEY, VERSION_KEY
from gguf_prune.writing.gguf_read import GGUFFile, GGUFFormatError, read_gguf, read_rows
from gguf_prune.writing.gguf_write import GGUFStreamWriter
from gguf_prune.writing.jobs import LayerCut, Override, TensorJob, layer_cuts, missing_layer_tensors, plan_jobs

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 5.0  # long rewrites log their progress this often


class RewriteError(GgufPruneError, ValueError):
    """A GGUF that cannot be rewritten (or an output that cannot be written): what, where, what to do."""


@dataclass(frozen=True)
class RewriteResult:
    path: Path
    architecture: str  # "llama" or "deci"
    n_layer: int
    layers: list[dict] = field(default_factory=list)  # LayerCut.dims() of each written layer
    n_tensors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    plan_digest: str = ""
    base_identity: str = ""  # gguf_identity of the input: recorded in the plan written next to the output

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ------------------------------------------------------------------------- reading the base


def gguf_identity(gf: GGUFFile, sample: int = 256) -> str:
    """Which GGUF this is, cheaply: every tensor's name, type and shape, and ``sample`` bytes at the start,
    middle and end of its data (a few hundred reads, whatever the file's size). Two conversions of one
    checkpoint in one type agree; another model of the same shape, or another type, does not."""
    h = hashlib.sha256()
    with open(gf.path, "rb") as f:
        for t in gf.tensors:
            h.update(f"{t.name}:{int(t.ggml_type)}:{t.ne}".encode())
            for at in sorted({0, max(0, t.nbytes // 2 - sample // 2), max(0, t.nbytes - sample)}):
                n = min(sample, t.nbytes - at)
                f.seek(t.offset + at)
                chunk = f.read(n)
                if len(chunk) != n:
                    raise GGUFFormatError(f"{gf.path}: tensor {t.name} runs past the end of the file "
                                          "(truncated?); convert the checkpoint again")
                h.update(chunk)
    return h.hexdigest()[:16]


def shape_from_gguf(gf: GGUFFile) -> ModelShape:
    """The (unpruned) model shape a plan refers to, from a converted GGUF's metadata."""
    path = gf.path
    arch_name = gf.architecture
    spec = archmod.get(arch_name)
    k = {name: f"{arch_name}.{suffix}" for name, suffix in spec.keys.items()}
    for name in ("n_ff", "n_head", "n_head_kv"):
        if gf.is_array(k[name]):
            raise RewriteError(f"{path}: {k[name]} is a per-layer array: this GGUF has already been cut; "
                               "rewrite the GGUF converted from the original checkpoint instead")
    missing = [k[n] for n in ("n_layer", "n_embd", "n_ff", "n_head") if k[n] not in gf.kv]
    if missing:
        raise RewriteError(f"{path}: metadata keys {missing} are missing; re-convert the checkpoint with "
                           "convert_hf_to_gguf.py")
    n_embd = int(gf.get(k["n_embd"]))
    n_head = int(gf.get(k["n_head"]))
    n_head_kv = int(gf.get(k["n_head_kv"], n_head))
    head_dim = int(gf.get(k["key_length"], n_embd // n_head if n_head else 0))
    value_length = int(gf.get(k["value_length"], head_dim))
    if value_length != head_dim:
        raise RewriteError(f"{path}: key_length {head_dim} != value_length {value_length} is not supported")
    n_vocab = gf.get(k["n_vocab"])
    if n_vocab is None:
        embd = next((t for t in gf.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise RewriteError(f"{path}: no {k['n_vocab']} key and no token_embd.weight tensor")
        n_vocab = embd.ne[1]  # ne = (n_embd, n_vocab)
    return ModelShape(architecture=arch_name, n_layer=int(gf.get(k["n_layer"])), n_embd=n_embd,
                      n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                      n_ff=int(gf.get(k["n_ff"])), n_vocab=int(n_vocab))


def base_shape(base: Path) -> ModelShape:
    """The shape of a base GGUF that :func:`rewrite` can cut; RewriteError when it cannot (quantized, already
    cut, an architecture not supported)."""
    return _open_base(Path(base))[2]


def _open_base(base: Path) -> tuple[GGUFFile, archmod.ArchSpec, ModelShape]:
    try:
        gf = read_gguf(base)
    except GGUFFormatError as e:
        raise RewriteError(str(e)) from None
    arch_name = gf.architecture
    if arch_name not in archmod.ARCHITECTURES:
        hint = ""
        if PLAN_KEY in gf.kv:
            hint = " (this file was already cut by gguf-prune; rewrite the GGUF of the original checkpoint)"
        raise RewriteError(f"{base}: architecture {arch_name!r} is not supported{hint}; supported: "
                           f"{', '.join(archmod.ARCHITECTURES)} (checkpoints converted with convert_hf_to_gguf.py)")
    quantized = [f"{t.name} ({t.ggml_type.name})" for t in gf.tensors if t.ggml_type not in SLICEABLE_TYPES]
    if quantized:
        more = f" and {len(quantized) - 3} more" if len(quantized) > 3 else ""
        raise RewriteError(f"{base} is quantized ({', '.join(quantized[:3])}{more}): rows of quantized blocks "
                           "cannot be sliced. Convert the checkpoint with --outtype f16 (or bf16/f32), prune, "
                           "and quantize after pruning (gguf-prune prune does all three)")
    return gf, archmod.get(arch_name), shape_from_gguf(gf)


# ------------------------------------------------------------------------- planning the cut


def _plan_tensor_jobs(gf: GGUFFile, cuts: list[LayerCut], spec: archmod.ArchSpec, shape: ModelShape, base: Path,
                      overrides: Mapping[str, Override] | None, arch_out: str) -> list[TensorJob]:
    """The jobs of the rewrite (see :mod:`gguf_prune.writing.jobs`), or one RewriteError naming every problem."""
    family = archmod.family_of_arch(spec.name)
    jobs, problems = plan_jobs(gf.tensors, cuts, spec, shape, base, overrides,
                               permute_rope=family.neox_rope and arch_out == archmod.PER_LAYER_ARCH)
    if problems:
        raise RewriteError(f"{base}: cannot rewrite ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  - "
                           + "\n  - ".join(problems))
    missing = missing_layer_tensors(jobs, cuts)
    if missing:
        raise RewriteError(f"{base}: tensors missing from the input for {missing[:3]}; re-convert the checkpoint")
    return jobs


# ------------------------------------------------------------------------- writing


def _general(gf: GGUFFile, plan: Plan, n_params: int) -> dict[str, str]:
    """general.name and general.size_label of the pruned model, so llama-server and its web UI show what is
    served: "<source name> pruned 20%" and the parameter count it now has ("113M")."""
    from gguf.utility import size_label

    name = str(gf.get("general.name") or gf.path.stem)
    pct = round(100 * plan.removed_fraction())
    if pct:
        name = f"{name} pruned {pct}%"
    return {"general.name": name, "general.size_label": size_label(n_params, 0, 0, 0)}


def _metadata(writer: GGUFStreamWriter, gf: GGUFFile, spec: archmod.ArchSpec, arch_out: str,
              cuts: list[LayerCut], s: ModelShape, plan: Plan, n_params: int) -> None:
    U32 = GGUFValueType.UINT32
    uniform = arch_out == spec.name
    first = cuts[0]
    prefix_in = spec.name + "."

    def per_layer(attr: str):
        if uniform:
            return (getattr(first, attr), U32, None)
        return ([getattr(c, attr) for c in cuts], GGUFValueType.ARRAY, U32)

    overrides = {
        spec.keys["n_layer"]: (len(cuts), U32, None),
        spec.keys["n_ff"]: per_layer("n_ff"),
        spec.keys["n_head"]: per_layer("n_head"),
        spec.keys["n_head_kv"]: per_layer("n_head_kv"),
        spec.keys["key_length"]: (s.head_dim, U32, None),
        spec.keys["value_length"]: (s.head_dim, U32, None),
    }
    swa = _swa_layers(gf, spec, s.n_layer)
    if swa is not None:  # every kept layer keeps its kind (local sliding-window or global attention)
        overrides[spec.keys["swa_pattern"]] = ([swa[c.source] for c in cuts], GGUFValueType.ARRAY,
                                               GGUFValueType.BOOL)
    general = _general(gf, plan, n_params)
    written = set()
    for key, kv in gf.kv.items():
        if key.startswith(OWN_KEY_PREFIX):
            continue
        if key == "general.architecture":
            writer.add_kv(key, arch_out, GGUFValueType.STRING)
            continue
        if key in general:
            writer.add_kv(key, general.pop(key), GGUFValueType.STRING)
            continue
        if key.startswith(prefix_in):
            suffix = key[len(prefix_in):]
            new_key = f"{arch_out}.{suffix}"
            if suffix in overrides:
                writer.add_kv(new_key, *overrides[suffix])
                written.add(suffix)
                continue
            writer.add_kv_raw(new_key, kv.raw)
            continue
        writer.add_kv_raw(key, kv.raw)
    for suffix, value in overrides.items():
        if suffix not in written:
            writer.add_kv(f"{arch_out}.{suffix}", *value)
    for key, value in general.items():
        writer.add_kv(key, value, GGUFValueType.STRING)
    writer.add_kv(PLAN_KEY, plan.to_json(), GGUFValueType.STRING)
    writer.add_kv(PLAN_DIGEST_KEY, plan.digest(), GGUFValueType.STRING)
    writer.add_kv(VERSION_KEY, _version(), GGUFValueType.STRING)


def _swa_layers(gf: GGUFFile, spec: archmod.ArchSpec, n_layer: int) -> list[bool] | None:
    """Which source layers use sliding-window attention, as llama.cpp reads it (``load_swa_pattern``: a per-layer
    array, else every n-th layer global, n from the pattern key, 6 by default), or None without a window."""
    window = gf.get(f"{spec.name}.attention.sliding_window")
    if spec.name != "gemma3" or not window:
        return None
    key = f"{spec.name}.{spec.keys['swa_pattern']}"
    if gf.is_array(key):
        values = [bool(v) for v in gf.get(key)]
        if len(values) != n_layer:
            raise RewriteError(f"{gf.path}: {key} has {len(values)} entries for {n_layer} layers; re-convert")
        return values
    n = int(gf.get(key, 6))
    return [n == 0 or i % n < n - 1 for i in range(n_layer)]


def _version() -> str:
    try:
        return importlib.metadata.version("gguf-prune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def to_element(values: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """float values → the element type of a sliceable GGUF tensor (BF16 rounded to nearest even, as gguf-py)."""
    a = np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type == GGMLQuantizationType.BF16:
        u = a.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    return a.astype(SLICEABLE_TYPES[ggml_type])


def _emit(writer: GGUFStreamWriter, fd: int, job: TensorJob) -> None:
    ref = job.src
    if job.data is not None:  # recovered values: (whole) array in memory, one tensor at a time
        arr = to_element(job.data.load(), ref.ggml_type)  # numpy order, source shape
        if tuple(arr.shape) != tuple(job.data.shape):
            raise RewriteError(f"recovered tensor for {job.name!r} loaded with shape {arr.shape}, "
                               f"declared {job.data.shape}")
        writer.write_array(arr if job.op == "copy" else np.take(arr, job.index, axis=job.axis))
        writer.end_tensor()
        return
    if job.op == "copy":
        writer.copy_from(fd, ref.offset, ref.nbytes)
    elif job.op == "zeros":
        writer.write_zeros(job.nbytes)
    elif job.op == "ones":
        writer.write_array(to_element(np.ones(job.shape, dtype=np.float32), ref.ggml_type))
    else:
        # work on the tensor as rows: numpy (n_rows, row_len); a 1-D tensor is (n, 1)
        n_rows = ref.shape[0]
        row_bytes = ref.nbytes // n_rows
        idx = job.index
        if job.axis == 0 and _n_runs(idx) <= 256:
            # kept rows come in a few contiguous runs (whole heads): copy each run kernel to kernel
            for a, b in _runs(idx):
                writer.copy_from(fd, ref.offset + a * row_bytes, (b - a) * row_bytes)
        else:
            rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
            for r0 in range(0, n_rows, rows_per_chunk):
                r1 = min(n_rows, r0 + rows_per_chunk)
                if job.axis == 0:
                    sel = idx[(idx >= r0) & (idx < r1)]
                    if len(sel) == 0:
                        continue
                    lo, hi = int(sel.min()), int(sel.max()) + 1  # rows may come reordered (RoPE permutation)
                    block = read_rows(fd, ref, lo, hi)  # (rows, row_len)
                    writer.write_array(block[sel - lo])
                else:
                    block = read_rows(fd, ref, r0, r1)  # (rows, row_len)
                    writer.write_array(block[:, idx])  # keep columns
    writer.end_tensor()


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices → [start, stop) runs of consecutive values."""
    if len(idx) == 0:
        return []
    breaks = np.nonzero(np.diff(idx) != 1)[0]
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    stops = np.concatenate([idx[breaks] + 1, [idx[-1] + 1]])
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def _n_runs(idx: np.ndarray) -> int:
    return 0 if len(idx) == 0 else int(np.count_nonzero(np.diff(idx) != 1)) + 1


def _stream_tensors(writer: GGUFStreamWriter, src_fd: int, jobs: list[TensorJob]) -> None:
    """Declare every output tensor, write the header, then each tensor's bytes in order (progress logged)."""
    for job in jobs:
        writer.add_tensor(job.name, job.ne, job.src.ggml_type, job.nbytes)
    writer.write_header()
    total = sum(job.nbytes for job in jobs)
    done, last_report = 0, time.time()
    for k, job in enumerate(jobs):
        log.debug("[%d/%d] %s %s ne %s", k + 1, len(jobs), job.op, job.name, job.ne)
        _emit(writer, src_fd, job)
        done += job.nbytes
        if time.time() - last_report > PROGRESS_SECONDS:
            log.info("  %3.0f%% (%d/%d tensors, %.0f MB)", 100 * done / total, k + 1, len(jobs), done / 1e6)
            last_report = time.time()


def rewrite(base_gguf: Path, plan: Plan, out: Path, *, fsync: bool = True,
            overrides: Mapping[str, Override] | None = None) -> RewriteResult:
    """Cut ``base_gguf`` as ``plan`` says and write the result to ``out`` (atomically).

    ``fsync=False`` skips flushing the output to disk before the rename: for an
    intermediate that is quantized at once and deleted. ``overrides``: recovered
    tensors by *source* GGUF name (``blk.{i}.attn_q.weight``; a patch's matrix as
    ``blk.{i}.attn_output.weight`` of its layer), see :class:`Override`.

    Raises RewriteError (file problems), PlanError (a plan that does not fit this model).
    """
    t0 = time.time()
    # check the inputs
    base, out = Path(base_gguf), Path(out)
    if out.resolve() == base.resolve() or (out.exists() and base.exists() and os.path.samefile(out, base)):
        raise RewriteError(f"output {out} is the input GGUF; write the pruned model to another path "
                           "(the input is never overwritten)")
    gf, spec, shape = _open_base(base)
    identity = gguf_identity(gf)
    validate(plan, shape, source=f"plan for {base.name}", gguf=identity)
    # plan the jobs
    cuts = layer_cuts(plan)
    arch_out, why = plan.output_architecture()  # validate() refused a cut no architecture loads
    log.info("output architecture %s: %s", arch_out, why)
    jobs = _plan_tensor_jobs(gf, cuts, spec, shape, base, overrides, arch_out)
    if out.is_dir():
        raise RewriteError(f"output {out} is a directory; pass a file path such as {out / 'model-pruned.gguf'}")
    # write the metadata, stream the tensors
    log.info("rewriting %s → %s (%s, %d of %d layers)", base.name, out, arch_out, len(cuts), shape.n_layer)
    src_fd = os.open(base, os.O_RDONLY)
    try:
        with atomic_output(out, fsync=fsync) as out_fd:
            writer = GGUFStreamWriter(out_fd, alignment=gf.alignment)
            _metadata(writer, gf, spec, arch_out, cuts, shape, plan,
                      n_params=sum(int(np.prod(job.ne)) for job in jobs))
            _stream_tensors(writer, src_fd, jobs)
            bytes_out = writer.finish()
    except OutOfSpaceError:
        raise  # names the output and says what to do; a caller writing an intermediate may say it better
    except GGUFFormatError as e:
        raise RewriteError(f"{base} changed or broke while it was read ({e}); nothing was written to {out}") from None
    except OSError as e:
        raise RewriteError(f"could not write {out}: {e.strerror or e} ({e.filename or base}); "
                           "nothing was left behind") from None
    finally:
        os.close(src_fd)
    # finish
    result = RewriteResult(path=out, architecture=arch_out, n_layer=len(cuts), layers=[c.dims() for c in cuts],
                           n_tensors=len(jobs), bytes_in=base.stat().st_size, bytes_out=bytes_out,
                           seconds=round(time.time() - t0, 3), plan_digest=plan.digest(), base_identity=identity)
    log.info("wrote %s: %s, %d layers, %.1f MB → %.1f MB in %.1f s", out.name, arch_out, len(cuts),
             result.bytes_in / 1e6, result.bytes_out / 1e6, result.seconds)
    return result
