"""Planning: the global choice of method and ranks per candidate, as modules of plain functions.

- `solver`: the multiple-choice knapsack (exact over Pareto fronts).
- `grid`: the option grid (keep, or a method at ranks) with each option's cost and damage.
- `factors`: the per-run factorisation cache every step shares.
- `damage`: the damage model (predicted relative error, output energies).
- `budget`: budget to capacity, the allowed methods, the error for an unreachable budget.
- `search`: the whole plan: options, solve, then the latency repairs.
- `latency`: the repair of a FLOP plan toward a measured speed-up, re-planning on measurement.
- `sensitivity`: damage as the drop of a user's score.
- `replay`: a saved plan read back and re-applied without search.

The plan pass (`fxdecomp.passes.plan`) wraps these and owns the onnxruntime timings.
"""
