"""Fine-tuning a pruned model in PyTorch: LoRA (peft) or full, by distillation or next-token loss.

The student is ``cuts.apply_plan(model, plan, patches)``: removed layers are gone,
patches are in place, and removed heads / neurons are *masked at the input of o_proj
/ down_proj* by forward pre-hooks. Masking the input (not the weight columns) is what
keeps training from reviving them: whatever o_proj's removed columns or the LoRA
delta on them become, they multiply zeros, so the model trained is exactly the model
llama.cpp will run after those columns are sliced away (they are also zeroed in what
is saved). Embeddings, the final norm and the output matrix are frozen (tied in many
models; the teacher's logits are computed with the same matrix).

Loss ``distill`` (default): mean per-token KL(teacher ‖ student) over real tokens; the
teacher's final normed hidden states are computed once and its logits rebuilt per
batch (n_tokens × n_embd floats kept instead of n_tokens × n_vocab). ``nexttoken``:
cross-entropy on the data's own next tokens.

AdamW, linear warm-up then cosine decay, gradient clipping; a held-out split is
scored every ``eval_every`` steps (held-out KL to the teacher, or NLL for
``nexttoken``), the best weights are kept, and training stops after ``patience``
evaluations without improvement. If no step beats the starting point, the weights
are left as they were. A checkpoint is written every ``checkpoint_every`` steps; a run
started again with the same inputs resumes from it.
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

from gguf_prune.calibration import Calibration
from gguf_prune.models import cuts
from gguf_prune.models.cuts import PatchLayer, _ZeroAttention, _ZeroMLP
from gguf_prune.plan import Plan
from gguf_prune.atomic import save_torch_atomic
from gguf_prune.errors import GgufPruneError

log = logging.getLogger(__name__)

METHODS = ("lora", "full")
LOSSES = ("distill", "nexttoken")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}


class FinetuneError(GgufPruneError, ValueError):
    """A fine-tuning request that cannot run: what, where, what to do."""


@dataclass(frozen=True)
class FinetuneOptions:
    method: str = "lora"
    loss: str = "distill"
    steps: int = 200
    batch_size: int = 4
    lr: float | None = None  # default: DEFAULT_LR[method]
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1  # the cosine ends at lr × this
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    train_patches: bool = True  # patch matrices are trained too (fully: n_embd² each)
    eval_every: int = 25
    patience: int = 4
    checkpoint_every: int = 25
    log_every: int = 10
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass
class FinetuneResult:
    weights: dict  # source HF name → tensor (float32, CPU): what changed
    stats: dict = field(default_factory=dict)


def resolve_device(device: str) -> str:
    return cuts.resolve_device(device, FinetuneError)


def check_options(o: FinetuneOptions) -> None:
    p = []
    if o.method not in METHODS:
        p.append(f"method {o.method!r} is not one of {', '.join(METHODS)}")
    if o.loss not in LOSSES:
        p.append(f"loss {o.loss!r} is not one of {', '.join(LOSSES)}")
    for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "lora_rank", "patience", "log_every"):
        if getattr(o, name) < 1:
            p.append(f"{name} is {getattr(o, name)}; it must be at least 1")
    if o.learning_rate <= 0:
        p.append(f"learning rate {o.learning_rate} must be positive")
    if not 0 <= o.warmup < 1:
        p.append(f"warmup {o.warmup} must be a fraction of the steps in [0, 1)")
    if p:
        raise FinetuneError("fine-tuning options are invalid:\n  - " + "\n  - ".join(p))


def check_data(cal: Calibration, heldout: set[int], o: FinetuneOptions) -> None:
    """Enough sequences for one batch of training (after the held-out split)? Raise FinetuneError if not."""
    check_options(o)
    n_train = cal.n_seq - len(heldout)
    if n_train < o.batch_size:
        raise FinetuneError(
            f"training data {cal.source} gives {cal.n_seq} sequence(s) of {cal.seq_len} tokens; "
            f"{len(heldout)} held out for early stopping leaves {n_train}, fewer than one batch of "
            f"{o.batch_size}: use more text (or --samples), a smaller --seq-len or --batch-size")


# ----------------------------------------------------------------------------- the student


def _masks(model, plan: Plan) -> list:
    """Forward pre-hooks zeroing removed heads at o_proj's input and removed neurons at down_proj's."""
    s = plan.shape
    by_index = {lp.index: lp for lp in plan.layers}
    hooks = []
    for layer in model.model.layers:
        lp = by_index[layer.source_index]
        if lp.removed:
            continue
        if lp.heads and len(lp.heads) < s.n_head and hasattr(layer.self_attn, "o_proj"):
            m = torch.zeros(s.n_head * s.head_dim)
            for h in lp.heads:
                m[h * s.head_dim:(h + 1) * s.head_dim] = 1
            hooks.append((layer.self_attn.o_proj, m))
        if lp.neurons and len(lp.neurons) < s.n_ff and hasattr(layer.mlp, "down_proj"):
            m = torch.zeros(s.n_ff)
            m[list(lp.neurons)] = 1
            hooks.append((layer.mlp.down_proj, m))
    return hooks


def _install(hooks, device) -> list:
    handles = []
    for module, m in hooks:
        mask = m.to(device)

        def pre(mod, args, _mask=mask):
            return (args[0] * _mask.to(args[0].dtype),) + tuple(args[1:])
        handles.append(module.register_forward_pre_hook(pre))
    return handles


def _used(layer, name: str) -> bool:
    """Does the parameter take part in the pruned model (and exist in its GGUF)?"""
    if name == "input_layernorm.weight":
        # a PatchLayer's norm gain is written as ones; a removed attention's norm is not read
        return not isinstance(layer, PatchLayer) and not isinstance(layer.self_attn, _ZeroAttention)
    if name == "post_attention_layernorm.weight":
        return not isinstance(layer.mlp, _ZeroMLP)
    return True


def _source_name(layer, rest: str) -> str:
    if rest == "self_attn.proj.weight":  # a patch's matrix (PatchLayer or LinearAttention)
        return f"model.layers.{layer.source_index}.patch.weight"
    return f"model.layers.{layer.source_index}.{rest}"


@dataclass
class Student:
    """The pruned model made trainable: LoRA injected (or the used weights unfrozen), removed heads and
    neurons masked at the input of o_proj / down_proj. ``core``/``lm_head`` are what the loss calls."""

    model: Any  # the module to train (a peft model for LoRA)
    base: Any  # the LlamaForCausalLM inside (the same object apply_plan returned)
    params: list  # (name, parameter) that train
    handles: list
    plan: Plan
    options: FinetuneOptions

    @property
    def core(self):
        return self.base.model  # peft injects its layers in place: the same LlamaModel

    @property
    def lm_head(self):
        return self.base.lm_head

    def weights(self, trained: bool = True) -> dict:
        """Remove the masks, merge LoRA, and return the changed tensors under source names ({} if not trained)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        base = self.base
        if self.options.method == "lora" and self.model is not self.base:
            base = self.model.merge_and_unload()
        return _changed(base, self.plan, self.params, self.options, trained)


