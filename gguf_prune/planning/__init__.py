"""Stage 2, `gguf-prune plan`: scores → plan.json (the format lives in :mod:`gguf_prune.plan`).
"""
