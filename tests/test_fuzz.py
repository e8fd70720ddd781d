"""Property-based tests (hypothesis): damaged input gets one clear error, never a traceback, a crash or a hang.

plan.json
    random edits of a valid plan (keys removed or renamed, types changed, indices out of range, duplicated,
    unsorted, values wrapped in or lifted out of arrays and objects, subtrees moved) and random damage to its
    bytes: ``Plan.load`` gives a Plan or one PlanError; ``plan --explain``'s table and ``validate`` take every
    Plan that loads; a plan that validates round-trips through JSON and cuts a real GGUF.

GGUF
    random truncations, byte changes and overwrites of the structural fields (counts, lengths, types, shapes,
    offsets, metadata values) of a small real GGUF, converted from a tiny seeded checkpoint, through every
    library entry that reads GGUFs: ``gguf_read.read_gguf``, ``rewrite.rewrite``, ``quantize.quantize``,
    ``llamacpp.load`` (what ``evaluate``, ``quantize`` and ``package`` load with), ``evaluate.evaluate`` and
    ``package.build_package``. Each succeeds or raises a GgufPruneError that names the file; no partial
    output is left and the input is not changed. The entries run in a worker process, so a crash of
    llama.cpp (SIGSEGV, abort) or a hang is caught and reported with the input that caused it.

Example counts are bounded (the file runs in about a minute on 2 cores; ``GGUF_PRUNE_FUZZ_SCALE=10`` runs ten
times as many) and derandomized, so CI sees the same inputs every run; a failure prints the input to replay.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

SCALE = float(os.environ.get("GGUF_PRUNE_FUZZ_SCALE", "1"))


def _settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------- fixtures

# small enough that one example takes milliseconds (token_embd is 49152 x 64), with GQA and every tensor kind
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            seed=3)


@pytest.fixture(scope="module")
def fuzz_gguf(tmp_path_factory) -> Path:
    from gguf_prune.writing.prune import convert_cached
    from tiny_models import TinySpec, make_tiny_llama

    hf = make_tiny_llama(tmp_path_factory.mktemp("fuzz-hf"), TinySpec(**TINY))
    return convert_cached(hf, "f16", cache_dir=tmp_path_factory.getbasetemp() / "converted")


@pytest.fixture(scope="module")
def fuzz_shape(fuzz_gguf):
    from gguf_prune.writing.gguf_read import read_gguf
    from gguf_prune.writing.rewrite import shape_from_gguf

    return shape_from_gguf(read_gguf(fuzz_gguf))


def _cut_plan(shape) -> dict:
    """A valid plan of every kind of cut on the 3-layer fixture: a layer removed, heads and neurons sliced."""
    from gguf_prune.plan import LayerPlan, Plan

    return Plan(shape=shape, fingerprint="f00d", settings={"protect_first": 0, "protect_last": 0, "uniform": False},
                predicted={"quant": "Q4_K_M"}, layers=(
                    LayerPlan(0, why={"kl": 0.5}),
                    LayerPlan(1, removed=True, why={"kl": 0.01}),
                    LayerPlan(2, heads=(0, 1), neurons=tuple(range(0, 128, 4))),
                )).to_dict()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- plan.json

KEYS = ("schema", "version", "model", "fingerprint", "gguf", "shape", "architecture", "n_layer", "n_embd", "n_head",
        "n_head_kv", "head_dim", "n_ff", "n_vocab", "settings", "protect_first", "protect_last", "uniform",
        "predicted", "layers", "index", "removed", "heads", "neurons", "patch", "why",
        "head", "Heads", "neuron", "layer", "remove", "")  # and near misses
OUT_OF_RANGE = (-1, -2, 0, 2, 3, 4, 64, 128, 129, 2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63, 10 ** 30, 10 ** 400)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3),
                    max_leaves=6)
PLAN_EDITS = ("remove", "retype", "range", "duplicate", "shuffle", "wrap", "unwrap", "move", "rename")


def _nodes(tree, path=()):
    yield path
    if isinstance(tree, dict):
        for k in list(tree):
            yield from _nodes(tree[k], path + (k,))
    elif isinstance(tree, list):
        for i in range(len(tree)):
            yield from _nodes(tree[i], path + (i,))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _put(tree, path, value):
    """``tree`` with the node at ``path`` replaced (the root when ``path`` is empty)."""
    if not path:
        return value
    _get(tree, path[:-1])[path[-1]] = value
    return tree


@st.composite
def edited_plans(draw, base: dict):
    tree = copy.deepcopy(base)
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        nodes = list(_nodes(tree))
        # structural nodes (not the elements of a long index list) first, so they are not drowned out
        inner = [p for p in nodes if not (p and isinstance(p[-1], int) and isinstance(_get(tree, p), int))]
        path = draw(st.sampled_from(inner) | st.sampled_from(nodes))
        node = _get(tree, path)
        op = draw(st.sampled_from(PLAN_EDITS))
        parent = _get(tree, path[:-1]) if path else None
        if op == "remove" and path:
            del parent[path[-1]]
        elif op == "retype":
            tree = _put(tree, path, draw(JSON))
        elif op == "range":
            tree = _put(tree, path, draw(st.sampled_from(OUT_OF_RANGE)))
        elif op == "duplicate" and isinstance(node, list) and node:
            i = draw(st.integers(0, len(node) - 1))
            node.insert(i, copy.deepcopy(node[i]))
        elif op == "duplicate" and path and isinstance(parent, list):
            parent.append(copy.deepcopy(node))
        elif op == "shuffle" and isinstance(node, list):
            tree = _put(tree, path, draw(st.permutations(node)))
        elif op == "wrap":
            tree = _put(tree, path, draw(st.sampled_from([[node], {"value": node}, {str(path[-1]) if path else "plan": node}])))
        elif op == "unwrap" and isinstance(node, (dict, list)) and node:
            children = list(node.values()) if isinstance(node, dict) else node
            tree = _put(tree, path, draw(st.sampled_from(children)))
        elif op == "move" and path and isinstance(path[-1], str):
            dicts = [p for p in _nodes(tree) if isinstance(_get(tree, p), dict) and p[:len(path)] != path]
            to = draw(st.sampled_from(dicts))
            del parent[path[-1]]
            _get(tree, to)[path[-1]] = node
        elif op == "rename" and path and isinstance(path[-1], str):
            parent[draw(st.sampled_from(KEYS))] = parent.pop(path[-1])
        else:
            op = "none"
        edits.append(f"{op} {'.'.join(map(str, path)) or '<root>'}")
    return tree, edits


def _check_plan_file(path: Path, shape, gguf: Path, out: Path) -> str:
    """What happens to one plan file, as every command that reads plans would see it; returns the outcome."""
    from gguf_prune.errors import GgufPruneError
    from gguf_prune.plan import Plan, PlanError, validate
    from gguf_prune.planning.explain import explain
    from gguf_prune.writing.rewrite import rewrite

    try:
        plan = Plan.load(path)
    except PlanError as e:
        assert str(path) in str(e) and e.problems
        return "refused when loaded"
    explain(plan)  # `gguf-prune plan --explain` prints the table of any plan that loads
    try:
        validate(plan, shape, source="plan")
    except PlanError as e:
        assert e.problems
        return "refused by validate"
    assert Plan.from_dict(json.loads(plan.to_json())) == plan  # what is written reads back the same
    try:
        rewrite(gguf, plan, out, fsync=False)
    except GgufPruneError as e:
        assert str(e)
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
        return "valid, cut refused by rewrite"
    out.unlink()
    return "valid, cut"


@pytest.mark.bad_input
def test_edited_plans_load_or_get_one_plan_error(fuzz_gguf, fuzz_shape, tmp_path):
    base = _cut_plan(fuzz_shape)
    plan_file, out = tmp_path / "plan.json", tmp_path / "out" / "cut.gguf"
    out.parent.mkdir()
    assert _check_plan_file(_write(plan_file, json.dumps(base)), fuzz_shape, fuzz_gguf, out) == "valid, cut"

    @_settings(300)
    @given(edited_plans(base))
    def check(edited):
        tree, edits = edited
        event(_check_plan_file(_write(plan_file, json.dumps(tree)), fuzz_shape, fuzz_gguf, out))

    check()


@pytest.mark.bad_input
@pytest.mark.parametrize("raw", [
    b"", b"\xff\xfe{}", b"[]", b"null", b"42", b'"plan"', b"{" * 100_000, b"[" * 5000 + b"]" * 5000,
    b'{"schema": "gguf-prune/plan", "version": true}', b'{"schema": "gguf-prune/plan", "version": 1}',
    b'{"schema": "gguf-prune/plan", "version": 1, "layers": ' + b"9" * 5000 + b"}",
], ids=lambda b: repr(b[:24]))
def test_plan_files_that_are_not_plans(raw, fuzz_gguf, fuzz_shape, tmp_path):
    (tmp_path / "out").mkdir()
    outcome = _check_plan_file(_write(tmp_path / "plan.json", raw), fuzz_shape, fuzz_gguf, tmp_path / "out" / "x.gguf")
    assert outcome == "refused when loaded"


@pytest.mark.bad_input
def test_damaged_plan_bytes_load_or_get_one_plan_error(fuzz_gguf, fuzz_shape, tmp_path):
    text = json.dumps(_cut_plan(fuzz_shape), indent=1).encode()
    plan_file, out = tmp_path / "plan.json", tmp_path / "out" / "cut.gguf"
    out.parent.mkdir()

    @_settings(100)
    @given(st.integers(0, len(text)), st.lists(st.tuples(st.integers(0, len(text) - 1), st.integers(0, 255)),
                                                 max_size=3))
    def check(keep, changes):
        raw = bytearray(text)
        for pos, value in changes:
            raw[pos] = value
        event(_check_plan_file(_write(plan_file, bytes(raw[:keep])), fuzz_shape, fuzz_gguf, out))

    check()


def _edit(path: str, value=None, delete: bool = False):
    """An edit of the plan's JSON tree at a dotted path (``layers.2.heads``), for the cases below."""
    def apply(tree):
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = _get(tree, keys[:-1])
        if delete:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
        return tree
    return apply


