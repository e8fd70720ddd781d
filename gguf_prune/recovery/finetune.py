"""Fine-tuning a pruned model in PyTorch: LoRA (peft) or full, by distillation or next-token loss.

The student (student.py) is the pruned model with the structure its GGUF will have: removed heads and
neurons masked so that training cannot revive them, embeddings, final norm and output matrix frozen.

Loss ``distill`` (default): mean per-token KL(teacher ‖ student) over real tokens; the
teacher's final normed hidden states are computed once and its logits rebuilt per
batch (n_tokens × n_embd floats kept instead of n_tokens × n_vocab). ``nexttoken``:
cross-entropy on the data's own next tokens. ``teacher_samples`` > 0 adds sequences sampled from the teacher
(sampled.py) to the training set; the held-out split stays real text.

AdamW, linear warm-up then cosine decay, gradient clipping; a held-out split is
scored every ``eval_every`` steps (held-out KL to the teacher, or NLL for
``nexttoken``), the best weights are kept, and training stops after ``patience``
evaluations without improvement. With a time budget (``max_minutes``) the planned steps shrink to
those that fit at the pace measured so far, so the schedule still decays to its end. If no step beats
the starting point, the weights are left as they were. A checkpoint is written every
``checkpoint_every`` steps; a run started again with the same inputs resumes from it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gguf_prune.atomic import save_torch_atomic
from gguf_prune.calibration import Calibration
from gguf_prune.models import cuts
from gguf_prune.plan import Plan
from gguf_prune.recovery.options import FinetuneError, FinetuneOptions, check_options
from gguf_prune.recovery import sampled
from gguf_prune.recovery.student import prepare_student

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    weights: dict  # source HF name → tensor (float32, CPU): what changed
    stats: dict = field(default_factory=dict)


def resolve_device(device: str) -> str:
    return cuts.resolve_device(device, FinetuneError)


def resolve_precision(precision: str, dev: torch.device) -> str:
    """"fp32" or "bf16". ``auto`` takes bf16 on CUDA and on CPUs where PyTorch's oneDNN reports bf16 support
    (AVX-512 and newer): on 2 Zen 4 cores a LoRA step on the demo model takes 3.7 s instead of 4.8 s."""
    if precision != "auto":
        return precision
    native = dev.type == "cuda" or (dev.type == "cpu" and torch.backends.mkldnn.is_available()
                                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "bf16" if native else "fp32"


def check_data(cal: Calibration, heldout: set[int], o: FinetuneOptions) -> None:
    """Enough sequences for one batch of training (after the held-out split)? Raise FinetuneError if not."""
    check_options(o)
    n_train = cal.n_seq - len(heldout)
    if n_train < o.batch_size:
        raise FinetuneError(
            f"training data {cal.source} gives {cal.n_seq} sequence(s) of {cal.seq_len} tokens; "
            f"{len(heldout)} held out for early stopping leaves {n_train}, fewer than one batch of "
            f"{o.batch_size}: use more text (or --samples), a smaller --seq-len or --batch-size")


# ----------------------------------------------------------------------------- losses and schedule


@torch.no_grad()
def teacher_states(teacher, ids: torch.Tensor, mask: torch.Tensor, device, bs: int) -> torch.Tensor:
    """The teacher's final normed hidden states (n, T, d), float32 on the CPU, computed ``bs`` sequences at a time."""
    out = []
    for s in range(0, ids.shape[0], bs):
        h = teacher.model(input_ids=ids[s:s + bs].to(device),
                          attention_mask=mask[s:s + bs].to(device)).last_hidden_state  # (b, T, d) normed
        out.append(h.float().cpu())
    return torch.cat(out)


