"""Conv kernels with the structure of trained weights, for factorization tests and benchmarks.

Example::

    kernel = trained_like(64, 32, 3, 3, seed=0)      # (64, 32, 3, 3) float32
"""

from __future__ import annotations

import torch


def trained_like(t: int, s: int, kh: int, kw: int, seed: int = 0) -> torch.Tensor:
    """A (t, s, kh, kw) float32 stand-in for trained weights: decaying spectrum (s_k = 1/k) on the lowered
    (t, s*kh*kw) matrix, plus a CP part with weights 1/k, plus 5% noise (each part of unit norm, seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = s * kh * kw
    m = min(t, n)
    u = torch.linalg.qr(torch.randn(t, m, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    sv = 1.0 / torch.arange(1, m + 1, dtype=torch.float64)
    lowered = ((u * sv) @ v.T).reshape(t, s, kh, kw)
    r0 = min(t, s)
    fs = [torch.randn(d, r0, generator=g, dtype=torch.float64) for d in (t, s, kh, kw)]
    fs = [f / f.norm(dim=0) for f in fs]
    w = 1.0 / torch.arange(1, r0 + 1, dtype=torch.float64)
    cp = torch.einsum("tr,sr,ir,jr->tsij", fs[0] * w, fs[1], fs[2], fs[3])
    noise = torch.randn(t, s, kh, kw, generator=g, dtype=torch.float64)
    return (0.5 * lowered / lowered.norm() + 0.5 * cp / cp.norm() + 0.05 * noise / noise.norm()).float()
