"""The scoring stage: measure what every layer, sub-block, head and neuron of a
Hugging Face llama-family model does, on calibration tokens, and write scores.json.

    score_model(hf_dir, out, ScoreOptions(...)) -> out

Every check that needs no weights runs first (:func:`gguf_prune.scoring.inputs.prepare`); then either the
model is loaded and measured here, on the prefix-cached engine (:mod:`gguf_prune.scoring.ablate`, the scan in
:mod:`gguf_prune.scoring.oneshot`), or, when asked for or when it would not fit
(:mod:`gguf_prune.scoring.engine_choice`), layer-major from the shards (:mod:`gguf_prune.scoring.stream`).
Either way the document is built by :mod:`gguf_prune.scores`, which owns the file format.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from gguf_prune import scores
from gguf_prune.models.cuts import apply_plan, load_model
from gguf_prune.plan import ModelShape
from gguf_prune.scoring import ablate, oneshot
from gguf_prune.scoring.engine_choice import StreamChoice, choose_engine
from gguf_prune.scoring.greedy import run_greedy
from gguf_prune.scoring.options import ScoreError, ScoreOptions
from gguf_prune.scoring.inputs import ScoreInputs, prepare, width_drops
from gguf_prune.scoring.memory import StreamError, activation_budget
from gguf_prune.scoring.taylor import head_taylor
from gguf_prune.scoring.width_repair import SCORE_ALPHA, WidthGrams

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the stage


def score_model(hf_dir: Path, out: Path, options: ScoreOptions = ScoreOptions()) -> Path:
    """Score ``hf_dir`` on calibration data and write ``out`` (scores.json), its neuron side file and plots."""
    t_start = time.perf_counter()
    hf_dir, out, o = Path(hf_dir), Path(out), options
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    inp = prepare(hf_dir, o)
    seconds["prepare"] = time.perf_counter() - t
    choice = choose_engine(hf_dir, o, inp)
    if choice is not None:
        return _score_streamed(hf_dir, out, o, inp, choice, seconds, t_start)
    run = _InMemoryRun(hf_dir, o, inp, seconds)
    run.measure()
    doc = run.document(out, t_start)
    scores.save(out, doc)
    log.info("wrote %s (%.0f s, %d layer evaluations)", out, seconds["total"], doc["timing"]["layer_evals"])
    if o.plots:
        _draw_plots(out)
    return out


def _score_streamed(hf_dir: Path, out: Path, o: ScoreOptions, inp: ScoreInputs, choice: StreamChoice,
                    seconds: dict, t_start: float) -> Path:
    from gguf_prune.scoring.stream import score_streamed

    try:
        part = score_streamed(hf_dir, out, o, inp, choice,
                              progress=lambda total, desc, unit: _progress(o, total, desc, unit))
    except StreamError as e:
        raise ScoreError(str(e)) from None
    seconds.update(part.seconds)
    settings = _settings(o, choice.device, part.batch_tokens, part.group_seqs)
    seconds["total"] = time.perf_counter() - t_start
    doc = scores.document(
        fingerprint=inp.fingerprint, shape=inp.shape, model_path=hf_dir, calibration=inp.calibration.to_dict(),
        settings=settings, full_nll=part.full_nll, layers=part.layers, seconds=seconds, layer_evals=part.layer_evals,
        heads=part.heads, neurons=part.neurons, stream=part.stream,
        units=None if choice.units is None else {"spec": choice.units, "layers": choice.owned})
    scores.save(out, doc)
    log.info("wrote %s (%.0f s, %d pass(es) over the weights)", out, seconds["total"], part.stream["passes"])
    if o.plots and choice.units is None:  # a slice's plots would show mostly nulls
        _draw_plots(out)
    return out


# ----------------------------------------------------------------------------- the model in memory


def _load(hf_dir: Path, o: ScoreOptions, device: str):
    dtype = "bfloat16" if o.dtype in ("bf16", "bfloat16") else "float32"
    if o.device_map is None:
        return load_model(hf_dir, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32, device_map=o.device_map)
    model.config.use_cache = False
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ScoreError(f"--device-map {o.device_map!r} offloads weights to disk ({meta[0]} …): scoring needs "
                         "every weight on a CPU or GPU; add memory or pass a device_map that fits")
    return model.eval()


def _batch_tokens(model, shape: ModelShape, seq_len: int, budget_bytes: int) -> int:
    """Tokens in one forward that fit ``budget_bytes`` of activations (MLP, residual, attention)."""
    elt = 2 if next(model.parameters()).dtype in (torch.bfloat16, torch.float16) else 4
    per_token = elt * (3 * shape.n_ff + 8 * shape.n_embd + shape.n_head * seq_len) + 64
    return max(seq_len, int(budget_bytes // per_token))


class _InMemoryRun:
    """One in-memory scoring run, in the order it happens: load the model and size the batches (here), then
    :meth:`measure` (the reference, the base plan's cuts, the neuron walk for width scores, the scan, Taylor,
    greedy), then :meth:`document`. Every KL is per real calibration token, against the unpruned model."""

    def __init__(self, hf_dir: Path, o: ScoreOptions, inp: ScoreInputs, seconds: dict[str, float]):
        self.hf_dir, self.o, self.inp, self.seconds = hf_dir, o, inp, seconds
        self.shape, self.cal, self.plan = inp.shape, inp.calibration, inp.plan
        t = time.perf_counter()
        self.model = _load(hf_dir, o, inp.device)
        seconds["load"] = time.perf_counter() - t
        self.device_desc = inp.device if o.device_map is None else f"device_map={o.device_map}"
        budget = activation_budget(inp.device if o.device_map is None else "cpu")
        self.batch_tokens = o.batch_tokens or _batch_tokens(self.model, self.shape, self.cal.seq_len, budget)
        # a quarter of a forward's tokens per group: the variants of one layer run stacked on it
        self.group_seqs = max(1, min(self.cal.n_seq, (self.batch_tokens // 4) // self.cal.seq_len))
        self.groups = list(self.cal.batches(self.group_seqs))
        self.drops = width_drops(o.width, self.shape.n_ff, o.width_align)
        self.taylor: dict | None = None
        self.greedy: dict | None = None
        log.info("scoring %s (%d layers) on %s, %s; %d sequences in %d batch(es), up to %d tokens per forward",
                 hf_dir, self.shape.n_layer, self.device_desc, o.dtype, self.cal.n_seq, len(self.groups),
                 self.batch_tokens)

    def measure(self) -> None:
        o, seconds = self.o, self.seconds
        self._reference()
        self._apply_base_plan()
        pre = self._neuron_walk() if self.drops else None
        with _progress(o, len(self.groups) * self.engine.n_layer, "score", "layer") as bar:
            self.res = oneshot.scan(self.engine, self.groups, self.refs, self.spec, progress=bar.update)
        seconds.update(self.res.seconds)
        if pre is not None:
            self.res.ff_count, self.res.ff_abs, self.res.ff_sq = pre.ff_count, pre.ff_abs, pre.ff_sq
        if o.heads:
            t = time.perf_counter()
            positions = [self.pos_of[s] for s in self.inp.head_layers]
            tokens = max(self.cal.seq_len, min(self.batch_tokens // 16, 1024))
            self.taylor = head_taylor(self.model, self.cal, positions, self.removed_heads, tokens=tokens)
            seconds["taylor"] = time.perf_counter() - t
        if o.greedy:
            t = time.perf_counter()
            with _progress(o, o.greedy * len(self.groups) * self.engine.n_layer, "greedy", "layer") as bar:
                self.greedy = run_greedy(self.engine, self.groups, self.refs, self.plan, self.shape, self.sources, o,
                                         self.res, bar.update)
            seconds["greedy"] = time.perf_counter() - t
        self.evals += self.engine.seq_layer_evals

    def _reference(self) -> None:
        """The unpruned model's predictions, once: every variant is measured against them."""
        self.engine = ablate.Engine(self.model, batch_tokens=self.batch_tokens)
        t = time.perf_counter()
        self.refs = [self.engine.reference(ids, mask) for ids, mask in self.groups]
        self.seconds["reference"] = time.perf_counter() - t
        self.n_real = sum(r.n_real for r in self.refs)
        self.n_tgt = sum(r.n_tgt for r in self.refs)
        self.full_nll = sum(r.nll for r in self.refs) / self.n_tgt
        self.evals = self.engine.seq_layer_evals

    def _apply_base_plan(self) -> None:
        """The model to score: with the base plan's cuts applied; positions ↔ source indices; the scan's spec."""
        plan, shape, o = self.plan, self.shape, self.o
        if plan is not None:
            apply_plan(self.model, plan)
            self.engine = ablate.Engine(self.model, batch_tokens=self.batch_tokens)
        self.sources = [lp.index for lp in plan.kept_layers()] if plan else list(range(shape.n_layer))
        self.pos_of = {s: p for p, s in enumerate(self.sources)}
        self.removed_heads = {}
        if plan is not None:
            for lp in plan.kept_layers():
                if lp.heads is not None and lp.heads:
                    self.removed_heads[self.pos_of[lp.index]] = set(range(shape.n_head)) - set(lp.heads)
        self.spec = ablate.ScanSpec(sublayers=o.sublayers,
                                    head_layers=tuple(self.pos_of[s] for s in self.inp.head_layers),
                                    removed_heads=self.removed_heads, neurons=o.neurons, tau=o.tau)

    def _neuron_walk(self) -> ablate.ScanResult:
        """Width variants follow each layer's energy order, so the neuron statistics come first (one walk)."""
        o = self.o
        with _progress(o, len(self.groups) * self.engine.n_layer, "neurons", "layer") as bar:
            self.spec, pre = width_spec(self.engine, self.groups, self.refs, self.spec, self.plan, self.shape,
                                        self.sources, self.drops, o.tau, o.repair, progress=bar.update,
                                        seconds=self.seconds)
        return pre

    # --- the document ------------------------------------------------------------------------
    def document(self, out: Path, t_start: float) -> dict:
        """The scores document; writes the neuron side file next to ``out`` on the way."""
        o, res, n_real = self.o, self.res, self.n_real
        layers = [self._layer_entry(s) for s in range(self.shape.n_layer)]
        heads = None
        if o.heads:
            hl, pos_of = self.inp.head_layers, self.pos_of
            heads = {"layers": hl,
                     "kl": {str(s): res.head_kl[pos_of[s]] / n_real for s in hl},
                     "kv_kl": {str(s): res.kv_kl[pos_of[s]] / n_real for s in hl},
                     "norm": {str(s): res.head_norm[pos_of[s]] / n_real for s in hl},
                     "taylor": {str(s): self.taylor[pos_of[s]] for s in hl}}
        neurons = None
        # width cuts follow the energy order: `plan --units width` reads it from the side file
        if o.neurons or self.drops:
            neurons = write_neurons(out, self.engine, res, self.sources, n_real, o.tau)
        base = None
        if self.plan is not None:
            base = scores.base_plan_entry(self.plan, str(o.plan), res.base_kl / n_real, res.base_nll / self.n_tgt)
        settings = _settings(o, self.device_desc, self.batch_tokens, self.group_seqs)
        self.seconds["total"] = time.perf_counter() - t_start
        width = {"drops": list(self.drops), "order": "energy", "align": o.width_align} if self.drops else None
        if width and o.repair:
            width["repair"] = {"alpha": SCORE_ALPHA, "cross_fitted": True}
        return scores.document(
            fingerprint=self.inp.fingerprint, shape=self.shape, model_path=self.hf_dir, calibration=self.cal.to_dict(),
            settings=settings, full_nll=self.full_nll, layers=layers, seconds=self.seconds,
            layer_evals=int(round(self.evals / self.cal.n_seq)), base_plan=base, heads=heads, neurons=neurons,
            greedy=self.greedy, width=width)

    def _layer_entry(self, s: int) -> dict:
        p = self.pos_of.get(s)
        if p is None:
            return scores.layer_entry(s, removed=True)
        res, lay, n_real = self.res, self.engine.layers[p], self.n_real
        width_kl, width_kl_repaired = width_kls(res, self.spec, p, self.drops, n_real, self.o.repair)
        return scores.layer_entry(
            s, bi=scores.per_token(res.bi[p], n_real), kl=scores.per_token(res.kl[p], n_real),
            ppl=math.exp(res.nll[p] / self.n_tgt) if self.o.ppl else None,
            attn_kl=scores.per_token(res.attn_kl[p], n_real), mlp_kl=scores.per_token(res.mlp_kl[p], n_real),
            attn_bi=scores.per_token(res.attn_bi[p], n_real) if ablate.has_attention(lay) else None,
            mlp_bi=scores.per_token(res.mlp_bi[p], n_real) if ablate.has_mlp(lay) else None,
            width_kl=width_kl, width_kl_repaired=width_kl_repaired)


