"""Stage 1, `gguf-prune score`: measure what every layer, sub-block, head and neuron does, on calibration
tokens, and write scores.json (the format lives in :mod:`gguf_prune.scores`).
"""