def prepare_student(student, plan: Plan, o: FinetuneOptions, device: str | torch.device = "cpu") -> Student:
    """Make ``student`` (``cuts.apply_plan(model, plan, patches)``) trainable as ``o`` says, on ``device``."""
    model, params = _prepare(student, o)
    model.to(device)
    # after LoRA is injected: the hooks sit on the wrapper, so that the LoRA path sees the mask too
    handles = _install(_masks(student, plan), device)
    return Student(model=model, base=student, params=params, handles=handles, plan=plan, options=o)


def _prepare(student, o: FinetuneOptions):
    """Freeze what does not train, add LoRA if asked; return (model to call, trainable named params)."""
    for p in student.parameters():
        p.requires_grad_(False)
    model = student
    if o.method == "lora":
        from peft import LoraConfig, get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, m in student.model.layers.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        targets = [t for t in LORA_TARGETS if t in present]
        if targets:
            cfg = LoraConfig(r=o.lora_rank, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                             target_modules=targets, bias="none")
            model = get_peft_model(student, cfg)
    else:
        for layer in student.model.layers:
            for n, p in layer.named_parameters():
                p.requires_grad_(_used(layer, n))
    if o.train_patches:
        for layer in student.model.layers:
            proj = getattr(layer.self_attn, "proj", None)
            if proj is not None:
                proj.weight.requires_grad_(True)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return model, params


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def _teacher_states(teacher, ids: torch.Tensor, mask: torch.Tensor, device, bs: int) -> torch.Tensor:
    """The teacher's final normed hidden states (n, T, d), float32 on the CPU."""
    out = []
    for s in range(0, ids.shape[0], bs):
        h = teacher.model(input_ids=ids[s:s + bs].to(device),
                          attention_mask=mask[s:s + bs].to(device)).last_hidden_state  # (b, T, d) normed
        out.append(h.float().cpu())
    return torch.cat(out)


