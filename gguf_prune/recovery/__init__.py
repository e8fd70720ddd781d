"""`gguf-prune recover`: win back what a cut lost (closed-form patches, fine-tuning), handed to `prune`
through a recover directory (the format lives in :mod:`gguf_prune.recovered`).

- recover.py: `recover`, the stage: checks the request, fits patches and/or fine-tunes, writes the directory
- patches.py: linear patches: where they go (mark_patches) and their ridge least-squares fit (fit_patches)
- finetune.py: fine-tuning by distillation or next-token loss: the Trainer, its losses and schedule
- options.py: RecoverOptions and FinetuneOptions, their defaults and checks (no torch: the CLI reads them)
- student.py: the pruned model made trainable (LoRA or full, removed heads and neurons masked), and what changed
"""
