"""Hardware facts: the CPU model, and the rank multiple a target rewards, measured rather than guessed.

onnxruntime's blocked (NCHWc) CPU convolution works on channel blocks (16 floats
with AVX-512, 8 with AVX2) and pads other channel counts up to the block; GPUs and
NPUs have their own tile sizes. `measured_rank_multiple` times a few convs whose
channel counts sit just above and at multiples of 8, 16 and 32 (`multiple_probes`)
with any timer that answers ``sites_ms(spec, shapes)`` (a `LayerLatency`, cached,
or a latency table measured on the device) and picks the block whose padded
channel counts explain the timings best (`rank_multiple_from_times`).

Example::

    from fxdecomp.onnxrt import LayerLatency, measured_rank_multiple
    measured_rank_multiple(LayerLatency(threads=1))   # 16 on an AVX-512 CPU
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError
from ..layer_spec import ConvSpec, layer_spec
from .timing import check_threads, cpu_model

__all__ = [
    "CANDIDATE_MULTIPLES",
    "cpu_model",
    "measured_rank_multiple",
    "multiple_probes",
    "preferred_rank_multiple",
    "rank_multiple_from_times",
]

CANDIDATE_MULTIPLES = (1, 2, 4, 8, 16, 32)
# Just above a multiple of 8, 16, 32 and at one: each block size predicts a different staircase.
PROBE_CHANNELS = (32, 33, 40, 41, 48, 49, 56, 57, 63, 64)
PROBE_SIZE = 28  # a 3x3 conv c -> c at 28 x 28: 1-3 ms at c = 64 on one CPU core, above timer noise


def multiple_probes() -> list[tuple[int, ConvSpec, tuple[int, int, int, int]]]:
    """(channels, spec, input shape) of the probe convs: 3x3, c -> c channels, padding 1, batch 1."""
    probes = []
    for c in PROBE_CHANNELS:
        with torch.device("meta"):
            spec = layer_spec(nn.Conv2d(c, c, 3, padding=1))
        probes.append((c, spec, (1, c, PROBE_SIZE, PROBE_SIZE)))
    return probes


def rank_multiple_from_times(times_ms: Mapping[int, float]) -> int:
    """The block size in `CANDIDATE_MULTIPLES` that best explains probe timings (channels -> ms).

    Model for block B: t(c) = a + s * ceil(c / B)^2 B^2 (a c -> c conv's work on padded
    channels, plus a fixed overhead), a and s fitted by least squares on relative
    errors; the B with the smallest residual wins, the smaller B on ties. Timings
    that follow the plain channel count give 1; a staircase with steps every 16 gives 16.
    """
    channels = sorted(times_ms)
    t = np.array([float(times_ms[c]) for c in channels])
    if len(channels) < 3 or not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise InvalidInputError(f"need at least 3 positive, finite probe timings, got {dict(times_ms)}")
    best, best_residual = 1, math.inf
    for block in CANDIDATE_MULTIPLES:
        padded = np.array([(math.ceil(c / block) * block) ** 2 for c in channels], dtype=np.float64)
        design = np.stack([np.ones_like(padded), padded], axis=1) / t[:, None]
        coef, *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
        residual = float(np.sum((design @ coef - 1.0) ** 2))
        if residual < best_residual * (1 - 1e-9) - 1e-12:
            best, best_residual = block, residual
    return best


def measured_rank_multiple(timer: Any) -> int:
    """The rank multiple the timer's target rewards, from its (cached) timings of `multiple_probes`."""
    return rank_multiple_from_times({c: timer.sites_ms(spec, [shape]) for c, spec, shape in multiple_probes()})


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def preferred_rank_multiple(threads: int = 1) -> int:
    """This CPU's SIMD block from its flags: 16 with AVX-512, else 8 (a prior; planners use `measured_rank_multiple`).

    onnxruntime's blocked (NCHWc) convolution works on channel blocks of 16 floats
    with AVX-512 and 8 with AVX2, and 1.32 pads other channel counts up to the block.
    tools/study_rank_multiples.py on an AVX-512 EPYC: a 3x3 conv 128 -> c costs the
    same for every c in 113..128 and 1.11x that for c in 129..144 (so 8 is not enough);
    a rank 1-3 above a multiple of 16 runs 1.29x slower (median) than the multiple, and
    rounding ResNet-50's plan to 16 instead of 1 lifts its efficiency from 0.73 to 0.98.
    It says nothing about another execution provider or device: the plan pass measures instead.
    """
    check_threads(threads)
    return 16 if "avx512f" in _cpu_flags() else 8
