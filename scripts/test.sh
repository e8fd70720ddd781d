#!/usr/bin/env bash
# Set up everything (idempotent; the first run builds llama.cpp, ~12 min on 2 cores)
# and run the whole test suite, end-to-end tests on the demo model included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
