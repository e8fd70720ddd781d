"""gguf-prune: prune a Hugging Face causal LM into a GGUF that stock llama.cpp runs."""