# (edit of the valid plan, the one problem PlanError names). The first six changed the cut without a word
# before: "false" is true, a string of digits is a list of digits, 2.0 is 2, and a misspelt key is ignored.
PLAN_CASES = {
    "removed as a string": (_edit("layers.0.removed", "false"),
                            "layers[0].removed is a string 'false', expected true or false"),
    "heads as a string": (_edit("layers.2.heads", "01"),
                          "layers[2].heads is a string '01', expected null (all kept) or an array of the numbers of "
                          "the kept query heads ([] removes them all)"),
    "a fractional index": (_edit("layers.2.index", 2.0),
                           "layers[2].index is a number 2.0, expected the source layer's number"),
    "a misspelt key": (lambda t: _edit("layers.2.head", t["layers"][2].pop("heads"))(t),
                       "layers[2] has unknown key 'head' (known: index, removed, heads, neurons, patch, why)"),
    "a neuron as a string": (_edit("layers.2.neurons.3", "12"),
                             "layers[2].neurons[3] is a string '12', expected the number of one of the kept FFN neurons"),
    "a boolean head": (_edit("layers.2.heads.1", True),
                       "layers[2].heads[1] is a boolean True, expected the number of one of the kept query heads"),
    "a removed layer keeping heads": (_edit("layers.1.heads", [0, 1]),
                                      "layers[1] is removed, so it cannot keep query heads: drop 'heads' or 'removed'"),
    "no index": (_edit("layers.0.index", delete=True),
                 "layers[0].index is missing or null, expected the source layer's number"),
    "a layer that is not an object": (_edit("layers.1", 1),
                                      "layers[1] is an integer 1, expected "
                                      '{"index": N, "removed": true} or {"index": N, "heads": [...]|null, '
                                      '"neurons": [...]|null}'),
    "layers not an array": (_edit("layers", {"0": {}}),
                            "'layers' is an object {\"0\": {}}, expected an array with one entry per source layer"),
    "an absurd n_ff": (_edit("model.shape.n_ff", 10 ** 12),
                       "'model.shape.n_ff' is an integer 1000000000000, expected an integer from 1 to 1048576"),
    "no n_vocab": (_edit("model.shape.n_vocab", delete=True), "'model.shape' lacks n_vocab"),
    "heads not in KV groups": (_edit("model.shape.n_head_kv", 3),
                               "'model.shape': n_head 4 is not a multiple of n_head_kv 3"),
    "shape at the top": (lambda t: t | {"shape": t["model"].pop("shape")},
                         ["the plan has unknown key 'shape' (known: schema, version, model, settings, predicted, "
                          "layers)", "'model.shape' is missing or null, expected an object with architecture, "
                          "n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab"]),
    "settings not an object": (_edit("settings", [1]), "'settings' is an array [1], expected an object"),
    "a number for the fingerprint": (_edit("model.fingerprint", 7),
                                     "'model.fingerprint' is an integer 7, expected a string"),
    # caught by validate, against the model
    "a protect count as a string": (_edit("settings.protect_first", "2"),
                                    "settings.protect_first is a string '2', expected a number of layers (0 or more)"),
    "uniform as a string": (_edit("settings.uniform", "yes"), "settings.uniform is a string 'yes', expected true or false"),
    "a layer twice": (_edit("layers.2.index", 1),
                      "layers must list each of the 3 source layers once; missing [2]; duplicated [1]"),
    "unsorted heads": (_edit("layers.2.heads", [1, 0]), "layer 2: head indices must be sorted ascending"),
    "a head out of range": (_edit("layers.2.heads", [0, 1, 4, 5]), "layer 2: head indices [4, 5] out of range 0..3"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_plan_edit_gets_one_exact_problem(case, fuzz_shape, tmp_path):
    from gguf_prune.plan import Plan, PlanError, validate

    edit, problems = PLAN_CASES[case]
    problems = [problems] if isinstance(problems, str) else problems
    path = _write(tmp_path / "plan.json", json.dumps(edit(_cut_plan(fuzz_shape))))
    with pytest.raises(PlanError) as e:
        validate(Plan.load(path), fuzz_shape)  # the source is the file when loading finds it, "plan" in validate
    assert e.value.problems == problems
    n = len(problems)
    assert str(e.value).endswith(f" is invalid ({n} problem{'s' if n > 1 else ''}):\n  - " + "\n  - ".join(problems))


def _write(path: Path, data) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------------------- GGUF

U8, U32, U64 = 1, 4, 8


def gguf_fields(data: bytes) -> tuple[list[tuple[int, int, str]], int]:
    """Every structural field of a GGUF as (offset, width, what), and where the tensor data starts.

    An independent walk (not gguf_read's): header counts, each key's length and value type, string lengths,
    array element types and counts, scalar metadata values, and each tensor's name length, rank, ne, type
    and offset.
    """
    fields = [(4, U32, "version"), (8, U64, "n_tensors"), (16, U64, "n_kv")]
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    _, _, n_tensors, n_kv = struct.unpack_from("<IIQQ", data, 0)
    pos = 24

    def string(what: str) -> bytes:
        """Note the length field of the string at ``pos``, step over it; its bytes."""
        nonlocal pos
        fields.append((pos, U64, f"length of {what}"))
        start = pos + 8
        pos = start + struct.unpack_from("<Q", data, pos)[0]
        return data[start:pos]

    for _ in range(n_kv):
        key = string("a key").decode()
        fields.append((pos, U32, f"type of {key}"))
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == 8:
            string(f"{key}")
        elif vtype == 9:
            fields += [(pos, U32, f"element type of {key}"), (pos + 4, U64, f"count of {key}")]
            sub, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if sub == 8:
                for k in range(count):
                    if k < 2 or k == count - 1:
                        string(f"{key}[{k}]")
                    else:
                        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
            else:
                pos += sizes[sub] * count
        else:
            fields.append((pos, sizes[vtype], f"value of {key}"))
            pos += sizes[vtype]
    for _ in range(n_tensors):
        name = string("a tensor name").decode()
        fields.append((pos, U32, f"rank of {name}"))
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4
        for j in range(n_dims):
            fields.append((pos, U64, f"ne{j} of {name}"))
            pos += 8
        fields += [(pos, U32, f"type of {name}"), (pos + 4, U64, f"offset of {name}")]
        pos += 12
    return fields, pos


@st.composite
def damages(draw, size: int, header_end: int, fields: list):
    """1-3 edits: a truncation, a byte changed (mostly in the header), or a structural field overwritten."""
    interesting = (0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 33, 255, 256, 2 ** 16 - 1, 2 ** 31 - 1, 2 ** 31,
                   2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, size, size + 1, header_end)
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "byte", "truncate"]))
        if kind == "truncate":
            edits.append(("truncate", draw(st.integers(0, header_end + 64) | st.integers(0, size - 1))))
        elif kind == "byte":
            pos = draw(st.integers(0, header_end - 1) | st.integers(0, size - 1))
            edits.append(("set", pos, draw(st.integers(0, 255)).to_bytes(1, "little"), "a byte"))
        else:
            pos, width, what = draw(st.sampled_from(fields))
            value = draw(st.sampled_from(interesting) | st.integers(0, 2 ** (8 * width) - 1)) % (1 << 8 * width)
            edits.append(("set", pos, value.to_bytes(width, "little"), what))
    return edits


