"""Layer-major streamed scoring: score a model bigger than memory, reading each layer's weights once.

The in-memory engine (:mod:`gguf_prune.scoring.ablate`) holds the whole model and, at each layer i, sends the
variants born there through layers i+1… before moving on. This engine turns the loops round: it reads
decoder layer j's tensors from the safetensors shards (memory-mapped, one layer at a time, closed after
the read), and advances through it *every* variant that needs it before reading layer j+1:

* the full model (the main path), which also yields BI, neuron statistics and head output norms;
* every variant born at an earlier layer i < j: layer i bypassed (its state at the input of layer i+1
  is the full model's input to layer i), its attention or MLP bypassed, one query head or one KV group
  zeroed. A variant is born from the main path the moment it diverges, so prefix reuse is free:
  L·(L−1)/2 layer evaluations for the layer ablation, each layer's weights read once.

After the last layer the final norm and output matrix are read once, the full model's predictions become
the reference, and each variant's KL(reference ‖ variant) is computed one variant at a time with the same
closed form as the in-memory engine (:meth:`ablate.Engine.divergence`), so the numbers are the same.

Memory: one layer's weights, the live variants' states (one (b, T, d) tensor each), the activations of one
stacked forward, the reference. When the variants' states do not fit the budget (``--max-memory``, default
what the device has free) the variants are cut into *passes*, in birth order: pass k starts at the first
layer where its variants are born, from the main path's state saved there during the first pass, so it
re-reads only the layers from there on. When even one layer's variants do not fit, the calibration
sequences are split into token groups, each scored on its own (KL sums add up). How many passes the run
made, and why, goes into scores.json (``stream``).

On CUDA the layer's weights, the live states and the output matrix sit on the GPU; the main path's saved
states and the checkpoint stay on the CPU / disk.

Where the parts live: the checkpoint reader and the layer-by-layer engine in
:mod:`gguf_prune.scoring.stream_engine`, the memory plan (token groups, passes) in
:mod:`gguf_prune.scoring.memory`, the Taylor passes in :mod:`gguf_prune.scoring.taylor`; this module walks
the weights (:func:`scan_streamed`) and turns the sums into scores (:func:`score_streamed`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from gguf_prune import scores
from gguf_prune.scoring import ablate
from gguf_prune.scoring.engine_choice import StreamChoice
from gguf_prune.scoring.inputs import ScoreInputs
from gguf_prune.scoring.options import ScoreOptions
from gguf_prune.scoring.memory import MemoryPlan, fmt_bytes, plan_memory
from gguf_prune.scoring.stream_engine import StreamEngine, open_checkpoint
from gguf_prune.scoring.taylor import taylor_streamed

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One ablation unit: born from the main path at ``layer``."""

    layer: int
    kind: str  # layer | attn | mlp | head | kv
    index: int = 0  # head or KV group index
    zero: tuple[int, ...] = ()  # query heads zeroed (head, kv)


def variants_of(layers: Sequence[int], n_head: int, n_head_kv: int, sublayers: bool,
                head_layers: Sequence[int]) -> list[Variant]:
    """Every unit to ablate, in birth order: per layer (layer, attn, mlp), then its heads and KV groups."""
    out = []
    heads = set(head_layers)
    for i in sorted(layers):
        out.append(Variant(i, "layer"))
        if sublayers:
            out += [Variant(i, "attn"), Variant(i, "mlp")]
        if i in heads:
            for kind, idx, zs in ablate._head_zero_sets(n_head, n_head_kv, set()):
                out.append(Variant(i, kind, idx, tuple(zs)))
    return out


# ----------------------------------------------------------------------------- the layer-major scan


@dataclass
class StreamResult:
    scan: ablate.ScanResult
    col_norm: dict = field(default_factory=dict)  # layer → (n_ff,) ‖down_proj column‖
    taylor: dict = field(default_factory=dict)  # layer → (n_head,)
    memory: MemoryPlan | None = None
    n_groups: int = 0
    bytes_read: int = 0
    layer_reads: int = 0
    full_nll: float = 0.0
    seconds: dict = field(default_factory=dict)


def _advance(eng: StreamEngine, layer, live: list, ctx: ablate.Context, per: int) -> None:
    """Every live variant state through ``layer``, stacked ``per`` at a time, in place."""
    for k in range(0, len(live), per):
        chunk = live[k:k + per]
        x = chunk[0][1] if len(chunk) == 1 else torch.cat([s for _, s in chunk], dim=0)  # (n·b, T, d)
        y = eng.forward(layer, x, ctx, reps=len(chunk))
        for j, part in enumerate(y.chunk(len(chunk), dim=0) if len(chunk) > 1 else (y,)):
            live[k + j] = (chunk[j][0], part)
        del x, y


