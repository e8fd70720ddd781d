"""The shell launcher at the head of a package: its text, and the packing-time values filled in.

Values given at packing time (names, host, system prompt) are data: the launcher holds them as
single-quoted shell words in assignments at its top and never evaluates them. package.py writes the
launcher followed by the tar payload it unpacks, and reads the assignments back (``packed_options``).
"""

from __future__ import annotations

import re
import shlex

LAUNCHER = r'''#!/bin/sh
# A llama-server with its web UI and a model, packed by gguf-prune; run it with --help.
# Every value set at packing time is in the single-quoted assignments below, as data: this
# script never evaluates a value (no eval, no unquoted expansion, no value in a heredoc).
set -eu
unset CDPATH
APP_NAME=@NAME@
MODEL_NAME=@MODEL@
DEFAULT_HOST=@HOST@
DEFAULT_PORT=@PORT@
DEFAULT_CTX=@CTX@
DEFAULT_THREADS=@THREADS@
HASH=@HASH@
MANIFEST_SHA256=@MANIFEST_SHA256@
PAYLOAD_LINE=@PAYLOAD_LINE@

say() { printf '%s: %s\n' "$APP_NAME" "$1" >&2; }
die() { say "$1"; exit "${2:-1}"; }

usage() {
  printf '%s: chat with %s in your browser (llama-server + web UI, packed by gguf-prune)\n\n' "$APP_NAME" "$MODEL_NAME"
  printf 'usage: %s [options] [llama-server options]\n\n' "$0"
  printf '  --host H        address to listen on (default %s)\n' "$DEFAULT_HOST"
  printf '  --port N        port (default %s)\n' "$DEFAULT_PORT"
  printf '  --ctx N         context size in tokens (default %s)\n' "$DEFAULT_CTX"
  printf '  --threads N     CPU threads (default: %s)\n' "${DEFAULT_THREADS:-chosen by llama-server}"
  printf '  --help          this help; --help-server shows every llama-server option\n'
  printf '  --path-only     unpack (if needed) and print where the files are\n\n'
  printf 'Then open http://HOST:PORT/ in a browser; the OpenAI-compatible API is at /v1.\n'
  printf 'Files are unpacked once into ${XDG_CACHE_HOME:-$HOME/.cache}/gguf-prune-app/%s.\n' "$HASH"
}

HOST=$DEFAULT_HOST; PORT=$DEFAULT_PORT; CTX=$DEFAULT_CTX; THREADS=$DEFAULT_THREADS
PATH_ONLY=0; SERVER_HELP=0
set_option() {
  case $1 in
    --host) HOST=$2 ;;
    --port) PORT=$2 ;;
    --ctx|-c|--ctx-size) CTX=$2 ;;
    --threads|-t) THREADS=$2 ;;
  esac
}
# Take out the options this launcher knows; the others stay in "$@", in their order, for llama-server.
n=$#
while [ "$n" -gt 0 ]; do
  arg=$1; shift; n=$((n - 1))
  case $arg in
    -h|--help) usage; exit 0 ;;
    --help-server) SERVER_HELP=1 ;;
    --path-only) PATH_ONLY=1 ;;
    --host|--port|--ctx|-c|--ctx-size|--threads|-t)
      [ "$n" -gt 0 ] || die "$arg needs a value" 2
      set_option "$arg" "$1"; shift; n=$((n - 1)) ;;
    --host=*|--port=*|--ctx=*|--ctx-size=*|--threads=*) set_option "${arg%%=*}" "${arg#*=}" ;;
    *) set -- "$@" "$arg" ;;
  esac
done
case $PORT in ''|*[!0-9]*) die "--port takes a number, not: $PORT" 2 ;; esac
case $CTX in ''|*[!0-9]*) die "--ctx takes a number, not: $CTX" 2 ;; esac
case $THREADS in *[!0-9]*) die "--threads takes a number, not: $THREADS" 2 ;; esac

# XDG: a relative XDG_CACHE_HOME is ignored
case ${XDG_CACHE_HOME:-} in
  /*) CACHE=$XDG_CACHE_HOME/gguf-prune-app ;;
  *) case ${HOME:-} in
       /*) CACHE=$HOME/.cache/gguf-prune-app ;;
       *) die "HOME is not an absolute path; set HOME or XDG_CACHE_HOME to say where to unpack" ;;
     esac ;;
esac
DIR=$CACHE/$HASH
SELF=$0
case $SELF in */*) ;; *) SELF=$(command -v -- "$SELF") ;; esac

# The manifest must be the one packed in this file (its hash is above), and every file must match it.
verify() {
  [ -f "$1/MANIFEST.sha256" ] || return 1
  (cd -- "$1" \
    && printf '%s  MANIFEST.sha256\n' "$MANIFEST_SHA256" | sha256sum -c --quiet --strict >/dev/null 2>&1 \
    && sha256sum -c --quiet --strict MANIFEST.sha256 >/dev/null 2>&1)
}

if ! verify "$DIR"; then
  mkdir -p -- "$CACHE"
  if [ -e "$DIR" ]; then
    say "the unpacked copy in $DIR is damaged; unpacking again"
    mv -- "$DIR" "$DIR.damaged.$$" 2>/dev/null && rm -rf -- "$DIR.damaged.$$" || true
  else
    say "unpacking once into $DIR"
  fi
  TMP=$(mktemp -d "$CACHE/.unpack.XXXXXX")
  trap 'rm -rf -- "$TMP"' EXIT INT TERM
  tail -n +"$PAYLOAD_LINE" -- "$SELF" | tar -x -f - -C "$TMP"
  verify "$TMP" || die "this file is damaged (payload does not match its manifest)"
  # atomic: if another start won the race, keep its copy and drop ours
  if ! mv -T -- "$TMP" "$DIR" 2>/dev/null; then
    verify "$DIR" || die "cannot install into $DIR"
    rm -rf -- "$TMP"
  fi
  trap - EXIT INT TERM
fi

if [ "$PATH_ONLY" = 1 ]; then printf '%s\n' "$DIR"; exit 0; fi
# ggml loads its CPU backend (libggml-cpu-<level>.so) from the executable's directory and from
# the current one: refuse to start where a stranger's copy would be loaded into llama-server.
if [ "$(pwd -P)" != "$(cd -- "$DIR/bin" && pwd -P)" ]; then
  for f in ./libggml-*.so; do
    if [ -e "$f" ]; then
      die "the current directory holds $f, which llama-server would load; start from another directory"
    fi
  done
fi
LD_LIBRARY_PATH=$DIR/lib
export LD_LIBRARY_PATH
if [ "$SERVER_HELP" = 1 ]; then exec "$DIR/bin/llama-server" --help; fi
if [ -f "$DIR/chat_template.jinja" ]; then
  set -- --jinja --chat-template-file "$DIR/chat_template.jinja" "$@"
fi
if [ -n "$THREADS" ]; then set -- -t "$THREADS" "$@"; fi
set -- -m "$DIR/model.gguf" --host "$HOST" --port "$PORT" -c "$CTX" --alias "$APP_NAME" "$@"
say "serving on http://$HOST:$PORT/ (Ctrl-C to stop)"
exec "$DIR/bin/llama-server" "$@"
exit 0
'''


def render_launcher(*, name: str, model_name: str, host: str, port: int, ctx: int, threads: int | None,
                    content_hash: str, manifest_sha256: str) -> bytes:
    """The launcher with every packing-time value in place; the payload starts on the line after it."""
    # Every value goes in as one shell-quoted word, in a single pass (a value that looks like
    # a placeholder stays as it is).
    subs = {"NAME": shlex.quote(name), "MODEL": shlex.quote(model_name), "HOST": shlex.quote(host),
            "PORT": str(port), "CTX": str(ctx), "THREADS": "" if threads is None else str(threads),
            "HASH": content_hash, "MANIFEST_SHA256": manifest_sha256}

    def render(payload_line: int) -> str:
        values = {**subs, "PAYLOAD_LINE": str(payload_line)}
        return re.sub(r"@([A-Z_0-9]+)@", lambda m: values[m.group(1)], LAUNCHER)

    launcher = render(0)
    launcher = render(launcher.count("\n") + 1)  # the payload starts on the line after the launcher
    return launcher.encode("utf-8", "surrogateescape")  # file names are bytes: keep them as they are