def batch_loss(core, lm_head, ids, mask, t_states, loss: str, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-token losses) of a batch: KL(teacher ‖ student) or next-token NLL over real tokens.

    ``core``/``lm_head``: the student's (Student.core, Student.lm_head); ``t_states``: the batch's teacher
    states (:func:`teacher_states`, unused for ``nexttoken``); ``autocast``: a context manager factory
    (``contextlib.nullcontext`` on the CPU)."""
    with autocast():
        h = core(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, T, d) normed
    real = mask.bool()
    if loss == "distill":
        zs = lm_head(h[real].float())  # (n, V)
        with torch.no_grad():
            lt = torch.log_softmax(lm_head(t_states[real]).float(), -1)
        ls = torch.log_softmax(zs, -1)
        per = (lt.exp() * (lt - ls)).sum(-1)  # (n,)
        return per.mean(), per.detach()
    pair = real[:, :-1] & real[:, 1:]  # (b, T-1): token t predicts a real token t+1
    zs = lm_head(h[:, :-1][pair].float())
    per = F.cross_entropy(zs, ids[:, 1:][pair], reduction="none")
    return per.mean(), per.detach()


def _lr_lambda(o: FinetuneOptions, total=None):
    """The learning rate's factor at a step: linear warm-up, then cosine decay to ``min_lr_ratio`` at the last
    step. ``total``: a callable giving the planned number of steps (a time budget changes it as the run goes);
    default ``o.steps``."""
    def f(step: int) -> float:
        steps = total() if total is not None else o.steps
        warm = max(1, int(o.warmup * steps)) if o.warmup > 0 else 0
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------- the trainer


def finetune(teacher, student, plan: Plan, cal: Calibration, heldout: set[int], o: FinetuneOptions,
             device: str = "cpu", state_dir: Path | None = None, key: str = "") -> FinetuneResult:
    """Train ``student`` (the pruned model, apply_plan'd) toward ``teacher`` on ``cal``; return what changed.

    ``heldout``: sequence indices kept out of training (early stopping, figures). ``state_dir``: where
    checkpoints go; one whose ``key`` matches is resumed.
    """
    return Trainer(teacher, student, plan, cal, heldout, o, device=device, state_dir=state_dir, key=key).run()


class Trainer:
    """One fine-tuning run. Set up on construction (teacher states, the trainable student, optimizer and
    schedule); :meth:`run` resumes a checkpoint or evaluates the starting point, then takes :meth:`step`
    after step, :meth:`evaluate`-ing every ``eval_every`` and :meth:`save_checkpoint`-ing every
    ``checkpoint_every``, and ends with the best weights."""

    def __init__(self, teacher, student, plan: Plan, cal: Calibration, heldout: set[int], o: FinetuneOptions,
                 device: str = "cpu", state_dir: Path | None = None, key: str = ""):
        check_data(cal, heldout, o)
        self.t0 = time.time()
        self.o, self.device, self.key = o, device, key
        self.dev = dev = torch.device(device)
        self.train_idx = [i for i in range(cal.n_seq) if i not in heldout]
        self.ho_idx = sorted(heldout)
        self.ids, self.mask = cal.input_ids, cal.attention_mask.long()  # (n_seq, T) each

        self.precision = resolve_precision(o.precision, dev)
        self.autocast = ((lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if self.precision == "bf16"
                         else contextlib.nullcontext)
        teacher.to(dev)
        self.sampling_seconds = 0.0
        if o.teacher_samples:  # the teacher's own samples join the training set (the held-out split stays real text)
            t = time.time()
            prompts = sampled.prompts_from(self.ids, self.mask, self.train_idx, o.teacher_samples, o.seed)
            new = sampled.sample(teacher, prompts, cal.seq_len, o.seed, dev, o.batch_size * 8, self.autocast)
            self.train_idx += range(cal.n_seq, cal.n_seq + len(new))
            self.ids, self.mask = torch.cat([self.ids, new]), torch.cat([self.mask, torch.ones_like(new)])
            self.sampling_seconds = time.time() - t
        self.t_states = None
        if o.loss == "distill" or self.ho_idx:  # held-out KL needs the teacher too
            self.t_states = teacher_states(teacher, self.ids, self.mask, dev, o.batch_size)  # (n_seq, T, d)
        teacher.to("cpu")

        self.student = prepare_student(student, plan, o, dev)
        self.params = self.student.params
        self.n_trainable = sum(p.numel() for _, p in self.params)
        log.info("fine-tuning (%s, %s loss): %d trainable parameters, %d train / %d held-out sequences of %d tokens, "
                 "%d steps of %d, lr %.1e, on %s (%s)", o.method, o.loss, self.n_trainable, len(self.train_idx),
                 len(self.ho_idx), cal.seq_len, o.steps, o.batch_size, o.learning_rate, device, self.precision)
        self.opt = torch.optim.AdamW([p for _, p in self.params], lr=o.learning_rate, weight_decay=o.weight_decay,
                                     betas=(0.9, 0.95))
        self.total = o.steps  # the planned steps: o.steps, or fewer when a time budget (max_minutes) binds
        self.eval_seconds = 0.0  # what one held-out evaluation costs (measured on the starting point)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(o, lambda: self.total))

        self.metric = "nll" if o.loss == "nexttoken" else "kl"  # what early stopping and "best" go by
        self.state_path = None if state_dir is None else Path(state_dir) / "state.pt"
        self.steps_done = 0
        self.history: list[dict] = []
        self.best: dict[str, Any] = {}  # {"step", "metric", "params", "eval"}
        self.bad_evals = 0  # evaluations since the best
        self.resumed = False
        self.losses: list[float] = []  # training loss of every step taken in this process

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Held-out KL to the teacher (and NLL for ``nexttoken``) per real token; {} without a held-out split."""
        o, dev, ids, mask = self.o, self.dev, self.ids, self.mask
        if not self.ho_idx:
            return {}
        model, core, lm_head = self.student.model, self.student.core, self.student.lm_head
        model.eval()
        kl_sum = nll_sum = 0.0
        n = 0
        with torch.no_grad():
            for s in range(0, len(self.ho_idx), o.batch_size):
                b = torch.tensor(self.ho_idx[s:s + o.batch_size])
                ts = self.t_states[b].to(dev)
                _, per = batch_loss(core, lm_head, ids[b].to(dev), mask[b].to(dev), ts, "distill", self.autocast)
                kl_sum += float(per.double().sum())
                n += per.numel()
                if o.loss == "nexttoken":
                    _, per_n = batch_loss(core, lm_head, ids[b].to(dev), mask[b].to(dev), ts, "nexttoken",
                                          self.autocast)
                    nll_sum += float(per_n.double().sum())
        model.train()
        r = {"kl": kl_sum / max(n, 1)}
        if o.loss == "nexttoken":
            r["nll"] = nll_sum / max(n, 1)
        return r

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params}

    # --- checkpoints ------------------------------------------------------------------------------

    def resume(self) -> bool:
        """Load the checkpoint in the state directory if it is this run's (same ``key``); True if loaded."""
        if self.state_path is None or not self.state_path.exists():
            return False
        saved = torch.load(self.state_path, map_location="cpu", weights_only=False)
        if saved.get("key") != self.key:
            log.warning("%s belongs to another run (other inputs or options); starting afresh", self.state_path)
            return False
        by_name = dict(self.params)
        with torch.no_grad():
            for n, v in saved["params"].items():
                by_name[n].copy_(v.to(self.dev))
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.steps_done, self.history = saved["step"], saved["history"]
        self.best, self.bad_evals = saved["best"], saved["bad_evals"]
        self.resumed = True
        log.info("resuming fine-tuning from %s at step %d/%d", self.state_path, self.steps_done, self.o.steps)
        return True

    def save_checkpoint(self) -> None:
        """Parameters, optimizer, schedule and early-stopping state, for :meth:`resume`."""
        if self.state_path is None:
            return
        try:  # through a temporary file: a checkpoint cut short (a full disk) is never left to resume from
            save_torch_atomic({"key": self.key, "step": self.steps_done,
                               "params": {n: p.detach().cpu() for n, p in self.params},
                               "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                               "history": self.history,
                               "best": {**self.best, "params": {n: v.cpu() for n, v in self.best["params"].items()}},
                               "bad_evals": self.bad_evals}, self.state_path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.state_path.parent.rmdir()  # only if empty: an earlier checkpoint stays to resume from
            raise

    # --- training ---------------------------------------------------------------------------------

    def step(self) -> float:
        """One optimizer step on the next batch; returns its loss. The batches follow a per-epoch shuffle
        seeded by the epoch, so a resumed run sees the same batches."""
        o, dev = self.o, self.dev
        epoch, k = divmod(self.steps_done, len(self.train_idx) // o.batch_size)
        order = list(self.train_idx)
        random.Random(o.seed * 100003 + epoch).shuffle(order)
        b = torch.tensor(order[k * o.batch_size:(k + 1) * o.batch_size])
        ts = None if self.t_states is None else self.t_states[b].to(dev)
        loss, _ = batch_loss(self.student.core, self.student.lm_head, self.ids[b].to(dev), self.mask[b].to(dev), ts,
                             o.loss, self.autocast)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], o.grad_clip)
        self.opt.step()
        self.sched.step()
        self.steps_done += 1
        self.losses.append(loss.item())
        return self.losses[-1]

    def _start(self) -> None:
        """Resume, or score the starting point: the best so far until a step beats it."""
        self.resume()
        if not self.best:
            t = time.time()
            ev = self.evaluate()
            self.eval_seconds = time.time() - t
            self.best = {"step": 0, "metric": ev.get(self.metric, math.inf), "params": self._snapshot(), "eval": ev}
            self.history.append({"step": 0, **ev})
            if ev:
                log.info("before fine-tuning: held-out %s", ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))

    def _evaluate_step(self) -> bool:
        """Evaluate after a step, keep the best weights; True when training should stop early."""
        o, step = self.o, self.steps_done
        ev = self.evaluate()
        self.history.append({"step": step, "loss": _mean(self.losses[-o.eval_every:]),
                             "lr": self.sched.get_last_lr()[0], **ev})
        if not ev:  # no held-out split: the latest weights are the best there is
            self.best = {"step": step, "metric": math.inf, "params": self._snapshot(), "eval": {}}
            return False
        better = ev[self.metric] < self.best["metric"]
        log.info("step %d: held-out %s%s", step, ", ".join(f"{k} {v:.4f}" for k, v in ev.items()),
                 " (best)" if better else f" (best {self.best['metric']:.4f} at step {self.best['step']})")
        if better:
            self.best = {"step": step, "metric": ev[self.metric], "params": self._snapshot(), "eval": ev}
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= o.patience:
            log.info("stopping early: %d evaluations without improvement", self.bad_evals)
            return True
        return False

    def run(self) -> FinetuneResult:
        """Train to ``steps`` (or an early stop); put the best weights back and return what changed."""
        o = self.o
        self._start()
        before = self.history[0] if self.history else {}
        self.student.model.train()
        t_loop, step0 = time.time(), self.steps_done
        stopped = "steps"
        while self.steps_done < self.total:
            self.step()
            step = self.steps_done
            out_of_time = self._fit_to_budget(t_loop, step0)
            if step % o.log_every == 0 or step == self.total:
                rate = (time.time() - t_loop) / max(1, step - step0)
                log.info("step %d/%d  loss %.4f  lr %.2e  %.1f s/step  ETA %s", step, self.total,
                         _mean(self.losses[-o.log_every:]), self.sched.get_last_lr()[0], rate,
                         _fmt_eta(rate * (self.total - step)))
            if (step % o.eval_every == 0 or step == self.total or out_of_time) and self._evaluate_step():
                stopped = "early"
                break
            if out_of_time:
                log.info("stopping at step %d: the time budget of %g minutes is spent", step, o.max_minutes)
                break
            if step % o.checkpoint_every == 0 and step < self.total:
                self.save_checkpoint()
        if stopped == "steps" and self.total < o.steps:
            stopped = "time"
        return self._finish(before, stopped, t_loop, step0)

    def _fit_to_budget(self, t_loop: float, step0: int) -> bool:
        """With a time budget: re-plan the steps to those that fit in it at the pace so far (evaluations
        included), so that the cosine schedule still ends at the last step; True once the budget is spent."""
        o = self.o
        if o.max_minutes is None:
            return False
        elapsed, budget = time.time() - t_loop, 60.0 * o.max_minutes
        if elapsed >= budget:
            return True
        done = self.steps_done - step0
        if done >= min(3, o.steps):  # the first steps' pace is all there is to go by
            pace = elapsed / done + self.eval_seconds / o.eval_every
            self.total = max(self.steps_done, min(o.steps, self.steps_done + int((budget - elapsed) / pace)))
        return False

    def _finish(self, before: dict, stopped: str, t_loop: float, step0: int) -> FinetuneResult:
        """The best weights back into the student; the changed tensors and the run's figures."""
        o, best = self.o, self.best
        with torch.no_grad():
            by_name = dict(self.params)
            for n, v in best["params"].items():
                by_name[n].copy_(v)
        weights = self.student.weights(trained=best["step"] > 0)
        self.student.model.to("cpu")
        stats = {
            "method": o.method, "loss": o.loss, "options": asdict(o), "device": self.device,
            "precision": self.precision, "teacher_samples": o.teacher_samples,
            "sampling_seconds": round(self.sampling_seconds, 1),
            "trainable_params": self.n_trainable, "train_sequences": len(self.train_idx),
            "heldout_sequences": len(self.ho_idx), "steps_done": self.steps_done, "stopped": stopped,
            "planned_steps": self.total, "max_minutes": o.max_minutes,
            "resumed": self.resumed, "best_step": best["step"],
            "heldout_kl_before": before.get("kl"), "heldout_kl_best": best["eval"].get("kl"),
            "history": self.history, "seconds": round(time.time() - self.t0, 1),
            "seconds_per_step": round((time.time() - t_loop) / max(1, self.steps_done - step0), 3),
            "tensors": len(weights),
        }
        if best["step"] == 0 and self.ho_idx:
            log.warning("fine-tuning did not beat the starting point on the held-out split; weights left unchanged")
        return FinetuneResult(weights=weights, stats=stats)
