"""The solver's output errors: tr(dW H dW^T) against tr(W H W^T), exact or from the factor.

`solve` reports, per weight, the relative output error of its result and of
round-to-nearest on the same grid. Small problems get exact float64 traces;
large ones reuse GPTQ's triangular factor (:class:`FactorTraces`), at half a
product's cost. No onnx import lives here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

# Up to this many multiply-adds (N*K*K per trace) the reported error traces are
# exact float64 products; above it they come from the ||Err||^2 identity and the
# triangular factor, in float32 (the full products would cost more than GPTQ).
FLOAT64_TRACE_LIMIT = 2e9


def trace_quadratic(W: torch.Tensor, Qs: list[torch.Tensor], H: torch.Tensor | None,
                     chunk_rows: int = 2048) -> list[float]:
    """tr(A H A^T) for A = W and A = W - Q for each Q (||A||^2 when H is None).

    Small problems are done in float64 throughout; large ones multiply by H in
    float32 (accumulating the traces in float64), in chunks of rows.

    Args:
        W: float32 [N, K].
        Qs: float32 [N, K] each.
        H: float64 [K, K] or None.
    Returns:
        [tr(W H W^T), tr(dW_1 H dW_1^T), ...].
    """
    n, k = W.shape
    exact = H is None or (1 + len(Qs)) * n * k * k <= FLOAT64_TRACE_LIMIT
    dtype = torch.float64 if exact else torch.float32
    Hc = None if H is None else H.to(dtype)
    out = [0.0] * (1 + len(Qs))
    for r0 in range(0, n, chunk_rows):
        w = W[r0:r0 + chunk_rows].to(dtype)
        for j, A in enumerate([w] + [w - Q[r0:r0 + chunk_rows].to(dtype) for Q in Qs]):
            AH = A if Hc is None else A @ Hc
            out[j] += float((AH * A).sum(dtype=torch.float64))
    return out


@dataclasses.dataclass(frozen=True)
class FactorTraces:
    """tr(A H A^T) for the undamped H from the damped factor, at half a product's cost.

    With J Hd J = L L^T (Hd = H + lam*I with dead inputs set to 1, in solve order
    `perm`), tr(A Hd A^T) = ||A[:, perm] J L||^2, and L is triangular, so column
    block j of the product only needs the rows of L from j on.
    """

    L: torch.Tensor  # float32 [K, K] lower
    order: torch.Tensor  # int64 [K]: perm reversed
    lam: float  # damp * mean(diag H)
    dead: torch.Tensor  # bool [K], original order

    def trace(self, A: torch.Tensor, block: int = 512) -> float:
        """tr(A H A^T) for float32 A [N, K] in the original column order."""
        k = A.shape[1]
        Ap = A[:, self.order]  # [N, K]
        total = 0.0
        for j in range(0, k, block):
            total += float((Ap[:, j:] @ self.L[j:, j:j + block]).pow(2).sum(dtype=torch.float64))
        total -= self.lam * float(A.pow(2).sum(dtype=torch.float64))
        if bool(self.dead.any()):
            total -= float(A[:, self.dead].pow(2).sum(dtype=torch.float64))
        return total


def relative_error(W: np.ndarray, Q: np.ndarray, H: np.ndarray | None) -> float:
    """tr((W-Q) H (W-Q)^T) / tr(W H W^T) in float64 (weight-space when H is None).

    Args:
        W: float [N, K] original weight.
        Q: float [N, K] quantized (dequantized) weight.
        H: float [K, K] Hessian, or None.
    Returns:
        The relative error; 0 when the denominator is 0 and W == Q.
    """
    W64 = np.asarray(W, dtype=np.float64)
    dW = W64 - np.asarray(Q, dtype=np.float64)
    if H is None:
        num, den = float((dW ** 2).sum()), float((W64 ** 2).sum())
    else:
        H64 = np.asarray(H, dtype=np.float64)
        num = float(((dW @ H64) * dW).sum())
        den = float(((W64 @ H64) * W64).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


__all__ = ["FLOAT64_TRACE_LIMIT", "FactorTraces", "relative_error", "trace_quadratic"]
