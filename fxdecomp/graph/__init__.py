"""Graph-level code shared by the passes: candidates and their call sites, side effects, attention capture,
parametrized weights, and the rewrite of decomposed call sites."""
