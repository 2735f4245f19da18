"""Real-client zoo for `fxdecomp.large.compress_sequential`: causal LMs of many architectures, streamed from disk.

Each model (a small config with random weights, built by transformers) is saved with
``save_pretrained``, compressed from that directory to 0.8 of its FLOPs with 4 calibration
batches, written out, read back with ``load_compressed``, and run. It is also compressed in
memory, its model saved with ``save_pretrained`` and read back with ``load_compressed`` (the
record in its config), which must give the same logits. One row per model: FLOPs kept
(fxdecomp's count), the relative error of the logits against the original, the in-memory
round trip, seconds, or the error (a named refusal is an ``InvalidInputError`` /
``BudgetError``; anything else is a bug).

    python tools/zoo_large.py
    python tools/zoo_large.py --models falcon,bloom,mamba
    python tools/zoo_large.py --suite moe --budget 0.5    # the mixtures of experts of zoo_more.HF_MOE

The notes say how many stacked experts were decomposed ("experts: decomposed / planned").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxdecomp  # noqa: E402
from fxdecomp.large import compress_sequential, load_compressed  # noqa: E402
from zoo_clients import HF, SMALL, _causal  # noqa: E402
from zoo_more import HF_MOE  # noqa: E402

MODELS = {
    **{name: HF[name] for name in ("gpt2", "llama-gqa", "qwen2", "phi", "gpt-neox", "opt", "gemma2", "phi3", "falcon", "bloom",
                                   "gpt-bigcode", "mixtral-moe", "mamba")},
    "gemma": _causal("GemmaConfig", num_key_value_heads=1, head_dim=16, max_position_embeddings=64, **SMALL),
    "gptj": _causal("GPTJConfig", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, rotary_dim=8),
    "codegen": _causal("CodeGenConfig", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, n_ctx=64, rotary_dim=8),
    "stablelm": _causal("StableLmConfig", num_key_value_heads=2, max_position_embeddings=64, **SMALL),
    "olmo": _causal("OlmoConfig", num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **SMALL),
    "starcoder2": _causal("Starcoder2Config", num_key_value_heads=2, max_position_embeddings=64, **SMALL),
    "granite": _causal("GraniteConfig", num_key_value_heads=2, max_position_embeddings=64, **SMALL),
    "qwen3": _causal("Qwen3Config", num_key_value_heads=2, head_dim=16, max_position_embeddings=64, **SMALL),
    "qwen2-moe": _causal("Qwen2MoeConfig", num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32, shared_expert_intermediate_size=64, **SMALL),
}


def run(name: str, budget: float) -> str:
    torch.manual_seed(0)
    model, (ids,) = MODELS[name]()
    batches = [(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(s)),) for s in range(4)]
    start = time.perf_counter()
    experts_note = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(f"{folder}/src")
                result = compress_sequential(f"{folder}/src", (ids,), budget=budget, calibration=batches, out=f"{folder}/out")
                small = load_compressed(f"{folder}/out")
                with torch.no_grad():
                    want, got = model(ids).logits, small(ids).logits
            row = f"{result.flops_after / result.flops_before:.3f} | {float((got - want).norm() / want.norm()):.3f} |"
            experts = [d for d in result.decisions if re.search(r"_expert\d+$", d.name)]
            if experts:
                experts_note = f"experts: {sum(d.method != 'keep' for d in experts)} / {len(experts)}"
        except fxdecomp.FxDecompError as exc:
            row = f"- | - | refused: {type(exc).__name__}: {str(exc).splitlines()[0][:160]} |"
        except Exception as exc:  # a bug: a raw error from inside
            row = f"- | - | FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:160]} |"
        row += " " + _saved_in_memory(model, ids, budget, batches) + " |"
    notes = "; ".join([experts_note] * bool(experts_note) + [str(w.message).splitlines()[0][:120] for w in caught if "fxdecomp" in str(w.message)])
    return f"| {name} | {row} {notes} | {time.perf_counter() - start:.1f} |"

def _saved_in_memory(model, ids, budget: float, batches) -> str:
    """compress_sequential in memory, its model saved with save_pretrained and loaded back: "same" when the logits are."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            result = compress_sequential(model, (ids,), budget=budget, calibration=batches)
            result.model.save_pretrained(folder)
            with torch.no_grad():
                want, got = result.model(ids).logits, load_compressed(folder)(ids).logits
    except fxdecomp.FxDecompError as exc:
        return f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    except Exception as exc:  # a bug: a raw error from inside
        return f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        return f"differs ({float((got - want).abs().max()):.2e})"
    return f"same ({result.flops_after / result.flops_before:.3f} of the FLOPs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated subset")
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--suite", choices=["default", "moe"], default="default", help="moe: zoo_more.HF_MOE's models")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; compress_sequential from a saved checkpoint at {args.budget} of the FLOPs, 4 calibration batches")
    print("| model | FLOPs kept | logits error | in memory, save_pretrained, load_compressed | notes | s |")
    print("|---|---|---|---|---|---|")
    if args.suite == "moe":
        MODELS.update(HF_MOE)
    for name in args.models.split(",") if args.models else (HF_MOE if args.suite == "moe" else MODELS):
        print(run(name, args.budget), flush=True)


if __name__ == "__main__":
    main()
