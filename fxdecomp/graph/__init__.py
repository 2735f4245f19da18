"""Graph-level building blocks shared by the passes: candidates and their call sites, the rewrite of a call site."""
