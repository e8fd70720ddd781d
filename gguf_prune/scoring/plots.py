"""PNG plots of a scores file, written next to it (matplotlib, Agg backend).

``<stem>.layers.png``     per-layer Block Influence and ablation KL
``<stem>.sublayers.png``  KL with the attention / the MLP sub-block bypassed, and the whole layer
``<stem>.heads.png``      head and KV-group KL heatmaps (with --heads)
``<stem>.neurons.png``    activation-frequency histograms per layer (with neuron statistics)
``<stem>.greedy.png``     cumulative KL along the greedy removal order (with --greedy)
``<stem>.width.png``      width KL per layer, one bar per measured width, with the MLP's own KL (with --width)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from gguf_prune.scores import ScoresError, load as load_scores, load_neurons
from gguf_prune.atomic import save_figure_atomic

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _vals(layers: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if e.get(key) is None else e[key] for e in layers], dtype=float)


def _stem(path: Path) -> str:
    return path.name[:-len(".json")] if path.name.endswith(".json") else path.name


def plot_scores(scores_path: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw every plot the scores file has data for; return the PNG paths."""
    scores_path = Path(scores_path)
    d = load_scores(scores_path)
    out_dir = Path(out_dir) if out_dir else scores_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(scores_path)
    plt = _plt()
    title = Path(d["model"]["path"]).name or d["model"]["path"]
    if d["base_plan"]:
        title += f" (on plan {d['base_plan']['digest']})"
    written = [_layers_figure(plt, d, title, out_dir / f"{stem}.layers.png"),
               _sublayers_figure(plt, d, title, out_dir / f"{stem}.sublayers.png"),
               _heads_figure(plt, d, title, out_dir / f"{stem}.heads.png"),
               _neurons_figure(plt, d, scores_path, title, out_dir / f"{stem}.neurons.png"),
               _greedy_figure(plt, d, title, out_dir / f"{stem}.greedy.png"),
               _width_figure(plt, d, title, out_dir / f"{stem}.width.png")]
    return [path for path in written if path is not None]


def _layers_figure(plt, d: dict, title: str, path: Path) -> Path:
    """BI and KL per layer (always drawn)."""
    layers = d["layers"]
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(layers) + 2), 4))
    ax.bar(x, _vals(layers, "kl"), color="tab:red", alpha=0.7, label="KL (layer bypassed)")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(full ‖ layer bypassed), nats/token")
    ax2 = ax.twinx()
    ax2.plot(x, _vals(layers, "bi"), "o-", color="tab:blue", label="Block Influence 1−cos")
    ax2.set_ylabel("Block Influence")
    ax.set_title(f"{title}: layer scores")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    return _save(fig, path)


def _sublayers_figure(plt, d: dict, title: str, path: Path) -> Path | None:
    """KL with the attention / the MLP sub-block bypassed, next to the whole layer's."""
    layers = d["layers"]
    if not any(e.get("attn_kl") is not None or e.get("mlp_kl") is not None for e in layers):
        return None
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 4))
    w = 0.28
    ax.bar(x - w, _vals(layers, "kl"), w, label="layer", color="tab:gray")
    ax.bar(x, _vals(layers, "attn_kl"), w, label="attention", color="tab:orange")
    ax.bar(x + w, _vals(layers, "mlp_kl"), w, label="MLP", color="tab:green")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL when bypassed, nats/token")
    ax.set_title(f"{title}: sub-block scores")
    ax.legend()
    return _save(fig, path)


def _heads_figure(plt, d: dict, title: str, path: Path) -> Path | None:
    """Head and KV-group KL heatmaps (with --heads)."""
    if not d["heads"]:
        return None
    h = d["heads"]
    rows = h["layers"]
    hk = np.array([[np.nan if v is None else v for v in h["kl"][str(i)]] for i in rows], dtype=float)
    kv = np.array([[np.nan if v is None else v for v in h["kv_kl"][str(i)]] for i in rows], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, max(3, 0.25 * len(rows) + 1.5)),
                             gridspec_kw={"width_ratios": [max(1, hk.shape[1]), max(1, kv.shape[1])]})
    for ax, m, name in ((axes[0], hk, "query head"), (axes[1], kv, "KV group")):
        im = ax.imshow(np.log10(np.clip(m, 1e-6, None)), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(rows)), [str(i) for i in rows], fontsize=7)
        ax.set_xlabel(name)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="log10 KL when zeroed")
    fig.suptitle(f"{title}: head ablation")
    return _save(fig, path)


def _neurons_figure(plt, d: dict, scores_path: Path, title: str, path: Path) -> Path | None:
    """Activation-frequency histograms per layer (with neuron statistics)."""
    if not d["neurons"]:
        return None
    try:
        stats = load_neurons(scores_path, d)
    except ScoresError as e:
        log.warning("%s", e)
        stats = None
    if not (stats and stats["freq"]):
        return None
    ls = sorted(stats["freq"])
    cols = min(6, len(ls))
    rws = math.ceil(len(ls) / cols)
    fig, axes = plt.subplots(rws, cols, figsize=(2.2 * cols, 1.8 * rws), squeeze=False, sharex=True)
    for k, ax in enumerate(axes.flat):
        if k >= len(ls):
            ax.axis("off")
            continue
        ax.hist(stats["freq"][ls[k]], bins=40, range=(0, 1), color="tab:purple")
        ax.set_title(f"layer {ls[k]}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}: neuron activation frequency (|a| > {d['neurons']['tau']})")
    fig.supxlabel("fraction of tokens active")
    return _save(fig, path)


def _greedy_figure(plt, d: dict, title: str, path: Path) -> Path | None:
    """Cumulative KL along the greedy removal order (with --greedy)."""
    if not (d["greedy"] and d["greedy"]["steps"]):
        return None
    steps = d["greedy"]["steps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(steps) + 1), [s["kl"] for s in steps], "o-")
    for k, s in enumerate(steps, start=1):
        ax.annotate(f"{s['kind']} {s['layer']}", (k, s["kl"]), fontsize=7, textcoords="offset points",
                    xytext=(3, 3))
    ax.set_xlabel("units removed")
    ax.set_ylabel("KL vs the full model, nats/token")
    ax.set_title(f"{title}: greedy removal ({d['greedy']['by']})")
    return _save(fig, path)


def _width_figure(plt, d: dict, title: str, path: Path) -> Path | None:
    """Width KL per layer, one bar per measured width, with the MLP's own KL (with --width)."""
    if not d.get("width"):
        return None
    layers = d["layers"]
    x = np.arange(len(layers))
    drops = d["width"]["drops"]
    n_ff = d["model"]["shape"]["n_ff"]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(layers) + 2), 4))
    w = 0.8 / (len(drops) + 1)
    for k, dd in enumerate(drops):
        v = np.array([np.nan if not e.get("width_kl") or e["width_kl"][k] is None else e["width_kl"][k]
                      for e in layers], dtype=float)
        ax.bar(x + (k - len(drops) / 2) * w, v, w, label=f"{dd} of {n_ff} neurons removed")
    ax.bar(x + (len(drops) / 2) * w, _vals(layers, "mlp_kl"), w, color="tab:gray", label="whole MLP")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL, nats/token")
    ax.set_title(f"{title}: MLP width (lowest-energy neurons removed first)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)  # removes its temporary file when the save fails
