"""plan.json: what to cut, per layer. The contract between measuring and cutting.

A plan is a frozen, versioned, validated object serialised as sorted,
human-editable JSON. For every layer of the source model it says what is kept:

``{"index": 7, "removed": true}``
    the whole layer goes.
``{"index": 8, "heads": [0, 1, 2, 4, 5, 6], "neurons": null}``
    attention keeps query heads 0,1,2 (KV group 0) and 4,5,6 (KV group 1) of
    8 heads in 2 KV groups; the MLP is untouched (``null`` = all kept).
``{"index": 9, "heads": [], "neurons": [3, 17, ...]}``
    attention removed (``[]``), MLP keeps the listed intermediate neurons;
    ``"neurons": []`` removes the MLP.
``{"index": 12, "removed": true, "patch": "linear"}``
    the layer goes and a *linear patch* stands in its place: h ↦ h + W·rmsnorm(h),
    one n_embd × n_embd matrix fitted (``gguf-prune recover``) to reproduce the run
    of removed layers that ends here. On an attention-removed layer
    (``"heads": [], "patch": "linear"``) the patch replaces the attention sub-block
    in place (on the layer's own normed input). The matrices live in the recover
    directory, not in the plan. In GGUF a patch is deci's "linear attention"
    (n_head > 0, n_head_kv = 0).

Indices always refer to the *source* model. Each entry may carry ``why``:
the scores behind the choice. :func:`validate` collects every problem and
raises one :class:`PlanError` that names each.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from gguf_prune.models import arch
from gguf_prune.atomic import write_text_atomic
from gguf_prune.values import is_int, kind
from gguf_prune.ranges import protected_layers
from gguf_prune.errors import GgufPruneError

PLAN_SCHEMA = "gguf-prune/plan"
PLAN_VERSION = 1

PATCH_KINDS = ("linear",)  # what may stand in for a removed layer run / attention sub-block


class PlanError(GgufPruneError, ValueError):
    """A plan that cannot be applied; the message lists every problem found."""

    def __init__(self, problems: list[str], source: str = "plan"):
        self.problems = list(problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  - "
                         + "\n  - ".join(problems))


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of an (unpruned) model that a plan refers to. ``architecture`` is the llama.cpp
    architecture its checkpoint converts to (``arch.Family.gguf_arch``: llama, qwen2, qwen3, gemma3)."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int

    @property
    def group_size(self) -> int:  # query heads per KV head
        return self.n_head // self.n_head_kv

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "ModelShape":
        n_head = int(config["num_attention_heads"])
        n_embd = int(config["hidden_size"])
        return cls(
            architecture=arch.family_of_config(config).gguf_arch,
            n_layer=int(config["num_hidden_layers"]),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or n_embd // n_head),
            n_ff=int(config["intermediate_size"]),
            n_vocab=int(config["vocab_size"]),
        )

    @classmethod
    def from_hf_dir(cls, hf_dir: Path) -> "ModelShape":
        return cls.from_hf_config(json.loads((Path(hf_dir) / "config.json").read_text()))

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    # parameter counts (weights only; norms included), per layer of the unpruned model
    def attn_params(self, n_head: int | None = None, n_head_kv: int | None = None) -> int:
        nh = self.n_head if n_head is None else n_head
        nkv = self.n_head_kv if n_head_kv is None else n_head_kv
        if nh == 0:
            return 0
        return self.n_embd * self.head_dim * (2 * nh + 2 * nkv) + self.n_embd  # q,o + k,v + attn_norm

    def mlp_params(self, n_ff: int | None = None) -> int:
        ff = self.n_ff if n_ff is None else n_ff
        if ff == 0:
            return 0
        return 3 * self.n_embd * ff + self.n_embd  # gate, up, down + ffn_norm

    def layer_params(self) -> int:
        return self.attn_params() + self.mlp_params()

    def patch_params(self) -> int:
        """A linear patch as written: attn_norm (n_embd) + the n_embd × n_embd matrix."""
        return self.n_embd * self.n_embd + self.n_embd


@dataclass(frozen=True)
class LayerPlan:
    index: int
    removed: bool = False
    heads: tuple[int, ...] | None = None  # kept query heads; None = all, () = attention removed
    neurons: tuple[int, ...] | None = None  # kept FFN neurons; None = all, () = MLP removed
    why: Mapping[str, Any] = field(default_factory=dict)
    patch: str | None = None  # "linear": a fitted linear map stands in for the removed layer(s) / attention

    @property
    def written(self) -> bool:
        """The layer exists in the output: kept, or removed with a patch in its place."""
        return not self.removed or self.patch is not None

    @property
    def attention_removed(self) -> bool:
        return not self.removed and self.heads is not None and len(self.heads) == 0

    @property
    def mlp_removed(self) -> bool:
        return not self.removed and self.neurons is not None and len(self.neurons) == 0

    @property
    def untouched(self) -> bool:
        return not self.removed and self.heads is None and self.neurons is None

    def kept_heads(self, shape: ModelShape) -> tuple[int, ...]:
        if self.removed:
            return ()
        return tuple(range(shape.n_head)) if self.heads is None else tuple(self.heads)

    def kept_kv_groups(self, shape: ModelShape) -> tuple[int, ...]:
        return tuple(sorted({h // shape.group_size for h in self.kept_heads(shape)}))

    def kept_neurons(self, shape: ModelShape) -> tuple[int, ...]:
        if self.removed:
            return ()
        return tuple(range(shape.n_ff)) if self.neurons is None else tuple(self.neurons)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"index": self.index}
        if self.removed:
            d["removed"] = True
        else:
            d["heads"] = None if self.heads is None else list(self.heads)
            d["neurons"] = None if self.neurons is None else list(self.neurons)
        if self.patch is not None:
            d["patch"] = self.patch
        if self.why:
            d["why"] = dict(self.why)
        return d


def with_patches(layers: Sequence[LayerPlan]) -> tuple[LayerPlan, ...]:
    """``layers`` with a linear patch on the last layer of every run of removed layers and on every removed
    attention sub-block (a layer whose attention and MLP both go counts as the latter): where `recover --patch`
    (and --repair) puts them."""
    out = list(layers)
    for k, lp in enumerate(out):
        run_ends = lp.removed and (k + 1 == len(out) or not out[k + 1].removed)
        if run_ends or lp.attention_removed:
            out[k] = replace(lp, patch="linear")
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    layers: tuple[LayerPlan, ...]
    fingerprint: str = ""  # content fingerprint of the source checkpoint ("" = not known)
    gguf: str = ""  # identity of the GGUF the plan was applied to (rewrite.gguf_identity; "" = none yet)
    settings: Mapping[str, Any] = field(default_factory=dict)
    predicted: Mapping[str, Any] = field(default_factory=dict)

    # --- derived per-layer dimensions of the pruned model (kept layers only, in order)
    def kept_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if not lp.removed]

    def patches(self) -> list[LayerPlan]:
        """The layers that carry a patch."""
        return [lp for lp in self.layers if lp.patch is not None]

    def without_patches(self) -> "Plan":
        """The same cut with no patch in it: what the cut alone computes."""
        return replace(self, layers=tuple(replace(lp, patch=None) for lp in self.layers))

    def dims(self) -> list[dict[str, int]]:
        """n_head, n_head_kv, n_ff of every written layer, as llama.cpp will see them
        (a patch: n_head_kv 0, the "linear attention" of deci; n_ff 0 = MLP removed)."""
        out = []
        for lp in self.layers:
            if not lp.written:
                continue
            heads = lp.kept_heads(self.shape)
            d = {
                "source_index": lp.index,
                "n_head": len(heads),
                "n_head_kv": len(lp.kept_kv_groups(self.shape)),
                "n_ff": len(lp.kept_neurons(self.shape)),
            }
            if lp.patch is not None:
                d.update(n_head=self.shape.n_head, n_head_kv=0, patch=lp.patch)
            out.append(d)
        return out

    def is_uniform(self) -> bool:
        """True when every written layer keeps one shape and nothing is removed inside a layer."""
        dims = self.dims()
        inside = any(lp.attention_removed or lp.mlp_removed or lp.patch is not None for lp in self.layers)
        return not inside and len({(d["n_head"], d["n_head_kv"], d["n_ff"]) for d in dims}) <= 1

    def output_architecture(self) -> tuple[str | None, str]:
        """The llama.cpp architecture the cut is written as, and why (None: no stock architecture loads it)."""
        s = self.shape
        shapes = {(d["n_head"], d["n_head_kv"], d["n_ff"]) for d in self.dims()}
        inside = any(lp.attention_removed or lp.mlp_removed or lp.patch is not None for lp in self.layers)
        return arch.output_architecture(arch.family_of_arch(s.architecture), shapes, inside,
                                        (s.n_head, s.n_head_kv, s.n_ff))

    def block_params(self) -> tuple[int, int]:
        """Transformer-block parameters (before, after)."""
        before = self.shape.n_layer * self.shape.layer_params()
        s = self.shape
        after = sum((s.patch_params() if "patch" in d else s.attn_params(d["n_head"], d["n_head_kv"]))
                    + s.mlp_params(d["n_ff"]) for d in self.dims())
        return before, after

    def removed_fraction(self) -> float:
        before, after = self.block_params()
        return 1.0 - after / before

    # --- serialisation
    def to_dict(self) -> dict:
        return {
            "schema": PLAN_SCHEMA,
            "version": PLAN_VERSION,
            "model": {"fingerprint": self.fingerprint, "shape": self.shape.to_dict()}
                     | ({"gguf": self.gguf} if self.gguf else {}),
            "settings": dict(self.settings),
            "predicted": dict(self.predicted),
            "layers": [lp.to_dict() for lp in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def digest(self) -> str:
        """A hash of what the plan cuts (not of its notes), recorded in outputs."""
        cut = [lp.to_dict() | {"why": None} for lp in self.layers]
        blob = json.dumps({"shape": self.shape.to_dict(), "layers": cut}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, path: Path) -> Path:
        write_text_atomic(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan") -> "Plan":
        """A plan from its JSON form; every problem of structure and type in one PlanError (what
        :func:`validate` checks against a model comes after)."""
        from gguf_prune.plan_reading import plan_from_dict  # it builds a Plan: imported here, not at the top

        return plan_from_dict(d, source)

    @classmethod
    def load(cls, path: Path) -> "Plan":
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise PlanError([f"no such file: {path}"], str(path)) from None
        except IsADirectoryError:
            raise PlanError([f"{path} is a directory; pass the plan.json file"], str(path)) from None
        except UnicodeDecodeError as e:
            raise PlanError([f"not UTF-8 text (byte {e.start}): not a plan.json; re-create it with "
                             "`gguf-prune plan`"], str(path)) from None
        try:
            d = json.loads(text)
        except ValueError as e:  # json.JSONDecodeError, or an integer too long to convert
            raise PlanError([f"not valid JSON: {e}"], str(path)) from None
        except RecursionError:
            raise PlanError(["not valid JSON: nested too deeply"], str(path)) from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def identity(cls, shape: ModelShape, fingerprint: str = "", **kw) -> "Plan":
        return cls(shape=shape, layers=tuple(LayerPlan(i) for i in range(shape.n_layer)),
                   fingerprint=fingerprint, **kw)

    def with_layer(self, lp: LayerPlan) -> "Plan":
        return replace(self, layers=tuple(lp if x.index == lp.index else x for x in self.layers))


def _few(xs: list, n: int = 5) -> str:
    """The first ``n`` of a list for a message: ``[1, 2, 3, 4, 5, …]`` (12 in all)."""
    return str(xs) if len(xs) <= n else f"{str(xs[:n])[:-1]}, …] ({len(xs)} in all)"


# ------------------------------------------------------------------------- validating a plan


def validate(plan: Plan, shape: ModelShape | None = None, fingerprint: str | None = None,
             source: str = "plan", gguf: str | None = None) -> Plan:
    """Check ``plan`` (against the model it will be applied to: its shape, its checkpoint ``fingerprint`` or
    the ``gguf`` identity of the file it will cut); raise one PlanError naming every problem."""
    p: list[str] = []
    _check_model(plan, shape, fingerprint, gguf, p)
    s = plan.shape
    # an unknown architecture or a broken head grouping makes every later check meaningless: stop here
    if s.architecture not in arch.BY_GGUF_ARCH:
        p.append(f"architecture {s.architecture!r} is not supported (supported: {', '.join(arch.BY_GGUF_ARCH)})")
        raise PlanError(p, source)
    if s.n_head_kv <= 0 or s.n_head % s.n_head_kv:
        p.append(f"model shape: n_head {s.n_head} is not a multiple of n_head_kv {s.n_head_kv}")
        raise PlanError(p, source)
    _check_layer_list(plan, p)
    protection = _protection(plan, p)
    for lp in plan.layers:
        _check_layer(lp, s, protection, p)
    if plan.layers and all(lp.removed for lp in plan.layers):
        p.append("the plan removes every layer")
    if not p:
        out_arch, why = plan.output_architecture()
        if out_arch is None:
            p.append(f"no stock llama.cpp architecture loads this cut: {why}")
    if p:
        raise PlanError(p, source)
    return plan


def _check_model(plan: Plan, shape: ModelShape | None, fingerprint: str | None, gguf: str | None,
                 p: list[str]) -> None:
    """The plan was made for this model: the same shape, checkpoint fingerprint and GGUF identity."""
    s = plan.shape
    if shape is not None and shape != s:
        diffs = [f"{k} {getattr(s, k)} in the plan vs {getattr(shape, k)} in the model"
                 for k in s.__dataclass_fields__ if getattr(s, k) != getattr(shape, k)]
        p.append("the plan was made for another model: " + ", ".join(diffs))
    if fingerprint and plan.fingerprint and fingerprint != plan.fingerprint:
        p.append(f"the plan was made for another model: fingerprint {plan.fingerprint} in the plan, "
                 f"{fingerprint} for this checkpoint")
    if gguf and plan.gguf and gguf != plan.gguf:
        p.append(f"the plan was applied to another GGUF (identity {plan.gguf}; this file is {gguf}): the same "
                 "shape, other weights. Cut the GGUF it was made for, or remove \"gguf\" from the plan's "
                 "\"model\" if you mean to apply it to this one")


def _check_layer_list(plan: Plan, p: list[str]) -> None:
    """One entry per source layer, each index once."""
    n_layer = plan.shape.n_layer
    indices = [lp.index for lp in plan.layers]
    if sorted(indices) != list(range(n_layer)):
        missing = sorted(set(range(n_layer)) - set(indices))
        extra = sorted(i for i in set(indices) if not 0 <= i < n_layer)
        dup = sorted(i for i, c in Counter(indices).items() if c > 1)
        p.append(f"layers must list each of the {n_layer} source layers once"
                 + (f"; missing {_few(missing)}" if missing else "")
                 + (f"; out of range {_few(extra)}" if extra else "") + (f"; duplicated {_few(dup)}" if dup else ""))


@dataclass(frozen=True)
class _Protection:
    """The protected layers a plan's settings name, and whether a cut may narrow them."""

    first: int
    last: int
    layers: set[int]
    uniform: Any  # settings.uniform as written (a non-bool is reported, and counts as its truth value)


