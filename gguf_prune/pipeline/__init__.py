"""The stages in order: `run` (the main job), `sweep` (the quality-vs-size curve) and iterative pruning.

- job.py: `run`, the main job (score → plan → [recover] → prune → eval → package), and its summary
- sweep.py: `sweep`, a pruned model per (strategy, budget) evaluated against one base, its table and plot
- strategy.py: the strategies of run and sweep, and the plan each one makes (a table)
- checks.py: every option and input of run and sweep, checked before the first stage starts
- iterate.py: iterative pruning (score → plan → recover, round by round)
"""
