"""The contract of the packed nodes onnx-gptq writes, stated once.

`pack` produces the tensors, `rewrite` wires them into nodes, `rewrite.read_packed`
reads them back, `runtime.custom_ops` builds one-node test models, and the C++
op (custom_ops/ort/gptq_op.h) declares the same input order; a test compares
that header with :data:`GPTQ_INPUTS`. The format limits here are the only ones:
`config.QuantConfig` validates against them and `pack` checks weights with them.
No onnx import lives here.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- onnx_gptq.GptqMatMul

GPTQ_DOMAIN = "onnx_gptq"
GPTQ_OP_TYPE = "GptqMatMul"
GPTQ_OP_VERSION = 1
#: Inputs in order (docs/CUSTOM_OP.md); zero_points, g_idx and bias are optional.
GPTQ_INPUTS = ("A", "B", "scales", "zero_points", "g_idx", "bias")
GPTQ_ATTRIBUTES = ("K", "N", "bits", "block_size")
#: Optional attributes (absent means 0, so models written without them load in older libraries).
GPTQ_OPTIONAL_ATTRIBUTES = ("accuracy_level",)
GPTQ_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: Code widths the solver, the packer and the custom kernels take.
GPTQ_BITS = (2, 3, 4, 8)

# --------------------------------------------------------------------------- com.microsoft.MatMulNBits

ORT_DOMAIN = "com.microsoft"
MATMULNBITS_OP_TYPE = "MatMulNBits"
#: Inputs in order; input 4 (g_idx) is never written.
MATMULNBITS_INPUTS = ("A", "B", "scales", "zero_points", "g_idx", "bias")
MATMULNBITS_ATTRIBUTES = ("K", "N", "bits", "block_size", "accuracy_level")
MATMULNBITS_BITS = (2, 4, 8)
#: Blocks are powers of two of at least this many columns.
MATMULNBITS_MIN_BLOCK = 16
#: 2-bit blocks hold at most this many columns.
MATMULNBITS_MAX_BLOCK_2BIT = 256
MATMULNBITS_ACCURACY_LEVELS = (0, 1, 2, 3, 4)

# --------------------------------------------------------------------------- DequantizeLinear

QDQ_BITS = (4, 8)
#: Blocked DequantizeLinear (block_size) and int4/uint4 need opset 21.
QDQ_MIN_OPSET = 21


def matmulnbits_group_problem(bits: int, group_size: int) -> str | None:
    """Why MatMulNBits cannot take every weight of this grid, or None when it can.

    Args:
        bits: code width.
        group_size: columns per group; -1 means per output channel (always fits).
    Returns:
        A phrase naming the limit ("group size 96 (...)"), or None.
    """
    if bits not in MATMULNBITS_BITS:
        return f"{bits}-bit codes (MatMulNBits takes {', '.join(map(str, MATMULNBITS_BITS))})"
    if group_size == -1:
        return None
    if group_size < MATMULNBITS_MIN_BLOCK or group_size & (group_size - 1):
        return f"group size {group_size} (MatMulNBits blocks are powers of two >= {MATMULNBITS_MIN_BLOCK})"
    if bits == 2 and group_size > MATMULNBITS_MAX_BLOCK_2BIT:
        return (f"2-bit block of {group_size} (MatMulNBits takes 2-bit blocks of at most "
                f"{MATMULNBITS_MAX_BLOCK_2BIT})")
    return None

# --------------------------------------------------------------------------- com.microsoft.GatherBlockQuantized

GATHER_OP_TYPE = "GatherBlockQuantized"
#: Inputs in order; zero_points is optional (default 2^(bits-1), as MatMulNBits').
GATHER_INPUTS = ("data", "indices", "scales", "zero_points")
#: uint8 data: gather_axis must be 0 and quantize_axis the last one.
GATHER_ATTRIBUTES = ("bits", "block_size", "gather_axis", "quantize_axis")
#: Code widths written for embeddings (uint8 data: two 4-bit codes per byte, low nibble first).
GATHER_BITS = (4, 8)
#: Blocks are powers of two of at least this many columns (the same rule as MatMulNBits).
GATHER_MIN_BLOCK = 16


def gather_group_problem(group_size: int) -> str | None:
    """Why GatherBlockQuantized cannot take this group size, or None when it can (-1: per row, fits)."""
    if group_size == -1 or (group_size >= GATHER_MIN_BLOCK and not group_size & (group_size - 1)):
        return None
    return f"group size {group_size} (GatherBlockQuantized blocks are powers of two >= {GATHER_MIN_BLOCK}, or -1)"