def _births(eng: StreamEngine, layer, vs: list[Variant], h, h_mid, o_in, ctx, per: int) -> list:
    """States at the input of layer i+1 of the variants born at layer i (as oneshot._layer_variants / _head_variants)."""
    out = []
    b = h.shape[0]
    heads = [v for v in vs if v.kind in ("head", "kv")]
    for v in vs:
        if v.kind == "layer":
            out.append((v, h))
        elif v.kind == "attn":  # attention output zeroed, residual kept
            out.append((v, h + eng.mlp(layer, h)))
        elif v.kind == "mlp":
            out.append((v, h_mid))
    nh, hd = eng.n_head, eng.head_dim
    for k in range(0, len(heads), per):
        chunk = heads[k:k + per]
        n = len(chunk)
        x = o_in.repeat(n, 1, 1).view(n, b, -1, nh, hd)  # (n, b, T, n_head, hd)
        for j, v in enumerate(chunk):
            x[j, :, :, list(v.zero)] = 0
        a_v = layer.self_attn.o_proj(x.view(n * b, -1, nh * hd))  # (n·b, T, d)
        hm = h.repeat(n, 1, 1) + a_v
        y = hm + eng.mlp(layer, hm)  # the input of layer i+1 in each variant
        out += [(v, part) for v, part in zip(chunk, y.chunk(n, dim=0))]
    return out


