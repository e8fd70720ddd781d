"""The strategies of `run` and `sweep`: their names, what they score, and the plan each one makes.

A strategy is a recipe over the planner (:mod:`gguf_prune.planning.strategies`): which scores file it
plans from and which PlanOptions it passes. :data:`STRATEGY_PLANS` maps each name to the function that
makes its plan; :data:`STRATEGIES` is its keys, in the order a sweep runs and reports them.

Only the standard library is imported here, so the CLI can list the strategies without loading the planner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from gguf_prune.plan import Plan

# Width KL levels scored for the width strategies: each MLP with 1/6, 1/3, 1/2 of its neurons removed
# (on SmolLM2-135M with align 256: 256, 512 and 768 of 1,536).
WIDTH_FRACTIONS = (1 / 6, 1 / 3, 1 / 2)
RUN_STRATEGIES = ("width-mixed", "greedy-mixed")
# What `run --recover` does after each cut: linear patches, LoRA or full fine-tuning, or a patch then fine-tuning.
RECOVER_MODES = ("none", "patch", "lora", "full", "patch+lora", "patch+full")


def recover_parts(mode: str) -> tuple[bool, str | None]:
    """A valid ``--recover`` mode → (patch, finetune method): ``"patch+lora"`` → (True, "lora"); ``"none"`` →
    (False, None)."""
    parts = mode.split("+")
    return "patch" in parts, next((p for p in parts if p in ("lora", "full")), None)


def greedy_steps_for(budget: float, n_layer: int, units: tuple[str, ...]) -> int:
    """Greedy steps enough to reach ``budget`` (a fraction of block parameters).

    Whole layers: one step per layer. Mixed units: a step may remove only an attention
    sub-block (a quarter of a layer in typical shapes) or an MLP (three quarters); allow
    two steps per layer-equivalent, plus two.
    """
    layers = math.ceil(budget * n_layer - 1e-9)
    return max(1, layers) if tuple(units) == ("layer",) else 2 * layers + 2


@dataclass(frozen=True)
class StrategyInputs:
    """What a strategy's plan is made from: the sweep's three scores files, the budget, where the plan goes."""

    budget: float  # fraction of block parameters to remove
    drop_layers: int  # whole layers the budget amounts to (at least 1), for the layer-only strategies
    scores_one: Path  # one-shot scores: Block Influence, KL of layers, sub-blocks and widths
    scores_greedy_layers: Path  # greedy KL over whole layers
    scores_greedy_mixed: Path  # greedy KL per parameter over layers and sub-blocks
    out: Path  # the plan.json to write
    protect: tuple[int, int]  # (first, last) layers kept whatever their scores
    repair: bool = False  # rank width cuts by their KL after repair (where the scores have it)

    def plan(self, scores: Path, **options: Any) -> "Plan":
        """make_plan on ``scores`` with ``options`` and the protected layers."""
        from gguf_prune.planning.options import PlanOptions
        from gguf_prune.planning.strategies import make_plan

        return make_plan(scores, self.out, PlanOptions(**options, protect_first=self.protect[0],
                                                       protect_last=self.protect[1], repair=self.repair))


def _all_units() -> tuple[str, ...]:
    from gguf_prune.planning.options import UNITS  # the planner is heavy to import: only when planning

    return UNITS


# strategy → the function that makes its plan. The order is the order a sweep builds and reports them.
STRATEGY_PLANS: dict[str, Callable[[StrategyInputs], "Plan"]] = {
    "bi-layers": lambda s: s.plan(s.scores_one, drop_layers=s.drop_layers, metric="bi"),
    "kl-layers": lambda s: s.plan(s.scores_one, drop_layers=s.drop_layers, metric="kl"),
    "greedy-layers": lambda s: s.plan(s.scores_greedy_layers, drop_layers=s.drop_layers, metric="greedy"),
    "oneshot-mixed": lambda s: s.plan(s.scores_one, target_params=s.budget),
    "greedy-mixed": lambda s: s.plan(s.scores_greedy_mixed, target_params=s.budget),
    "width": lambda s: s.plan(s.scores_one, target_params=s.budget, units=("width",)),
    "width-mixed": lambda s: s.plan(s.scores_one, target_params=s.budget, units=_all_units()),
}
STRATEGIES = tuple(STRATEGY_PLANS)


def strategy_plan(strategy: str, budget: float, scores_one: Path, scores_greedy_layers: Path,
                  scores_greedy_mixed: Path, n_layer: int, out: Path, protect: tuple[int, int] = (2, 2),
                  repair: bool = False) -> "Plan":
    """The plan ``strategy`` makes for ``budget`` from the sweep's scores files, written to ``out``; ``repair``:
    width cuts ranked by their KL after repair."""
    make = STRATEGY_PLANS.get(strategy)
    if make is None:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    drop_layers = max(1, math.ceil(budget * n_layer - 1e-9))
    return make(StrategyInputs(budget=budget, drop_layers=drop_layers, scores_one=scores_one,
                               scores_greedy_layers=scores_greedy_layers, scores_greedy_mixed=scores_greedy_mixed,
                               out=out, protect=protect, repair=repair))
