"""`gguf-prune recover`: win back what a cut lost (closed-form patches, fine-tuning), handed to `prune`
through a recover directory (the format lives in :mod:`gguf_prune.recovered`).
"""