class _LayerMajorScan:
    """One :func:`scan_streamed` call: the running sums (an ablate.ScanResult) and the walk over the weights, one
    token group and one pass at a time."""

    def __init__(self, eng: StreamEngine, mem: MemoryPlan, n_groups: int, head_norm_layers: Sequence[int],
                 neurons: bool, tau: float, bar=None):
        L, nh, nkv = eng.n_layer, eng.n_head, eng.n_head_kv
        self.eng, self.mem, self.neurons, self.tau, self.bar = eng, mem, neurons, tau, bar
        self.r = r = ablate.ScanResult(bi=np.zeros(L), attn_bi=np.zeros(L), mlp_bi=np.zeros(L), kl=np.zeros(L),
                                       nll=np.zeros(L), attn_kl=np.zeros(L), mlp_kl=np.zeros(L))
        self.out = StreamResult(scan=r, memory=mem, n_groups=n_groups)
        self.norm_layers = set(head_norm_layers)
        for i in self.norm_layers:
            r.head_norm[i] = np.zeros(nh)
        for v in (v for p in mem.passes for v in p if v.kind in ("head", "kv")):
            r.head_kl.setdefault(v.layer, np.zeros(nh))
            r.kv_kl.setdefault(v.layer, np.zeros(nkv))
        self.starts = sorted({p[0].layer for p in mem.passes[1:] if p})  # where the passes after the first start
        self.t_layers = self.t_head = 0.0

    def token_group(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Every pass over the weights for one token group (ids, mask: (b, T))."""
        ctx = self.eng.context(ids, mask)
        b, T = ids.shape
        per = max(1, self.mem.batch_tokens // (b * T))  # variant states stacked into one forward
        rr = mask.bool().to(self.eng.device)  # (b, T): the real tokens
        saved: dict[int, torch.Tensor] = {}  # layer → the main path's state at its input, where a later pass starts
        ref = None
        for p, variants in enumerate(self.mem.passes):
            ref = self._pass(p, variants, ids, mask, ctx, per, rr, saved, ref)

    def _pass(self, p: int, variants: list[Variant], ids, mask, ctx: ablate.Context, per: int, rr, saved: dict,
              ref: ablate.Reference | None) -> ablate.Reference:
        """Pass ``p``: the main path from where the pass starts, its variants born from it and carried through every
        later layer, then each scored against the reference (which the first pass makes)."""
        eng, first = self.eng, p == 0
        start = 0 if first else variants[0].layer
        last_birth = variants[-1].layer if variants else -1
        by_layer: dict[int, list[Variant]] = {}
        for v in variants:
            by_layer.setdefault(v.layer, []).append(v)
        h = eng.embed(ids) if start == 0 else saved[start].to(eng.device)  # (b, T, d)
        if not first and all(q[0].layer != start for q in self.mem.passes[p + 1:] if q):
            del saved[start]  # no later pass starts here
        live: list = []  # (variant, its state at the input of the next layer)
        t0 = time.perf_counter()
        for j in range(start, eng.n_layer):
            layer = eng.load_layer(j)
            self.out.layer_reads += 1
            _advance(eng, layer, live, ctx, per)
            if first or j <= last_birth:  # later passes need the main path only until their last birth
                h = self._main_path(layer, j, h, first, by_layer.get(j, []), live, ctx, per, rr, saved)
            del layer
            self._tick(p, live)
        t1 = time.perf_counter()
        self.t_layers += t1 - t0
        head = eng.load_head(self.mem.logit_tokens)
        if first:
            ref = head.reference_from(h, ids, mask)
            self.r.n_real += ref.n_real
            self.r.n_tgt += ref.n_tgt
            self.out.full_nll += ref.nll
        del h
        self._score_variants(head, live, ref)
        del head, live
        self.t_head += time.perf_counter() - t1
        return ref

    def _main_path(self, layer, j: int, h: torch.Tensor, first: bool, born: list[Variant], live: list,
                   ctx: ablate.Context, per: int, rr, saved: dict) -> torch.Tensor:
        """Layer ``j`` on the main path: its statistics on the first pass, and the variants ``born`` here join
        ``live``. Returns the main path's state after the layer."""
        eng = self.eng
        want_o = any(v.kind in ("head", "kv") for v in born) or (first and j in self.norm_layers)
        if first and j in self.starts:
            saved[j] = h.to("cpu")  # a later pass starts here
        got: dict = {}
        hooks = []
        if want_o:  # o_proj's input: every head's attention output, for head variants and head norms
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a: got.__setitem__("o_in", a[0])))
        if first and self.neurons:  # down_proj's input: the MLP's neuron activations
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a: got.__setitem__("ff", a[0])))
        try:
            h_mid = h + eng.attn(layer, h, ctx)
            h_out = h_mid + eng.mlp(layer, h_mid)
        finally:
            for hk in hooks:
                hk.remove()
        if first:
            self._main_statistics(layer, j, h, h_mid, h_out, got, rr)
        if born:
            live += _births(eng, layer, born, h, h_mid, got.get("o_in"), ctx, per)
        return h_out

    def _main_statistics(self, layer, j: int, h, h_mid, h_out, got: dict, rr) -> None:
        """Block influence of layer ``j`` and its sub-blocks, its neuron statistics, its head output norms."""
        r, out = self.r, self.out
        r.bi[j] += ablate._one_minus_cos(h, h_out, rr)
        r.attn_bi[j] += ablate._one_minus_cos(h, h_mid, rr)
        r.mlp_bi[j] += ablate._one_minus_cos(h_mid, h_out, rr)
        if "ff" in got:
            a = got["ff"][rr].float().abs()  # (n_real, n_ff)
            r.ff_count[j] = r.ff_count.get(j, 0) + (a > self.tau).sum(0, dtype=torch.float64).cpu().numpy()
            r.ff_abs[j] = r.ff_abs.get(j, 0) + a.sum(0, dtype=torch.float64).cpu().numpy()
            r.ff_sq[j] = r.ff_sq.get(j, 0) + a.double().pow(2).sum(0).cpu().numpy()
            if j not in out.col_norm:  # down_proj: (n_embd, n_ff), column j is neuron j's output
                out.col_norm[j] = layer.mlp.down_proj.weight.float().norm(dim=0).cpu().numpy()
        if j in self.norm_layers and "o_in" in got:
            b, T = h.shape[:2]
            ph = got["o_in"].float().view(b, T, self.eng.n_head, self.eng.head_dim).norm(dim=-1)  # (b, T, n_head)
            r.head_norm[j] += ph[rr].sum(0, dtype=torch.float64).cpu().numpy()

    def _score_variants(self, head, live: list, ref: ablate.Reference) -> None:
        """Each live variant's KL (and, for a removed layer, NLL) against the reference, added to its sums."""
        r = self.r
        for k in range(len(live)):  # one variant at a time: never every variant's logits at once
            v, state = live[k]
            live[k] = (v, None)
            kl, nll = head.divergence(state, ref, 1)
            if v.kind == "layer":
                r.kl[v.layer] += kl[0]
                r.nll[v.layer] += nll[0]
            elif v.kind == "attn":
                r.attn_kl[v.layer] += kl[0]
            elif v.kind == "mlp":
                r.mlp_kl[v.layer] += kl[0]
            elif v.kind == "head":
                r.head_kl[v.layer][v.index] += kl[0]
            else:
                r.kv_kl[v.layer][v.index] += kl[0]
            del state

    def _tick(self, p: int, live: list) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        post = getattr(self.bar, "set_postfix_str", None)
        if post:
            post(f"pass {p + 1}/{len(self.mem.passes)}, {len(live)} variants in flight, "
                 f"read {fmt_bytes(self.eng.ckpt.bytes_read)}", refresh=False)

    def finish(self) -> StreamResult:
        r = self.r
        if self.eng.n_head == self.eng.n_head_kv:  # MHA: a KV group is one head
            for i in r.kv_kl:
                r.kv_kl[i] = r.head_kl[i]
        self.out.bytes_read = self.eng.ckpt.bytes_read
        self.out.seconds = {"layers": self.t_layers, "head": self.t_head}
        return self.out


