"""Data-free Gram matrices from the BatchNorms around a layer: what a weight-only plan can know of the data.

A relative weight error ||dW|| / ||W|| treats every output row and input column of
a layer alike. In a lean mobile network (depthwise / pointwise convs, each followed
by a BatchNorm) they are not alike: the BatchNorm after a conv multiplies output
channel i by s_i = gamma_i / sqrt(var_i + eps), and these scales spread over orders
of magnitude (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", section 3.1); a truncation that drops a weak row of W can
remove a strongly amplified channel. The BatchNorm before a layer (through an
elementwise activation) says, without data, how large each input channel is: its
output is about N(beta_j, gamma_j^2) (the same paper, section 4.2).

So, per candidate, this module builds:

- an input Gram matrix G = diag(E[x_j^2]) (repeated over the kernel positions of a
  conv), E[x_j^2] = beta_j^2 + gamma_j^2 for a BatchNorm output, and the closed form
  of a rectified Gaussian behind a ReLU / ReLU6 (`rectified_second_moment`); the
  identity when no BatchNorm precedes;
- an output-side Gram matrix H = diag(s_i^2) of the BatchNorm that follows the
  layer (None when none follows),

as `PriorGram` objects that stand in for calibration accumulators
(`fxdecomp.calibration.GramAccumulator`): the whitened SVD and the damage model
then measure a layer's error on its BatchNorm's output. They carry ``prior = True``,
so their errors are not scaled by output energies (those need measured gradients).

Example::

    grams, output_grams = batchnorm_priors(gm, candidates)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

# A known diagonal needs no ridge against sampling noise, only against exact zeros (dead channels):
# the ridge of measured Gram matrices (1 % of the mean) would flatten BatchNorm scales that spread
# over orders of magnitude, the very thing the prior is for.
PRIOR_DAMPING = 1e-6

# Elementwise activations a prior may look through (modules and functions).
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity)
_aten = torch.ops.aten
# torch.fx records the functions; torch.export their aten overloads (nn.ReLU6 as hardtanh(x, 0, 6), F.relu6 as relu6).
_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu6, F.silu, F.hardswish, F.gelu, F.leaky_relu, F.elu, F.mish, torch.relu,
    _aten.relu.default, _aten.relu_.default, _aten.relu6.default, _aten.hardtanh.default, _aten.hardtanh_.default, _aten.silu.default,
    _aten.silu_.default, _aten.hardswish.default, _aten.hardswish_.default, _aten.gelu.default, _aten.leaky_relu.default,
    _aten.leaky_relu_.default, _aten.elu.default, _aten.elu_.default, _aten.mish.default, _aten.mish_.default,
}  # fmt: skip
_RECTIFIERS = (nn.ReLU, nn.ReLU6)
_RECTIFIER_FUNCTIONS = {F.relu, F.relu6, torch.relu, _aten.relu.default, _aten.relu_.default, _aten.relu6.default}
_HARDTANH = {_aten.hardtanh.default, _aten.hardtanh_.default}


@dataclass
class PriorGram:
    """A fixed diagonal Gram matrix per group, with the interface the planner reads from an accumulator."""

    diagonals: list[torch.Tensor]  # per group: (dim,) float64, the diagonal
    prior: bool = True

    @property
    def groups(self) -> int:
        return len(self.diagonals)

    def matrix(self, group: int = 0, damping: float = PRIOR_DAMPING) -> torch.Tensor:
        """The group's diagonal Gram matrix (dim x dim, float64), barely damped (see PRIOR_DAMPING)."""
        diagonal = self.diagonals[group]
        ridge = damping * float(diagonal.mean()) if diagonal.numel() else 0.0
        return torch.diag(diagonal + ridge)


def rectified_second_moment(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[max(z, 0)^2] for z ~ N(mean, std^2), elementwise: (mu^2 + s^2) Phi(mu/s) + mu s phi(mu/s)."""
    std = std.abs().clamp_min(1e-12)
    ratio = mean / std
    cdf = 0.5 * (1 + torch.erf(ratio / math.sqrt(2)))
    pdf = torch.exp(-0.5 * ratio**2) / math.sqrt(2 * math.pi)
    return ((mean**2 + std**2) * cdf + mean * std * pdf).clamp_min(0.0)


def _module(gm: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        try:
            return gm.get_submodule(str(node.target))
        except AttributeError:
            return None
    return None


def _is_batchnorm(module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.track_running_stats


def _batchnorm_scale(module) -> torch.Tensor:
    """s = gamma / sqrt(running_var + eps), float64."""
    return (module.weight.detach() / (module.running_var.detach() + module.eps).sqrt()).to(torch.float64)


def _input_moments(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """E[x_j^2] per channel of ``node``'s value when it is a BatchNorm's output through at most one activation."""
    rectified = False
    for _ in range(2):
        module = _module(gm, node)
        if _is_batchnorm(module):
            mean, std = module.bias.detach().to(torch.float64), module.weight.detach().to(torch.float64)
            return rectified_second_moment(mean, std) if rectified else mean**2 + std**2
        is_activation = isinstance(module, _ACTIVATION_MODULES) or (
            node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS
        )
        if not is_activation or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        rectified = isinstance(module, _RECTIFIERS) or (node.op == "call_function" and node.target in _RECTIFIER_FUNCTIONS) or (
            node.op == "call_function" and node.target in _HARDTANH and len(node.args) > 1 and node.args[1] == 0
        )
        node = node.args[0]
    return None


def _output_scale(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """s per output channel when ``node``'s only user is a BatchNorm in eval mode (running statistics)."""
    users = list(node.users)
    if len(users) != 1:
        return None
    module = _module(gm, users[0])
    if not _is_batchnorm(module) or module.training:
        return None
    return _batchnorm_scale(module)


def batchnorm_priors(gm: fx.GraphModule, candidates) -> tuple[dict[str, PriorGram], dict[str, PriorGram]]:
    """(input priors, output-side priors) by candidate name, for Conv2d candidates with a BatchNorm around them.

    A candidate gets an input prior when a BatchNorm or an output prior exists for it
    (the input one is then the identity where no BatchNorm precedes), and an output prior
    only where every call site's output feeds one BatchNorm with the same channel count.
    Candidates with several call sites that disagree, Linear layers and other kinds get none.
    """
    grams: dict[str, PriorGram] = {}
    output_grams: dict[str, PriorGram] = {}
    for name, candidate in candidates.items():
        if candidate.excluded or candidate.kind != "conv2d" or len(candidate.sites) != 1:
            continue
        spec, site = candidate.spec, candidate.sites[0]
        moments = _input_moments(gm, site.input_node) if isinstance(site.input_node, fx.Node) else None
        scale = _output_scale(gm, site.node)
        if moments is not None and moments.numel() != spec.in_channels:
            moments = None
        if scale is not None and scale.numel() != spec.out_channels:
            scale = None
        if moments is None and scale is None:
            continue
        if moments is None:
            moments = torch.ones(spec.in_channels, dtype=torch.float64)
        # Lowered conv columns are channel-major: channel j covers kernel_area consecutive columns.
        columns = moments.repeat_interleave(spec.kernel_area).clamp_min(0.0)
        grams[name] = PriorGram(list(columns.split(spec.in_per_group * spec.kernel_area)))
        if scale is not None:
            output_grams[name] = PriorGram(list((scale**2).split(spec.out_per_group)))
    return grams, output_grams
