"""The stages in order: `run` (the main job), `sweep` (the quality-vs-size curve) and iterative pruning.
"""
