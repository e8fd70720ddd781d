"""Iterative pruning: cut a little, recover, re-score, repeat.

    iterate(hf_dir, out_dir, IterateOptions(rounds=R, budget=b, recover="lora")) -> IterateResult

Round r of R reaches the budget b·r/R (a fraction of the source model's block parameters):

1. **score** the current model on top of the cuts so far. The current model is the source
   checkpoint with the previous round's cut applied and the tensors its recovery left loaded
   over the checkpoint's (``cuts.apply_plan(model, plan, recovered weights)``, exactly the
   model ``prune --recovered`` writes). Every remaining layer and attention / MLP sub-block is
   bypassed in turn (the prefix-cached engine of :mod:`gguf_prune.scoring.ablate`) and scored by
   KL(unpruned ‖ current model without it): the reference is always the *unpruned* checkpoint,
   so every round measures distance to the same target, not to the last round's model;
2. **extend the plan** to the round's budget: the planner's budget fill on top of the previous
   plan (the scores' ``base_plan``), cheapest units by KL per parameter first. A unit removed in
   an earlier round is never revived (checked; the recovery refuses it too);
3. **recover** the new cut (:func:`gguf_prune.recovery.recover.recover` with ``start=`` the previous
   round's recover directory): the tensors the new cut still uses are loaded first, patches are
   fitted on that model, and fine-tuning continues from there, distilling from the unpruned model.

Recovered weights reach the next round's scoring by being loaded over the checkpoint in memory:
no intermediate checkpoint is written, so every plan, scores file and recover directory is made
for the *source* checkpoint (its fingerprint), and ``prune`` refuses them for any other model.

Patches: the cut changes between rounds (a run of removed layers grows, an attention next to a
patched run goes), so a patch matrix cannot be carried over. Every round fits its patches afresh
(closed form, seconds) on the current model, and the next round scores on top of the cut *with*
those patches. With ``patch+lora`` / ``patch+full`` each round fits patches, then fine-tunes
patches and weights together.

``recover="none"`` makes R rounds of re-scoring without recovery (the cut alone in between).

Scoring uses the training sequences only (at most ``score_samples`` of them); the held-out split
(``heldout``) is the same in every round, for early stopping and the figures. Scores are one-shot
per round (no greedy run inside a round): the rounds themselves are the re-measuring.

Files, under ``out_dir``::

    round-{r}/scores.json   the current model's scores entering round r (base_plan = the cuts so far)
    round-{r}/plan.json     the cut after round r (source indices)
    round-{r}/recovered/    the recover directory after round r (any round can be made into a GGUF)
    round-{r}/round.json    the round's figures; written last: a round that has it is reused as is
    plan.json               the final plan (the last recover directory's, patches included)
    iterate.json            every round's figures

The last ``round-{R}/recovered`` is what ``gguf-prune prune HF_DIR --recovered DIR`` writes into GGUF.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gguf_prune.scoring import ablate, oneshot
from gguf_prune.models import checkpoint
from gguf_prune.models import cuts
from gguf_prune import scores
from gguf_prune.calibration import Calibration, check_calibration_file, load_calibration
from gguf_prune.plan import Plan
from gguf_prune.atomic import write_text_atomic
from gguf_prune.errors import GgufPruneError
from gguf_prune.pipeline.strategy import RECOVER_MODES, recover_parts
from gguf_prune.writing.options import DEFAULT_QUANT

log = logging.getLogger(__name__)

ITERATE_SCHEMA = "gguf-prune/iterate"
ITERATE_VERSION = 1
UNITS = ("layer", "attn", "mlp", "width")  # what a round may cut (width: MLP neurons, re-measured every round)


class IterateError(GgufPruneError, ValueError):
    """An iterative-pruning request that cannot run: what, where, what to do."""


def parse_recover(mode: str) -> tuple[bool, str | None]:
    """``"patch+lora"`` → (patch, finetune method): (True, "lora"); ``"none"`` → (False, None)."""
    if mode not in RECOVER_MODES:
        raise IterateError(f"--recover {mode!r} is not one of {', '.join(RECOVER_MODES)}")
    return recover_parts(mode)


@dataclass(frozen=True)
class IterateOptions:
    rounds: int = 2
    budget: float = 0.2  # fraction of block parameters removed after the last round
    recover: str = "lora"  # one of RECOVER_MODES
    calibration: Path | None = None  # scoring, patch fit and training data (None: the bundled text)
    calibration_kind: str = "auto"
    samples: int = 64  # sequences loaded (recovery uses them all; scoring at most score_samples)
    score_samples: int | None = 16  # training sequences scored each round (None: all)
    seq_len: int = 128
    seed: int = 0
    heldout: float = 0.1  # fraction of sequences held out (early stopping, ridge choice, the figures)
    units: tuple[str, ...] = ("layer", "attn", "mlp")  # what the budget may cut (UNITS)
    repair: bool = False  # closed-form repair each round: narrowed parts refitted, removed parts patched
    protect_first: int = 2
    protect_last: int = 2
    quant: str = DEFAULT_QUANT  # for the plan's size estimate
    patch_fit: str = "pruned"
    finetune_options: Any = None  # finetune.FinetuneOptions; its method is set from ``recover``
    device: str = "auto"
    batch_tokens: int = 16384  # tokens per stacked forward while scoring


@dataclass
class IterateResult:
    out_dir: Path
    plan: Plan  # the final plan (with its patches when recovered with patches)
    plan_path: Path
    recovered: Path | None  # the last round's recover directory (None with recover="none")
    rounds: list = field(default_factory=list)  # one dict of figures per round

    def summary(self) -> str:
        lines = [f"{len(self.rounds)} round(s) in {self.out_dir}:"]
        for r in self.rounds:
            kl = r.get("heldout_kl")
            lines.append(f"  round {r['round']}: budget {100 * r['target']:.1f}% → {100 * r['removed_fraction']:.1f}% "
                         f"removed (cut {', '.join(r['cut']) or 'nothing'}); held-out KL after recovery "
                         + ("n/a" if kl is None else f"{kl:.4f}"))
        lines.append(f"plan {self.plan_path}" + (f", recovered {self.recovered}" if self.recovered else ""))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- checks


def _check(hf_dir: Path, out_dir: Path, o: IterateOptions):
    """Every check that needs no weights; returns (shape, fingerprint, patch?, finetune options or None)."""
    from gguf_prune.recovery.options import FinetuneOptions, check_options
    from gguf_prune.recovery.options import PATCH_FITS

    p = []
    if not isinstance(o.rounds, int) or o.rounds < 1:
        p.append(f"rounds is {o.rounds!r}; it must be a whole number, at least 1")
    if not 0 < o.budget < 1:
        p.append(f"budget {o.budget} must be a fraction of the block parameters in (0, 1)")
    if o.recover not in RECOVER_MODES:
        p.append(f"recover {o.recover!r} is not one of {', '.join(RECOVER_MODES)}")
    if o.score_samples is not None and o.score_samples < 1:
        p.append(f"score_samples is {o.score_samples}; it must be at least 1 (or None: every training sequence)")
    if not 0 <= o.heldout < 1:
        p.append(f"heldout {o.heldout} must be in [0, 1)")
    bad = [u for u in o.units if u not in UNITS]
    if bad or not o.units:
        p.append(f"units {list(o.units)}: choose from {', '.join(UNITS)}")
    if o.patch_fit not in PATCH_FITS:
        p.append(f"patch_fit {o.patch_fit!r} is not one of {', '.join(PATCH_FITS)}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        p.append(f"output {out_dir} is a file; pass a directory (it is created if missing)")
    if p:
        raise IterateError("iterative pruning options are invalid:\n  - " + "\n  - ".join(p))
    patch, method = parse_recover(o.recover)
    fto = None
    if method:
        fto = replace(o.finetune_options or FinetuneOptions(), method=method)
        check_options(fto)
    shape = checkpoint.check_model_dir(hf_dir)
    check_calibration_file(o.calibration, o.calibration_kind)
    return shape, checkpoint.fingerprint(hf_dir), patch, fto


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- scoring the current model


def current_model(hf_dir: Path, plan: Plan | None, recovered: Path | None, device: str = "cpu"):
    """The model a round ends with: the checkpoint, ``plan``'s cut, the recovered tensors loaded over it."""
    from gguf_prune.recovered import load_recovered_model

    if recovered is not None:
        model = load_recovered_model(hf_dir, recovered)
    else:
        model = cuts.load_model(hf_dir)
        if plan is not None:
            cuts.apply_plan(model, plan)
    return model.to(device).eval()


