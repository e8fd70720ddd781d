"""The data files shipped in the wheel: calibration and held-out texts, and the task prompts."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