@torch.inference_mode()
def scan_streamed(eng: StreamEngine, groups: Sequence[tuple[torch.Tensor, torch.Tensor]], mem: MemoryPlan,
                  head_norm_layers: Sequence[int], neurons: bool, tau: float,
                  bar=None) -> StreamResult:
    """Score every variant of ``mem.passes`` on every token group; main-path statistics on every layer."""
    scan = _LayerMajorScan(eng, mem, len(groups), head_norm_layers, neurons, tau, bar)
    for ids, mask in groups:
        scan.token_group(ids, mask)
    return scan.finish()


# ----------------------------------------------------------------------------- the score stage, streamed


@dataclass
class StreamedScores:
    """What the streamed scorer measured: the parts of the scores document it owns. The stage's driver
    (:func:`gguf_prune.scoring.measure.score_model`) adds the settings and the rest and writes the document."""

    layers: list  # scores.layer_entry per source layer
    heads: dict | None
    neurons: dict | None  # the side file is written already
    full_nll: float
    stream: dict  # the document's "stream" entry: passes over the weights and why, bytes read, the memory plan
    seconds: dict
    layer_evals: int
    batch_tokens: int
    group_seqs: int


def score_streamed(hf_dir: Path, out: Path, o: ScoreOptions, inp: ScoreInputs, choice: StreamChoice,
                   progress: Callable) -> StreamedScores:
    """Everything score_model measures, layer-major from the shards, for ``choice.owned`` layers' units;
    ``progress(total, desc, unit)`` makes a progress bar."""
    t_start = time.perf_counter()
    ckpt = open_checkpoint(hf_dir)  # every tensor present with its shape: before any long work
    shape, cal = inp.shape, inp.calibration
    dtype = torch.bfloat16 if o.dtype in ("bf16", "bfloat16") else torch.float32
    elt = 2 if dtype == torch.bfloat16 else 4
    stored = {t.dtype for n, t in ckpt.tensors.items() if n.startswith("model.layers.")}
    owned = set(choice.owned)
    variants = variants_of(choice.owned, shape.n_head, shape.n_head_kv, o.sublayers,
                           [i for i in inp.head_layers if i in owned])
    mem = plan_memory(ckpt, cal.n_seq, cal.seq_len, variants, choice.budget, elt,
                      store_is_compute=stored == {"F32" if elt == 4 else "BF16"}, batch_tokens=o.batch_tokens)
    groups = list(cal.batches(mem.group_seqs))
    n_pass = len(groups) * len(mem.passes)
    log.info("streaming %s (%d layers, %s on disk) on %s, %s, within %s: %d variants, %d pass(es) over the "
             "weights (%s)", hf_dir, shape.n_layer, fmt_bytes(ckpt.total_bytes()), choice.device, o.dtype,
             fmt_bytes(choice.budget), len(variants), n_pass, mem.why)
    eng = StreamEngine(ckpt, choice.device, dtype)
    taylor_layers = [i for i in inp.head_layers if i in owned] if o.heads else []
    res, t_taylor = _measure(eng, groups, mem, o, inp, taylor_layers, progress)
    r = res.scan
    taylor_reads = 2 * shape.n_layer if taylor_layers else 0  # a forward and a backward pass for Taylor
    passes_why = mem.why + (f"; +2 passes (forward and backward) for the Taylor head scores of "
                            f"{len(taylor_layers)} layer(s)" if taylor_layers else "")
    layers = _layer_entries(r, shape.n_layer, owned, o)
    heads = _head_entries(res, inp) if o.heads else None
    neurons = _write_neurons(out, res, r.n_real, o.tau) if o.neurons else None
    total_passes = n_pass + (2 if taylor_layers else 0)
    log.info("streamed %d pass(es) over the weights, %d layer reads, %s read: %s", total_passes,
             res.layer_reads + taylor_reads, fmt_bytes(ckpt.bytes_read), passes_why)
    seconds = {"layers": res.seconds["layers"], "head": res.seconds["head"], "stream": time.perf_counter() - t_start}
    if taylor_layers:
        seconds["taylor"] = t_taylor
    stream = {"engine": "layer-major", "device": choice.device, "dtype": o.dtype, "reason": choice.reason,
              **mem.to_dict(len(groups)), "passes": total_passes, "why": passes_why,
              "bytes_read": ckpt.bytes_read, "checkpoint_bytes": ckpt.total_bytes(),
              "layer_reads": res.layer_reads + taylor_reads, "units": choice.units, "owned_layers": sorted(owned)}
    return StreamedScores(layers=layers, heads=heads, neurons=neurons, full_nll=res.full_nll / r.n_tgt,
                          stream=stream, seconds=seconds, layer_evals=int(round(eng.seq_layer_evals / cal.n_seq)),
                          batch_tokens=mem.batch_tokens, group_seqs=mem.group_seqs)


