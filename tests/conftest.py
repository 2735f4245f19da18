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
    config.addinivalue_line("markers", "host_latency: plan on this machine's timed static latency model and SIMD block")
    # .ci/run: the suite must run against the installed wheel, not the checkout it sits in.
    if os.environ.get("FXDECOMP_TEST_INSTALLED") == "1":
        import sysconfig

        import fxdecomp

        site = os.path.realpath(sysconfig.get_paths()["purelib"])
        if not os.path.realpath(fxdecomp.__file__).startswith(site + os.sep):
            raise pytest.UsageError(f"FXDECOMP_TEST_INSTALLED=1 but fxdecomp comes from {fxdecomp.__file__}, not {site}")


# The default recipe plans on a static latency model whose rates are timed once per CPU (three probe layers)
# and whose channel block comes from the CPU's flags. The suite pins both, so that a plan does not depend on
# the machine or its load: rates of a 2-core Xeon (AVX-512), block 16. The model itself is tested in
# tests/planning/test_fast_default.py; tests marked host_latency, or every test with
# FXDECOMP_TEST_HOST_LATENCY=1, time and detect on the machine instead.
PINNED_RATES = {1: (1.09e8, 88.8, 1.30e7), 2: (1.98e8, 131.0, 4.51e7)}


@pytest.fixture(autouse=True)
def pinned_static_latency(request, monkeypatch):
    if request.node.get_closest_marker("host_latency") or os.environ.get("FXDECOMP_TEST_HOST_LATENCY") == "1":
        return
    from fxdecomp.onnxrt import static_model

    def pinned(threads=1, cache_dir=None, block=None):
        macs, output_macs, bandwidth = PINNED_RATES.get(threads, PINNED_RATES[2])
        return static_model.Rates(macs_per_ms=macs, output_macs=output_macs, bytes_per_ms=bandwidth, block=block or 16)

    monkeypatch.setattr(static_model, "calibrate", pinned)
    monkeypatch.setattr("fxdecomp.passes.plan.preferred_rank_multiple", lambda threads=1: 16)
