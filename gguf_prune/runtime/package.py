"""One executable: llama-server (with its embedded web UI) and the model, in a single file.

The file is a POSIX shell launcher followed by a tar payload: the portable
llama-server (built without -march=native, its CPU backend once per x86-64 level,
the best loaded at run time: it runs on any x86-64 CPU), every shared library it
needs that is not part of glibc (llama.cpp's own, libstdc++, libgcc_s, libgomp)
and the GGUF. Values given at packing time (names, host, system prompt) are data:
the launcher holds them as single-quoted shell words and never evaluates them.

On first start it unpacks once into a per-user cache directory keyed by the
payload's content hash, verifies every file against the manifest, and moves the
directory into place atomically (two starts at once each unpack to their own
temporary directory; the first rename wins). Later starts verify the manifest
again and reuse it; a damaged cache is detected and unpacked afresh. The manifest
itself must have the hash the launcher carries, so a copy planted in the cache
directory is refused too. It needs /bin/sh, tar, tail, sha256sum and glibc: no
Python, no checkout, no network.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import os
import re
import shlex
import struct
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gguf_prune.errors import GgufPruneError
from gguf_prune.models.checkpoint import file_sha256
from gguf_prune.runtime import llamacpp, portable_build, toolchain
from gguf_prune.runtime.launcher import render_launcher

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
        elif not _valid_host(self.host):
            p.append(f"--host {self.host!r}: not an IP address, a host name, a comma-separated list of them or a "
                     "UNIX socket path ending in .sock; give e.g. 127.0.0.1 (this machine only) or 0.0.0.0 "
                     "(every interface)")
        if self.name is not None and not self.name.strip():
            p.append(f"--name {self.name!r}: give the name the server reports, or leave it out to use the file name")
        if p:
            raise PackageError("invalid package options: " + "; ".join(p))


def shared_libraries(binary: Path, env: dict[str, str] | None = None) -> list[Path]:
    """Resolved non-glibc shared libraries ``binary`` loads, from ldd (run with ``env``)."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env)
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


def _jinja_string(text: str) -> str:
    r"""``text`` as a double-quoted Jinja string literal that llama.cpp's template lexer and
    Python's jinja2 both read back exactly.

    llama.cpp's lexer knows only the escapes \n \t \r \b \f \v \\ \' \" (no \uXXXX, so not
    json.dumps, which writes \u escapes for non-ASCII text) and turns a raw carriage return
    into a newline; every other character may stand as it is, UTF-8 included.
    """
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
               "\v": "\\v"}
    return '"' + "".join(escapes.get(c, c) for c in text) + '"'


def chat_template_with_system_prompt(model: Path, system_prompt: str) -> str:
    """The model's own chat template, with ``system_prompt`` added when a chat has no system message.

    llama-server has no default-system-prompt option; a template wrapper is what it honours
    (``--chat-template-file``), and the web UI's own system message still takes precedence.
    """
    from gguf import GGUFReader

    if "\0" in system_prompt:
        raise PackageError("--system-prompt contains a NUL character; give plain text")
    field = GGUFReader(str(model)).fields.get("tokenizer.chat_template")
    if field is None:
        raise PackageError(f"{model} has no chat template, so --system-prompt cannot be applied")
    template = field.contents()
    head = ("{%- if not (messages and messages[0]['role'] == 'system') -%}"
            "{%- set messages = [{'role': 'system', 'content': " + _jinja_string(system_prompt) + "}] + messages -%}"
            "{%- endif -%}")
    return head + template


_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _valid_host(host: str) -> bool:
    """What llama-server's --host takes: IP addresses or host names, comma-separated, or a *.sock path."""
    if host.endswith(".sock"):
        return "\0" not in host
    for part in host.split(","):
        try:
            ipaddress.ip_address(part)
        except ValueError:
            if not _HOST_NAME.fullmatch(part):
                return False
    return True


# ELF64 little-endian: the dynamic section's library search path (DT_RPATH / DT_RUNPATH).
_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 0, 5, 15, 29