def _groups(cal: Calibration, seqs: list[int], seq_len: int, batch_tokens: int) -> list:
    idx = torch.tensor(seqs, dtype=torch.long)
    ids, mask = cal.input_ids[idx], cal.attention_mask[idx]  # (n, T)
    per = max(1, min(len(seqs), (batch_tokens // 4) // seq_len))
    return [(ids[s:s + per], mask[s:s + per]) for s in range(0, len(seqs), per)]


def score_current(teacher, student, plan: Plan | None, cal: Calibration, seqs: list[int], out: Path,
                  hf_dir: Path, fingerprint: str, settings: dict, batch_tokens: int = 16384,
                  width: bool = False, repair: bool = False, align: int = 256) -> Path:
    """Score ``student`` (the current model: ``plan``'s cut, recovered weights) against ``teacher`` (the
    unpruned checkpoint) on sequences ``seqs`` of ``cal``; write a scores file the planner extends ``plan`` from.

    Per remaining layer: KL with the layer, its attention and its MLP bypassed, and BI; layers ``plan``
    removes are marked removed (a patch standing in for them is not a unit the planner may cut). ``width``:
    also each MLP's KL with 1/6, 1/3, 1/2 of its live neurons removed (lowest energy first, multiples of
    ``align``), and with ``repair`` the same cuts repaired, with the neuron side file the planner reads.
    """
    from gguf_prune.pipeline.strategy import WIDTH_FRACTIONS
    from gguf_prune.scoring.inputs import width_drops
    from gguf_prune.scoring.measure import width_kls, width_spec, write_neurons
    from gguf_prune.scoring.options import DEFAULT_TAU
    from gguf_prune.scoring.width_repair import SCORE_ALPHA

    t0 = time.perf_counter()
    shape = checkpoint.check_model_dir(hf_dir)
    groups = _groups(cal, seqs, cal.seq_len, batch_tokens)
    drops = width_drops(WIDTH_FRACTIONS, shape.n_ff, align) if width else ()
    with torch.inference_mode():
        te = ablate.Engine(teacher, batch_tokens=batch_tokens)
        refs = [te.reference(ids, mask) for ids, mask in groups]
        se = ablate.Engine(student, batch_tokens=batch_tokens)
        sources = [layer.source_index for layer in se.layers] if plan is not None else list(range(shape.n_layer))
        spec, pre = ablate.ScanSpec(sublayers=True, neurons=False), None
        if drops:
            spec, pre = width_spec(se, groups, refs, spec, plan, shape, sources, drops, DEFAULT_TAU, repair)
        res = oneshot.scan(se, groups, refs, spec)
    n_real, n_tgt = res.n_real, sum(r.n_tgt for r in refs)
    lps = {lp.index: lp for lp in plan.layers} if plan is not None else {}
    pos_of = {s: p for p, s in enumerate(sources)}
    layers = []
    for s in range(shape.n_layer):
        if s in lps and lps[s].removed:
            layers.append(scores.layer_entry(s, removed=True))
            continue
        p, lay = pos_of[s], se.layers[pos_of[s]]
        wkl, wkl_r = width_kls(res, spec, p, drops, n_real, repair)
        layers.append(scores.layer_entry(
            s, bi=scores.per_token(res.bi[p], n_real), kl=scores.per_token(res.kl[p], n_real),
            attn_kl=scores.per_token(res.attn_kl[p], n_real), mlp_kl=scores.per_token(res.mlp_kl[p], n_real),
            attn_bi=scores.per_token(res.attn_bi[p], n_real) if ablate.has_attention(lay) else None,
            mlp_bi=scores.per_token(res.mlp_bi[p], n_real) if ablate.has_mlp(lay) else None,
            width_kl=wkl, width_kl_repaired=wkl_r))
    neurons = write_neurons(out, se, pre, sources, pre.n_real, DEFAULT_TAU) if pre is not None else None
    wd = None
    if drops:
        wd = {"drops": list(drops), "order": "energy", "align": align} | (
            {"repair": {"alpha": SCORE_ALPHA, "cross_fitted": True}} if repair else {})
    base = None
    if plan is not None:
        base = scores.base_plan_entry(plan, settings.get("plan_path"), res.base_kl / n_real, res.base_nll / n_tgt)
    seconds = dict(res.seconds) | {"total": time.perf_counter() - t0}
    doc = scores.document(
        fingerprint=fingerprint, shape=shape, model_path=hf_dir, calibration=cal.to_dict() | {"sequences": list(seqs)},
        settings={"scorer": "gguf_prune.pipeline.iterate.score_current", "sublayers": True, "neurons": False,
                  "heads": False, "batch_tokens": batch_tokens, "torch": torch.__version__} | settings,
        full_nll=sum(r.nll for r in refs) / n_tgt, layers=layers, seconds=seconds,
        layer_evals=int(round(se.seq_layer_evals / max(1, len(seqs)))), base_plan=base, neurons=neurons, width=wd)
    scores.save(out, doc)
    log.info("wrote %s (%.0f s): %d units scored on %d sequences%s", out, seconds["total"],
             sum(e[k] is not None for e in layers for k in ("kl", "attn_kl", "mlp_kl")), len(seqs),
             "" if base is None else f"; the current model's KL to the unpruned one: {base['kl']:.4f}")
    return out


def heldout_kl(teacher, student, cal: Calibration, seqs: list[int], batch_tokens: int = 16384) -> float | None:
    """Mean per-token KL(teacher ‖ student) over the real tokens of sequences ``seqs`` (None if there are none).

    Both models share the output matrix (recovery never trains it), as the engine's KL formula assumes.
    """
    if not seqs:
        return None
    total, n = 0.0, 0
    with torch.inference_mode():
        te, se = ablate.Engine(teacher, batch_tokens=batch_tokens), ablate.Engine(student, batch_tokens=batch_tokens)
        for ids, mask in _groups(cal, seqs, cal.seq_len, batch_tokens):
            ref = te.reference(ids, mask)
            h = se.run(se.embed(ids), 0, se.context(ids, mask))  # (b, T, d) before the final norm
            kl, _ = se.divergence(h, ref, 1)
            total += float(kl[0])
            n += ref.n_real
    return total / max(n, 1)


# ----------------------------------------------------------------------------- the loop


def iterate(hf_dir: Path, out_dir: Path, options: IterateOptions = IterateOptions()) -> IterateResult:
    """Prune ``hf_dir`` in ``options.rounds`` rounds, recovering after each; see the module docstring."""
    t_start = time.time()
    rounds = _Rounds(Path(hf_dir), Path(out_dir), options)
    for r in range(1, options.rounds + 1):
        rounds.run_round(r)
    return rounds.finish(t_start)


class _Rounds:
    """What iterate() carries from round to round (the cut so far, with patches as recovered; the last recover
    directory; the current model) and what every round shares (checked options, calibration, its splits, the
    unpruned teacher)."""

    def __init__(self, hf_dir: Path, out_dir: Path, o: IterateOptions):
        from transformers import AutoTokenizer

        from gguf_prune.planning.options import PlanOptions
        from gguf_prune.recovery.finetune import check_data, resolve_device
        from gguf_prune.recovery.options import RecoverOptions
        from gguf_prune.recovery.recover import split_heldout

        self.hf_dir, self.out_dir, self.o = hf_dir, out_dir, o
        self.shape, self.fp, self.patch, fto = _check(hf_dir, out_dir, o)
        self.fto = fto
        self.device = resolve_device(o.device)
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        self.cal = cal = load_calibration(o.calibration, tokenizer, seq_len=o.seq_len, samples=o.samples,
                                          seed=o.seed, kind=o.calibration_kind)
        heldout = split_heldout(cal.n_seq, o.heldout, o.seed)
        if fto is not None:
            check_data(cal, heldout, fto)  # before any model is loaded or any file written
        train = [i for i in range(cal.n_seq) if i not in heldout]
        self.score_seqs = train[:o.score_samples] if o.score_samples else train
        self.heldout = sorted(heldout)
        self.ropts = RecoverOptions(calibration=o.calibration, calibration_kind=o.calibration_kind, seq_len=o.seq_len,
                                    samples=o.samples, seed=o.seed, heldout=o.heldout, patch=self.patch or o.repair,
                                    repair=o.repair, patch_fit=o.patch_fit, finetune=fto.method if fto else None, finetune_options=fto,
                                    device=o.device)
        self.popts = PlanOptions(target_params=None, units=tuple(o.units), protect_first=o.protect_first,
                                 protect_last=o.protect_last, quant=o.quant, repair=o.repair)
        log.info("iterative pruning of %s: %d round(s) to %.1f%% of block parameters, recovery %s; scoring on %d "
                 "sequences, %d held out", hf_dir, o.rounds, 100 * o.budget, o.recover, len(self.score_seqs),
                 len(self.heldout))
        out_dir.mkdir(parents=True, exist_ok=True)

        self.teacher = cuts.load_model(hf_dir).to(self.device)
        self.plan: Plan | None = None  # the cut so far (with patches, as recovered)
        self.rec_dir: Path | None = None
        self.student = self.teacher  # the current model; round 1 scores the checkpoint itself
        self.rounds: list[dict] = []
        # a round is reused only when everything that shapes it is the same
        self.key = _key(self.fp, cal.fingerprint, asdict(self.popts),
                        asdict(replace(self.ropts, finetune_options=None)), asdict(fto) if fto else None,
                        o.score_samples, o.rounds, o.budget)

    def run_round(self, r: int) -> None:
        """Round ``r``: reused when a run with the same inputs finished it, else scored, cut and recovered; then
        the round's model becomes the current one."""
        from gguf_prune.recovered import open_recovered

        o = self.o
        t_round = time.time()
        target = o.budget * r / o.rounds
        rdir = self.out_dir / f"round-{r}"
        rkey = _key(self.key, r, self.plan.digest() if self.plan else None,
                    open_recovered(self.rec_dir).manifest["tensors"]["sha256"] if self.rec_dir else None)
        log.info("")
        log.info("== round %d/%d: reach %.1f%% of block parameters removed (now %.1f%%)", r, o.rounds,
                 100 * target, 100 * (self.plan.removed_fraction() if self.plan else 0.0))
        done = _finished_round(rdir, rkey)
        if done is not None:
            new_plan, new_rec, figures = done
            log.info("round %d is complete in %s (same inputs): reusing it", r, rdir)
        else:
            new_plan, new_rec, figures = self._cut_and_recover(r, rdir, target)
        self.student = current_model(self.hf_dir, new_plan, new_rec, self.device)
        if done is None:
            figures["heldout_kl"] = heldout_kl(self.teacher, self.student, self.cal, self.heldout, o.batch_tokens)
            figures["seconds"]["total"] = round(time.time() - t_round, 1)
            write_text_atomic(rdir / "round.json", json.dumps({"key": rkey, **figures}, indent=1, sort_keys=True,
                                                              default=str) + "\n")
        kl = figures.get("heldout_kl")
        log.info("round %d: %.1f%% removed; held-out KL to the unpruned model after recovery (%s): %s", r,
                 100 * figures["removed_fraction"], o.recover, "n/a (no held-out split)" if kl is None else f"{kl:.4f}")
        self.rounds.append(figures)
        self.plan, self.rec_dir = new_plan, new_rec

    def _cut_and_recover(self, r: int, rdir: Path, target: float) -> tuple[Plan, Path | None, dict]:
        """Score the current model, extend the plan to ``target``, recover: (the new plan, recover directory or
        None, the round's figures)."""
        from gguf_prune.planning.diff import new_cuts, revived
        from gguf_prune.planning.strategies import make_plan
        from gguf_prune.recovery.recover import recover

        plan, rec_dir = self.plan, self.rec_dir
        # 1. score the current model on top of the cuts so far
        t = time.time()
        scores_path = score_current(
            self.teacher, self.student, plan, self.cal, self.score_seqs, rdir / "scores.json", self.hf_dir, self.fp,
            {"round": r, "rounds": self.o.rounds, "recovered": str(rec_dir) if rec_dir else None,
             "plan_path": None if plan is None else str(rec_dir / "plan.json" if rec_dir
                                                        else self.out_dir / f"round-{r - 1}" / "plan.json")},
            self.o.batch_tokens, width="width" in self.o.units, repair=self.o.repair, align=self.popts.align)
        t_score = time.time() - t
        kl_in = json.loads(scores_path.read_text())["base_plan"]
        # 2. extend the plan to this round's budget
        new_cut = make_plan(scores_path, rdir / "plan.json", replace(self.popts, target_params=target))
        back = revived(plan.without_patches(), new_cut) if plan else []
        if back:  # the planner starts from the base plan and only adds: a bug, not a user error
            raise RuntimeError("internal error: the extended plan revives removed units:\n  - "
                               + "\n  - ".join(back))
        cut = new_cuts(plan, new_cut)
        log.info("round %d: cut %s → %.1f%% of block parameters removed", r, ", ".join(cut) or "nothing",
                 100 * new_cut.removed_fraction())
        self.student = None  # free the current model (unless it is the teacher) before recovery loads its own
        # 3. recover, starting from the last round's weights
        t = time.time()
        new_plan, new_rec, stages = new_cut, None, {}
        if self.patch or self.o.repair or self.fto is not None:
            res = recover(self.hf_dir, new_cut, rdir / "recovered", self.ropts, start=rec_dir)
            if res.manifest["calibration"]["fingerprint"] != self.cal.fingerprint:
                raise RuntimeError("internal error: recovery tokenised other calibration sequences")
            new_plan, new_rec, stages = res.plan, res.path, dict(res.manifest.get("heldout_kl") or {})
        t_recover = time.time() - t
        figures = {"round": r, "target": target, "removed_fraction": new_cut.removed_fraction(), "cut": cut,
                   "scores": str(scores_path), "plan": str(rdir / "plan.json"), "plan_digest": new_plan.digest(),
                   "recovered": str(new_rec) if new_rec else None,
                   "kl_in": None if kl_in is None else kl_in["kl"], "heldout_kl_stages": stages,
                   "seconds": {"score": round(t_score, 1), "recover": round(t_recover, 1)}}
        return new_plan, new_rec, figures

    def finish(self, t_start: float) -> IterateResult:
        """The final plan and iterate.json, every round's figures."""
        o, cal, plan, rec_dir = self.o, self.cal, self.plan, self.rec_dir
        self.student = self.teacher = None
        plan_path = plan.save(self.out_dir / "plan.json")
        result = IterateResult(out_dir=self.out_dir, plan=plan, plan_path=plan_path, recovered=rec_dir,
                               rounds=self.rounds)
        write_text_atomic(self.out_dir / "iterate.json", json.dumps({
            "schema": ITERATE_SCHEMA, "version": ITERATE_VERSION,
            "model": {"path": str(self.hf_dir), "fingerprint": self.fp, "shape": self.shape.to_dict()},
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()},
            "calibration": cal.to_dict() | {"heldout_sequences": self.heldout, "score_sequences": self.score_seqs},
            "rounds": self.rounds, "plan": str(plan_path), "recovered": str(rec_dir) if rec_dir else None,
            "seconds": round(time.time() - t_start, 1)}, indent=1, sort_keys=True, default=str) + "\n")
        log.info("iterative pruning done in %.0f s: %s", time.time() - t_start, plan_path)
        return result


def _finished_round(rdir: Path, rkey: str) -> tuple[Plan, Path | None, dict] | None:
    """A round that a run with the same inputs completed: (its plan, recover directory, figures), else None."""
    from gguf_prune.recovered import RecoverError, open_recovered

    f = rdir / "round.json"
    if not f.is_file():
        return None
    try:
        figures = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    if figures.pop("key", None) != rkey:
        return None
    try:
        if figures.get("recovered"):
            rec = open_recovered(Path(figures["recovered"]))
            plan, path = rec.plan, rec.path
        else:
            plan, path = Plan.load(rdir / "plan.json"), None
    except (RecoverError, ValueError, OSError):
        return None
    if plan.digest() != figures.get("plan_digest"):
        return None
    return plan, path, figures
