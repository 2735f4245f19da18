"""A latency budget planned from a table measured on the "device", end to end.

1. ``fxdecomp.latency_pack.latency_pack``: the ONNX file of every structure the planner
   may pick, for a small VGG-style CNN (or ``--zoo vgg16`` at 224x224 from tools/zoo.py).
2. ``device_bench.py`` from the pack, run in a subprocess with ``python -S`` on a
   sys.path holding only onnxruntime's and numpy's folders (no torch, no fxdecomp: the
   device), writes ``table.json``.
3. ``fxdecomp.compress(..., budget=Budget(latency=F), pipeline=load_recipe(...).with_options(
   plan={"latency_table": "table.json"}))``: the plan, its predicted latency on the device.
4. For comparison, the plan's model timed here (`fxdecomp.onnxrt.compare_models_ms`):
   this machine stands in for the device, so prediction and measurement can be compared.

Usage::

    python tools/plan_from_table.py                       # small CNN, budget 0.6, ~1-2 minutes on 2 shared cores
    python tools/plan_from_table.py --budget 0.7 --keep pack_dir/
    python tools/plan_from_table.py --zoo vgg16 --budget 0.6 --methods svd,tucker2   # long: VGG-16's pack is large
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxruntime  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxdecomp  # noqa: E402
from fxdecomp.latency_pack import latency_pack  # noqa: E402
from fxdecomp.onnxrt import compare_models_ms  # noqa: E402


def small_cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers, c_in = [], 3
    for c_out in (64, 64, "M", 128, 128, "M", 256):
        if c_out == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
        c_in = c_out
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model.eval(), torch.randn(1, 3, 56, 56)


def device_command(script: Path, args: list[str]) -> list[str]:
    """python -S with only onnxruntime's and numpy's site folder entries on sys.path (links in a temp dir)."""
    site = Path(onnxruntime.__file__).parent.parent
    links = Path(tempfile.mkdtemp(prefix="fxdecomp-device-path-"))
    for name in ("onnxruntime", "numpy", "numpy.libs", "google", "flatbuffers", "packaging"):
        if (site / name).exists():
            (links / name).symlink_to(site / name)
    boot = (
        f"import sys, runpy; sys.path[1:1] = [{str(links)!r}, {str(script.parent)!r}]; "
        "assert not any(__import__('importlib.util').util.find_spec(m) for m in ('torch', 'fxdecomp')); "
        f"sys.argv = [{str(script)!r}, *sys.argv[1:]]; runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    return [sys.executable, "-S", "-c", boot, *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.6, help="latency fraction to keep (default 0.6)")
    parser.add_argument("--methods", default="svd,tucker2", help="methods (default svd,tucker2)")
    parser.add_argument("--zoo", help="a model of tools/zoo.py (vgg16, resnet50) at 224x224 instead of the small CNN")
    parser.add_argument("--keep", help="write the pack and table here instead of a temp dir")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.zoo:
        from tools.zoo import build

        model, x = build(args.zoo).eval(), torch.randn(1, 3, 224, 224)
    else:
        model, x = small_cnn()
    methods = args.methods.split(",")
    work = Path(args.keep or tempfile.mkdtemp(prefix="fxdecomp-table-"))
    pack_dir, table = work / "pack", work / "table.json"

    start = time.perf_counter()
    pack = latency_pack(model, (x,), pack_dir, methods=methods)
    print(f"pack: {pack.layers} layer/option files, {pack.probes} probes, model; {pack.bytes / 1e6:.1f} MB; {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(device_command(pack_dir / "device_bench.py", [str(pack_dir), "--out", str(table), "-q"]), env=env, cwd=work, text=True, capture_output=True)
    if done.returncode:
        sys.exit(f"device_bench.py failed:\n{done.stderr}")
    print(done.stdout.strip(), f"({time.perf_counter() - start:.1f} s)")
    data = json.loads(table.read_text())
    print(f"table: device {data['device']}, {data['provider']} {data['provider_options']}, {data['threads']} thread(s), onnxruntime {data['onnxruntime']}")

    recipe = fxdecomp.load_recipe("default").with_options(plan={"latency_table": str(table)})
    start = time.perf_counter()
    result = fxdecomp.compress(model, (x,), budget=fxdecomp.Budget(latency=args.budget), methods=methods, pipeline=recipe)
    print(f"planned from the table in {time.perf_counter() - start:.1f} s (no timing here)\n")
    print(result.report())
    predicted = result.latency_after_ms / result.latency_before_ms
    before, after = compare_models_ms(model, result.graph_module, (x,), rounds=50)
    print(
        f"\nbudget {args.budget:g}: predicted from the table {result.latency_before_ms:.3f} -> {result.latency_after_ms:.3f} ms "
        f"({predicted:.3f}); timed here, interleaved: {before:.3f} -> {after:.3f} ms ({after / before:.3f})"
    )


if __name__ == "__main__":
    main()