def _loss(core, lm_head, ids, mask, t_states, loss: str, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-token losses) of a batch: KL(teacher ‖ student) or next-token NLL over real tokens."""
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
    pair = real[:, :-1] & real[:, 1:]
    zs = lm_head(h[:, :-1][pair].float())
    per = F.cross_entropy(zs, ids[:, 1:][pair], reduction="none")
    return per.mean(), per.detach()


def _lr_lambda(o: FinetuneOptions):
    warm = max(1, int(o.warmup * o.steps)) if o.warmup > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, o.steps - warm)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def finetune(teacher, student, plan: Plan, cal: Calibration, heldout: set[int], o: FinetuneOptions,
             device: str = "cpu", state_dir: Path | None = None, key: str = "") -> FinetuneResult:
    """Train ``student`` (the pruned model, apply_plan'd) toward ``teacher`` on ``cal``; return what changed.

    ``heldout``: sequence indices kept out of training (early stopping, figures). ``state_dir``: where
    checkpoints go; one whose ``key`` matches is resumed.
    """
    check_data(cal, heldout, o)
    t0 = time.time()
    dev = torch.device(device)
    train_idx = [i for i in range(cal.n_seq) if i not in heldout]
    ho_idx = sorted(heldout)
    ids, mask = cal.input_ids, cal.attention_mask.long()

    teacher.to(dev)
    t_states = None
    if o.loss == "distill" or ho_idx:
        t_states = _teacher_states(teacher, ids, mask, dev, o.batch_size)  # (n_seq, T, d)
    teacher.to("cpu")

    st = prepare_student(student, plan, o, dev)
    model, params, core, lm_head = st.model, st.params, st.core, st.lm_head
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext
    n_trainable = sum(p.numel() for _, p in params)
    log.info("fine-tuning (%s, %s loss): %d trainable parameters, %d train / %d held-out sequences of %d tokens, "
             "%d steps of %d, lr %.1e, on %s", o.method, o.loss, n_trainable, len(train_idx), len(ho_idx),
             cal.seq_len, o.steps, o.batch_size, o.learning_rate, device)

    opt = torch.optim.AdamW([p for _, p in params], lr=o.learning_rate, weight_decay=o.weight_decay,
                            betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(o))

    def evaluate() -> dict:
        if not ho_idx:
            return {}
        model.eval()
        kl_sum = nll_sum = 0.0
        n = 0
        with torch.no_grad():
            for s in range(0, len(ho_idx), o.batch_size):
                b = torch.tensor(ho_idx[s:s + o.batch_size])
                ts = t_states[b].to(dev)
                _, per = _loss(core, lm_head, ids[b].to(dev), mask[b].to(dev), ts, "distill", autocast)
                kl_sum += float(per.double().sum())
                n += per.numel()
                if o.loss == "nexttoken":
                    _, per_n = _loss(core, lm_head, ids[b].to(dev), mask[b].to(dev), ts, "nexttoken", autocast)
                    nll_sum += float(per_n.double().sum())
        model.train()
        r = {"kl": kl_sum / max(n, 1)}
        if o.loss == "nexttoken":
            r["nll"] = nll_sum / max(n, 1)
        return r

    metric = "nll" if o.loss == "nexttoken" else "kl"
    snapshot = lambda: {n: p.detach().clone() for n, p in params}  # noqa: E731
    state_path = None if state_dir is None else Path(state_dir) / "state.pt"
    step, history = 0, []
    best: dict[str, Any] = {}
    bad_evals = 0
    resumed = False
    if state_path is not None and state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            by_name = dict(params)
            with torch.no_grad():
                for n, v in saved["params"].items():
                    by_name[n].copy_(v.to(dev))
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            step, history, best, bad_evals = saved["step"], saved["history"], saved["best"], saved["bad_evals"]
            resumed = True
            log.info("resuming fine-tuning from %s at step %d/%d", state_path, step, o.steps)
        else:
            log.warning("%s belongs to another run (other inputs or options); starting afresh", state_path)
    if not best:
        ev = evaluate()
        best = {"step": 0, "metric": ev.get(metric, math.inf), "params": snapshot(), "eval": ev}
        history.append({"step": 0, **ev})
        if ev:
            log.info("before fine-tuning: held-out %s", ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    before = history[0] if history else {}

    def save_state() -> None:
        if state_path is None:
            return
        try:  # through a temporary file: a checkpoint cut short (a full disk) is never left to resume from
            save_torch_atomic({"key": key, "step": step, "params": {n: p.detach().cpu() for n, p in params},
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                               "best": {**best, "params": {n: v.cpu() for n, v in best["params"].items()}},
                               "bad_evals": bad_evals}, state_path)
        except BaseException:
            with contextlib.suppress(OSError):
                state_path.parent.rmdir()  # only if empty: an earlier checkpoint stays to resume from
            raise

    model.train()
    n_epoch_batches = len(train_idx) // o.batch_size
    t_loop, step0 = time.time(), step
    losses: list[float] = []
    stopped = "steps"
    while step < o.steps:
        epoch, k = divmod(step, n_epoch_batches)
        order = list(train_idx)
        random.Random(o.seed * 100003 + epoch).shuffle(order)  # the same batches on a resumed run
        b = torch.tensor(order[k * o.batch_size:(k + 1) * o.batch_size])
        ts = None if t_states is None else t_states[b].to(dev)
        loss, _ = _loss(core, lm_head, ids[b].to(dev), mask[b].to(dev), ts, o.loss, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], o.grad_clip)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        if step % o.log_every == 0 or step == o.steps:
            rate = (time.time() - t_loop) / max(1, step - step0)
            log.info("step %d/%d  loss %.4f  lr %.2e  %.1f s/step  ETA %s", step, o.steps,
                     sum(losses[-o.log_every:]) / len(losses[-o.log_every:]), sched.get_last_lr()[0], rate,
                     _fmt_eta(rate * (o.steps - step)))
        if step % o.eval_every == 0 or step == o.steps:
            ev = evaluate()
            history.append({"step": step, "loss": sum(losses[-o.eval_every:]) / len(losses[-o.eval_every:]), **ev})
            if ev:
                better = ev[metric] < best["metric"]
                log.info("step %d: held-out %s%s", step, ", ".join(f"{k} {v:.4f}" for k, v in ev.items()),
                         " (best)" if better else f" (best {best['metric']:.4f} at step {best['step']})")
                if better:
                    best = {"step": step, "metric": ev[metric], "params": snapshot(), "eval": ev}
                    bad_evals = 0
                else:
                    bad_evals += 1
                    if bad_evals >= o.patience:
                        stopped = "early"
                        log.info("stopping early: %d evaluations without improvement", bad_evals)
                        break
            else:
                best = {"step": step, "metric": math.inf, "params": snapshot(), "eval": {}}
        if step % o.checkpoint_every == 0 and step < o.steps:
            save_state()

    with torch.no_grad():  # the best weights back
        by_name = dict(params)
        for n, v in best["params"].items():
            by_name[n].copy_(v)
    weights = st.weights(trained=best["step"] > 0)
    model.to("cpu")
    stats = {
        "method": o.method, "loss": o.loss, "options": asdict(o), "device": device,
        "trainable_params": n_trainable, "train_sequences": len(train_idx), "heldout_sequences": len(ho_idx),
        "steps_done": step, "stopped": stopped, "resumed": resumed, "best_step": best["step"],
        "heldout_kl_before": before.get("kl"), "heldout_kl_best": best["eval"].get("kl"),
        "history": history, "seconds": round(time.time() - t0, 1),
        "seconds_per_step": round((time.time() - t_loop) / max(1, step - step0), 3),
        "tensors": len(weights),
    }
    if best["step"] == 0 and ho_idx:
        log.warning("fine-tuning did not beat the starting point on the held-out split; weights left unchanged")
    return FinetuneResult(weights=weights, stats=stats)


def _changed(student, plan: Plan, params, o: FinetuneOptions, trained: bool) -> dict:
    """Source-named tensors that training changed (masked columns zeroed, as the GGUF slices them away)."""
    if not trained:
        return {}
    s = plan.shape
    by_index = {lp.index: lp for lp in plan.layers}
    trained_names = {n.removeprefix("base_model.model.") for n, _ in params}  # peft's prefix
    out = {}
    for p_, layer in enumerate(student.model.layers):
        lp = by_index[layer.source_index]
        for rest, p in layer.named_parameters():
            leaf = rest.rsplit(".", 2)[-2]  # "self_attn.q_proj.weight" → "q_proj"
            lora_target = o.method == "lora" and leaf in LORA_TARGETS  # merged: every one changed
            if not (lora_target or f"model.layers.{p_}.{rest}" in trained_names) or not _used(layer, rest):
                continue
            w = p.detach().float().cpu().clone()
            if rest == "self_attn.o_proj.weight" and lp.heads is not None and len(lp.heads) < s.n_head:
                keep = torch.zeros(s.n_head * s.head_dim, dtype=torch.bool)
                for h in lp.heads:
                    keep[h * s.head_dim:(h + 1) * s.head_dim] = True
                w[:, ~keep] = 0
            if rest == "mlp.down_proj.weight" and lp.neurons is not None and len(lp.neurons) < s.n_ff:
                keep = torch.zeros(s.n_ff, dtype=torch.bool)
                keep[list(lp.neurons)] = True
                w[:, ~keep] = 0
            out[_source_name(layer, rest)] = w
    return out
