"""Graph-level helpers shared by the passes: call sites of weights, side effects, attention capture."""
