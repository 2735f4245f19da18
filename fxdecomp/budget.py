"""The budget: what fraction of the model's FLOPs (or parameters, or latency) the result may keep.

Example::

    Budget.parse(0.5)                 # Budget(flops=0.5)
    Budget(params=0.3)                # keep at most 30 % of the parameters
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BudgetError


@dataclass(frozen=True)
class Budget:
    """Fractions in (0, 1] of the original model's FLOPs, parameters or measured latency.

    Exactly one of the three is set.
    """

    flops: float | None = None
    params: float | None = None
    latency: float | None = None

    def __post_init__(self):
        given = {k: v for k, v in (("flops", self.flops), ("params", self.params), ("latency", self.latency)) if v is not None}
        if len(given) != 1:
            raise BudgetError(f"give exactly one of flops=, params=, latency= to Budget, got {sorted(given) or 'none'}")
        (key, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 < value <= 1.0:
            raise BudgetError(
                f"budget {key}={value!r} is outside (0, 1]: it is the fraction of the original model's {key} to keep, "
                "e.g. 0.5 for half"
            )

    @property
    def metric(self) -> str:
        return "flops" if self.flops is not None else "params" if self.params is not None else "latency"

    @property
    def fraction(self) -> float:
        return float(getattr(self, self.metric))

    @classmethod
    def parse(cls, budget: "float | Budget") -> "Budget":
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise BudgetError(f"budget must be a float in (0, 1] or fxdecomp.Budget(...), got {budget!r}")
        return cls(flops=float(budget))
