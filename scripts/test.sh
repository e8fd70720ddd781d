#!/usr/bin/env bash
# Set up everything (idempotent; the first run builds llama.cpp, ~12 min on 2 cores)
# and run the whole test suite, end-to-end tests on the demo model included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# Headless Chromium and its driver for the web-UI test (Debian packages).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing chromium and chromium-driver for the web-UI test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
  else
    echo "[test] error: the web-UI test needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)" >&2
    exit 1
  fi
fi
exec .venv/bin/python -m pytest -q "$@"
