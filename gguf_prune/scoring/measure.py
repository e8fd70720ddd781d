"""The scoring stage: measure what every layer, sub-block, head and neuron of a
Hugging Face llama-family model does, on calibration tokens, and write scores.json.

    score_model(hf_dir, out, ScoreOptions(...)) -> out

Everything that can be wrong with the inputs (model directory, calibration
file, --head-layers, a base plan for another model, options) is checked before
the model is loaded. The measurements themselves run on the prefix-cached
engine in :mod:`gguf_prune.scoring.ablate`; the file format lives in :mod:`gguf_prune.scores`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gguf_prune.scoring import ablate
from gguf_prune import scores as scores_io
from gguf_prune.models import cuts
from gguf_prune.calibration import (DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_SEQ_LEN, Calibration, check_calibration_file,
                                    load_calibration)
from gguf_prune.models.cuts import apply_plan, load_model, load_tokenizer
from gguf_prune.models.checkpoint import check_model_dir, fingerprint
from gguf_prune.plan import ModelShape, Plan, validate
from gguf_prune.atomic import save_tensors_atomic
from gguf_prune.errors import GgufPruneError

log = logging.getLogger(__name__)

GREEDY_UNITS = ("layer", "attn", "mlp")
GREEDY_BY = ("kl", "kl-per-param")
# |act(gate)·up| above which a neuron counts as active on a token. Absolute, so it depends on the model's
# activation scale: on SmolLM2-135M, 0.05 spreads per-neuron frequencies over about 0.2–0.8 in middle layers,
# while at 0.01 nearly every neuron fires on 60–95 % of tokens (dense SiLU MLPs have few dead neurons).
# mean_abs and wxa do not depend on it.
DEFAULT_TAU = 0.05


class ScoreError(GgufPruneError, ValueError):
    """Options that cannot be scored: what is wrong and what to do."""


@dataclass(frozen=True)
class ScoreOptions:
    calibration: Path | None = None  # None: the shipped default text
    calibration_kind: str = "auto"  # auto (.jsonl = chat) | text | chat
    seq_len: int = DEFAULT_SEQ_LEN
    samples: int = DEFAULT_SAMPLES
    seed: int = DEFAULT_SEED
    sublayers: bool = True  # attention / MLP sub-block KL and BI
    ppl: bool = False  # perplexity with each layer removed
    heads: bool = False  # head and KV-group KL, head norms, Taylor
    head_layers: str | None = None  # "3,5-8" (source indices); None = every layer with attention
    neurons: bool = True  # activation frequency, mean |a|, weight × activation
    tau: float = DEFAULT_TAU  # |a| > tau counts a neuron as active
    width: tuple[float, ...] = ()  # width KL: each layer's MLP with these fractions of its neurons removed
    width_align: int = 256  # removed-neuron counts are multiples of this (k-quant rows of ffn_down)
    plan: Path | None = None  # score on top of this plan's cuts
    greedy: int = 0  # greedy removal steps
    greedy_units: tuple[str, ...] = ("layer",)
    greedy_by: str = "kl"
    greedy_pool: int | None = None  # lazy greedy: re-measure only this many cheapest candidates per step
    protect_first: int = 2
    protect_last: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bf16
    device_map: str | None = None  # accelerate device_map for from_pretrained (e.g. "auto")
    batch_tokens: int | None = None  # max tokens in one forward; None: from a memory budget
    plots: bool = True
    progress: bool = True
    stream: bool = False  # layer-major from the shards (gguf_prune.scoring.stream); also chosen when the model would not fit
    max_memory: str | None = None  # memory budget, e.g. "24GB" (default: what the device has free)
    units: str | None = None  # a slice of the ablation units: "K/N" (0-based) or layers "3,5-8"; implies stream

    def __post_init__(self) -> None:
        # the same refusals for an API user as for the CLI, when the options are made (score_model checks again)
        _check_options(self)
        p = []
        if self.calibration_kind not in ("auto", "text", "chat"):
            p.append(f"--calibration-kind {self.calibration_kind!r}: use auto, text or chat")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            p.append(f"--seed {self.seed!r}: must be a whole number, 0 or more")
        if self.greedy_pool is not None and (isinstance(self.greedy_pool, bool) or not isinstance(self.greedy_pool, int)
                                             or self.greedy_pool < 1):
            p.append(f"--greedy-pool {self.greedy_pool!r}: must be a whole number, 1 or more")
        if not math.isfinite(self.tau):
            p.append(f"--tau {self.tau}: must be a finite number, 0 or more")
        if self.width_align != 1 and (self.width_align < 32 or self.width_align % 32):
            p.append(f"--width-align {self.width_align}: must be a positive multiple of 32 (256 for k-quants), or 1 "
                     "for no rounding (F16/BF16/F32 files only)")
        if p:
            raise ScoreError("invalid options: " + "; ".join(p))


# ----------------------------------------------------------------------------- checks


def parse_layers(spec: str, n_layer: int, what: str = "--head-layers") -> list[int]:
    """'3,5-8' → [3, 5, 6, 7, 8], each checked against 0..n_layer-1."""
    out: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                rng = range(lo, hi + 1)
            else:
                rng = range(int(part), int(part) + 1)
        except ValueError:
            raise ScoreError(f"{what} {spec!r}: cannot read {part!r}; use indices and ranges like 3,5-8") from None
        bad = [i for i in rng if not 0 <= i < n_layer]
        if bad:
            raise ScoreError(f"{what} {spec!r}: layer {bad[0]} is out of range 0..{n_layer - 1} "
                             f"(the model has {n_layer} layers)")
        out.update(rng)
    if not out:
        raise ScoreError(f"{what} {spec!r} names no layers; use indices and ranges like 3,5-8")
    return sorted(out)


def _resolve_device(device: str) -> str:
    return cuts.resolve_device(device, ScoreError)


def _check_options(o: ScoreOptions) -> None:
    p = []
    if o.seq_len < 2:
        p.append(f"--seq-len {o.seq_len}: must be at least 2")
    if o.samples < 1:
        p.append(f"--samples {o.samples}: must be at least 1")
    if o.dtype not in ("float32", "bf16", "bfloat16"):
        p.append(f"--dtype {o.dtype!r}: use float32 or bf16")
    if o.greedy < 0:
        p.append(f"--greedy {o.greedy}: must be 0 or more")
    bad = [u for u in o.greedy_units if u not in GREEDY_UNITS]
    if bad or not o.greedy_units:
        p.append(f"--greedy-units {','.join(o.greedy_units)!r}: use a comma list of {', '.join(GREEDY_UNITS)}")
    if o.greedy_by not in GREEDY_BY:
        p.append(f"--greedy-by {o.greedy_by!r}: use one of {', '.join(GREEDY_BY)}")
    if o.protect_first < 0 or o.protect_last < 0:
        p.append("--protect-first / --protect-last must be 0 or more")
    if not o.tau >= 0:
        p.append(f"--tau {o.tau}: must be 0 or more")
    if o.batch_tokens is not None and o.batch_tokens < 1:
        p.append(f"--batch-tokens {o.batch_tokens}: must be positive")
    if any(not 0 < f < 1 for f in o.width):
        p.append(f"--width {','.join(map(str, o.width))}: fractions of each MLP's neurons, each between 0 and 1")
    if o.width_align < 1:
        p.append(f"--width-align {o.width_align}: must be 1 or more")
    if o.width and o.stream:
        p.append("--width is not available with --stream: width variants run on the in-memory engine")
    if p:
        raise ScoreError("invalid options: " + "; ".join(p))


@dataclass
class _Inputs:
    shape: ModelShape
    fingerprint: str
    plan: Plan | None
    head_layers: list[int]  # source indices
    calibration: Calibration
    device: str


def prepare(hf_dir: Path, options: ScoreOptions) -> _Inputs:
    """Every check that needs no model weights: raise before any long work."""
    o = options
    _check_options(o)
    shape = check_model_dir(hf_dir)
    fp = fingerprint(hf_dir)
    device = _resolve_device(o.device) if o.device_map is None else "map"
    plan = None
    if o.plan is not None:
        plan = Plan.load(Path(o.plan))
        validate(plan, shape=shape, fingerprint=fp, source=str(o.plan))
    removed = {lp.index for lp in plan.layers if lp.removed} if plan else set()
    no_attn = {lp.index for lp in plan.layers if lp.attention_removed} if plan else set()
    if o.heads:
        if o.head_layers:
            head_layers = parse_layers(o.head_layers, shape.n_layer)
            gone = [i for i in head_layers if i in removed or i in no_attn]
            if gone:
                raise ScoreError(f"--head-layers: layer {gone[0]} has no attention left in the base plan "
                                 f"{o.plan} ({'removed' if gone[0] in removed else 'attention removed'}); "
                                 "leave it out of --head-layers")
        else:
            head_layers = [i for i in range(shape.n_layer) if i not in removed and i not in no_attn]
    elif o.head_layers:
        raise ScoreError("--head-layers needs --heads")
    else:
        head_layers = []
    check_calibration_file(o.calibration, o.calibration_kind)
    tokenizer = load_tokenizer(hf_dir)
    cal = load_calibration(o.calibration, tokenizer, seq_len=o.seq_len, samples=o.samples, seed=o.seed,
                           kind=o.calibration_kind)
    return _Inputs(shape=shape, fingerprint=fp, plan=plan, head_layers=head_layers, calibration=cal, device=device)


# ----------------------------------------------------------------------------- model


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


def width_drops(fractions, n_ff: int, align: int) -> tuple[int, ...]:
    """Removed-neuron counts for width fractions: multiples of ``align``, at least one, fewer than n_ff."""
    out = set()
    for f in fractions:
        d = int(round(f * n_ff / align)) * align
        d = min(max(d, align), n_ff - 1)
        if 0 < d < n_ff:
            out.add(d)
    return tuple(sorted(out))


def _batch_tokens(model, shape: ModelShape, seq_len: int, budget_bytes: int) -> int:
    """Tokens in one forward that fit ``budget_bytes`` of activations (MLP, residual, attention)."""
    elt = 2 if next(model.parameters()).dtype in (torch.bfloat16, torch.float16) else 4
    per_token = elt * (3 * shape.n_ff + 8 * shape.n_embd + shape.n_head * seq_len) + 64
    return max(seq_len, int(budget_bytes // per_token))


def _budget(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.3)
    return 2 << 30  # CPU: 2 GiB of activations per forward


# ----------------------------------------------------------------------------- scoring


def score_model(hf_dir: Path, out: Path, options: ScoreOptions = ScoreOptions()) -> Path:
    """Score ``hf_dir`` on calibration data and write ``out`` (scores.json), its neuron side file and plots."""
    t_start = time.perf_counter()
    hf_dir, out, o = Path(hf_dir), Path(out), options
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    inp = prepare(hf_dir, o)
    shape, cal, plan = inp.shape, inp.calibration, inp.plan
    seconds["prepare"] = time.perf_counter() - t
    choice = _stream_choice(hf_dir, o, inp)
    if choice is not None:
        return _score_streamed(hf_dir, out, o, inp, choice, seconds, t_start)

    t = time.perf_counter()
    model = _load(hf_dir, o, inp.device)
    seconds["load"] = time.perf_counter() - t
    dev_desc = inp.device if o.device_map is None else f"device_map={o.device_map}"
    budget = _budget(inp.device if o.device_map is None else "cpu")
    batch_tokens = o.batch_tokens or _batch_tokens(model, shape, cal.seq_len, budget)
    group_seqs = max(1, min(cal.n_seq, (batch_tokens // 4) // cal.seq_len))
    groups = list(cal.batches(group_seqs))
    log.info("scoring %s (%d layers) on %s, %s; %d sequences in %d batch(es), up to %d tokens per forward",
             hf_dir, shape.n_layer, dev_desc, o.dtype, cal.n_seq, len(groups), batch_tokens)

    # the reference: the unpruned model's predictions, once
    engine = ablate.Engine(model, batch_tokens=batch_tokens)
    t = time.perf_counter()
    refs = [engine.reference(ids, mask) for ids, mask in groups]
    seconds["reference"] = time.perf_counter() - t
    n_real = sum(r.n_real for r in refs)
    n_tgt = sum(r.n_tgt for r in refs)
    full_nll = sum(r.nll for r in refs) / n_tgt
    evals = engine.seq_layer_evals

    # the model to score: with the base plan's cuts applied; positions ↔ source indices
    if plan is not None:
        apply_plan(model, plan)
        engine = ablate.Engine(model, batch_tokens=batch_tokens)
    sources = [lp.index for lp in plan.kept_layers()] if plan else list(range(shape.n_layer))
    pos_of = {s: p for p, s in enumerate(sources)}
    removed_heads = {}
    if plan is not None:
        for lp in plan.kept_layers():
            if lp.heads is not None and lp.heads:
                removed_heads[pos_of[lp.index]] = set(range(shape.n_head)) - set(lp.heads)
    spec = ablate.ScanSpec(sublayers=o.sublayers, head_layers=tuple(pos_of[s] for s in inp.head_layers),
                           removed_heads=removed_heads, neurons=o.neurons, tau=o.tau)
    drops = width_drops(o.width, shape.n_ff, o.width_align)
    pre = None
    if drops:  # width variants follow each layer's energy order, so the neuron statistics come first
        with _progress(o, len(groups) * engine.n_layer, "neurons", "layer") as bar:
            pre = ablate.scan(engine, groups, refs, ablate.ScanSpec(layers=False, neurons=True, tau=o.tau),
                              progress=bar.update)
        seconds["neuron_walk"] = sum(pre.seconds.values())
        order = {}
        for p, lay in enumerate(engine.layers):
            if p not in pre.ff_count:
                continue
            cn = lay.mlp.down_proj.weight.detach().float().norm(dim=0).cpu().numpy()
            live = plan.layers[sources[p]].kept_neurons(shape) if plan is not None else None
            order[p] = scores_io.energy_order(scores_io.neuron_energy(cn, pre.ff_sq[p], pre.n_real), live)
        spec = replace(spec, neurons=False, width_drops=drops, width_order=order)

    with _progress(o, len(groups) * engine.n_layer, "score", "layer") as bar:
        res = ablate.scan(engine, groups, refs, spec, progress=bar.update)
    seconds.update(res.seconds)
    if pre is not None:
        res.ff_count, res.ff_abs, res.ff_sq = pre.ff_count, pre.ff_abs, pre.ff_sq
    n_real_scan = res.n_real

    taylor = None
    if o.heads:
        t = time.perf_counter()
        taylor = head_taylor(model, cal, [pos_of[s] for s in inp.head_layers], removed_heads,
                             tokens=max(cal.seq_len, min(batch_tokens // 16, 1024)))
        seconds["taylor"] = time.perf_counter() - t

    greedy_out = None
    if o.greedy:
        t = time.perf_counter()
        initial = {"base": res.base_kl / n_real_scan if n_real_scan else 0.0}
        for pos in range(engine.n_layer):  # the scan already measured every single-unit removal
            for kind, arr in (("layer", res.kl), ("attn", res.attn_kl), ("mlp", res.mlp_kl)):
                if arr is not None and np.isfinite(arr[pos]) and n_real_scan:
                    initial[(kind, pos)] = float(arr[pos]) / n_real_scan
        greedy_out = _run_greedy(engine, groups, refs, plan, shape, sources, o, initial)
        seconds["greedy"] = time.perf_counter() - t
    evals += engine.seq_layer_evals

    # ------------------------------------------------------------------ assemble
    def mean(x):
        return None if x is None or not np.isfinite(x) else float(x) / n_real

    layers = []
    for s in range(shape.n_layer):
        p = pos_of.get(s)
        if p is None:
            layers.append({"index": s, "removed": True, "bi": None, "kl": None, "ppl": None, "attn_kl": None,
                           "mlp_kl": None, "attn_bi": None, "mlp_bi": None})
            continue
        lay = engine.layers[p]
        layers.append({
            "index": s, "removed": False,
            "bi": mean(res.bi[p]), "kl": mean(res.kl[p]),
            "ppl": math.exp(res.nll[p] / n_tgt) if o.ppl else None,
            "attn_kl": mean(res.attn_kl[p]), "mlp_kl": mean(res.mlp_kl[p]),
            "attn_bi": mean(res.attn_bi[p]) if ablate.has_attention(lay) else None,
            "mlp_bi": mean(res.mlp_bi[p]) if ablate.has_mlp(lay) else None,
        })
        if drops:
            w = res.width_kl.get(p)
            live = len(spec.width_order.get(p, ()))
            layers[-1]["width_kl"] = [mean(w[k]) if w is not None and d < live else None
                                      for k, d in enumerate(drops)]

    heads = None
    if o.heads:
        heads = {"layers": inp.head_layers,
                 "kl": {str(s): res.head_kl[pos_of[s]] / n_real for s in inp.head_layers},
                 "kv_kl": {str(s): res.kv_kl[pos_of[s]] / n_real for s in inp.head_layers},
                 "norm": {str(s): res.head_norm[pos_of[s]] / n_real for s in inp.head_layers},
                 "taylor": {str(s): taylor[pos_of[s]] for s in inp.head_layers}}

    neurons = None
    if o.neurons or drops:  # width cuts follow the energy order: `plan --units width` reads it from the side file
        neurons = _write_neurons(out, engine, res, sources, n_real, o.tau)

    base = None
    if plan is not None:
        base_nll = res.base_nll / n_tgt
        base = {"digest": plan.digest(), "path": str(o.plan), "plan": plan.to_dict(), "kl": res.base_kl / n_real,
                "nll": base_nll, "ppl": math.exp(base_nll)}

    settings = {k: (str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v))
                for k, v in asdict(o).items()}
    settings.update({"device_resolved": dev_desc, "batch_tokens_resolved": batch_tokens, "group_seqs": group_seqs,
                     "torch": torch.__version__, "transformers": _transformers_version()})
    seconds["total"] = time.perf_counter() - t_start
    doc = {
        "schema": scores_io.SCORES_SCHEMA, "version": scores_io.SCORES_VERSION,
        "model": {"fingerprint": inp.fingerprint, "shape": shape.to_dict(), "path": str(hf_dir)},
        "calibration": cal.to_dict(),
        "settings": settings,
        "base_plan": base,
        "full": {"nll": full_nll, "ppl": math.exp(full_nll)},
        "layers": layers,
        "heads": heads,
        "neurons": neurons,
        "greedy": greedy_out,
        "timing": {"seconds": seconds, "layer_evals": int(round(evals / cal.n_seq))},
    }
    if drops:
        doc["width"] = {"drops": list(drops), "order": "energy", "align": o.width_align}
    scores_io.save(out, doc)
    log.info("wrote %s (%.0f s, %d layer evaluations)", out, seconds["total"], doc["timing"]["layer_evals"])
    if o.plots:
        from gguf_prune.scoring.plots import plot_scores

        try:
            for png in plot_scores(out):
                log.info("wrote %s", png)
        except Exception as e:  # plots are a convenience: never lose the scores for them
            log.warning("could not draw the score plots (%s: %s); scores.json is complete", type(e).__name__, e)
    return out


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


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


def _write_neurons(out: Path, engine: ablate.Engine, res: ablate.ScanResult, sources: list[int], n_real: int,
                   tau: float) -> dict:
    col_norm = {p: engine.layers[p].mlp.down_proj.weight.detach().float().norm(dim=0).cpu().numpy()
                for p in res.ff_count}  # down_proj: (n_embd, n_ff), column j is neuron j's output
    tensors = scores_io.neuron_tensors([(s, p) for p, s in enumerate(sources)], res.ff_count, res.ff_abs,
                                       res.ff_sq, col_norm, n_real)
    name = scores_io.neurons_file_name(out)
    save_tensors_atomic(out.parent / name, tensors, {"tau": str(tau), "n_tokens": str(n_real)})
    return {"file": name, "tau": tau, "stats": list(scores_io.NEURON_STATS),
            "layers": sorted(int(k.split(".")[1]) for k in tensors if k.startswith("freq."))}


# ----------------------------------------------------------------------------- Taylor


def head_taylor(model, cal: Calibration, positions: list[int], removed_heads: dict, tokens: int = 1024) -> dict:
    """Σ |g ⊙ w| over each query head's weights: its q_proj rows and o_proj columns, plus its KV head's
    k_proj / v_proj rows shared equally among the group's query heads. g is the gradient of the mean
    next-token loss over every real calibration target (one backward pass, accumulated over micro-batches).
    """
    cfg = model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    layers = model.model.layers
    params = [m.weight for p in positions for m in (layers[p].self_attn.q_proj, layers[p].self_attn.k_proj,
                                                     layers[p].self_attn.v_proj, layers[p].self_attn.o_proj)]
    was = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)
    real = cal.attention_mask
    n_tgt = int((real[:, :-1] & real[:, 1:]).sum())
    try:
        with torch.enable_grad():
            for ids, mask in cal.batches(max(1, tokens // cal.seq_len)):
                dev = model.model.embed_tokens.weight.device
                logits = model(input_ids=ids.to(dev), attention_mask=mask.long().to(dev)).logits  # (b, T, V)
                tm = (mask[:, :-1] & mask[:, 1:]).to(logits.device)  # (b, T-1): next token is real
                lp = torch.log_softmax(logits[:, :-1].float(), -1)
                nll = -lp.gather(-1, ids[:, 1:].to(logits.device)[..., None])[..., 0]  # (b, T-1)
                (nll[tm].sum() / n_tgt).backward()
                del logits, lp, nll
        out = {}
        for p in positions:
            t = ablate.taylor_per_head(layers[p].self_attn, nh, nkv, hd).double().cpu().numpy()
            for h in removed_heads.get(p, ()):
                t[h] = np.nan
            out[p] = t
        return out
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(was[id(p)])


# ----------------------------------------------------------------------------- greedy


def _run_greedy(engine: ablate.Engine, groups, refs, plan: Plan | None, shape: ModelShape, sources: list[int],
                o: ScoreOptions, initial: dict | None = None) -> dict:
    units = set(o.greedy_units)
    n = shape.n_layer
    protected = set(range(min(o.protect_first, n))) | set(range(max(0, n - o.protect_last), n))
    lps = {lp.index: lp for lp in plan.layers} if plan else {}

    def present(pos: int, modes: list[str]) -> tuple[int, int]:
        """Parameters of the attention and MLP still present at position ``pos``."""
        layer, mode, lp = engine.layers[pos], modes[pos], lps.get(sources[pos])
        attn = mlp = 0
        if ablate.has_attention(layer) and mode not in ("attn", "layer"):
            heads = lp.kept_heads(shape) if lp else range(shape.n_head)
            kv = lp.kept_kv_groups(shape) if lp else range(shape.n_head_kv)
            attn = shape.attn_params(len(heads), len(kv))
        if ablate.has_mlp(layer) and mode not in ("mlp", "layer"):
            mlp = shape.mlp_params(len(lp.kept_neurons(shape)) if lp else shape.n_ff)
        return attn, mlp

    def candidates(modes):
        for pos, src in enumerate(sources):
            if src in protected:
                continue
            attn, mlp = present(pos, modes)
            if not attn and not mlp:
                continue
            if "layer" in units and (units == {"layer"} or (attn and mlp)):
                yield ("layer", pos)
            if "attn" in units and attn:
                yield ("attn", pos)
            if "mlp" in units and mlp:
                yield ("mlp", pos)

    def params(kind, pos, modes):
        attn, mlp = present(pos, modes)
        return {"layer": attn + mlp, "attn": attn, "mlp": mlp}[kind]

    with _progress(o, o.greedy * len(groups) * engine.n_layer, "greedy", "layer") as bar:
        steps = ablate.greedy(engine, groups, refs, o.greedy, candidates, params, by=o.greedy_by,
                              progress=bar.update, describe=lambda pos: f"layer {sources[pos]}",
                              pool=o.greedy_pool, initial=initial)
    return {"units": [u for u in GREEDY_UNITS if u in units], "by": o.greedy_by, "pool": o.greedy_pool,
            "protect_first": o.protect_first,
            "protect_last": o.protect_last,
            "steps": [{"kind": s.kind, "layer": sources[s.pos], "kl": s.kl, "delta_kl": s.delta_kl,
                       "params_removed": s.params, "candidates": s.candidates} for s in steps]}


# ----------------------------------------------------------------------------- summary


def summary(path: Path, top: int = 5) -> str:
    """A few lines about a scores file: reference perplexity, the cheapest layers, greedy order, files."""
    d = scores_io.load(path, allow_slice=True)
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


# ----------------------------------------------------------------------------- streamed (layer-major)


def _in_memory_bytes(hf_dir: Path, shape: ModelShape, o: ScoreOptions, device: str) -> int:
    """What loading the model for the in-memory engine takes: weights in the compute dtype + activations."""
    from gguf_prune.models.checkpoint import read_config

    tied = bool(read_config(hf_dir).get("tie_word_embeddings", False))
    elt = 2 if o.dtype in ("bf16", "bfloat16") else 4
    params = shape.n_layer * shape.layer_params() + shape.n_vocab * shape.n_embd * (1 if tied else 2) + shape.n_embd
    act = _budget(device) if device.startswith("cuda") else 2 << 30
    return params * elt + act


def _parse_units(spec: str, shape: ModelShape, o: ScoreOptions, head_layers: list[int]) -> list[int]:
    """--units K/N (slice K of N, 0-based, of about equal cost) or a layer list '3,5-8' → the layers owned."""
    from gguf_prune.scoring.stream import slice_layers

    spec = str(spec).strip()
    if "/" not in spec:
        return parse_layers(spec, shape.n_layer, what="--units")
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ScoreError(f"--units {spec!r}: use K/N (slice K of N, counted from 0) or layers like 3,5-8") from None
    if not (n >= 1 and 0 <= k < n):
        raise ScoreError(f"--units {spec!r}: K must be in 0..N-1 (slice K of N, counted from 0)")
    if n > shape.n_layer:
        raise ScoreError(f"--units {spec!r}: {n} slices of a {shape.n_layer}-layer model; slices are cut at layer "
                         f"boundaries, use at most {shape.n_layer}")
    heads = set(head_layers)
    per = [(1 + (2 if o.sublayers else 0) + (shape.n_head + (shape.n_head_kv if shape.group_size > 1 else 0)
                                             if i in heads else 0)) * (shape.n_layer - i) for i in range(shape.n_layer)]
    return slice_layers(k, n, per)


def _stream_choice(hf_dir: Path, o: ScoreOptions, inp: _Inputs):
    """None for the in-memory engine, or a stream.StreamChoice: asked for, or the model would not fit."""
    from gguf_prune.scoring import stream

    try:
        budget = stream.parse_bytes(o.max_memory)
    except stream.StreamError as e:
        raise ScoreError(str(e)) from None
    device = inp.device if inp.device != "map" else "cpu"
    asked = o.stream or o.units is not None
    reason = "--stream" if o.stream else ("--units" if o.units is not None else "")
    if not asked:
        if o.device_map is not None:
            return None
        need = _in_memory_bytes(hf_dir, inp.shape, o, device)
        have = budget if budget is not None else stream.available_memory(device)
        if need <= have:
            return None
        where = f"--max-memory {stream.fmt_bytes(have)}" if budget is not None else \
            f"{stream.fmt_bytes(have)} free on {device}"
        base = f"the model would need about {stream.fmt_bytes(need)} in memory ({where})"
        if plan_or_greedy := [x for x, on in (("--plan", o.plan is not None), ("--greedy", o.greedy)) if on]:
            log.warning("%s, but %s is not supported in streamed mode: trying in memory anyway", base,
                        " and ".join(plan_or_greedy))
            return None
        reason = base + ": scoring layer-major from the shards instead (--stream)"
        log.info("%s", reason)
    if inp.shape.architecture != "llama":
        raise ScoreError(f"{reason}: the streamed engine runs llama decoder layers and supports llama-family "
                         f"models (llama, mistral) only, not {inp.shape.architecture}; score in memory (drop --stream "
                         "/ --units, or give --device-map auto to spread the model over devices)")
    bad = [x for x, on in (("--plan", o.plan is not None), ("--greedy", bool(o.greedy)),
                           ("--device-map", o.device_map is not None)) if on]
    if bad:
        raise ScoreError(f"{reason}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not supported by the streamed "
                         "engine yet; score in memory (drop --stream / --units), or drop "
                         + ", ".join(bad))
    owned = list(range(inp.shape.n_layer)) if o.units is None else _parse_units(o.units, inp.shape, o, inp.head_layers)
    if budget is None:
        free = stream.available_memory(device)
        budget = int(free * (0.9 if device.startswith("cuda") else 0.8))
    return stream.StreamChoice(device=device, budget=budget, owned=owned, units=o.units, reason=reason)


def _score_streamed(hf_dir: Path, out: Path, o: ScoreOptions, inp: _Inputs, choice, seconds: dict,
                    t_start: float) -> Path:
    from gguf_prune.scoring import stream

    try:
        parts = stream.score_streamed(hf_dir, out, o, inp, choice,
                                      progress=lambda total, desc, unit: _progress(o, total, desc, unit))
    except stream.StreamError as e:
        raise ScoreError(str(e)) from None
    seconds.update(parts["seconds"])
    settings = {k: (str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v))
                for k, v in asdict(o).items()}
    settings.update({"device_resolved": choice.device, "batch_tokens_resolved": parts["batch_tokens"],
                     "group_seqs": parts["group_seqs"], "torch": torch.__version__,
                     "transformers": _transformers_version()})
    seconds["total"] = time.perf_counter() - t_start
    doc = {
        "schema": scores_io.SLICE_SCHEMA if choice.units is not None else scores_io.SCORES_SCHEMA,
        "version": scores_io.SCORES_VERSION,
        "model": {"fingerprint": inp.fingerprint, "shape": inp.shape.to_dict(), "path": str(hf_dir)},
        "calibration": inp.calibration.to_dict(),
        "settings": settings, "base_plan": None, "full": parts["full"], "layers": parts["layers"],
        "heads": parts["heads"], "neurons": parts["neurons"], "greedy": None, "stream": parts["stream"],
        "timing": {"seconds": seconds, "layer_evals": parts["layer_evals"]},
    }
    if choice.units is not None:
        doc["units"] = {"spec": choice.units, "layers": choice.owned}
    scores_io.save(out, doc)
    log.info("wrote %s (%.0f s, %d pass(es) over the weights)", out, seconds["total"], parts["stream"]["passes"])
    if o.plots and choice.units is None:
        from gguf_prune.scoring.plots import plot_scores

        try:
            for png in plot_scores(out):
                log.info("wrote %s", png)
        except Exception as e:  # plots are a convenience: never lose the scores for them
            log.warning("could not draw the score plots (%s: %s); scores.json is complete", type(e).__name__, e)
    return out


def merge_scores(paths: list[Path], out: Path) -> Path:
    """Join --units slices into one scores.json (refusing slices of other models, data or settings)."""
    from gguf_prune.scoring import stream

    try:
        stream.merge_slices(paths, Path(out))
    except stream.StreamError as e:
        raise ScoreError(str(e)) from None
    return Path(out)
