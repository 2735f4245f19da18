"""Peak memory and time of the sequential pipeline against model size (Llama-style, random weights).

    python tools/bench_scale.py                       # ~0.1 B to ~0.8 B parameters, with and without calibration
    python tools/bench_scale.py --sizes 0.1b --whole  # also the whole-model fxdecomp.compress, for contrast
    python tools/bench_scale.py --sizes 7b --dtype bfloat16 --calibration-only   # the Llama-2-7B shape
    python tools/bench_scale.py --sizes moe-0.4b      # a Mixtral-style mixture of experts (8 experts, top 2)

Each model is written once as safetensors shards (a Hugging Face directory under
--work), then compressed in a fresh process by `fxdecomp.large.compress_sequential`
reading it lazily, at --budget of the Linear FLOPs (scope "layers"), without
and with calibration (--samples batches of --tokens random tokens). A row gives
the peak RSS of that process (VmHWM, which includes the interpreter and
libraries: the "imports" row is that baseline), its ratio to the model's bytes
and to one block's bytes, and the seconds. The last lines print how peak and
time grow from the smallest size to the largest.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 2, 4, 2, 256),
    "0.1b": (768, 2048, 12, 12, 4, 32000),
    "0.3b": (1024, 2816, 20, 16, 4, 32000),
    "0.5b": (1536, 4096, 16, 16, 4, 32000),
    "0.8b": (2048, 5632, 16, 16, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "7b-2l": (4096, 11008, 2, 32, 32, 32000),  # two blocks of the 7B shape: per-block time and peak, quickly
    "7b-6l": (4096, 11008, 6, 32, 32, 32000),  # six: past the first 1 GiB output shard
}
# Mixtral-style mixtures of experts: the sizes above, then experts and experts per token. Their checkpoints
# store the experts one per expert, as save_pretrained writes them; transformers fuses them on load.
MOE_SIZES = {
    "moe-tiny": (64, 128, 2, 4, 2, 256, 4, 2),
    "moe-0.4b": (1024, 1408, 8, 16, 4, 32000, 8, 2),
}

CHILD = r"""
import json, sys, time, torch
torch.manual_seed(0)
path, out, budget, samples, tokens, whole = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
from transformers import AutoConfig
vocab = AutoConfig.from_pretrained(path).vocab_size
import fxdecomp
from fxdecomp.large import compress_sequential
example = (torch.randint(0, vocab, (1, tokens)),)
calibration = [(torch.randint(0, vocab, (1, tokens)),) for _ in range(samples)] or None
start = time.perf_counter()
if whole:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    result = fxdecomp.compress(model, example, budget=budget, calibration=calibration)
    kept = result.flops_after / result.flops_before
else:
    result = compress_sequential(path, example, budget=budget, calibration=calibration, out=out, scope="layers", progress=True)
    kept = sum(d.flops_after for d in result.decisions) / sum(d.flops_before for d in result.decisions)
experts = [d for d in result.decisions if "_expert" in d.name.rpartition(".")[2] and d.name.rpartition("_expert")[2].isdigit()]
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - start, "peak": peak, "kept": kept,
                  "experts": f"{sum(d.method != 'keep' for d in experts)} / {len(experts)}" if experts else ""}))
"""

# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report the parent's peak when that was
# higher (as after the parent built a mixture of experts in memory to save_pretrained it).
IMPORTS = ("import torch, transformers, fxdecomp.large; "
           "print(next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM:')))")


def write_model(name: str, path: Path, dtype: str) -> tuple[int, int, int]:
    """Write a random Llama-style (or Mixtral-style) checkpoint; (parameters, bytes, bytes of one block)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    moe = name in MOE_SIZES
    hidden, intermediate, layers, heads, kv, vocab, *experts = MOE_SIZES[name] if moe else SIZES[name]
    shape = dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False, use_cache=False, torch_dtype=dtype,
    )
    config = MixtralConfig(**shape, num_local_experts=experts[0], num_experts_per_tok=experts[1]) if moe else LlamaConfig(**shape)
    with init_empty_weights():
        skeleton = (MixtralForCausalLM if moe else LlamaForCausalLM)(config)
    block_params = sum(p.numel() for p in skeleton.model.layers[0].parameters())
    params = sum(p.numel() for p in skeleton.parameters())
    width = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    if not (path / "config.json").is_file():
        if moe:  # save_pretrained writes the experts as transformers stores them (one tensor per expert)
            torch.manual_seed(0)
            (MixtralForCausalLM(config).to(getattr(torch, dtype))).save_pretrained(path, max_shard_size="2GB")
        else:
            _write_random(skeleton, config, path, getattr(torch, dtype))
    return params, params * width, block_params * width


