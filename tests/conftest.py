import os

# Idle OpenMP threads sleep instead of spinning: on a loaded 2-core machine spinning
# workers slowed steps 40x. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# One thread: steady timings and no MKL stalls on the 2-core CI machines.
torch.set_num_threads(int(os.environ.get("FXDECOMP_TEST_THREADS", "1")))

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
# tools/mutation/run.py: few examples, the same for every mutant.
settings.register_profile("mutation", max_examples=12, deadline=None, derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    import fxdecomp

    return f"fxdecomp {fxdecomp.__version__} under test: {os.path.dirname(fxdecomp.__file__)}"


def pytest_configure(config):
    # .ci/run: the suite must run against the installed wheel, not the checkout it sits in.
    if os.environ.get("FXDECOMP_TEST_INSTALLED") == "1":
        import sysconfig

        import fxdecomp

        site = os.path.realpath(sysconfig.get_paths()["purelib"])
        if not os.path.realpath(fxdecomp.__file__).startswith(site + os.sep):
            raise pytest.UsageError(f"FXDECOMP_TEST_INSTALLED=1 but fxdecomp comes from {fxdecomp.__file__}, not {site}")
