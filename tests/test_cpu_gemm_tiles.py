"""The accuracy_level 0 GEMM path's edges (kernel_impl.h): the dequantized tile
written block-interleaved (TileOut, including chunks pushed off the block grid
by an odd block tail), several k panels summed into Y through StoreTile's
transposed masked stores, a last output tile narrower than NR, and a last panel
of A of at most W rows packed narrow; on every ISA, 1 and 2 threads, against a
float64 reference within the fp32 rounding bound."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from onnx_gptq.pack import pack_custom
from onnx_gptq.runtime import custom_ops
from tests.test_custom_ops import ISAS, assert_matches, assert_within_rounding_bound, make_weight, reference

# (N, K, group): N = 13 and 25 leave a last tile of 1 column (AVX-512 NR = 12,
# AVX2 NR = 6); K = 1100 in blocks of 100 has chunk tails (100 is no multiple of
# a 32- or 64-code chunk) and two k panels; K = 2500 g128 three to five panels
# and a ragged last block.
SHAPES = [(13, 1100, 100), (25, 2500, 128)]
# Rows of A around the SIMD widths: narrow last panels (9, 16, 33, 48 on
# AVX-512; 9 on AVX2), full ones (32) and a single row past a panel (17).
ROWS = [9, 16, 17, 32, 33, 48]


def run(qw, x: np.ndarray, threads: int, bias: np.ndarray | None = None) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    model = custom_ops.gptq_matmul_model(pack_custom(qw), dtype=x.dtype, bias=bias)
    return custom_ops.make_session(model, sess_options=opts).run(None, {"A": x})[0]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_gemm_edges_every_isa(monkeypatch: pytest.MonkeyPatch, isa: str, n: int, k: int, group: int,
                              m: int) -> None:
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
    qw = make_weight(n, k, 4, group, seed=m + n)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    bias = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    y = run(qw, x, 1, bias)
    assert_within_rounding_bound(qw, x, y, bias)
    assert_matches(y, reference(qw, x, bias), np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_edges_bits_zero_points_g_idx(bits: int, sym: bool, act_order: bool, threads: int) -> None:
    n, k, group = SHAPES[0]
    qw = make_weight(n, k, bits, group, sym=sym, act_order=act_order, seed=bits)
    x = np.random.default_rng(bits).standard_normal((33, k)).astype(np.float32)
    y = run(qw, x, threads)
    assert_within_rounding_bound(qw, x, y)


@pytest.mark.parametrize("m", [16, 33])
@pytest.mark.parametrize("isa", ISAS)
def test_gemm_edges_float16(monkeypatch: pytest.MonkeyPatch, isa: str, m: int) -> None:
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
    n, k, group = SHAPES[1]
    qw = make_weight(n, k, 4, group, dtype=np.float16, seed=m)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float16)
    bias = np.random.default_rng(3).standard_normal(n).astype(np.float16)
    assert_matches(run(qw, x, 2, bias), reference(qw, x, bias), np.float16)


def test_decode_and_gemm_agree_across_the_threshold() -> None:
    """m = 8 runs the decode path, m = 9 the GEMM path: the same rows agree."""
    n, k, group = SHAPES[1]
    qw = make_weight(n, k, 4, group, seed=7)
    x = np.random.default_rng(7).standard_normal((9, k)).astype(np.float32)
    y8, y9 = run(qw, x[:8], 1), run(qw, x, 1)
    scale = float(np.abs(y9).max())
    assert float(np.abs(y8 - y9[:8]).max()) <= 1e-5 * scale
