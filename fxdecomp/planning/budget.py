"""Budget to capacity: the whole model's cost in the budget's metric, and the error for a budget out of reach.

The budget is a fraction of the whole model (every op counted): the knapsack's
capacity is that fraction of the total minus what the layers that are not
decided (other ops, excluded and undecomposable layers) cost.

Example::

    total = model_total("flops", ModelCost(flops=8_000, params=100), None)   # 8000
    capacity = budget.fraction * total - fixed
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..budget import Budget
from ..decomposers import all_methods
from ..errors import BudgetError, UnknownMethodError
from ..records import ModelCost
from .solver import Infeasible


def allowed_methods(requested: Sequence[str] | None) -> tuple[str, ...]:
    """The methods the plan may use: the requested ones (checked), or every registered method."""
    known = all_methods()
    methods = tuple(requested) if requested is not None else tuple(known)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UnknownMethodError(f"unknown method(s) {unknown}; known methods: {known}")
    return methods


def model_total(metric: str, cost: ModelCost, latency_ms: float | None) -> float:
    """The whole model's cost in ``metric``: FLOPs (2 per multiply-add), parameters, or onnxruntime ms."""
    return {"flops": cost.flops, "params": cost.params, "latency": latency_ms}[metric]


def unreachable(exc: Infeasible, fixed: float, total: float, budget: Budget, refused: dict[str, str] | None = None,
                excluded: Sequence[str] = ()) -> BudgetError:
    """The `BudgetError` for a budget below the smallest reachable fraction (``exc.smallest`` + ``fixed``) / ``total``.

    ``refused`` ({layer: reason}) and ``excluded`` name the layers that keep their whole cost.
    """
    metric = budget.metric
    smallest = (exc.smallest + fixed) / total
    why = ""
    if refused:
        first, reason = next(iter(refused.items()))
        why += (f" {len(refused)} conv / Linear layer(s) are not candidates, e.g. {first!r}: {reason} (all are logged at "
                "INFO level by the 'fxdecomp' logger).")
    if excluded:
        why += f" {len(excluded)} layer(s) are excluded ({', '.join(excluded[:5])}{', ...' if len(excluded) > 5 else ''})."
    return BudgetError(
        f"a {metric} budget of {budget.fraction:g} cannot be reached: the smallest reachable is "
        f"{smallest:.4f} of the model's {metric} (layers that cannot be decomposed keep their cost); "
        f"ask for at least {math.ceil(smallest * 1000) / 1000:g}.{why}",
        smallest_reachable=smallest,
    )