def _measure(eng: StreamEngine, groups: list, mem: MemoryPlan, o: ScoreOptions, inp: ScoreInputs,
             taylor_layers: list[int], progress: Callable) -> tuple[StreamResult, float]:
    """The scan over every pass, then the Taylor passes; the result and the Taylor passes' seconds."""
    n_layer, cal = inp.shape.n_layer, inp.calibration
    walked = sum(n_layer - (0 if k == 0 else p[0].layer) for k, p in enumerate(mem.passes)) * len(groups)
    with progress(walked + (2 * n_layer if taylor_layers else 0), "score (streamed)", "layer") as bar:
        res = scan_streamed(eng, groups, mem, inp.head_layers if o.heads else [], o.neurons, o.tau, bar=bar)
        t = time.perf_counter()
        if taylor_layers:
            tokens = max(cal.seq_len, min(mem.batch_tokens // 16, 1024))
            res.taylor = taylor_streamed(eng, list(cal.batches(max(1, tokens // cal.seq_len))), taylor_layers,
                                         bar=bar)
        t_taylor = time.perf_counter() - t
    return res, t_taylor


def _layer_entries(r: ablate.ScanResult, n_layer: int, owned: set[int], o: ScoreOptions) -> list[dict]:
    """Every source layer's entry: BI everywhere (the main path passes every layer), KLs for the owned layers."""
    n_real = r.n_real
    out = []
    for s in range(n_layer):
        mine = s in owned
        out.append(scores.layer_entry(
            s, bi=scores.per_token(r.bi[s], n_real),
            kl=scores.per_token(r.kl[s], n_real) if mine else None,
            ppl=math.exp(r.nll[s] / r.n_tgt) if (o.ppl and mine) else None,
            attn_kl=scores.per_token(r.attn_kl[s], n_real) if (mine and o.sublayers) else None,
            mlp_kl=scores.per_token(r.mlp_kl[s], n_real) if (mine and o.sublayers) else None,
            attn_bi=scores.per_token(r.attn_bi[s], n_real), mlp_bi=scores.per_token(r.mlp_bi[s], n_real)))
    return out


def _head_entries(res: StreamResult, inp: ScoreInputs) -> dict:
    """The ``heads`` entry; NaN for the heads of a layer another --units slice owns."""
    r, n_real, shape = res.scan, res.scan.n_real, inp.shape
    nan_h, nan_kv = np.full(shape.n_head, np.nan), np.full(shape.n_head_kv, np.nan)
    return {"layers": inp.head_layers,
            "kl": {str(s): r.head_kl[s] / n_real if s in r.head_kl else nan_h for s in inp.head_layers},
            "kv_kl": {str(s): r.kv_kl[s] / n_real if s in r.kv_kl else nan_kv for s in inp.head_layers},
            "norm": {str(s): r.head_norm[s] / n_real for s in inp.head_layers},
            "taylor": {str(s): res.taylor.get(s, nan_h) for s in inp.head_layers}}


def _write_neurons(out: Path, res: StreamResult, n_real: int, tau: float) -> dict:
    """The neuron side file in the in-memory scorer's format (one statistic per source layer); its entry."""
    r = res.scan
    tensors = scores.neuron_tensors([(s, s) for s in sorted(r.ff_count)], r.ff_count, r.ff_abs, r.ff_sq,
                                    res.col_norm, n_real)
    return scores.save_neurons(out, tensors, tau, n_real)
