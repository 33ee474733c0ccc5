"""The solver's result: integer codes, scales and zero points, exactly as packed.

This is the contract between `solve` (which produces it) and `pack` (which
writes it without re-deriving anything). Orientation follows the paper: rows
are output channels (N), columns are input channels (K); an ONNX MatMul weight
of shape [K, N] is the transpose.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight matrix.

    Attributes:
        codes: uint8 [N, K], each in [0, 2**bits).
        scales: [N, n_groups], float32 or float16 (the dtype the model computes in;
            the solver rounds scales to it before quantizing, so dequantization is exact).
        zeros: uint8 [N, n_groups] integer zero points (2**(bits-1) when symmetric).
        bits: code width.
        group_size: columns per group in K order; equals K for per-channel.
        g_idx: int32 [K] group index of each input column when groups are not
            contiguous (act-order with dynamic groups); None otherwise.
        sym: whether the grid is symmetric (zeros all equal 2**(bits-1)).
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    group_size: int
    g_idx: np.ndarray | None = None
    sym: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        return self.codes.shape  # type: ignore[return-value]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def group_of_column(self) -> np.ndarray:
        """int64 [K]: the group of each input column."""
        k = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx.astype(np.int64)
        return np.arange(k, dtype=np.int64) // self.group_size

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: (codes - zeros[g]) * scales[g], in float32 arithmetic."""
        g = self.group_of_column()
        scales = self.scales.astype(np.float32)[:, g]
        zeros = self.zeros.astype(np.float32)[:, g]
        return (self.codes.astype(np.float32) - zeros) * scales
