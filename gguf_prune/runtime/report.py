"""Reports: a terminal table, report.json, report.md and PNG plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gguf_prune.atomic import save_figure_atomic, write_text_atomic

log = logging.getLogger(__name__)


def _f(v: Any, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = [["model", "size MB", "size×", "params×", "PPL", "PPL×", "KL mean", "KL med", "KL p99", "top-1",
             "pp t/s", "tg t/s", "tg×", "tg× pred", "prompts"]]
    for e in result["models"]:
        if "error" in e:
            rows.append([e["name"], "error: " + e["error"].splitlines()[0][:80]] + [""] * 13)
            continue
        q, s, facts = e.get("quality", {}), e.get("speed", {}), e.get("facts", {})
        pr = e.get("prompts")
        prompts = "—" if not pr else (f"{pr['passed']}/{pr['total']}" if "passed" in pr else "error")
        rows.append([
            e["name"], _f(facts.get("bytes", 0) / 1e6, ".1f"), _f(e.get("size_ratio"), ".3f"),
            _f(e.get("params_ratio"), ".3f"), _f(q.get("ppl"), ".3f"), _f(q.get("ppl_ratio"), ".3f"),
            _f(q.get("kl_mean"), ".4f"), _f(q.get("kl_median"), ".4f"), _f(q.get("kl_p99"), ".3f"),
            _f(q.get("top1_agreement", None) and 100 * q["top1_agreement"], ".1f") + ("%" if q.get("top1_agreement") else ""),
            _f(s.get("pp_ts"), ".1f"), _f(s.get("tg_ts"), ".1f"), _f(s.get("tg_ratio"), ".2f"),
            _f(s.get("tg_ratio_predicted"), ".2f"), prompts,
        ])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(r[c].rjust(widths[c]) if c else r[c].ljust(widths[c]) for c in range(len(r))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def render_markdown(result: dict[str, Any]) -> str:
    t = result["text"]
    hw = result.get("hardware", {})
    lines = ["# gguf-prune evaluation", "",
             f"Held-out text: `{t['path']}` ({t['tokens']} tokens), context {t['ctx']}, {t.get('chunks')} chunks; "
             f"{t['note']}.", ""]
    if result.get("bench"):
        b = result["bench"]
        lines.append(f"Speed: llama-bench pp{b['pp']} / tg{b['tg']}, {b['reps']} rounds with the base timed "
                     f"between every two models, {hw.get('threads')} threads on {hw.get('cpu')} "
                     f"({hw.get('backends')}); a ratio is the median over the rounds of the model's tokens/s over "
                     "the base runs beside it; tg× pred: the cost model's prediction (`eval --cost`).")
        lines.append("")
    lines.append(markdown_table(table_rows(result)))
    lines.append("")
    for e in result["models"]:
        lines.append(f"## {e['name']}")
        if "error" in e:
            lines += ["", "```", e["error"], "```", ""]
            continue
        f = e.get("facts", {})
        lines.append("")
        lines.append(f"- file: `{f.get('path')}` ({f.get('bytes')} bytes, {f.get('architecture')}, "
                     f"{f.get('n_layer')} layers, {f.get('params_total')} parameters)")
        lines.append(f"- tensor types: {', '.join(f'{k} ×{v}' for k, v in f.get('tensor_types', {}).items())}")
        for k, cmd in e.get("commands", {}).items():
            lines.append(f"- {k}: `{cmd}`")
        pr = e.get("prompts")
        if pr and "results" in pr:
            lines.append(f"- prompts: {pr['passed']}/{pr['total']} pass")
            for r in pr["results"]:
                mark = "pass" if r["pass"] else "FAIL: " + "; ".join(r["failures"])
                lines.append(f"  - {r['prompt'][:60]!r} → {mark}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """The report's PNGs: quality against size and speed, and (for models that record their plan) the fraction
    of each layer's parameters removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in result["models"] if "error" not in e and "quality" in e]
    if not ok:
        return []
    paths = [_plot_quality(plt, ok, out_dir / "quality_vs_size_speed.png")]
    pruned = [e for e in ok if e["facts"].get("plan")]  # the plan recorded in the GGUF says what went
    if pruned:
        paths.append(_plot_removed_per_layer(plt, pruned, out_dir / "removed_per_layer.png"))
    return paths


def _plot_quality(plt, entries: list[dict[str, Any]], path: Path) -> Path:
    """Mean KL against size on disk (left) and generation speed (right), a labelled point per model."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for e in entries:
        kl = e["quality"].get("kl_mean", 0.0)
        axes[0].scatter(e["facts"]["bytes"] / 1e6, kl, s=40)
        axes[0].annotate(e["name"], (e["facts"]["bytes"] / 1e6, kl), fontsize=7, xytext=(4, 3),
                         textcoords="offset points")
        tg = e.get("speed", {}).get("tg_ts")
        if tg:
            axes[1].scatter(tg, kl, s=40)
            axes[1].annotate(e["name"], (tg, kl), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axes[0].set_xlabel("size on disk (MB)")
    axes[1].set_xlabel("generation speed (tokens/s, llama-bench tg)")
    for ax in axes:
        ax.set_ylabel("mean KL vs base (nats)")
        ax.grid(alpha=0.3)
    fig.suptitle("quality against size and speed")
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)


def _plot_removed_per_layer(plt, pruned: list[dict[str, Any]], path: Path) -> Path:
    """A row per pruned model, a column per source layer: the fraction of the layer's parameters its plan
    removed (1 for a removed layer)."""
    import numpy as np

    n_layer = max(len(e["facts"]["plan"]["layers"]) for e in pruned)
    grid = np.zeros((len(pruned), n_layer))  # (models, source layers)
    for r, e in enumerate(pruned):
        shape = e["facts"]["plan"]["model"]["shape"]
        # attention: q and o (n_head heads) and k and v (n_head_kv heads), each n_embd × head_dim per head;
        # MLP: gate, up and down, each n_embd × n_ff
        full = shape["n_embd"] * shape["head_dim"] * (2 * shape["n_head"] + 2 * shape["n_head_kv"]) \
            + 3 * shape["n_embd"] * shape["n_ff"]
        for lp in e["facts"]["plan"]["layers"]:
            if lp.get("removed"):
                grid[r, lp["index"]] = 1.0
                continue
            heads = shape["n_head"] if lp.get("heads") is None else len(lp["heads"])
            kv = shape["n_head_kv"] if lp.get("heads") is None else \
                len({h // (shape["n_head"] // shape["n_head_kv"]) for h in lp["heads"]})  # the groups kept heads use
            ff = shape["n_ff"] if lp.get("neurons") is None else len(lp["neurons"])
            kept = shape["n_embd"] * shape["head_dim"] * (2 * heads + 2 * kv) + 3 * shape["n_embd"] * ff
            grid[r, lp["index"]] = 1 - kept / full
    fig, ax = plt.subplots(figsize=(max(6, n_layer * 0.3), 0.5 + 0.45 * len(pruned)))
    im = ax.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=1)
    ax.set_yticks(range(len(pruned)), [e["name"] for e in pruned], fontsize=7)
    ax.set_xlabel("source layer")
    ax.set_title("fraction of each layer's parameters removed")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        result["plots"] = [str(p) for p in plot_report(result, out_dir)]
    except Exception as e:  # a plot must never lose the numbers
        log.warning("plots failed: %s", e)
        result["plots"] = []
    write_text_atomic(out_dir / "report.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_text_atomic(out_dir / "report.md", render_markdown(result))
    log.info("report written to %s", out_dir)
