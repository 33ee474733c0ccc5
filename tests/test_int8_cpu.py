"""GptqMatMul accuracy_level 4 on CPU: int8 activations, int8 dot products.

The int8 path's only approximation is rounding A to int8 per block of K: with
sa = max|a| / 127 over the block, |a - sa q| <= sa / 2. So against the float64
reference ``x @ W^T`` the error of every output is bounded by
``sum_k |w[n, k]| * sa(m, block of k) / 2`` (plus fp32 rounding), which these
tests assert per bit width, layout and instruction set; activations that are
exact multiples of their block's sa must give the fp32 result.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnx_gptq.runtime import custom_ops
from onnx_gptq.pack import pack_custom
from onnx_gptq.qweight import QuantizedWeight
from tests.test_custom_ops import _PEAK_RSS_CHILD, U32, make_weight, reference

# What ONNX_GPTQ_CPU_ISA can force: "native" (any other value) is the best build
# (AVX512-VNNI on the machine of docs/BENCHMARKS.md); "avxvnni" caps an
# AVX512-VNNI CPU at AVX-VNNI and changes nothing elsewhere.
INT8_ISAS = ("native", "avxvnni", "avx2", "scalar")


def run_int8(qw: QuantizedWeight, x: np.ndarray, accuracy_level: int = 4,
             bias: np.ndarray | None = None) -> np.ndarray:
    model = custom_ops.gptq_matmul_model(pack_custom(qw), dtype=x.dtype, bias=bias, accuracy_level=accuracy_level)
    return custom_ops.make_session(model).run(None, {"A": x})[0]


def quantization_bound(qw: QuantizedWeight, x: np.ndarray) -> np.ndarray:
    """[M, N] bound on |y - ref| from rounding x to int8 per block (or group, with g_idx).

    Plus fp32 rounding of the terms the kernel rounds: per block it adds
    sa s dot(q, c) and subtracts s z sa sum(q) (exact integer sums, but two
    fp32 terms of size ~ sum |a| s (c + z) that cancel to the block's share).
    """
    k = x.shape[1]
    blocks = qw.g_idx if qw.g_idx is not None else np.arange(k) // qw.group_size
    x64 = x.astype(np.float64)
    sa = np.zeros_like(x64)
    for b in np.unique(blocks):
        cols = blocks == b
        sa[:, cols] = np.abs(x64[:, cols]).max(axis=1, keepdims=True) / 127.0
    w = np.abs(qw.dequantize().astype(np.float64))
    scale = np.abs(qw.scales.astype(np.float64))[:, blocks]
    terms = scale * (qw.codes.astype(np.float64) + qw.zeros.astype(np.float64)[:, blocks])
    return (sa / 2) @ w.T + 8 * U32 * ((np.abs(x64) + sa / 2) @ terms.T)


def assert_within_quantization_bound(qw: QuantizedWeight, x: np.ndarray, y: np.ndarray) -> float:
    bound = quantization_bound(qw, x)
    err = np.abs(y.astype(np.float64) - reference(qw, x))
    ratio = float((err / bound).max(initial=0.0))
    assert ratio <= 1.0, f"error {ratio:.3g} x the int8 rounding bound"
    return ratio


# (N, K, group): SIMD units of one block (128), two and four blocks per chunk
# (32, 16 at 4 bits), tail blocks (K = 200, g = 64: 4 blocks, the last ragged;
# K = 96, g = 32: 3 blocks at 2 per unit), per-channel, and block sizes the
# units cannot tile (48, 8 at 3 bits) that take the natural-order path.
SHAPES = [(33, 256, 128), (17, 200, 64), (24, 256, 32), (9, 144, 16), (12, 96, 32), (40, 96, None),
          (10, 144, 48), (6, 64, 8)]


@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 6, 70])
def test_error_within_int8_rounding_bound(monkeypatch: pytest.MonkeyPatch, isa: str, bits: int, n: int, k: int,
                                          group: int | None, m: int) -> None:
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
    qw = make_weight(n, k, bits, group, seed=bits * 7 + n)
    x = np.random.default_rng(m + k).standard_normal((m, k)).astype(np.float32)
    assert_within_quantization_bound(qw, x, run_int8(qw, x))


@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_act_order_g_idx(monkeypatch: pytest.MonkeyPatch, isa: str, bits: int, m: int) -> None:
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
    qw = make_weight(19, 256, bits, 64, act_order=True, seed=bits)
    x = np.random.default_rng(m).standard_normal((m, 256)).astype(np.float32)
    assert_within_quantization_bound(qw, x, run_int8(qw, x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group,act_order", [(128, False), (32, False), (64, True)])
@pytest.mark.parametrize("m", [1, 9])
def test_exact_when_activations_are_on_the_int8_grid(bits: int, sym: bool, group: int, act_order: bool,
                                                     m: int) -> None:
    """x = sa * q with |q| <= 127 and one q = +-127 per block: rounding is exact, so the
    integer dot products, zero points and scales must reproduce the fp32 result."""
    k, n = 256, 21
    qw = make_weight(n, k, bits, group, sym=sym, act_order=act_order, seed=bits + 3)
    rng = np.random.default_rng(m)
    q = rng.integers(-127, 128, size=(m, k))
    blocks = qw.g_idx if qw.g_idx is not None else np.arange(k) // group
    sa = np.zeros((m, k))
    for b in np.unique(blocks):
        cols = np.flatnonzero(blocks == b)
        q[:, cols[0]] = 127 * rng.choice([-1, 1], size=m)
        sa[:, cols] = rng.uniform(0.01, 0.1, size=(m, 1))
    # Exact in fp32: sa is a multiple of 2**-20 so sa * q needs < 24 bits.
    sa = np.round(sa * 2**20) / 2**20
    x = (sa * q).astype(np.float32)
    y = run_int8(qw, x).astype(np.float64)
    ref = reference(qw, x)
    size = np.abs(x.astype(np.float64)) @ np.abs(qw.dequantize().astype(np.float64)).T
    assert float((np.abs(y - ref) / (U32 * size)).max()) <= 16.0


@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_instruction_sets_agree(monkeypatch: pytest.MonkeyPatch, isa: str, bits: int) -> None:
    """The integer parts are exact on every path; only fp32 summation order differs."""
    qw = make_weight(37, 512, bits, 32, seed=bits)
    x = np.random.default_rng(0).standard_normal((11, 512)).astype(np.float32)
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", "scalar")
    want = run_int8(qw, x).astype(np.float64)
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
    got = run_int8(qw, x).astype(np.float64)
    size = np.abs(x.astype(np.float64)) @ np.abs(qw.dequantize().astype(np.float64)).T
    assert float((np.abs(got - want) / (U32 * size)).max()) <= 8.0


def test_int8_path_is_taken_and_bound_is_not_vacuous() -> None:
    """Level 4 differs from level 0 by about the rounding of A, well inside the bound."""
    qw = make_weight(64, 512, 4, 128, seed=1)
    x = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32)
    y0, y4 = run_int8(qw, x, 0).astype(np.float64), run_int8(qw, x, 4).astype(np.float64)
    ref = reference(qw, x)
    bound = quantization_bound(qw, x)
    assert np.abs(y0 - ref).max() < 1e-3 * np.abs(y4 - ref).max()
    assert 0.02 < float((np.abs(y4 - ref) / bound).max()) <= 1.0


@pytest.mark.parametrize("level", [1, 2, 3])
def test_levels_below_4_are_the_fp32_path(level: int) -> None:
    qw = make_weight(24, 256, 4, 32, seed=5)
    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    np.testing.assert_array_equal(run_int8(qw, x, level), run_int8(qw, x, 0))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("act_order", [False, True])
def test_float16(bits: int, m: int, act_order: bool) -> None:
    qw = make_weight(32, 256, bits, 64, act_order=act_order, dtype=np.float16, seed=bits)
    x = np.random.default_rng(m).standard_normal((m, 256)).astype(np.float16)
    bias = np.random.default_rng(9).standard_normal(32).astype(np.float16)
    y = run_int8(qw, x, bias=bias)
    assert y.dtype == np.float16
    ref = reference(qw, x, bias)
    bound = quantization_bound(qw, x) + 2.0**-11 * np.abs(ref) + 2.0**-24
    assert float((np.abs(y.astype(np.float64) - ref) / bound).max()) <= 1.0


def test_bias_and_zero_rows() -> None:
    """An all-zero row (sa = 0) gives exactly the bias."""
    qw = make_weight(16, 128, 4, 32, seed=4)
    x = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    x[1] = 0.0
    x[2, :32] = 0.0  # one all-zero block
    bias = np.linspace(-1, 1, 16).astype(np.float32)
    y = run_int8(qw, x, bias=bias)
    np.testing.assert_array_equal(y[1], bias)
    rows = [0, 2]
    bound = quantization_bound(qw, x[rows]) + 2 * U32 * np.abs(bias)
    assert float((np.abs(y[rows] - reference(qw, x[rows], bias)) / bound).max()) <= 1.0


def _model_with_level(level: int) -> onnx.ModelProto:
    model = custom_ops.gptq_matmul_model(pack_custom(make_weight(16, 128, 4, 32)))
    model.graph.node[0].attribute.append(helper.make_attribute("accuracy_level", level))
    return model


@pytest.mark.parametrize("level", [-1, 5, 16])
def test_invalid_accuracy_level_fails_at_session_creation(level: int) -> None:
    with pytest.raises(Exception, match=rf"GptqMatMul node 'gptq_matmul': attribute accuracy_level={level} "
                                        r"must be 0\.\.4"):
        custom_ops.make_session(_model_with_level(level))


def test_int8_isa_introspection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert custom_ops.cpu_int8_isa() in ("avx512vnni", "avxvnni", "avx2", "scalar")
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", "scalar")
    assert custom_ops.cpu_int8_isa() == "scalar"


# test_custom_ops' child, building the node with accuracy_level 4.
_PEAK_RSS_INT8 = _PEAK_RSS_CHILD.replace("gptq_matmul_model(tensors)", "gptq_matmul_model(tensors, accuracy_level=4)")
assert _PEAK_RSS_INT8 != _PEAK_RSS_CHILD


@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self")
def test_memory_and_work_follow_K_not_block_size(bits: int, m: int) -> None:
    """block_size may exceed K (2**22 here, for K = 3): the int8 path's activation
    rows and unpacked codes must be sized, and its loops bounded, by K."""
    k, n, block_size = 3, 2, 1 << 22
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_INT8, *map(str, (k, n, bits, block_size, m))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew_kib, y_min, y_max = out.stdout.split()
    assert float(y_min) == float(y_max) == -(2 ** (bits - 1)) * k  # (0 - zp) * 1 per column
    assert int(grew_kib) < 16 * 1024, f"the run grew the peak RSS by {int(grew_kib) // 1024} MiB"


# The GEMM path (m >= 4, no g_idx, blocks of whole chunks, or of whole vectors at
# 2 and 4 bits): blocks interleaved in groups of 8, 4, 2 and 1. K = 15 blocks gives
# one group of each size; the second K ends in a ragged block; 4 x 3 register
# tiles meet row and column edges. Group 32 at 3 bits keeps the per-block path.
@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [128, 32])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("m", [4, 7, 13])
def test_gemm_path_block_groups(monkeypatch: pytest.MonkeyPatch, isa: str, bits: int, group: int, ragged: bool,
                                sym: bool, m: int) -> None:
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
    k = 14 * group + group // 3 if ragged else 15 * group
    qw = make_weight(8, k, bits, group, sym=sym, seed=bits + k)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    ratio = assert_within_quantization_bound(qw, x, run_int8(qw, x))
    assert ratio > 1e-3  # the bound is tight enough to catch a misplaced block


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [128, 32])
@pytest.mark.parametrize("m", [5, 70])
def test_gemm_path_float16_and_bias(bits: int, group: int, m: int) -> None:
    assert_float16_with_bias_within_bound(10, 11 * group, bits, group, m)


def assert_float16_with_bias_within_bound(n: int, k: int, bits: int, group: int, m: int) -> None:
    """fp16 A, scales and bias: the int8 bound plus the fp16 rounding of the output."""
    qw = make_weight(n, k, bits, group, dtype=np.float16, seed=bits)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float16)
    bias = np.random.default_rng(1).standard_normal(n).astype(np.float16)
    y = run_int8(qw, x, bias=bias).astype(np.float64)
    ref = reference(qw, x) + bias.astype(np.float64)
    bound = quantization_bound(qw, x.astype(np.float32)) + 2.0 ** -10 * np.abs(ref)  # + fp16 output rounding
    assert float((np.abs(y - ref) / bound).max()) <= 1.0


@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("m", [1, 3, 6, 16, 40, 129])
def test_threads_give_identical_results(accuracy_level: int, m: int) -> None:
    """The task partition follows the hardware, not the session's threads: one and
    two intra-op threads must give the same bits (GEMV and both GEMM paths, their edges)."""
    k = 9 * 128 + 64
    qw = make_weight(37, k, 4, 128, seed=m)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    model = custom_ops.gptq_matmul_model(pack_custom(qw), dtype=x.dtype, accuracy_level=accuracy_level)
    ys = []
    for threads in (1, 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        ys.append(custom_ops.make_session(model, sess_options=options).run(None, {"A": x})[0])
    np.testing.assert_array_equal(ys[0], ys[1])
    if accuracy_level == 4:
        assert_within_quantization_bound(qw, x, ys[0])
    else:
        size = np.abs(x.astype(np.float64)) @ np.abs(qw.dequantize().astype(np.float64)).T
        assert float((np.abs(ys[0] - reference(qw, x)) / (U32 * size)).max()) <= 64.0


# The GEMV path (int8_gemv.h, m <= 4, or <= 6 for packed weights up to 1 MiB):
# blocks of one and two 64-byte vectors, and the half vector (32 bytes of 2/4/8
# bits, 24 of 3 bits) that group 64 and a ragged last block leave; m = 7 is
# the GEMM path just past the threshold.
@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [128, 64])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("m", [1, 2, 4, 6, 7])
def test_gemv_path_edges(monkeypatch: pytest.MonkeyPatch, isa: str, bits: int, group: int, ragged: bool,
                         sym: bool, m: int) -> None:
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
    k = 4 * group + group // 2 if ragged else 5 * group
    qw = make_weight(11, k, bits, group, sym=sym, seed=bits + k + m)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    ratio = assert_within_quantization_bound(qw, x, run_int8(qw, x))
    assert ratio > 1e-3


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [128, 64])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_path_float16_and_bias(bits: int, group: int, m: int) -> None:
    assert_float16_with_bias_within_bound(9, 7 * group + group // 2, bits, group, m)


@pytest.mark.parametrize("m", [4, 5, 6])
def test_gemv_row_limit_follows_weight_size(m: int) -> None:
    """A packed weight over 1 MiB takes the GEMM path from m = 5: both sides of it stay within the bound."""
    qw = make_weight(1040, 2048, 4, 128, seed=m)
    x = np.random.default_rng(m).standard_normal((m, 2048)).astype(np.float32)
    assert_within_quantization_bound(qw, x, run_int8(qw, x))
