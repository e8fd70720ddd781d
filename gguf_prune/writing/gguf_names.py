"""The names gguf-prune reads and writes inside a GGUF: its own metadata keys.

A pruned GGUF records the plan it was cut with under ``gguf_prune.*``, so ``eval`` and ``package`` can say
what a file is without the plan file next to it. Per-layer tensors are named ``blk.{i}.<suffix>``
(:func:`gguf_prune.models.arch.split_layer_name` owns that pattern).
"""

from __future__ import annotations

OWN_KEY_PREFIX = "gguf_prune."  # every key gguf-prune writes; a rewrite drops the input's own
PLAN_KEY = "gguf_prune.plan"  # the plan, as its sorted JSON
PLAN_DIGEST_KEY = "gguf_prune.plan_digest"
VERSION_KEY = "gguf_prune.version"  # the gguf-prune that wrote the file
