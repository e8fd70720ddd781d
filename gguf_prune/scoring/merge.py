"""Joining ``score --units`` slices into one scores.json (``gguf-prune score --merge``).

    merge_scores([a.json, b.json, ...], out) -> out

Each slice scored the ablation units of some layers (its ``units.layers``) and left the rest null; the merged
document takes every layer's entries, head scores and neuron statistics from the slice that owns the layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from gguf_prune import scores
from gguf_prune.atomic import save_tensors_atomic
from gguf_prune.ranges import ranges
from gguf_prune.scoring.options import ScoreError

log = logging.getLogger(__name__)

# settings that change the numbers: slices must agree on them to be joined
_SAME_SETTINGS = ("calibration", "calibration_kind", "seq_len", "samples", "seed", "sublayers", "ppl", "heads",
                  "head_layers", "neurons", "tau", "plan", "dtype")


def merge_scores(paths: Sequence[Path], out: Path) -> Path:
    """Join scores slices written with ``--units`` into one scores file ``out`` (and its neuron side file).

    Refuses slices of different models, calibration data or settings, slices that overlap, and a set of
    slices that leaves layers unscored: every problem named in one error.
    """
    paths, out = [Path(p) for p in paths], Path(out)
    if len(paths) < 2:
        raise ScoreError("--merge needs at least two scores slices (written by `gguf-prune score --units …`)")
    docs = [scores.load(p, allow_slice=True) for p in paths]
    owner = _owners(paths, docs)
    first = docs[0]
    n_layer = int(first["model"]["shape"]["n_layer"])
    merged = {k: v for k, v in first.items() if k != "units"}
    merged["schema"] = scores.SCORES_SCHEMA
    merged["layers"] = [docs[owner[i]]["layers"][i] for i in range(n_layer)]
    if first["heads"] is not None:
        h = {"layers": first["heads"]["layers"]}
        for key in ("kl", "kv_kl", "norm", "taylor"):
            h[key] = {str(i): docs[owner[i]]["heads"][key][str(i)] for i in first["heads"]["layers"]}
        merged["heads"] = h
    if first["neurons"] is not None:
        merged["neurons"] = _merge_neurons(paths, docs, owner, out, n_layer)
    secs: dict[str, float] = {}
    for d in docs:
        for k, v in d["timing"]["seconds"].items():
            secs[k] = secs.get(k, 0.0) + float(v or 0)
    merged["timing"] = {"seconds": secs, "layer_evals": sum(int(d["timing"]["layer_evals"]) for d in docs)}
    merged["settings"] = dict(first["settings"], units=None)
    merged["stream"] = _merge_stream(paths, docs)
    scores.save(out, merged)
    log.info("merged %d slices into %s", len(paths), out)
    return out


def _owners(paths: list[Path], docs: list[dict]) -> dict[int, int]:
    """Which slice (its position in ``paths``) owns each layer; ScoreError naming every reason the slices cannot
    be joined."""
    first, p0 = docs[0], paths[0]
    problems = []
    for p, d in zip(paths[1:], docs[1:]):
        if d["model"]["fingerprint"] != first["model"]["fingerprint"] or d["model"]["shape"] != first["model"]["shape"]:
            problems.append(f"{p} is a slice of another model (fingerprint {d['model']['fingerprint']}, "
                            f"{p0} has {first['model']['fingerprint']})")
        if d["calibration"] != first["calibration"]:
            diff = [k for k in sorted(set(d["calibration"]) | set(first["calibration"]))
                    if d["calibration"].get(k) != first["calibration"].get(k)]
            problems.append(f"{p} was scored on other calibration data than {p0} (differs in {', '.join(diff)})")
        diff = [k for k in _SAME_SETTINGS if d["settings"].get(k) != first["settings"].get(k)]
        if diff:
            problems.append(f"{p} was scored with other settings than {p0}: "
                            + ", ".join(f"{k} {d['settings'].get(k)!r} vs {first['settings'].get(k)!r}" for k in diff))
    owner: dict[int, int] = {}
    for k, (p, d) in enumerate(zip(paths, docs)):
        u = d.get("units")
        if not u:
            problems.append(f"{p} is a whole run, not a --units slice; merge only slices")
            continue
        for i in u["layers"]:
            if i in owner:
                problems.append(f"layer {i} is scored in both {paths[owner[i]]} and {p}: the slices overlap")
            else:
                owner[i] = k
    n_layer = int(first["model"]["shape"]["n_layer"])
    missing = [i for i in range(n_layer) if i not in owner]
    if missing and not problems:
        problems.append(f"no slice scores layer(s) {ranges(missing)}: score them with --units and merge again")
    if problems:
        raise ScoreError(f"cannot merge {len(paths)} scores slices ({len(problems)} problem"
                         f"{'s' if len(problems) != 1 else ''}):\n  - " + "\n  - ".join(problems))
    return owner


def _merge_neurons(paths: list[Path], docs: list[dict], owner: dict[int, int], out: Path, n_layer: int) -> dict:
    """One neuron side file next to ``out`` with each layer's statistics from its owner; its ``neurons`` entry."""
    from safetensors.torch import load_file

    tensors = {}
    for i in range(n_layer):
        src = paths[owner[i]].parent / docs[owner[i]]["neurons"]["file"]
        if not src.exists():
            raise ScoreError(f"{src} is missing: it is written next to {paths[owner[i]].name}; "
                             "copy both files together")
        t = load_file(str(src))  # "{stat}.{layer}" → (n_ff,)
        tensors.update({k: v for k, v in t.items() if k.rsplit(".", 1)[1] == str(i)})
    name = scores.neurons_file_name(out)
    tau = docs[0]["neurons"]["tau"]
    save_tensors_atomic(out.parent / name, dict(sorted(tensors.items())),
                        {"tau": str(tau), "n_tokens": str(docs[0]["calibration"]["n_tokens"])})
    return scores.neurons_entry(name, tau, tensors)


def _merge_stream(paths: list[Path], docs: list[dict]) -> dict:
    """The merged ``stream`` entry: the slices' passes and bytes read, added up."""
    streams = [d.get("stream") or {} for d in docs]
    return {"engine": "layer-major", "merged_from": [str(p) for p in paths],
            "units": [d["units"]["spec"] for d in docs],
            "passes": sum(int(s.get("passes", 0)) for s in streams),
            "bytes_read": sum(int(s.get("bytes_read", 0)) for s in streams),
            "why": f"{len(paths)} slices, each its own passes over the weights: "
                   + "; ".join(f"{d['units']['spec']}: {s.get('passes')}" for d, s in zip(docs, streams))}