def width_spec(engine: ablate.Engine, groups, refs, spec: ablate.ScanSpec, plan, shape: ModelShape,
               sources: list[int], drops: tuple[int, ...], tau: float, repair: bool, progress=None,
               seconds: dict | None = None) -> tuple[ablate.ScanSpec, ablate.ScanResult]:
    """The neuron walk that width scores need first: neuron statistics (and, with ``repair``, the Grams each
    width's repair is fitted from) on one walk; returns ``spec`` with the width variants set (each layer's live
    neurons in energy order, the drops, the repairs' fits) and the walk's result (the neuron statistics)."""
    seconds = {} if seconds is None else seconds
    grams = WidthGrams(float(getattr(engine.model.config, "rms_norm_eps", 1e-6))) if repair else None
    pre = oneshot.scan(engine, groups, refs, ablate.ScanSpec(layers=False, neurons=True, tau=tau, width_grams=grams),
                       progress=progress)
    seconds["neuron_walk"] = sum(pre.seconds.values())
    order, fits = {}, {}
    t = time.perf_counter()
    for p, lay in enumerate(engine.layers):
        if p not in pre.ff_count:
            continue
        live = plan.layers[sources[p]].kept_neurons(shape) if plan is not None else None
        order[p] = scores.energy_order(scores.neuron_energy(_column_norms(lay), pre.ff_sq[p], pre.n_real), live)
        if grams is not None:  # the repair of each width, fitted now, scored on the scan
            f = grams.fits(p, order[p], [d for d in drops if d < len(order[p])], lay.mlp.down_proj.weight)
            grams.grams.pop(p, None)
            if f:
                fits[p] = f
    if grams is not None:
        seconds["width_repair_fit"] = time.perf_counter() - t
    return replace(spec, neurons=False, width_drops=drops, width_order=order, width_fits=fits), pre


