"""The house rules of the source tree, checked: the architecture page lists every module, no room outgrows
itself, the layers only import downwards, and options have one default.

These are the rules docs/architecture.md states; a change that breaks one fails here with the file and line to
look at, instead of surfacing months later as a 900-line module."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import click
import pytest

import gguf_prune

PKG = Path(gguf_prune.__file__).resolve().parent
ROOT = PKG.parent
DOC = ROOT / "docs" / "architecture.md"

MAX_MODULE_LINES = 520  # "no module over about 500 lines"
MAX_FUNCTION_LINES = 75  # "no function a reader has to scroll"
STAGES = ("models", "scoring", "planning", "writing", "recovery", "runtime", "pipeline")
# Which packages a package may import from: a stage never imports a stage that runs after it, and nothing but
# the pipeline and the CLI imports the pipeline. Top-level modules (hand-off files and shared helpers) are open
# to all, and import nothing but models/ themselves (the CLI excepted).
MAY_IMPORT = {
    "models": set(),
    "scoring": {"models"},
    "planning": {"models", "writing"},  # writing: the quant types and sizes a budget predicts
    "writing": {"models", "runtime", "recovery"},  # prune writes a recover directory's weights
    "recovery": {"models", "scoring", "planning", "writing"},
    "runtime": {"models", "writing"},
    "pipeline": set(STAGES),
}


def modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def module_name(p: Path) -> str:
    rel = p.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _tree_listing() -> set[str]:
    """The module paths the tree in docs/architecture.md lists (``scoring/options.py``, ``cli.py``, ...)."""
    text = DOC.read_text()
    tree = text[text.index("gguf_prune/\n"):]
    tree = tree[:tree.index("```")]
    listed, package = set(), ""
    for line in tree.splitlines()[1:]:
        m = re.match(r"^([│ ]*)[├└]── (\w+)(/|\.py)", line)
        if not m:
            continue
        depth = len(m.group(1)) // 4
        if m.group(3) == "/":
            package = m.group(2) + "/"
        else:
            listed.add((package if depth else "") + m.group(2) + ".py")
    return listed


def test_architecture_page_lists_every_module():
    listed = _tree_listing()
    present = {p.relative_to(PKG).as_posix() for p in modules() if p.name != "__init__.py"}
    assert not present - listed, f"docs/architecture.md does not list: {', '.join(sorted(present - listed))}"
    assert not listed - present, f"docs/architecture.md lists modules that do not exist: {sorted(listed - present)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.relative_to(PKG).as_posix())
def test_no_room_outgrows_itself(path: Path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {len(lines)} lines: split it by topic"
    tree = ast.parse("\n".join(lines))
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(ROOT)}: split along its sections: {', '.join(long)}"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gguf_prune"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gguf_prune"))
    return out


def test_stages_import_only_downwards():
    bad = []
    for p in modules():
        parts = p.relative_to(PKG).parts
        own = parts[0] if len(parts) > 1 else None
        for mod in _imports(p):
            target = mod.split(".")
            if len(target) < 2 or target[1] not in STAGES:
                continue
            other = target[1]
            if own is None:
                if p.name != "cli.py" and other != "models":
                    bad.append(f"{p.relative_to(ROOT)} (a shared top-level module) imports {mod}")
            elif other != own and other not in MAY_IMPORT[own]:
                bad.append(f"{p.relative_to(ROOT)} imports {mod}")
    assert not bad, "imports that run against the stage order:\n" + "\n".join(sorted(set(bad)))


def test_package_inits_hold_only_a_docstring():
    for p in PKG.rglob("__init__.py"):
        body = ast.parse(p.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{p.relative_to(ROOT)}: docstring only"


def test_only_the_cli_imports_click():
    users = [p.relative_to(ROOT).as_posix() for p in modules() if re.search(r"^\s*(import|from) click\b",
                                                                            p.read_text(), re.M)]
    assert users == ["gguf_prune/cli.py", "gguf_prune/cli_params.py"]


def _commands():
    from gguf_prune.cli import main

    return main.commands.items()


@pytest.mark.parametrize("name,command", _commands(), ids=[n for n, _ in _commands()])
def test_option_defaults_come_from_the_options_dataclass(name, command):
    """A click option that sets a field of the command's options dataclass shows that field's default."""
    from gguf_prune import cli

    classes = cli.OPTION_CLASSES.get(name, ())
    fields = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                fields.setdefault(f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                fields.setdefault(f.name, f.default_factory())
    checked = 0
    for param in command.params:
        if not isinstance(param, click.Option) or param.name not in fields or param.name in cli.CLI_ONLY_DEFAULTS:
            continue
        want = fields[param.name]
        got = param.default
        if isinstance(want, tuple) and isinstance(got, str):
            got = param.type.convert(got, param, None)
        assert got == want or (want is None and got is None), (
            f"`{name} --{param.name.replace('_', '-')}` shows {got!r}, the options dataclass says {want!r}")
        checked += 1
    if classes:
        assert checked, f"`{name}` has an options class but no option took its default from it"
