"""gguf-prune."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"  # the bundled texts and prompts (shipped in the wheel)
