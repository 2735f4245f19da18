"""Why fxdecomp's onnxruntime sessions spin within a run only: two sessions timed interleaved, three thread policies.

The figures quoted in `fxdecomp.benchmark.session_options`: ResNet-50 (tools/zoo.py)
at 224x224, two sessions alive and timed alternately, as `compare_latency` does:
onnxruntime's default spinning, never spinning, and spinning within a run only
(``session.force_spinning_stop``). Each line prints both sessions' medians.

    python tools/study_spinning.py                    # ~1 minute
    python tools/study_spinning.py --threads 2 --runs 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxdecomp.export import export_onnx  # noqa: E402
from tools.zoo import build  # noqa: E402

POLICIES = {
    "spinning (onnxruntime default)": {},
    "never spinning": {"session.intra_op.allow_spinning": "0"},
    "spinning within a run (fxdecomp)": {"session.force_spinning_stop": "1"},
}


def session(path: Path, threads: int, config: dict[str, str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    x = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "resnet50.onnx"
        export_onnx(build("resnet50", seed=0), (x,), path, dynamic_batch=False)
        print(f"| policy | session A median ms | session B median ms | ({args.threads} threads, interleaved) |")
        print("|---|---|---|---|")
        for name, config in POLICIES.items():
            sessions = [session(path, args.threads, config) for _ in range(2)]
            feed = {sessions[0].get_inputs()[0].name: x.numpy()}
            for s in sessions * 3:
                s.run(None, feed)
            times: list[list[float]] = [[], []]
            for _ in range(args.runs):
                for k, s in enumerate(sessions):
                    start = time.perf_counter()
                    s.run(None, feed)
                    times[k].append(1000 * (time.perf_counter() - start))
            print(f"| {name} | {np.median(times[0]):.2f} | {np.median(times[1]):.2f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