def _write_random(skeleton, config, path: Path, dtype) -> None:
    """Random weights written tensor by tensor (a 7 B model never sits whole in memory)."""
    import torch

    from fxdecomp.large import ShardWriter

    generator = torch.Generator().manual_seed(0)
    writer = ShardWriter(path, max_shard_bytes=2 << 30)
    for name, param in skeleton.named_parameters():
        if name.endswith("norm.weight"):
            tensor = torch.ones(param.shape, dtype=dtype)
        else:
            tensor = (torch.randn(param.shape, generator=generator) * 0.02).to(dtype)
        writer.add(name, tensor)
    writer.close()
    config.save_pretrained(path)


def run(path: Path, out: Path, budget: float, samples: int, tokens: int, whole: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    log = out.with_suffix(".log")  # the child's progress (per block, with an ETA): tail -f it on long runs
    with log.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(out), str(budget), str(samples), str(tokens), "1" if whole else "0"],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    if done.returncode:
        return {"error": (log.read_text().strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.1b", "0.3b", "0.5b", "0.8b"], choices=sorted(SIZES) + sorted(MOE_SIZES))
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--calibration-only", action="store_true")
    parser.add_argument("--whole", action="store_true", help="also run the whole-model fxdecomp.compress (smallest size)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fxdecomp-scale"))
    args = parser.parse_args()
    baseline = int(subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True).stdout)
    print(f"threads: torch default; imports alone peak at {baseline / 2**30:.2f} GiB RSS")
    print("| size | params | model GiB | pipeline | calibration | peak RSS GiB | peak / model | peak / block | seconds | FLOPs kept |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.sizes:
        start = time.perf_counter()
        params, nbytes, block = write_model(name, args.work / f"{name}-{args.dtype}", args.dtype)
        print(f"(wrote {name} in {time.perf_counter() - start:.0f} s)", file=sys.stderr)
        cases = [(s, False) for s in ((args.samples,) if args.calibration_only else (0, args.samples))]
        if args.whole and name == args.sizes[0]:
            cases += [(s, True) for s in ((args.samples,) if args.calibration_only else (0, args.samples))]
        for samples, whole in cases:
            got = run(args.work / f"{name}-{args.dtype}", args.work / "out", args.budget, samples, args.tokens, whole)
            pipeline = "whole model" if whole else "sequential"
            calibration = f"{samples} x {args.tokens}" if samples else "none"
            if "error" in got:
                print(f"| {name} | {params / 1e9:.2f} B | {nbytes / 2**30:.2f} | {pipeline} | {calibration} | {got['error']} | | | | |")
                continue
            rows.append((name, samples, whole, got))
            print(
                f"| {name} | {params / 1e9:.2f} B | {nbytes / 2**30:.2f} | {pipeline} | {calibration} | "
                f"{got['peak'] / 2**30:.2f} | {got['peak'] / nbytes:.2f} | {got['peak'] / block:.1f} | "
                f"{got['seconds']:.0f} | {got['kept']:.3f}{' (experts decomposed: ' + got['experts'] + ')' if got.get('experts') else ''} |",
                flush=True,
            )
    for samples in sorted({r[1] for r in rows}):
        series = [(n, g) for n, s, w, g in rows if s == samples and not w]
        if len(series) > 1:
            (n0, first), (n1, last) = series[0], series[-1]
            params0, params1 = (write_model(n, args.work / f"{n}-{args.dtype}", args.dtype)[0] for n in (n0, n1))
            print(
                f"calibration {samples or 'none'}: {n0} -> {n1} ({params1 / params0:.1f}x the parameters): "
                f"peak RSS x{first['peak'] and last['peak'] / first['peak']:.2f} "
                f"(above the imports: x{(last['peak'] - baseline) / max(first['peak'] - baseline, 1):.2f}), "
                f"time x{last['seconds'] / first['seconds']:.1f}"
            )


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
