"""Perplexity of a causal LM and of its compressed version, side by side, on a text file.

    python tools/perplexity.py ORIGINAL_DIR COMPRESSED_DIR --text tools/data/sentences.txt [--window 256]

ORIGINAL_DIR is a Hugging Face model directory; COMPRESSED_DIR one written by
`fxdecomp compress-llm` (or `fxdecomp.large.compress_sequential(..., out=...)`).
The text is tokenized with the tokenizer saved in ORIGINAL_DIR; a model built
from a config has none, and then the text's UTF-8 bytes (modulo the
vocabulary) stand in for tokens, which still compares the two models on one
fixed stream.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def token_ids(model_dir: Path, text: str, vocab: int) -> tuple[torch.Tensor, str]:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return torch.tensor(tokenizer(text)["input_ids"]), f"tokenizer of {model_dir.name}"
    except (OSError, ValueError, TypeError):
        return torch.tensor(list(text.encode("utf-8"))) % vocab, "UTF-8 bytes modulo the vocabulary (no tokenizer)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path)
    parser.add_argument("compressed", type=Path)
    parser.add_argument("--text", type=Path, default=Path(__file__).parent / "data" / "sentences.txt")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from fxdecomp.large import load_compressed
    from fxdecomp.large.perplexity import perplexity

    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_pretrained(args.original).eval()
    ids, how = token_ids(args.original, args.text.read_text(), original.config.vocab_size)
    ids = ids[: args.max_tokens]
    print(f"{ids.numel()} tokens ({how}), window {args.window}")
    print("| model | perplexity | seconds |\n|---|---|---|")
    for name, load in (("original", lambda: original), ("compressed", lambda: load_compressed(args.compressed))):
        model = load()
        start = time.perf_counter()
        value = perplexity(model, ids, window=args.window)
        print(f"| {name} | {value:.3f} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