def known_damage(data: bytes, fields: list) -> dict[str, list]:
    """The damage that found the bugs fixed here, replayed first on every run (field positions are looked up in
    the file, so they hold whatever the fixture's layout)."""
    at = {what: (pos, width) for pos, width, what in fields}

    def field(what: str, value: int) -> tuple:
        pos, width = at[what]
        return ("set", pos, value.to_bytes(width, "little"), what)

    ount = data.index(b"\x04" + b"\x00" * 7 + b"ount") + 10  # inside the token 'ount'
    return {
        # llama.cpp's loader aborted (GGML_ASSERT): the process that loaded the file in-process died
        "no layers": [field("value of llama.block_count", 0)],
        "more layers than llama.cpp allows": [field("value of llama.block_count", 600)],
        "a NUL inside a token": [("set", ount, b"\x00", "a byte of the token 'ount'")],
        # the reader took a float for a layer count, a tensor's data at another's offset, and a name that is
        # not UTF-8 (a UnicodeDecodeError traceback)
        "a float layer count": [field("type of llama.block_count", 6)],
        "overlapping tensor data": [field("offset of blk.0.attn_norm.weight", 0)],
        "a name that is not UTF-8": [("set", at["length of general.name"][0] + 8, b"\xff", "general.name")],
        # quantize's message named its own temporary file
        "no tensors": [field("n_tensors", 0)],
    }


