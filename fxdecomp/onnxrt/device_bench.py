"""Time a latency pack on the target device and write a latency table; needs only onnxruntime and numpy.

A user on the device (an ARM board, a GPU server, an NPU behind an onnxruntime
execution provider), with the folder written by ``fxdecomp latency-pack``::

    pip install onnxruntime numpy          # or the device's onnxruntime build
    python PACK/device_bench.py PACK --out table.json
    python PACK/device_bench.py PACK --out table.json --provider CUDAExecutionProvider \\
        --provider-option device_id=0 --threads 1
    python PACK/device_bench.py --list-providers

then, back on the build machine, plan from the table::

    fxdecomp.compress(model, x, budget=fxdecomp.Budget(latency=0.6),
                      pipeline=fxdecomp.load_recipe("default").with_options(plan={"latency_table": "table.json"}))

Every file is timed alone by `timing.Protocol.time_model`, the loop fxdecomp's
layer-latency cache uses (same warm-up, repeats and minimum time); the pack
carries a copy of ``timing.py`` and ``files.py`` beside this script. The table
format is described in `fxdecomp.onnxrt.table`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:  # imported as part of fxdecomp
    from .files import atomic_write_text
    from .timing import InvalidInputError, Protocol, Provider, device_facts
except ImportError:  # run as a script from a latency pack: its two modules lie beside it
    # The folder is put on the path explicitly: with PYTHONSAFEPATH=1 (or python -P) Python leaves it off.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from files import atomic_write_text  # type: ignore[no-redef]
    from timing import InvalidInputError, Protocol, Provider, device_facts  # type: ignore[no-redef]

MANIFEST_FORMAT = "fxdecomp-latency-pack"
TABLE_FORMAT = "fxdecomp-latency-table"
VERSION = 1


def parse_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def bench_pack(
    pack_dir: str | Path,
    *,
    provider: Provider,
    threads: int = 1,
    protocol: Protocol | None = None,
    progress: bool = True,
) -> dict:
    """Time every file of the pack in ``pack_dir``; returns the table (a JSON-able dict)."""
    pack_dir = Path(pack_dir)
    try:
        manifest = json.loads((pack_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read {pack_dir / 'manifest.json'}: {exc}; give the folder written by fxdecomp latency-pack") from exc
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != VERSION:
        raise InvalidInputError(f"{pack_dir / 'manifest.json'} is not a latency pack manifest ({MANIFEST_FORMAT}, version {VERSION})")
    protocol = protocol or Protocol(**manifest.get("protocol", {}))
    entries, start = [], time.perf_counter()
    for i, entry in enumerate(manifest["entries"]):
        how = Protocol(**entry["protocol"]) if "protocol" in entry else protocol
        stats = how.time_model(pack_dir / entry["file"], threads, provider)
        entries.append({"key": entry["key"], "file": entry["file"], "what": entry.get("what", {}), **stats})
        if progress:
            print(f"\r[{i + 1}/{len(manifest['entries'])}] {entry['file']}: {stats['median_ms']:.3f} ms", end="", file=sys.stderr, flush=True)
    if progress:
        print(f"\ntimed {len(entries)} files in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    facts = device_facts()
    return {
        "format": TABLE_FORMAT,
        "version": VERSION,
        "device": facts,
        **provider.as_dict(),
        "threads": threads,
        "onnxruntime": facts["onnxruntime"],
        "protocol": protocol.to_dict(),
        "entries": entries,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="device_bench.py",
        description="Time the ONNX files of an fxdecomp latency pack with onnxruntime and write a latency table (JSON).",
        epilog="example: python device_bench.py pack/ --out table.json --provider CPUExecutionProvider --threads 1",
    )
    parser.add_argument("pack", nargs="?", help="the folder written by 'fxdecomp latency-pack' (holds manifest.json)")
    parser.add_argument("--out", help="the table to write (JSON)")
    parser.add_argument("--provider", default="CPUExecutionProvider", help="onnxruntime execution provider (default CPUExecutionProvider)")
    parser.add_argument("--provider-option", action="append", default=[], type=parse_option, metavar="KEY=VALUE", help="a provider option (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--warmup", type=int, help="untimed runs per file after the first (default: the pack's, 1)")
    parser.add_argument("--runs", type=int, help="timed runs per file at least (default: the pack's, 5)")
    parser.add_argument("--min-seconds", type=float, help="keep timing a file until this long (default: the pack's, 0.05)")
    parser.add_argument("--list-providers", action="store_true", help="print the execution providers this onnxruntime has, and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    import onnxruntime

    if args.list_providers:
        print("\n".join(onnxruntime.get_available_providers()))
        return 0
    if not args.pack or not args.out:
        parser.error("give the pack folder and --out table.json")
    try:
        provider = Provider.resolve(args.provider, dict(args.provider_option))
        settings = {k: v for k, v in (("warmup", args.warmup), ("runs", args.runs), ("min_seconds", args.min_seconds)) if v is not None}
        protocol = None
        if settings:
            manifest = json.loads((Path(args.pack) / "manifest.json").read_text(encoding="utf-8"))
            protocol = Protocol(**{**manifest.get("protocol", {}), **settings})
        table = bench_pack(args.pack, provider=provider, threads=args.threads, protocol=protocol, progress=not args.quiet)
    except (InvalidInputError, OSError, ValueError) as exc:
        print(f"device_bench.py: error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(args.out, json.dumps(table, indent=1))
    print(f"wrote {args.out}: {len(table['entries'])} entries, {provider.name}, {table['device']['processor']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