def width_kls(res: ablate.ScanResult, spec: ablate.ScanSpec, p: int, drops: tuple[int, ...], n_real: int,
              repair: bool) -> tuple[list | None, list | None]:
    """Layer position ``p``'s width KLs per drop, without and (``repair``) with repair; None where the layer has
    no more live neurons than the drop."""
    if not drops:
        return None, None
    w, wr = res.width_kl.get(p), res.width_kl_repaired.get(p)
    live = len(spec.width_order.get(p, ()))
    kl = [scores.per_token(w[k], n_real) if w is not None and d < live else None for k, d in enumerate(drops)]
    if not repair:
        return kl, None
    return kl, [scores.per_token(wr[k], n_real) if wr is not None and d < live else None for k, d in enumerate(drops)]


def _column_norms(layer):
    """‖down_proj column j‖ for each neuron j: down_proj is (n_embd, n_ff), column j is neuron j's output."""
    return layer.mlp.down_proj.weight.detach().float().norm(dim=0).cpu().numpy()


def write_neurons(out: Path, engine: ablate.Engine, res: ablate.ScanResult, sources: list[int], n_real: int,
                   tau: float) -> dict:
    col_norm = {p: _column_norms(engine.layers[p]) for p in res.ff_count}
    tensors = scores.neuron_tensors([(s, p) for p, s in enumerate(sources)], res.ff_count, res.ff_abs,
                                    res.ff_sq, col_norm, n_real)
    return scores.save_neurons(out, tensors, tau, n_real)