def apply_damage(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for e in edits:
        if e[0] == "truncate":
            del out[e[1]:]
        elif e[1] < len(out):
            out[e[1]:e[1] + len(e[2])] = e[2][:len(out) - e[1]]
    return bytes(out)


class Worker:
    """The GGUF entries, run in a child process: a crash of llama.cpp kills the child, not the tests."""

    def __init__(self, log: Path):
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.logf, cwd=self.log.parent)

    def call(self, request: dict, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if line:
            return json.loads(line)
        if not ready:
            self.proc.kill()
        code = self.proc.wait()
        tail = self.log.read_bytes()[-3000:].decode(errors="replace")
        self.proc = None
        return {"status": "hang" if not ready else "crash", "code": code, "message": tail}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.proc = None


def _entry(name: str, path: Path, out: Path, aux: dict) -> None:
    """One library entry that reads the GGUF at ``path`` (in the worker)."""
    from gguf_prune.runtime import llamacpp
    from gguf_prune.runtime.evaluate import EvalError, EvalOptions, evaluate
    from gguf_prune.writing.gguf_read import read_gguf
    from gguf_prune.runtime.package import PackageOptions, build_package
    from gguf_prune.plan import Plan
    from gguf_prune.writing.quantize import quantize
    from gguf_prune.writing.rewrite import rewrite

    if name == "read_gguf":
        gf = read_gguf(path)
        for key in gf.kv:
            gf.get(key)
    elif name == "rewrite":
        rewrite(path, Plan.from_dict(aux["plan"]), out / "cut.gguf", fsync=False)
    elif name == "quantize":
        quantize(path, out / "q8.gguf", "Q8_0", threads=1)
    elif name == "llamacpp.load":
        llamacpp.load(path, n_ctx=64).close()
    elif name == "evaluate":
        # every check evaluate makes of its inputs, then the refusal of a text too short to run llama-perplexity
        try:
            evaluate(path, [path], out / "report", text=Path(aux["text"]), options=EvalOptions(ctx=64, bench=False))
        except EvalError as e:
            if "llama-perplexity needs at least" not in str(e):
                raise
    elif name == "package":
        build_package(path, out / "app", PackageOptions(threads=1))
    else:
        raise ValueError(name)


def _worker_main() -> None:
    import logging

    from gguf_prune.errors import GgufPruneError

    logging.disable(logging.CRITICAL)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to the log, not into the answers
    for line in sys.stdin:
        r = json.loads(line)
        try:
            _entry(r["entry"], Path(r["path"]), Path(r["out"]), r["aux"])
            answer = {"status": "ok"}
        except GgufPruneError as e:
            answer = {"status": "error", "type": type(e).__name__, "message": str(e)}
        except Exception as e:  # a bug: what the user would see as a traceback
            answer = {"status": "traceback", "type": type(e).__name__, "message": traceback.format_exc()}
        proto.write(json.dumps(answer) + "\n")


# examples per entry and the seconds one may take before it counts as a hang
ENTRIES = {"read_gguf": (150, 20), "rewrite": (100, 30), "llamacpp.load": (60, 30), "quantize": (40, 60),
           "evaluate": (30, 60), "package": (25, 60)}
PRODUCES = {"read_gguf": set(), "rewrite": {"cut.gguf"}, "llamacpp.load": set(), "quantize": {"q8.gguf"},
            "evaluate": set(), "package": {"app"}}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("fuzz-worker") / "worker.log")
    yield w
    w.stop()


