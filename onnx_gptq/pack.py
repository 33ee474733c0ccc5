"""Packed layouts of a :class:`QuantizedWeight`: the only place they are produced.

Four layouts, all written from the solver's codes, scales and zero points
unchanged (nothing is re-quantized here):

* `pack_custom`   -> inputs of `onnx_gptq.GptqMatMul` (docs/CUSTOM_OP.md)
* `pack_matmulnbits` -> inputs of `com.microsoft.MatMulNBits`
* `pack_qdq`      -> blocked ONNX `DequantizeLinear` (opset 21) inputs
* `pack_gather`   -> inputs of `com.microsoft.GatherBlockQuantized` (embedding tables)

Each has an `unpack_*` inverse returning an equal QuantizedWeight, which the
tests use to check the round trip bit for bit. No onnx import lives here.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from onnx_gptq.contract import (GATHER_BITS, MATMULNBITS_BITS, MATMULNBITS_MAX_BLOCK_2BIT, MATMULNBITS_MIN_BLOCK,
                                QDQ_BITS)
from onnx_gptq.qweight import QuantizedWeight


def n_blocks_of(k: int, block_size: int) -> int:
    return -(-k // block_size)


def blob_size_of(block_size: int, bits: int) -> int:
    return -(-block_size * bits // 8)


def pack_bits(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Pack codes into little-endian bit streams, one per (row, block).

    Args:
        codes: uint8 [R, K], each < 2**bits.
        bits: code width, 1..8.
        block_size: columns per block; the last block is zero-padded.
    Returns:
        uint8 [R, n_blocks, blob_size].
    """
    rows, k = codes.shape
    n_blocks = n_blocks_of(k, block_size)
    blob = blob_size_of(block_size, bits)
    padded = np.zeros((rows, n_blocks * block_size), dtype=np.uint8)
    padded[:, :k] = codes
    padded = padded.reshape(rows, n_blocks, block_size)
    if 8 % bits == 0 and (block_size * bits) % 8 == 0:
        per_byte = 8 // bits
        grouped = padded.reshape(rows, n_blocks, blob, per_byte)
        shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
        out = np.bitwise_or.reduce(grouped << shifts, axis=-1)
        return out.astype(np.uint8)
    # General widths (3 bits, or blobs ending mid-byte): spell out every bit.
    bit_idx = np.arange(bits, dtype=np.uint8)
    stream = ((padded[..., None] >> bit_idx) & 1).reshape(rows, n_blocks, block_size * bits)
    pad = blob * 8 - block_size * bits
    if pad:
        stream = np.concatenate([stream, np.zeros((rows, n_blocks, pad), np.uint8)], axis=-1)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, block_size: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint8 [R, n_blocks, blob] -> uint8 [R, K]."""
    rows, n_blocks, _ = packed.shape
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : block_size * bits]
    stream = stream.reshape(rows, n_blocks, block_size, bits)
    weights = (1 << np.arange(bits)).astype(np.uint16)
    codes = (stream.astype(np.uint16) * weights).sum(axis=-1).astype(np.uint8)
    return codes.reshape(rows, n_blocks * block_size)[:, :k]


def _symmetric_zero(bits: int) -> int:
    return 1 << (bits - 1)


def _zeros_or_default(zeros: np.ndarray | None, shape: tuple[int, int], bits: int) -> np.ndarray:
    if zeros is None:
        return np.full(shape, _symmetric_zero(bits), dtype=np.uint8)
    return zeros.astype(np.uint8)


# --------------------------------------------------------------------------- custom


@dataclasses.dataclass(frozen=True)
class CustomOpTensors:
    """Inputs 1-4 and attributes of `onnx_gptq.GptqMatMul` (docs/CUSTOM_OP.md)."""

    B: np.ndarray  # uint8 [N, n_blocks, blob_size]
    scales: np.ndarray  # T [N, n_groups]
    zero_points: np.ndarray | None  # uint8 [N, n_groups]; None when symmetric
    g_idx: np.ndarray | None  # int32 [K]
    K: int
    N: int
    bits: int
    block_size: int


def pack_custom(qw: QuantizedWeight) -> CustomOpTensors:
    n, k = qw.shape
    return CustomOpTensors(
        B=pack_bits(qw.codes, qw.bits, qw.group_size),
        scales=np.ascontiguousarray(qw.scales),
        zero_points=None if qw.sym else np.ascontiguousarray(qw.zeros, dtype=np.uint8),
        g_idx=None if qw.g_idx is None else qw.g_idx.astype(np.int32),
        K=k,
        N=n,
        bits=qw.bits,
        block_size=qw.group_size,
    )


def unpack_custom(t: CustomOpTensors) -> QuantizedWeight:
    codes = unpack_bits(t.B, t.bits, t.block_size, t.K)
    return QuantizedWeight(
        codes=codes,
        scales=t.scales,
        zeros=_zeros_or_default(t.zero_points, t.scales.shape, t.bits),
        bits=t.bits,
        group_size=t.block_size,
        g_idx=t.g_idx,
        sym=t.zero_points is None,
    )


# --------------------------------------------------------------------------- MatMulNBits


def matmulnbits_block_size(k: int, group_size: int) -> int | None:
    """The MatMulNBits block_size holding `group_size`, or None if it has none.

    MatMulNBits takes power-of-two blocks of at least 16 (`contract`). A per-channel grid
    (group_size == K) fits in one block of the next power of two >= K, whose
    tail is padding.
    """
    if group_size >= k:
        return max(MATMULNBITS_MIN_BLOCK, 1 << (k - 1).bit_length())
    if group_size >= MATMULNBITS_MIN_BLOCK and group_size & (group_size - 1) == 0:
        return group_size
    return None


@dataclasses.dataclass(frozen=True)
class MatMulNBitsTensors:
    """Inputs 1-3 and attributes of `com.microsoft.MatMulNBits`."""

    B: np.ndarray  # uint8 [N, n_blocks, block_size*bits/8]
    scales: np.ndarray  # T [N * n_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(n_blocks*bits/8)]; None when symmetric
    K: int
    N: int
    bits: int
    block_size: int


def can_pack_matmulnbits(qw: QuantizedWeight) -> str | None:
    """None when MatMulNBits can hold `qw` exactly, else the reason it cannot."""
    n, k = qw.shape
    if qw.bits not in MATMULNBITS_BITS:
        return f"{qw.bits}-bit codes (MatMulNBits takes {', '.join(map(str, MATMULNBITS_BITS))})"
    if qw.g_idx is not None:
        return "act-order g_idx (MatMulNBits mishandles it with zero points on CPU)"
    block = matmulnbits_block_size(k, qw.group_size)
    if block is None:
        return f"group size {qw.group_size} (MatMulNBits blocks are powers of two >= {MATMULNBITS_MIN_BLOCK})"
    if qw.bits == 2 and block > MATMULNBITS_MAX_BLOCK_2BIT:
        return f"2-bit block of {block} (MatMulNBits takes 2-bit blocks of at most {MATMULNBITS_MAX_BLOCK_2BIT})"
    return None


def pack_matmulnbits(qw: QuantizedWeight) -> MatMulNBitsTensors:
    reason = can_pack_matmulnbits(qw)
    if reason is not None:
        raise ValueError(f"cannot pack as MatMulNBits: {reason}")
    n, k = qw.shape
    block = matmulnbits_block_size(k, qw.group_size)
    assert block is not None
    zero_points = None
    if not qw.sym:
        zero_points = pack_bits(qw.zeros.astype(np.uint8), qw.bits, qw.n_groups).reshape(-1)
    return MatMulNBitsTensors(
        B=pack_bits(qw.codes, qw.bits, block),
        scales=np.ascontiguousarray(qw.scales).reshape(-1),
        zero_points=zero_points,
        K=k,
        N=n,
        bits=qw.bits,
        block_size=block,
    )


def unpack_matmulnbits(t: MatMulNBitsTensors, group_size: int) -> QuantizedWeight:
    codes = unpack_bits(t.B, t.bits, t.block_size, t.K)
    n_blocks = t.B.shape[1]
    scales = t.scales.reshape(t.N, n_blocks)
    if t.zero_points is None:
        zeros = _zeros_or_default(None, scales.shape, t.bits)
    else:
        packed = t.zero_points.reshape(t.N, 1, -1)
        zeros = unpack_bits(packed, t.bits, n_blocks, n_blocks)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=t.bits,
                           group_size=group_size, sym=t.zero_points is None)


# --------------------------------------------------------------------------- QDQ


@dataclasses.dataclass(frozen=True)
class QDQTensors:
    """Inputs and attributes of a blocked `DequantizeLinear` producing W [K, N].

    `block_size` is 0 for per-axis (per-channel) quantization, where scales
    and zero points are 1-D [N].
    """

    codes: np.ndarray  # int4/uint4/int8/uint8 [K, N]
    scales: np.ndarray  # T [n_groups, N] or [N]
    zero_points: np.ndarray | None  # same dtype as codes; None when symmetric
    block_size: int
    axis: int = 0


_QDQ_DTYPES = {  # bits -> (signed dtype for symmetric, unsigned dtype for asymmetric)
    4: (ml_dtypes.int4, ml_dtypes.uint4),
    8: (np.int8, np.uint8),
}


def pack_qdq(qw: QuantizedWeight) -> QDQTensors:
    if qw.bits not in QDQ_BITS:
        raise ValueError(f"cannot pack {qw.bits}-bit codes as DequantizeLinear (takes "
                         f"{' or '.join(map(str, QDQ_BITS))})")
    if qw.g_idx is not None:
        raise ValueError("cannot pack act-order g_idx as DequantizeLinear")
    n, k = qw.shape
    signed, unsigned = _QDQ_DTYPES[qw.bits]
    per_channel = qw.group_size >= k
    scales = qw.scales[:, 0] if per_channel else qw.scales.T
    if qw.sym:
        # Symmetric codes c with zero point 2**(bits-1) are the signed values c - 2**(bits-1).
        codes = (qw.codes.astype(np.int16) - _symmetric_zero(qw.bits)).T.astype(signed)
        zero_points = None
    else:
        codes = qw.codes.T.astype(unsigned)
        zeros = qw.zeros[:, 0] if per_channel else qw.zeros.T
        zero_points = np.ascontiguousarray(zeros.astype(unsigned))
    return QDQTensors(
        codes=np.ascontiguousarray(codes),
        scales=np.ascontiguousarray(scales),
        zero_points=zero_points,
        block_size=0 if per_channel else qw.group_size,
        axis=1 if per_channel else 0,
    )


def unpack_qdq(t: QDQTensors, bits: int) -> QuantizedWeight:
    k, n = t.codes.shape
    sym = t.zero_points is None
    offset = _symmetric_zero(bits) if sym else 0
    codes = (t.codes.astype(np.int16) + offset).T.astype(np.uint8)
    scales = t.scales.reshape(n, 1) if t.block_size == 0 else t.scales.T
    if sym:
        zeros = _zeros_or_default(None, scales.shape, bits)
    else:
        z = t.zero_points.astype(np.uint8)
        zeros = z.reshape(n, 1) if t.block_size == 0 else z.T
    return QuantizedWeight(codes=codes, scales=np.ascontiguousarray(scales),
                           zeros=np.ascontiguousarray(zeros), bits=bits,
                           group_size=k if t.block_size == 0 else t.block_size, sym=sym)


# --------------------------------------------------------------------------- GatherBlockQuantized


@dataclasses.dataclass(frozen=True)
class GatherTensors:
    """Inputs 0, 2, 3 and attributes of `com.microsoft.GatherBlockQuantized` for a table [V, H].

    uint8 data holds each row's codes as one little-endian bit stream (two 4-bit
    codes per byte, low nibble first). The op's rows are `columns` codes wide
    (`data.shape[1] * 8 / bits`); when that exceeds H (a padded MatMulNBits B, or
    an odd H at 4 bits) a Slice after the op keeps the first H.
    """

    data: np.ndarray  # uint8 [V, columns * bits / 8]
    scales: np.ndarray  # T [V, n_blocks]
    zero_points: np.ndarray | None  # uint8 [V, ceil(n_blocks * bits / 8)]; None when symmetric
    H: int
    bits: int
    block_size: int

    @property
    def columns(self) -> int:
        return self.data.shape[1] * 8 // self.bits


def gather_block_size(h: int, group_size: int) -> int | None:
    """The GatherBlockQuantized block holding `group_size` columns of a row of `h` (None: none does)."""
    return matmulnbits_block_size(h, group_size)  # the same power-of-two rule, per-row grids included


def pack_gather(qw: QuantizedWeight) -> GatherTensors:
    """A quantized table [V, H] (rows = tokens, groups along H) as GatherBlockQuantized inputs."""
    v, h = qw.shape
    block = gather_block_size(h, qw.group_size)
    if qw.bits not in GATHER_BITS or block is None or qw.g_idx is not None:
        raise ValueError(f"cannot pack as GatherBlockQuantized: {qw.bits}-bit g{qw.group_size}"
                         f"{' with g_idx' if qw.g_idx is not None else ''}")
    zero_points = None
    if not qw.sym:
        zero_points = pack_bits(qw.zeros.astype(np.uint8), qw.bits, qw.n_groups).reshape(v, -1)
    return GatherTensors(data=pack_bits(qw.codes, qw.bits, h).reshape(v, -1),
                         scales=np.ascontiguousarray(qw.scales), zero_points=zero_points,
                         H=h, bits=qw.bits, block_size=block)


def gather_from_matmulnbits(t: MatMulNBitsTensors) -> GatherTensors:
    """The GatherBlockQuantized view of a head's MatMulNBits tensors (its weight is the table,
    transposed): the same bytes, B as [N, n_blocks * blob] and scales as [N, n_blocks]."""
    if t.bits not in GATHER_BITS:
        raise ValueError(f"cannot share {t.bits}-bit MatMulNBits codes with GatherBlockQuantized")
    n_blocks = t.B.shape[1]
    zero_points = None if t.zero_points is None else t.zero_points.reshape(t.N, -1)
    return GatherTensors(data=t.B.reshape(t.N, -1), scales=t.scales.reshape(t.N, n_blocks),
                         zero_points=zero_points, H=t.K, bits=t.bits, block_size=t.block_size)


def unpack_gather(t: GatherTensors, group_size: int) -> QuantizedWeight:
    v = t.data.shape[0]
    codes = unpack_bits(t.data.reshape(v, 1, -1), t.bits, t.columns, t.H)
    n_blocks = t.scales.shape[1]
    if t.zero_points is None:
        zeros = _zeros_or_default(None, t.scales.shape, t.bits)
    else:
        zeros = unpack_bits(t.zero_points.reshape(v, 1, -1), t.bits, n_blocks, n_blocks)
    return QuantizedWeight(codes=codes, scales=t.scales, zeros=zeros, bits=t.bits, group_size=group_size,
                           sym=t.zero_points is None)
