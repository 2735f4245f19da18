"""CP factors of a conv kernel fitted to the calibration data (the data-aware `cp` method).

Lebedev et al. (ICLR 2015) give the structure; the fit minimises the output-weighted error
||H^(1/2) (W - W_hat) G^(1/2)|| by whitening the kernel mode by mode with the Kronecker
factors of G (`fxdecomp.factorize.fitted.mode_grams`, as K-FAC does) and H, decomposing it
with `fxdecomp.factorize.cp.cp_conv_kernel`, and refitting the output factor by exact
weighted least squares (after Zhang et al., TPAMI 2015).
"""

from __future__ import annotations

import torch

from .cp import CPFactors, _balance, _check_inputs, _khatri_rao3, _solve, cp_conv_kernel, max_cp_rank
from .fitted import mode_grams, psd_power


def fitted_cp(
    kernel: torch.Tensor,
    rank: int,
    gram: torch.Tensor,
    output_weight: tuple[torch.Tensor, torch.Tensor] | None = None,
    **options,
) -> CPFactors:
    """CP factors of a (T, S, a, b) kernel fitted to the data: least ||H^(1/2) (W - W_hat) G^(1/2)||.

    ``gram`` is the (S*a*b)^2 Gram matrix of the layer's input patches (C order, as the
    kernel's trailing modes), ``output_weight`` (H^(1/2), H^(-1/2)) of an output Gram matrix
    or None. The kernel is whitened mode by mode with the Kronecker factors of G (its
    partial traces, `fxdecomp.factorize.fitted.mode_grams`) and H, CP-decomposed by
    `cp_conv_kernel` (``options``: max_iter, tol, seed), the factors mapped back, and the
    output factor refitted by exact weighted least squares on G (one ALS step in the true
    metric, which never increases the error). ``relative_error`` is then the relative output
    error ||H^(1/2) (W - W_hat) G^(1/2)|| / ||H^(1/2) W G^(1/2)||, the planner's damage.
    At ``rank >= max_cp_rank`` the exact decomposition is returned (its error is zero either way).
    Sources: Lebedev et al. (ICLR 2015) for the structure; the data-driven, whitened fit
    after Zhang et al. (TPAMI 2015) and K-FAC's Kronecker-factored Gram matrices.
    """
    rank = _check_inputs(kernel, rank, options.get("max_iter", 200), options.get("tol", 1e-6))
    dims = tuple(kernel.shape)
    t_dim = dims[0]
    w = kernel.detach().to(torch.float64)
    g = gram.to(torch.float64)
    sqrt, inv_sqrt = output_weight if output_weight is not None else (None, None)
    lowered = w.reshape(t_dim, -1)
    h_lowered = lowered if sqrt is None else (sqrt @ lowered).to(torch.float64)
    total = float(((h_lowered @ g) * h_lowered).sum())
    if rank >= max_cp_rank(dims) or total <= 0.0:
        exact = cp_conv_kernel(kernel, rank, **options)
        return CPFactors(exact.out, exact.inp, exact.vertical, exact.horizontal, 0.0 if total <= 0.0 else exact.relative_error)

    roots = [psd_power(m, 0.5, -0.5) for m in mode_grams(g, dims[1:])]
    whitened = torch.einsum("tsij,sa,ib,jc->tabc", w, roots[0][0], roots[1][0], roots[2][0])
    if sqrt is not None:
        whitened = (sqrt @ whitened.reshape(t_dim, -1)).to(torch.float64).reshape(dims)
    cp = cp_conv_kernel(whitened.to(kernel.dtype if kernel.dtype == torch.float64 else torch.float32), rank, **options)
    inp, vertical, horizontal = (root[1] @ f.double() for root, f in zip(roots, (cp.inp, cp.vertical, cp.horizontal)))

    # The output factor in the true metric: out = W G K^T (K G K^T)^-1, K = khatri_rao(inp, v, h)^T.
    khatri_rao = _khatri_rao3(inp, vertical, horizontal)  # (S*a*b, R)
    g_k = g @ khatri_rao
    out = _solve(lowered @ g_k, khatri_rao.T @ g_k, torch.float64)
    residual = lowered - out @ khatri_rao.T
    if sqrt is not None:
        residual = (sqrt @ residual).to(torch.float64)
    error = (max(float(((residual @ g) * residual).sum()), 0.0) / total) ** 0.5
    factors = [f.to(cp.out.dtype).contiguous() for f in _balance([out, inp, vertical, horizontal])]
    return CPFactors(*factors, relative_error=error)
