"""Where gguf-prune's files live: the data shipped in the wheel (calibration and held-out texts, task prompts)
and the cache of builds, converted models and the demo model. Standard library only: set-up imports it before
anything is installed."""

import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def cache_root() -> Path:
    """Where builds and converted models are cached (``$GGUF_PRUNE_CACHE``)."""
    env = os.environ.get("GGUF_PRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gguf-prune"
