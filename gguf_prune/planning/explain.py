"""`gguf-prune plan --explain`: a plan as a table of what goes and why, with parameter counts before and
after, the output architecture, the patches and the predicted file size."""

from __future__ import annotations

import json
from typing import Any

from gguf_prune.plan import Plan
from gguf_prune.planning.draft import predict
from gguf_prune.ranges import ranges


def explain(plan: Plan) -> str:
    """A table of what goes and why, with parameter counts before and after."""
    s = plan.shape
    rows = [("layer", "status", "heads", "kv", "n_ff", "params", "→ after", "why")]
    tot_b = tot_a = 0
    for lp in plan.layers:
        before = s.layer_params()
        heads = lp.kept_heads(s)
        kv = lp.kept_kv_groups(s)
        ff = len(lp.kept_neurons(s))
        if lp.removed:
            status, after = "removed", 0
            if lp.patch is not None:
                status, after = f"removed, {lp.patch} patch", s.patch_params()
        else:
            after = s.attn_params(len(heads), len(kv)) + s.mlp_params(ff)
            parts = []
            if lp.attention_removed and lp.patch is not None:
                parts.append(f"attn → {lp.patch} patch")
                after += s.patch_params()
            elif lp.attention_removed:
                parts.append("attn removed")
            elif lp.heads is not None:
                parts.append(f"heads {ranges(heads)}")
            if lp.mlp_removed:
                parts.append("mlp removed")
            elif lp.neurons is not None:
                parts.append(f"ffn {ff}/{s.n_ff}")
            status = ", ".join(parts) or "kept"
        tot_b += before
        tot_a += after
        why = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(lp.why.items()))
        rows.append((str(lp.index), status, f"{len(heads)}/{s.n_head}", f"{len(kv)}/{s.n_head_kv}",
                     f"{ff}/{s.n_ff}", _human(before), _human(after), why))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(len(widths))) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * (sum(widths) + 2 * len(widths) + 3))
    pred = plan.predicted or predict(plan)
    lines.append("")
    lines.append(f"block parameters: {_human(tot_b)} → {_human(tot_a)} "
                 f"({100 * (1 - tot_a / tot_b):.1f}% removed); {len(plan.kept_layers())}/{s.n_layer} layers kept")
    out_arch, why = plan.output_architecture()
    lines.append(f"output architecture: {out_arch or 'none'} ({why})")
    patches = plan.patches()
    if patches:
        lines.append(f"{len(patches)} {patches[0].patch} patch{'es' if len(patches) > 1 else ''} "
                     f"(layers {ranges(lp.index for lp in patches)}): {_human(s.patch_params())} parameters each "
                     f"(n_embd² + attn_norm), {_human(len(patches) * s.patch_params())} in all, counted above; "
                     "weights from `gguf-prune recover`")
    repaired = [lp.why for lp in plan.layers if "width_kl_repaired" in lp.why]
    if repaired:
        cut = sum(float(w["width_kl_cut"]) for w in repaired)
        rep = sum(float(w["width_kl_repaired"]) for w in repaired)
        lines.append(f"{len(repaired)} width cut(s) ranked by their KL after repair (calibration, each alone): "
                     f"Σ {cut:.4f} before repair → {rep:.4f} after; `gguf-prune recover --repair` fits the repairs")
    sp = pred.get("speedup")
    if sp:
        lines.append(f"predicted speed-up: ×{sp['value']:.3f} {sp['metric']} at depth {sp['depth']}, {sp['threads']} "
                     f"threads, {sp['quant']}{' with the patches' if sp.get('patched') else ''} (cost file "
                     f"{sp['cost']}); speedup_after: the prediction after each cut")
    if "size_bytes_estimate_after" in pred:
        lines.append(f"predicted {pred.get('quant', '')} size: {pred['size_bytes_estimate_before'] / 1e6:.1f} MB → "
                     f"{pred['size_bytes_estimate_after'] / 1e6:.1f} MB (estimate)")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)