@pytest.mark.bad_input
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_damaged_gguf_gets_a_clear_error(entry, fuzz_gguf, fuzz_shape, worker, tmp_path):
    pristine = fuzz_gguf.read_bytes()
    fields, header_end = gguf_fields(pristine)
    damaged, out = tmp_path / "damaged.gguf", tmp_path / "out"
    text = _write(tmp_path / "short.txt", "A held-out text far too short to measure perplexity on.\n")
    n, timeout = ENTRIES[entry]
    aux = {"plan": _cut_plan(fuzz_shape), "text": str(text)}

    def run(data: bytes, timeout: float = timeout) -> dict:
        damaged.write_bytes(data)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        t0 = time.monotonic()
        r = worker.call({"entry": entry, "path": str(damaged), "out": str(out), "aux": aux}, timeout)
        r["seconds"] = time.monotonic() - t0
        r["left"] = sorted(p.name for p in out.iterdir())
        r["input_changed"] = damaged.read_bytes() != data
        return r

    # the pristine file works (evaluate: up to the refusal of the short text, after every check of the model);
    # the first package on a machine builds the portable server (scripts/test.sh builds it before the tests)
    r = run(pristine, timeout=3600)
    assert r["status"] == "ok", r

    def check(edits):
        r = run(apply_damage(pristine, edits))
        assert r["status"] in ("ok", "error"), f"{entry} on {edits}: {r['status']}\n{r['message']}"
        assert not r["input_changed"], f"{entry} changed its input"
        if r["status"] == "error":
            event(f"{r['type']}")
            assert damaged.name in r["message"], f"{entry} on {edits}: the message does not name the file: {r}"
            assert r["left"] == [], f"{entry} on {edits} failed and left {r['left']}"
        else:
            event("ok (the damage did not matter)")
            assert set(r["left"]) <= PRODUCES[entry], r["left"]

    test = given(damages(len(pristine), header_end, fields))(check)
    for edits in known_damage(pristine, fields).values():
        test = example(edits)(test)
    _settings(n)(test)()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
