import os

# Idle OpenMP threads sleep instead of spinning: on a loaded 2-core machine spinning
# workers slowed steps 40x. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# One thread: steady timings and no MKL stalls on the 2-core CI machines.
torch.set_num_threads(int(os.environ.get("FXDECOMP_TEST_THREADS", "1")))

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
# tools/mutation/run.py: few examples, the same for every mutant.
settings.register_profile("mutation", max_examples=12, deadline=None, derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