# ----------------------------------------------------------------------------- finishing


def _settings(o: ScoreOptions, device: str, batch_tokens: int, group_seqs: int) -> dict:
    """The document's ``settings``: every option as given (JSON-ready), what was resolved, the library versions."""
    import transformers

    settings = {k: (str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v))
                for k, v in asdict(o).items()}
    settings.update({"device_resolved": device, "batch_tokens_resolved": batch_tokens, "group_seqs": group_seqs,
                     "torch": torch.__version__, "transformers": transformers.__version__})
    return settings


def _draw_plots(out: Path) -> None:
    from gguf_prune.scoring.plots import plot_scores

    try:
        for png in plot_scores(out):
            log.info("wrote %s", png)
    except Exception as e:  # plots are a convenience: never lose the scores for them
        log.warning("could not draw the score plots (%s: %s); scores.json is complete", type(e).__name__, e)


class _NoBar:
    def update(self, n=1):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(o: ScoreOptions, total: int, desc: str, unit: str):
    if not o.progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                mininterval=1.0)


# ----------------------------------------------------------------------------- summary


def summary(path: Path, top: int = 5) -> str:
    """A few lines about a scores file: reference perplexity, the cheapest layers, greedy order, files."""
    d = scores.load(path, allow_slice=True)
    cal = d["calibration"]
    lines = [f"scored {d['model']['path']} on {cal['n_seq']} × {cal['seq_len']} {cal['kind']} tokens "
             f"({cal['n_tokens']} real) in {d['timing']['seconds'].get('total', 0):.0f} s; "
             f"full model ppl {d['full']['ppl']:.3f}"]
    if d["base_plan"]:
        lines.append(f"base plan {d['base_plan']['digest']}: KL {d['base_plan']['kl']:.4f}, "
                     f"ppl {d['base_plan']['ppl']:.3f}")
    live = sorted((e for e in d["layers"] if e["kl"] is not None), key=lambda e: e["kl"])
    lines.append("lowest-KL layers: " + ", ".join(f"{e['index']} ({e['kl']:.4f})" for e in live[:top]))
    if d["greedy"]:
        lines.append("greedy: " + " → ".join(f"{s['kind']} {s['layer']} ({s['kl']:.4f})"
                                             for s in d["greedy"]["steps"]))
    if d.get("stream"):
        st = d["stream"]
        lines.append(f"streamed layer-major: {st.get('passes')} pass(es) over the weights, "
                     f"{st.get('bytes_read', 0) / 2**30:.2f} GiB read ({st.get('why')})")
    if d.get("units"):
        lines.append(f"slice --units {d['units']['spec']} (layers {d['units']['layers'][0]}-"
                     f"{d['units']['layers'][-1]}): join the slices with `gguf-prune score --merge ... -o scores.json`")
    files = [Path(path).name] + ([d["neurons"]["file"]] if d["neurons"] else [])
    lines.append(f"wrote {', '.join(files)} in {Path(path).parent}")
    return "\n".join(lines)
