"""`gguf-prune doctor`: what was found, where, and what is missing."""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass, field
from pathlib import Path

from gguf_prune.runtime import toolchain


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def problems(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _portable(tc: toolchain.Toolchain) -> str:
    """The server `package` ships: where it is and the CPU variants a package carries (not built yet is fine)."""
    flags = "GGML_NATIVE=OFF, GGML_BACKEND_DL=ON, GGML_CPU_ALL_VARIANTS=ON"
    if not tc.portable_ready():
        return (f"not built yet ({flags}): the first `gguf-prune package` builds it once, about 27 CPU-minutes "
                f"(13 min on 2 idle cores); or build it now: python -m gguf_prune.runtime.toolchain portable")
    info = tc.portable_info()
    variants = info["cpu_variants"]
    return (f"llama-server for packages, runs on any {info.get('machine', '?')} CPU ({flags}), "
            f"built {info.get('built_at', '?')} "
            f"in {info.get('build_seconds', '?')} s, in {tc.portable_build_dir}; a package carries "
            f"{len(variants)} CPU variants, the best loaded at run time: {', '.join(variants)}")


def diagnose() -> Report:
    """Every check, in the order `gguf-prune doctor` lists them; a missing piece is a failed check, never an error."""
    r = Report()
    tc = _check_llama_cpp(r)
    _check_gguf_py(r)
    _check_bindings(r, tc)
    _check_torch(r)
    _check_transformers(r)
    _check_demo_model(r)
    return r


def _check_llama_cpp(r: Report) -> toolchain.Toolchain | None:
    """The pinned build, its tools and converter, and the portable server; the toolchain, or None if not built."""
    try:
        tc = toolchain.find()
        info = tc.info()
        r.add("llama.cpp", True,
              f"llama-cpp-python {info.get('llama_cpp_python')} tree, commit {info.get('commit', '?')[:12]}, "
              f"built {info.get('built_at', '?')} in {tc.build_dir}")
        r.add("native build", True,
              "GGML_NATIVE, llama.cpp's default (tuned to this CPU; runs only on CPUs like it): the bindings and "
              + ", ".join(toolchain.TOOL_TARGETS) + "; eval measures with these; packages never carry them")
        for name in toolchain.TOOL_TARGETS:
            path = tc.bin_dir / name
            r.add(name, path.exists(), str(path) if path.exists() else f"missing: {path}; run scripts/setup.sh")
        conv = tc.convert_script
        r.add("convert_hf_to_gguf.py", conv.exists(), str(conv))
        r.add("portable server", True, _portable(tc))
    except toolchain.ToolchainError as e:
        r.add("llama.cpp", False, str(e))
        return None
    return tc


def _check_gguf_py(r: Report) -> None:
    try:
        import gguf

        r.add("gguf-py", True, f"{md.version('gguf')} at {Path(gguf.__file__).parent}")
    except ImportError as e:
        r.add("gguf-py", False, f"not importable ({e}); run scripts/setup.sh")


def _check_bindings(r: Report, tc: toolchain.Toolchain | None) -> None:
    """llama-cpp-python imports and loads the pinned build's libllama (not one of its own)."""
    try:
        import llama_cpp

        lib = Path(llama_cpp.llama_cpp._base_path)
        detail = f"llama-cpp-python {llama_cpp.__version__}, library {lib / 'libllama.so'}"
        ok = True
        if tc is not None:
            built = tc.bin_dir / "libllama.so"
            if built.exists() and (lib / "libllama.so").exists() and \
                    built.stat().st_size != (lib / "libllama.so").stat().st_size:
                ok = False
                detail += f" differs from the pinned build {built}; run scripts/setup.sh"
        r.add("bindings", ok, detail)
    except Exception as e:  # an unloadable shared library raises OSError/RuntimeError
        r.add("bindings", False, f"llama_cpp does not import ({e}); run scripts/setup.sh")


def _check_torch(r: Report) -> None:
    try:
        import torch

        if torch.cuda.is_available():
            dev = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
        else:
            dev = "cpu"
        r.add("torch", True, f"{torch.__version__}, device {dev}")
    except ImportError as e:
        r.add("torch", False, f"not importable ({e}); run scripts/setup.sh")


def _check_transformers(r: Report) -> None:
    try:
        r.add("transformers", True, md.version("transformers"))
    except md.PackageNotFoundError:
        r.add("transformers", False, "not installed; run scripts/setup.sh")


def _check_demo_model(r: Report) -> None:
    from gguf_prune.models.demo import demo_dir

    hf = demo_dir() / "hf"
    r.add("demo model", (hf / "config.json").exists(),
          str(hf) if (hf / "config.json").exists() else f"not prepared at {hf}; run scripts/setup.sh")
