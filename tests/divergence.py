"""Divergences between two models' predictions (numpy, float64 for accuracy)."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_per_token(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P ‖ Q) per row, in nats: P is the reference (e.g. the unpruned model)."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def top1_agreement(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    return float((np.argmax(p_logits, -1) == np.argmax(q_logits, -1)).mean())
