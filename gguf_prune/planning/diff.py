"""Two plans compared: what a later plan cuts that an earlier one did not (:func:`new_cuts`), and what it
keeps that the earlier one removed (:func:`revived`). Iterative pruning only ever cuts more, so each round's
log names its new cuts, and a round (or a recovery) that would revive a part is refused."""

from __future__ import annotations

from gguf_prune.plan import Plan
from gguf_prune.ranges import ranges


def new_cuts(before: Plan | None, after: Plan) -> list[str]:
    """What ``after`` cuts that ``before`` did not: ``["layer 3", "attn 4", "mlp 2", "heads 5", ...]``."""
    out = []
    prev = {lp.index: lp for lp in before.layers} if before is not None else {}
    for lp in after.layers:
        b = prev.get(lp.index)
        if lp.removed:
            if b is None or not b.removed:
                out.append(f"layer {lp.index}")
            continue
        if lp.attention_removed and not (b and b.attention_removed):
            out.append(f"attn {lp.index}")
        elif lp.heads is not None and (b is None or b.heads != lp.heads) and not lp.attention_removed:
            out.append(f"heads {lp.index}")
        if lp.mlp_removed and not (b and b.mlp_removed):
            out.append(f"mlp {lp.index}")
        elif lp.neurons is not None and (b is None or b.neurons != lp.neurons) and not lp.mlp_removed:
            out.append(f"neurons {lp.index}")
    return out


def revived(before: Plan, after: Plan) -> list[str]:
    """What ``after`` keeps that ``before`` removed (a layer, an attention or MLP sub-block, a head, a
    neuron), one line each; [] when ``after`` only cuts more. Patches are ignored: they stand in for
    removed parts, they do not keep them."""
    s = before.shape
    out = []
    for b, a in zip(before.layers, after.layers):
        i = b.index
        if b.removed:
            if not a.removed:
                out.append(f"layer {i} is removed before and kept after")
            continue
        if a.removed:
            continue
        back_h = sorted(set(a.kept_heads(s)) - set(b.kept_heads(s)))
        if b.attention_removed and back_h:
            out.append(f"layer {i}: attention removed before and kept after")
        elif back_h:
            out.append(f"layer {i}: query heads {ranges(back_h)} removed before and kept after")
        back_n = sorted(set(a.kept_neurons(s)) - set(b.kept_neurons(s)))
        if b.mlp_removed and back_n:
            out.append(f"layer {i}: MLP removed before and kept after")
        elif back_n:
            out.append(f"layer {i}: {len(back_n)} MLP neuron(s) removed before and kept after")
    return out
