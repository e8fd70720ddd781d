"""Distillation text sampled from the teacher (``FinetuneOptions.teacher_samples``).

The calibration file covers one kind of text; a distilled student learns the teacher there and transfers only
partly elsewhere. Sequences sampled from the teacher itself (temperature 1, no top-k / top-p: its own
distribution) spread the training set over what the teacher is likely to write, which needs no data beyond the
model (the idea of LLM-QAT's data-free distillation). Each sample starts from the first ``PROMPT_TOKENS`` tokens
of a random training window, so it begins in the user's domain and wanders from there.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from gguf_prune.recovery.options import FinetuneError

log = logging.getLogger(__name__)

PROMPT_TOKENS = 4


def prompts_from(ids: torch.Tensor, mask: torch.Tensor, train_idx: list[int], n: int, seed: int) -> torch.Tensor:
    """(n, PROMPT_TOKENS) prompts: the opening tokens of training windows drawn at random (with replacement
    when n exceeds them) among those whose opening tokens are all real."""
    usable = [i for i in train_idx if bool(mask[i, :PROMPT_TOKENS].all())]
    if not usable:
        raise FinetuneError(f"no training sequence has {PROMPT_TOKENS} real tokens to start a teacher sample from: "
                            "use longer sequences (--seq-len) or leave out --teacher-samples")
    g = torch.Generator().manual_seed(seed)
    pick = torch.tensor(usable)[torch.randint(len(usable), (n,), generator=g)]
    return ids[pick, :PROMPT_TOKENS].clone()


@torch.no_grad()
def sample(teacher, prompts: torch.Tensor, seq_len: int, seed: int, device, batch_size: int = 32,
           autocast=None) -> torch.Tensor:
    """(n, seq_len) token ids: each prompt continued by ancestral sampling from ``teacher`` (an HF causal LM)
    at temperature 1 to ``seq_len`` tokens, end-of-sequence tokens included as ordinary tokens (never cut
    short, so every sequence is all real tokens). Seeded: the same inputs give the same samples on one machine."""
    prompts = prompts[:, :seq_len]
    n, k = prompts.shape
    out = torch.empty(n, seq_len, dtype=torch.long)
    out[:, :k] = prompts
    g = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    teacher.eval()
    for s in range(0, n, batch_size):
        cur = prompts[s:s + batch_size].to(device)
        past = None
        step_in = cur
        with (autocast or contextlib.nullcontext)():  # one region: the weights are cast once per batch, not per token
            for t in range(k, seq_len):
                o = teacher(input_ids=step_in, past_key_values=past, use_cache=True)
                past = o.past_key_values
                probs = torch.softmax(o.logits[:, -1].float(), -1)  # (b, V)
                nxt = torch.multinomial(probs, 1, generator=g)  # (b, 1)
                out[s:s + cur.shape[0], t] = nxt[:, 0].cpu()
                step_in = nxt
        log.info("sampled %d/%d sequences of %d tokens from the teacher (%.0f s)", min(s + batch_size, n), n,
                 seq_len, time.time() - t0)
    return out
