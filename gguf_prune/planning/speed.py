"""Planning for speed (``plan --target-speedup``, ``--cost cost.json``): what each cut saves per token in llama.cpp
on the machine the cost file was measured on, and the speed-up a plan under construction is predicted to reach.

The budget (:mod:`gguf_prune.planning.budget`) prices a unit by its KL per second saved instead of per parameter
when a speed target is set; the seconds come from the cost file's fit (:mod:`gguf_prune.costs`), applied to the
layers as the rewriter will write them: with ``patched`` (the run repairs or patches its cuts) a removed run of
layers and a removed attention keep the linear patch that stands in for them, and its cost.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

from gguf_prune import costs
from gguf_prune.plan import LayerPlan, ModelShape, PlanError, with_patches
from gguf_prune.planning.draft import Draft
from gguf_prune.planning.options import PlanOptions


class SpeedGoal:
    """A cost fit (one metric at one depth) and the target speed-up, priced on draft plans."""

    def __init__(self, doc: dict[str, Any], shape: ModelShape, o: PlanOptions, source: str):
        self.coef = costs.fit_for(doc, o.speed_metric, o.speed_depth)["coef"]
        self.shape, self.patched, self.target = shape, o.patched, o.target_speedup
        self.info = {"metric": o.speed_metric, "depth": o.speed_depth, "threads": doc["threads"],
                     "quant": doc["quant"], "cost": source, "patched": o.patched}
        self.base = self.seconds([LayerPlan(i) for i in range(shape.n_layer)])

    def seconds(self, layers: Sequence[LayerPlan]) -> float:
        """Predicted seconds per token of the file ``layers`` write (with their patches when ``patched``)."""
        if self.patched:
            layers = with_patches(layers)
        return costs.seconds_of(self.coef, costs.layer_features(self.shape, layers))

    def layers(self, w: Draft) -> list[LayerPlan]:
        return [w.layer_plan(i) for i in range(self.shape.n_layer)]

    def speedup(self, w: Draft) -> float:
        """Predicted tokens/s of the draft over the base's."""
        return self.base / self.seconds(self.layers(w))

    def met(self, w: Draft) -> bool:
        return self.target is not None and self.speedup(w) >= self.target - 1e-9

    def most(self, w: Draft, protected: set[int]) -> float:
        """The speed-up with every layer that is not protected removed: the most any plan here reaches."""
        layers = [LayerPlan(lp.index, removed=True) if lp.index not in protected else lp for lp in self.layers(w)]
        return self.base / self.seconds(layers)

    def saving(self, w: Draft) -> Callable[[int, str, int | None], float]:
        """``saving(i, kind, n_ff)``: seconds per token that cutting ``kind`` of layer i (``width``: to ``n_ff``
        neurons) saves from the draft as it stands."""
        layers = self.layers(w)
        now = self.seconds(layers)

        def saving(i: int, kind: str, n_ff: int | None = None) -> float:
            after = list(layers)
            after[i] = cut_layer(layers[i], kind, n_ff)
            return now - self.seconds(after)

        return saving

    def refuse_unreachable(self, w: Draft, protected: set[int], o: PlanOptions) -> None:
        """PlanError with the largest reachable speed-up when no plan reaches the target."""
        if self.target is None:
            return
        most = self.most(w, protected)
        if most < self.target - 1e-9:
            raise PlanError([f"--target-speedup {self.target:g} cannot be reached: with every layer that is not "
                             f"protected removed (--protect-first {o.protect_first}, --protect-last {o.protect_last}) "
                             f"the cost file predicts ×{most:.2f} {self.info['metric']} at depth "
                             f"{self.info['depth']}; ask for ×{most:.2f} or less, or protect fewer layers"],
                            "plan request")


def cut_layer(lp: LayerPlan, kind: str, n_ff: int | None = None) -> LayerPlan:
    """``lp`` with ``kind`` cut (layer, attn, mlp, or width to ``n_ff`` neurons); a layer left with neither
    attention nor MLP is removed."""
    if kind == "layer" or (kind == "attn" and lp.mlp_removed) or (kind == "mlp" and lp.attention_removed):
        return LayerPlan(lp.index, removed=True)
    if kind == "attn":
        return replace(lp, heads=())
    if kind == "mlp":
        return replace(lp, neurons=())
    return replace(lp, neurons=tuple(range(int(n_ff))))


def goal_for(o: PlanOptions, shape: ModelShape) -> SpeedGoal | None:
    """The speed goal of the options (None without --cost), its cost file checked against this model."""
    if not o.cost:
        return None
    doc = costs.load(o.cost)
    costs.check(doc, shape, o.threads, o.quant, source=str(o.cost))
    return SpeedGoal(doc, shape, o, str(o.cost))
