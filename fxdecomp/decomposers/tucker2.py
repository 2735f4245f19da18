"""Tucker-2 (Kim et al. 2016): 1x1 (S->r_in), core kh x kw (r_in->r_out), 1x1 (r_out->T).

Ranks are (r_in, r_out), input side first; grouped convs are factorised group by
group (each group gets r_in and r_out channels).
"""

from __future__ import annotations

import torch
from torch import nn

from ..factorize.tucker import tucker2_hosvd
from .base import Decomposer, combined_error, conv, group_slices, leading_pad, register


@register
class ConvTucker2(Decomposer):
    kind, method = "conv2d", "tucker2"

    def max_ranks(self, spec):
        return (spec.in_per_group, spec.out_per_group)

    def structure(self, spec, ranks):
        r_in, r_out = ranks
        pads, padding = leading_pad(spec)
        g = spec.groups
        return nn.Sequential(
            *pads,
            conv(spec.in_channels, g * r_in, groups=g),
            conv(g * r_in, g * r_out, spec.kernel_size, spec.stride, padding, spec.dilation, groups=g),
            conv(g * r_out, spec.out_channels, groups=g, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        blocks = group_slices(spec, weight)
        return blocks, [tucker2_hosvd(b) for b in blocks]

    def error(self, spec, state, ranks):
        blocks, tuckers = state
        return combined_error([t.relative_error(*ranks) for t in tuckers], blocks.norms)

    def reconstruct(self, spec, state, ranks):
        return torch.cat([torch.einsum("ta,abij,sb->tsij", u_out, core, u_in) for core, u_in, u_out in (t.factors(*ranks) for t in state[1])])

    def load(self, module, spec, state, ranks):
        r_in, r_out = ranks
        first, core_conv, last = module[-3], module[-2], module[-1]
        tg = spec.out_per_group
        for g, tucker in enumerate(state[1]):
            core, u_in, u_out = tucker.factors(r_in, r_out)
            with torch.no_grad():
                first.weight[g * r_in : (g + 1) * r_in].copy_(u_in.T[:, :, None, None])
                core_conv.weight[g * r_out : (g + 1) * r_out].copy_(core)
                last.weight[g * tg : (g + 1) * tg].copy_(u_out[:, :, None, None])

    def rank_spectra(self, spec, state):
        tuckers = state[1]
        return [[t.in_spectrum for t in tuckers], [t.out_spectrum for t in tuckers]]
