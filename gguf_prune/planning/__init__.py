"""Stage 2, `gguf-prune plan`: scores → plan.json (the format lives in :mod:`gguf_prune.plan`).

options.py     PlanOptions, their ranges and what a given model can honour
strategies.py  build_plan / make_plan: the cutting strategies applied in order (layers, sub-blocks, heads, neurons)
budget.py      the budget of a per-layer plan: greedy steps, then the cheapest unit per parameter
uniform.py     uniform plans: one shape for every kept layer (the model's own llama.cpp architecture)
draft.py       Draft, a plan under construction, and the size it predicts
explain.py     `plan --explain`: the table of what goes and why
diff.py        two plans compared: new cuts, revived parts
"""
