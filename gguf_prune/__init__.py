"""gguf-prune."""
