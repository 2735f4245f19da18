import os

import torch
from hypothesis import settings

# One thread: steady timings and no MKL stalls on the 2-core CI machines.
torch.set_num_threads(int(os.environ.get("FXDECOMP_TEST_THREADS", "1")))

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
