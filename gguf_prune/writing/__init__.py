"""Stage 3, `gguf-prune rewrite` / `prune`: plan + GGUF → a pruned GGUF that stock llama.cpp loads, then
quantized by llama.cpp.
"""
