"""``fxdecomp compress-llm``: a Hugging Face causal LM directory compressed block by block, shards in and out.

Runs `fxdecomp.large.compress_sequential` on the checkpoint, never loading the
whole model; under ``torchrun`` every process joins the process group that
torchrun describes and takes its share of the calibration batches and of each
block's factorizations (gloo; the work stays on the CPUs).
"""

from __future__ import annotations

import argparse
import json

from ..progress import Progress
from .args import AddCommand, positive_int
from .errors import EXIT_OK, UsageError
from .loading import parse_budget, use_torch

EXAMPLE = (
    "fxdecomp compress-llm llama-dir --out llama-small --budget 0.8 --scope layers --calibration-text corpus.txt\n"
    "  torchrun --nproc-per-node 2 -m fxdecomp compress-llm llama-dir --out llama-small --budget 0.8   # two processes"
)


def register(command: AddCommand) -> None:
    sub = command(
        "compress-llm", "compress a Hugging Face causal LM directory block by block (safetensors in and out, torchrun-ready)",
        EXAMPLE, run,
    )  # fmt: skip
    sub.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory: config.json and safetensors shards")
    sub.add_argument("--out", required=True, metavar="DIR", help="where the compressed shards, config.json and fxdecomp_plan.json go")
    sub.add_argument("--budget", default="0.8", help="fraction of the FLOPs to keep (default 0.8)")
    sub.add_argument("--scope", choices=("model", "layers"), default="model", help="budget of the whole model's FLOPs (default) or of its Linear layers'")
    sub.add_argument("--tokens", type=positive_int, help="tokens per example and calibration sequence (default 128, or the model's positions if fewer)")
    sub.add_argument("--samples", type=positive_int, default=0, help="calibration sequences (default 0: weight-only)")
    sub.add_argument("--calibration-text", metavar="FILE", help="text cut into the calibration sequences (needs the directory's tokenizer)")
    sub.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="layer name or glob left alone (repeatable)")
    sub.add_argument("--shard-gb", type=float, default=1.0, help="largest output shard in GiB (default 1)")
    sub.add_argument("--device", choices=("cpu", "cuda"), help="where blocks run and are factorized (default: cuda with NCCL under torchrun where CUDA is available, else cpu)")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    torch = use_torch(args.threads)
    from ..large import LazyCheckpoint, compress_sequential
    from ..large.distributed import init_from_environment

    budget = parse_budget(args.budget)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but this torch build sees no CUDA device", "leave --device out or use --device cpu")
    world = init_from_environment(args.device)
    progress = Progress.on_terminal(args.quiet or world.rank > 0)
    checkpoint = LazyCheckpoint(args.model_dir)
    vocab = int(checkpoint.config.get("vocab_size", 0))
    if vocab < 2:
        raise UsageError(f"{args.model_dir}/config.json has no vocab_size", "give the directory of a causal language model")
    positions = next((int(checkpoint.config[k]) for k in ("max_position_embeddings", "n_positions") if isinstance(checkpoint.config.get(k), int)), None)
    if args.tokens is None:
        args.tokens = min(128, positions or 128)
    elif positions is not None and args.tokens > positions:
        raise UsageError(f"--tokens {args.tokens} is more than the model's {positions} positions", f"give --tokens {positions} or fewer")
    example, calibration = _token_batches(args, vocab, torch)
    result = compress_sequential(
        checkpoint, example, budget, calibration, out=args.out, exclude=tuple(args.exclude),
        scope=args.scope, shard_bytes=int(args.shard_gb * 2**30), progress=progress.enabled, device=args.device,
    )  # fmt: skip
    if world.rank > 0:
        return EXIT_OK
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, allow_nan=False))
        return EXIT_OK
    kept = [d for d in result.decisions if d.decomposed]
    print(f"wrote {result.output_dir}: {len(kept)} of {len(result.decisions)} Linear layers decomposed, in {result.seconds:.0f} s")
    for label, before, after in (
        ("FLOPs (2 x MACs)", result.flops_before, result.flops_after),
        ("parameters", result.params_before, result.params_after),
        ("bytes", result.bytes_before, result.bytes_after),
    ):
        print(f"  {label:<17} {before:>16,} -> {after:>16,}  ({after / before:.3f})")
    print("  load it with: fxdecomp.large.load_compressed(" + repr(str(result.output_dir)) + ")")
    return EXIT_OK


def _token_batches(args, vocab: int, torch):
    """(example batch, calibration batches): from --calibration-text with the directory's tokenizer, else random tokens."""
    generator = torch.Generator().manual_seed(0)
    if args.calibration_text:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{args.model_dir} has no tokenizer for --calibration-text ({exc})", "save the tokenizer beside the model, or leave out --calibration-text") from exc
        with open(args.calibration_text, encoding="utf-8") as handle:
            ids = torch.tensor(tokenizer(handle.read())["input_ids"])
        count = max(args.samples, 1)
        if ids.numel() < args.tokens * count:
            raise UsageError(f"{args.calibration_text} holds {ids.numel()} tokens, fewer than {count} x {args.tokens}", "give more text, or fewer --samples / --tokens")
        sequences = ids[: args.tokens * count].reshape(count, 1, args.tokens)
        return (sequences[0],), [(s,) for s in sequences] if args.samples else None
    example = (torch.randint(0, vocab, (1, args.tokens), generator=generator),)
    calibration = [(torch.randint(0, vocab, (1, args.tokens), generator=generator),) for _ in range(args.samples)]
    return example, calibration or None
