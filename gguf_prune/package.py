"""One executable: llama-server (with its embedded web UI) and the model, in a single file.

The file is a POSIX shell launcher followed by a tar payload: the llama-server
binary, every shared library it needs that is not part of glibc (llama.cpp's own,
libstdc++, libgcc_s, libgomp) and the GGUF. On first start it unpacks once into a
per-user cache directory keyed by the payload's content hash, verifies every file
against the manifest, and moves the directory into place atomically (two starts at
once each unpack to their own temporary directory; the first rename wins). Later
starts verify the manifest again and reuse it; a damaged cache is detected and
unpacked afresh. It needs /bin/sh, tar, tail, sha256sum and glibc: no Python, no
checkout, no network.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import llamacpp, toolchain
from .errors import GgufPruneError

log = logging.getLogger(__name__)

# glibc's own libraries: the target machine has these; everything else is carried.
GLIBC = ("linux-vdso", "libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "ld-linux",
         "libresolv.so", "libutil.so")


class PackageError(GgufPruneError, ValueError):
    pass


@dataclass(frozen=True)
class PackageOptions:
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    ctx: int = 4096
    threads: int | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        # refused when the options are made, for an API user as for the CLI (ctx 0: llama-server takes the
        # model's own context length)
        p = []
        for flag, v, lo, hi in (("--port", self.port, 1, 65535), ("--ctx", self.ctx, 0, None),
                                ("--threads", self.threads, 1, None)):
            if v is None and flag == "--threads":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                p.append(f"{flag} {v!r}: must be a whole number, {lo}..{hi}" if hi else
                         f"{flag} {v!r}: must be a whole number, {lo} or more")
        if not isinstance(self.host, str) or not self.host.strip():
            p.append(f"--host {self.host!r}: give an address to listen on, such as 127.0.0.1")
        if p:
            raise PackageError("invalid package options: " + "; ".join(p))


def shared_libraries(binary: Path) -> list[Path]:
    """Resolved non-glibc shared libraries ``binary`` loads, from ldd."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PackageError(f"ldd failed on {binary}: {proc.stderr.strip()}")
    libs = []
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(\S+)\s+\(", line)
        if not m:
            continue
        name, path = m.groups()
        if path == "not" or not Path(path).exists():
            raise PackageError(f"{binary} needs {name}, which ldd cannot find")
        if name.startswith(GLIBC):
            continue
        libs.append(Path(path))
    return libs


LAUNCHER = r'''#!/bin/sh
# @NAME@: a llama-server with its web UI and a model, packed by gguf-prune.
# Usage: ./@FILE@ [--port N] [--host H] [--ctx N] [--threads N] [llama-server flags...]
set -eu
APP_NAME='@NAME@'
HASH='@HASH@'
PAYLOAD_LINE=@PAYLOAD_LINE@
SELF=$0
case "$SELF" in */*) ;; *) SELF=$(command -v -- "$SELF") ;; esac

usage() {
  cat <<EOF
$APP_NAME — chat with @MODEL@ in your browser (llama-server + web UI, packed by gguf-prune)

usage: $0 [options] [llama-server options]

  --host H        address to listen on (default @HOST@)
  --port N        port (default @PORT@)
  --ctx N         context size in tokens (default @CTX@)
  --threads N     CPU threads (default: llama-server's choice)
  --help          this help; --help-server shows every llama-server option
  --path-only     unpack (if needed) and print where the files are

Then open http://HOST:PORT/ in a browser; the OpenAI-compatible API is at /v1.
Files are unpacked once into \${XDG_CACHE_HOME:-\$HOME/.cache}/gguf-prune-app/$HASH.
EOF
}

HOST='@HOST@'; PORT='@PORT@'; CTX='@CTX@'; THREADS='@THREADS@'
PASS=''
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --port) PORT=$2; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    --host) HOST=$2; shift 2 ;;
    --host=*) HOST=${1#*=}; shift ;;
    --ctx|-c|--ctx-size) CTX=$2; shift 2 ;;
    --ctx=*) CTX=${1#*=}; shift ;;
    --threads|-t) THREADS=$2; shift 2 ;;
    --threads=*) THREADS=${1#*=}; shift ;;
    --help-server) SHOW_SERVER_HELP=1; shift ;;
    --path-only) PATH_ONLY=1; shift ;;
    *) PASS="$PASS $(quote "$1")"; shift ;;
  esac
done

CACHE=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/gguf-prune-app
DIR=$CACHE/$HASH

verify() {
  [ -f "$1/MANIFEST.sha256" ] || return 1
  (cd "$1" && sha256sum -c --quiet --strict MANIFEST.sha256 >/dev/null 2>&1)
}

if ! verify "$DIR"; then
  mkdir -p "$CACHE"
  if [ -e "$DIR" ]; then
    echo "$APP_NAME: the unpacked copy in $DIR is damaged; unpacking again" >&2
    mv "$DIR" "$DIR.damaged.$$" 2>/dev/null && rm -rf "$DIR.damaged.$$" || true
  else
    echo "$APP_NAME: unpacking once into $DIR" >&2
  fi
  TMP=$(mktemp -d "$CACHE/.unpack.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT INT TERM
  tail -n +"$PAYLOAD_LINE" "$SELF" | tar -x -C "$TMP"
  verify "$TMP" || { echo "$APP_NAME: this file is damaged (payload does not match its manifest)" >&2; exit 1; }
  # atomic: if another start won the race, keep its copy and drop ours
  if ! mv -T "$TMP" "$DIR" 2>/dev/null; then
    verify "$DIR" || { echo "$APP_NAME: cannot install into $DIR" >&2; exit 1; }
    rm -rf "$TMP"
  fi
  trap - EXIT INT TERM
fi

if [ "${PATH_ONLY:-}" = 1 ]; then echo "$DIR"; exit 0; fi
export LD_LIBRARY_PATH="$DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "${SHOW_SERVER_HELP:-}" = 1 ]; then exec "$DIR/bin/llama-server" --help; fi
set -- -m "$DIR/model.gguf" --host "$HOST" --port "$PORT" -c "$CTX" --alias "$APP_NAME"
[ -n "$THREADS" ] && set -- "$@" -t "$THREADS"
[ -f "$DIR/chat_template.jinja" ] && set -- "$@" --jinja --chat-template-file "$DIR/chat_template.jinja"
eval "set -- \"\$@\" $PASS"
echo "$APP_NAME: serving on http://$HOST:$PORT/ (Ctrl-C to stop)" >&2
exec "$DIR/bin/llama-server" "$@"
exit 0
'''


def chat_template_with_system_prompt(model: Path, system_prompt: str) -> str:
    """The model's own chat template, with ``system_prompt`` added when a chat has no system message.

    llama-server has no default-system-prompt option; a template wrapper is what it honours
    (``--chat-template-file``), and the web UI's own system message still takes precedence.
    """
    import json

    from gguf import GGUFReader

    field = GGUFReader(str(model)).fields.get("tokenizer.chat_template")
    if field is None:
        raise PackageError(f"{model} has no chat template, so --system-prompt cannot be applied")
    template = field.contents()
    literal = json.dumps(system_prompt)  # a double-quoted string literal Jinja reads the same way
    head = ("{%- if not (messages and messages[0]['role'] == 'system') -%}"
            "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages -%}"
            "{%- endif -%}")
    return head + template


def build_package(model: Path, out: Path, options: PackageOptions = PackageOptions()) -> Path:
    """Write the single executable ``out`` serving ``model``; return its path."""
    model, out = Path(model), Path(out)
    if not model.is_file():
        raise PackageError(f"no such model file: {model}")
    with open(model, "rb") as f:
        if f.read(4) != b"GGUF":
            raise PackageError(f"{model} is not a GGUF file (no GGUF magic); package a .gguf model")
    try:  # llama.cpp must load it before anything is written
        llamacpp.load(model, n_ctx=64).close()
    except llamacpp.LlamaCppError as e:
        raise PackageError(f"llama.cpp cannot load {model}, so it cannot be packaged: {e}") from None
    if out.resolve() == model.resolve():
        raise PackageError("the output path is the model itself; choose another -o")
    tc = toolchain.find()
    server = tc.tool("llama-server")
    libs = shared_libraries(server)
    name = options.name or out.name

    # payload: bin/llama-server, lib/*, model.gguf, MANIFEST.sha256
    entries: list[tuple[str, Path | bytes]] = [("bin/llama-server", server)]
    entries += [(f"lib/{lib.name}", lib) for lib in libs]
    entries.append(("model.gguf", model))
    if options.system_prompt:
        entries.append(("chat_template.jinja",
                        chat_template_with_system_prompt(model, options.system_prompt).encode()))
    manifest_lines, h = [], hashlib.sha256()
    for arc, src in entries:
        digest = _sha256(src)
        manifest_lines.append(f"{digest}  {arc}")
        h.update(f"{arc}\0{digest}\n".encode())
    manifest = ("\n".join(manifest_lines) + "\n").encode()
    content_hash = h.hexdigest()[:16]

    launcher = LAUNCHER
    subs = {"@NAME@": name.replace("'", ""), "@FILE@": out.name, "@HASH@": content_hash,
            "@HOST@": options.host, "@PORT@": str(options.port), "@CTX@": str(options.ctx),
            "@THREADS@": "" if options.threads is None else str(options.threads), "@MODEL@": model.name}
    for k, v in subs.items():
        launcher = launcher.replace(k, v)
    n_lines = launcher.count("\n")
    launcher = launcher.replace("@PAYLOAD_LINE@", str(n_lines + 1))

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(launcher.encode())
            with tarfile.open(fileobj=f, mode="w|") as tar:
                for arc, src in entries + [("MANIFEST.sha256", manifest)]:
                    _add(tar, arc, src)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("packaged %s (%d MB): llama-server + %d libraries + %s", out, out.stat().st_size // 10**6,
             len(libs), model.name)
    return out


def _sha256(src: Path | bytes) -> str:
    if isinstance(src, bytes):
        return hashlib.sha256(src).hexdigest()
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _add(tar: tarfile.TarFile, arc: str, src: Path | bytes) -> None:
    if isinstance(src, bytes):
        info = tarfile.TarInfo(arc)
        info.size, info.mode = len(src), 0o644
        tar.addfile(info, io.BytesIO(src))
        return
    real = Path(src).resolve()  # ldd names sonames, often symlinks: carry the real file under that name
    info = tarfile.TarInfo(arc)
    info.size = real.stat().st_size
    info.mtime = int(real.stat().st_mtime)
    info.mode = 0o755 if arc.startswith("bin/") else 0o644
    with open(real, "rb") as f:
        tar.addfile(info, f)


def describe(out: Path) -> str:
    return f"{out} — run it with: {shlex.quote(str(out))} (then open http://127.0.0.1:8080/)"