def _protection(plan: Plan, p: list[str]) -> _Protection:
    protect = {}
    for key in ("protect_first", "protect_last"):
        protect[key] = plan.settings.get(key, 0)
        if not (is_int(protect[key]) and protect[key] >= 0):
            p.append(f"settings.{key} is {kind(protect[key])}, expected a number of layers (0 or more)")
            protect[key] = 0  # the other checks go on without it
    first, last = protect["protect_first"], protect["protect_last"]
    uniform = plan.settings.get("uniform", False)  # a uniform plan narrows protected layers like every other
    if not isinstance(uniform, bool):
        p.append(f"settings.uniform is {kind(uniform)}, expected true or false")
    return _Protection(first, last, protected_layers(plan.shape.n_layer, first, last), uniform)


def _check_layer(lp: LayerPlan, s: ModelShape, protection: _Protection, p: list[str]) -> None:
    """One layer's cut: not in a protected layer, indices in range, sorted, once each, GQA-consistent heads,
    and a patch only where something was removed."""
    where = f"layer {lp.index}"
    removes = lp.removed or lp.attention_removed or lp.mlp_removed
    if lp.index in protection.layers and not lp.untouched and (removes or not protection.uniform):
        p.append(f"{where} is protected (protect_first={protection.first}, protect_last={protection.last}) "
                 "but the plan cuts it")
    if lp.heads is not None:
        _check_heads(lp.heads, s, where, p)
    if lp.neurons is not None:
        _check_indices(lp.neurons, s.n_ff, "neuron", where, p)
    if lp.patch is not None:
        if lp.patch not in PATCH_KINDS:
            p.append(f"{where}: patch {lp.patch!r} is not a known kind (known: {', '.join(PATCH_KINDS)})")
        elif not (lp.removed or lp.attention_removed):
            p.append(f"{where}: a {lp.patch} patch stands in for a removed layer or a removed attention "
                     "sub-block, but this layer keeps its attention (llama.cpp's deci layer has no linear "
                     "FFN, so a removed MLP alone cannot carry one)")


def _check_indices(kept: tuple[int, ...], n: int, unit: str, where: str, p: list[str]) -> bool:
    """Kept head / neuron indices: in range 0..n-1, once each, ascending. True when all are in range."""
    bad = sorted(x for x in kept if not 0 <= x < n)
    if bad:
        p.append(f"{where}: {unit} indices {_few(bad)} out of range 0..{n - 1}")
    if len(set(kept)) != len(kept):
        p.append(f"{where}: duplicated {unit} indices")
    if list(kept) != sorted(kept):
        p.append(f"{where}: {unit} indices must be sorted ascending")
    return not bad


def _check_heads(heads: tuple[int, ...], s: ModelShape, where: str, p: list[str]) -> None:
    if not _check_indices(heads, s.n_head, "head", where, p) or not heads:
        return
    per_group = Counter(h // s.group_size for h in heads)  # KV group → query heads kept in it
    if len(set(per_group.values())) > 1:
        per = ", ".join(f"group {g}: {c}" for g, c in sorted(per_group.items()))
        p.append(f"{where}: GQA groups left uneven ({per} query heads); llama.cpp maps query head h "
                 f"to KV head h*n_head_kv/n_head, so every kept KV group must keep the same number "
                 f"of query heads (or remove whole groups)")