def set_runpath(elf: bytes, runpath: str) -> bytes:
    """``elf`` with its RPATH/RUNPATH strings replaced by ``runpath`` (in place: never longer).

    The build tree's RUNPATH names the build directory and ends in an empty element (CMake's
    padding), which the loader reads as the current directory: a packaged llama-server
    started in a directory holding, say, a libm.so.6 would load it. ``$ORIGIN``-relative
    paths find the carried libraries wherever the package is unpacked, and nothing else.
    A file without either entry is returned as it is.
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise PackageError("not a 64-bit little-endian ELF file; cannot set its RUNPATH")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return elf
    entries = [struct.unpack_from("<qQ", elf, off) for off in range(dynamic[0], dynamic[0] + dynamic[1], 16)]
    entries = entries[:next((i for i, (tag, _) in enumerate(entries) if tag == _DT_NULL), len(entries))]
    strtab = next((val for tag, val in entries if tag == _DT_STRTAB), None)
    paths = [val for tag, val in entries if tag in (_DT_RPATH, _DT_RUNPATH)]
    if not paths:
        return elf
    # DT_STRTAB is an address: the file offset is where the loadable segment holding it starts
    base = next((off + strtab - vaddr for vaddr, off, size in loads if vaddr <= strtab < vaddr + size), None)
    if base is None:
        raise PackageError("the ELF file's string table lies in no loadable segment; cannot set its RUNPATH")
    out, new = bytearray(elf), runpath.encode()
    for rel in paths:
        start = base + rel
        end = out.index(b"\0", start)
        if len(new) > end - start:
            raise PackageError(f"RUNPATH {runpath!r} is longer than the one it replaces "
                               f"({out[start:end].decode(errors='replace')!r})")
        out[start:end] = new.ljust(end - start, b"\0")
    return bytes(out)


def _portable_server_files(tc: toolchain.Toolchain) -> tuple[Path, list[Path], list[Path]]:
    """The portable llama-server, its CPU variants and every non-glibc library they load.

    ldd runs with the portable build directory as the only library path, and every llama.cpp
    library must come from there: a native library in the package would bring back the
    instructions the portable build leaves out.
    """
    server = tc.portable_bin_dir / "llama-server"
    variants = tc.cpu_variants()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_LIBRARY_PATH": str(tc.portable_bin_dir)}
    libs: dict[str, Path] = {}
    for binary in [server, *variants]:
        for lib in shared_libraries(binary, env=env):
            libs.setdefault(lib.name, lib)
    own = tc.portable_bin_dir.resolve()
    for lib in libs.values():
        if lib.name.startswith(("libllama", "libggml", "libmtmd")) and lib.resolve().parent != own:
            raise PackageError(f"{server} loads {lib}, which is not from the portable build in {own}; "
                               f"rebuild it with `python -m gguf_prune.runtime.toolchain portable`")
    return server, variants, sorted(libs.values())


def build_package(model: Path, out: Path, options: PackageOptions = PackageOptions()) -> Path:
    """Write the single executable ``out`` serving ``model``; return its path.

    The first call on a machine builds the portable llama-server (see portable_build.build_portable).
    """
    model, out = Path(model), Path(out)
    _check_model(model, out)
    template = chat_template_with_system_prompt(model, options.system_prompt) if options.system_prompt else None
    tc = portable_build.build_portable(toolchain.find())
    server, variants, libs = _portable_server_files(tc)
    entries = _payload(server, variants, libs, model, template)
    manifest, content_hash = _manifest(entries)
    head = render_launcher(name=options.name or out.name, model_name=model.name, host=options.host,
                           port=options.port, ctx=options.ctx, threads=options.threads,
                           content_hash=content_hash, manifest_sha256=hashlib.sha256(manifest).hexdigest())
    _write_executable(out, head, entries + [("MANIFEST.sha256", manifest)])
    log.info("packaged %s (%d MB): portable llama-server with %d CPU variants, %d libraries and %s",
             out, out.stat().st_size // 10**6, len(variants), len(libs), model.name)
    return out


def _check_model(model: Path, out: Path) -> None:
    """A GGUF that llama.cpp loads, and not the output path: checked before anything is written."""
    if not model.is_file():
        raise PackageError(f"no such model file: {model}")
    with open(model, "rb") as f:
        if f.read(4) != b"GGUF":
            raise PackageError(f"{model} is not a GGUF file (no GGUF magic); package a .gguf model")
    try:
        llamacpp.load(model, n_ctx=64).close()
    except llamacpp.LlamaCppError as e:
        raise PackageError(f"llama.cpp cannot load {model}, so it cannot be packaged: {e}") from None
    if out.resolve() == model.resolve():
        raise PackageError("the output path is the model itself; choose another -o")


def _payload(server: Path, variants: list[Path], libs: list[Path], model: Path,
             template: str | None) -> list[tuple[str, Path | bytes]]:
    """(name in the archive, file or bytes) of every payload file but the manifest.

    bin/llama-server and the CPU variants next to it (ggml looks for them in the executable's directory),
    lib/*, model.gguf and the chat template; each ELF file with its RUNPATH set to the package's own lib/
    (see set_runpath).
    """
    entries: list[tuple[str, Path | bytes]] = [("bin/llama-server", set_runpath(server.read_bytes(), "$ORIGIN/../lib"))]
    entries += [(f"bin/{v.name}", set_runpath(v.read_bytes(), "$ORIGIN/../lib")) for v in variants]
    entries += [(f"lib/{lib.name}", set_runpath(lib.read_bytes(), "$ORIGIN")) for lib in libs]
    entries.append(("model.gguf", model))
    if template is not None:
        entries.append(("chat_template.jinja", template.encode()))
    return entries


def _manifest(entries: list[tuple[str, Path | bytes]]) -> tuple[bytes, str]:
    """MANIFEST.sha256 (``sha256sum -c`` format) and the payload's content hash, which names its cache directory."""
    manifest_lines, h = [], hashlib.sha256()
    for arc, src in entries:
        digest = hashlib.sha256(src).hexdigest() if isinstance(src, bytes) else file_sha256(src)
        manifest_lines.append(f"{digest}  {arc}")
        h.update(f"{arc}\0{digest}\n".encode())
    return ("\n".join(manifest_lines) + "\n").encode(), h.hexdigest()[:16]


def _write_executable(out: Path, head: bytes, entries: list[tuple[str, Path | bytes]]) -> None:
    """``head`` then a tar of ``entries``, made executable and renamed to ``out`` only when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".package.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            with tarfile.open(fileobj=f, mode="w|") as tar:
                for arc, src in entries:
                    _add(tar, arc, src)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            e.filename = str(out)  # a full disk: the CLI's one line names the file that could not be written
        raise


def _add(tar: tarfile.TarFile, arc: str, src: Path | bytes) -> None:
    if isinstance(src, bytes):
        info = tarfile.TarInfo(arc)
        info.size, info.mode = len(src), 0o755 if arc.startswith("bin/") else 0o644
        tar.addfile(info, io.BytesIO(src))
        return
    real = Path(src).resolve()  # ldd names sonames, often symlinks: carry the real file under that name
    info = tarfile.TarInfo(arc)
    info.size = real.stat().st_size
    info.mtime = int(real.stat().st_mtime)
    info.mode = 0o755 if arc.startswith("bin/") else 0o644
    with open(real, "rb") as f:
        tar.addfile(info, f)


def packed_options(out: Path) -> PackageOptions:
    """The host, port, context size and threads an executable was packed with, read from its launcher.

    The launcher's assignments are read as the shell reads them: a quoted value may span lines
    (a name with a newline), so each one is taken whole before the next is looked at.
    """
    with open(out, "rb") as f:
        lines = f.read(1 << 16).decode("utf-8", "surrogateescape").split("\n")
    values: dict[str, str] = {}
    i = 0
    while i < len(lines) and "PAYLOAD_LINE" not in values:
        m = re.match(r"([A-Z_0-9]+)=(.*)", lines[i])
        i += 1
        if not m:
            continue
        text = m.group(2)
        while True:
            try:
                words = shlex.split(text)
                break
            except ValueError:  # a quote still open: the value goes on on the next line
                if i >= len(lines):
                    raise PackageError(f"{out} is not an executable made by gguf-prune package") from None
                text += "\n" + lines[i]
                i += 1
        values[m.group(1)] = words[0] if words else ""
    try:
        return PackageOptions(host=values["DEFAULT_HOST"], port=int(values["DEFAULT_PORT"]),
                              ctx=int(values["DEFAULT_CTX"]),
                              threads=int(values["DEFAULT_THREADS"]) if values["DEFAULT_THREADS"] else None)
    except (KeyError, ValueError):
        raise PackageError(f"{out} is not an executable made by gguf-prune package") from None


def describe(out: Path, options: PackageOptions | None = None) -> str:
    """How to run ``out`` and the address it serves (the host and port it was packed with)."""
    options = options or packed_options(out)
    run = f"{out} — run it with: {shlex.quote(str(out))}"
    if options.host.endswith(".sock"):
        return f"{run} (then it listens on the UNIX socket {options.host})"
    hosts = options.host.split(",")
    url_host = hosts[0]
    if url_host in ("0.0.0.0", "::"):  # every interface: this machine reaches it on loopback
        url_host = "127.0.0.1" if url_host == "0.0.0.0" else "::1"
    if ":" in url_host:
        url_host = f"[{url_host}]"
    where = f"then open http://{url_host}:{options.port}/"
    if hosts[0] in ("0.0.0.0", "::"):
        where += f"; it listens on every network interface ({options.host})"
    return f"{run} ({where})"
