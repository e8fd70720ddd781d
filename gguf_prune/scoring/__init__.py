"""Stage 1, `gguf-prune score`: measure what every layer, sub-block, head and neuron does, on calibration
tokens, and write scores.json (the format lives in :mod:`gguf_prune.scores`).

options.py        the stage's options (ScoreOptions), their defaults and choices (no torch: the CLI reads them)
inputs.py         every check before weights load (prepare → ScoreInputs)
measure.py        the stage's driver, score_model: the in-memory run, or the streamed one; writes the document
engine_choice.py  in memory or streamed (asked for, or the model would not fit); which layers a --units slice owns
taylor.py         Taylor head scores, in memory (one backward) or streamed (two passes over the weights)
merge.py          score --merge: --units slices joined into one scores.json
stream.py         the layer-major streamed scan over a checkpoint's weights, and its scores
stream_engine.py  the streamed engine: a checkpoint read a few tensors at a time, decoder layers run one at a time
memory.py         memory budgets: --max-memory, free device memory, the streamed engine's token groups and passes
ablate.py         the prefix-cached ablation engine, and the scan spec and result both engines share
oneshot.py        the one-shot scan: every unit's KL, BI and statistics from one walk of the engine
greedy.py         the greedy search (one unit removed at a time, re-measured each step), its candidates and entry
naive.py          the naive reference path (whole model per unit set, hooks) the engine is tested against
plots.py          PNG plots of a scores file
"""
