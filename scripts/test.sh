#!/usr/bin/env bash
# Set up everything (idempotent; the first run builds llama.cpp, ~12 min on 2 cores, and
# then the portable llama-server that packages ship, 27 CPU-minutes: ~13 min more on 2
# idle cores) and run the whole test suite, end-to-end tests on the demo model included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# Debian packages the tests need: headless Chromium and its driver (the web-UI test) and
# qemu-user (the packaged executable on an emulated CPU without AVX). Missing ones are
# installed when we are root with apt-get; otherwise this stops here, naming them: the tests
# that need them fail rather than skip.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v qemu-x86_64 >/dev/null 2>&1 || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing ${need[*]} for the web-UI and portable-executable tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
  else
    echo "[test] error: the tests need ${need[*]} (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
# The server that packages ship (every CPU variant): built once, here rather than in the
# middle of the first package test, so its progress shows.
.venv/bin/python -m gguf_prune.runtime.toolchain portable >/dev/null
exec .venv/bin/python -m pytest -q "$@"
