"""onnx_gptq.GptqMatMul on onnxruntime's CPU execution provider (custom_ops/).

Every test runs the real library in a real onnxruntime session and compares
with a float64 numpy reference ``x @ qw.dequantize().T (+ bias)``, where the
weight is packed by onnx_gptq.pack.pack_custom. The library must be built
(`pip install -e .`); without it these tests fail with the build instructions.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnx_gptq import custom_ops
from onnx_gptq.pack import CustomOpTensors, pack_custom
from onnx_gptq.qweight import QuantizedWeight

ISAS = ("avx512", "avx2", "scalar")


@pytest.fixture(scope="module", autouse=True)
def library() -> str:
    """The built library; raises CustomOpsLibraryError (with how to build it) when missing."""
    return str(custom_ops.library_path())


def make_weight(n: int, k: int, bits: int, group: int | None, *, sym: bool = False, act_order: bool = False,
                n_groups: int | None = None, dtype: type = np.float32, seed: int = 0) -> QuantizedWeight:
    """A random N x K weight. group None = per-channel; act_order shuffles the group of each column."""
    rng = np.random.default_rng(seed)
    group_size = k if group is None else group
    g_idx = None
    groups = -(-k // group_size)
    if act_order:
        groups = n_groups or groups
        g_idx = rng.permutation(np.arange(k) * groups // k).astype(np.int32)
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    scales = (rng.random((n, groups)) * 0.05 + 0.005).astype(dtype)
    if sym:
        zeros = np.full((n, groups), 1 << (bits - 1), dtype=np.uint8)
    else:
        zeros = rng.integers(0, 1 << bits, size=(n, groups), dtype=np.uint8)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size,
                           g_idx=g_idx, sym=sym)


def run_op(qw: QuantizedWeight, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    model = custom_ops.gptq_matmul_model(pack_custom(qw), dtype=x.dtype, bias=bias,
                                         input_shape=[f"d{i}" for i in range(x.ndim - 1)] + [x.shape[-1]])
    session = custom_ops.make_session(model)
    return session.run(None, {"A": x})[0]


def reference(qw: QuantizedWeight, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    y = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y


def assert_matches(y: np.ndarray, ref: np.ndarray, dtype: type) -> None:
    assert y.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-6)
    # fp32: accumulation-order noise; fp16: the output's own rounding (2**-11).
    tol = 2e-6 if dtype == np.float32 else 1e-3
    err = float(np.abs(y.astype(np.float64) - ref).max()) / scale
    assert err < tol, f"max error {err:.3g} x max|ref| exceeds {tol:g}"


U32 = 2.0 ** -24  # unit roundoff of float32
U16 = 2.0 ** -11  # unit roundoff of float16

# The rounding bound the kernel must meet, in units of U32 * S, where
# S[m, n] = sum_k |x[m, k] w[n, k]| + |bias[n]| bounds every partial sum of
# the dot product. First order, the error is sum_i delta_i * partial_i over
# the n = K + 2 roundings (dequantization, K multiply-adds, bias), each
# |delta_i| <= U32 and independent: by Hoeffding, |error| <= lam * sqrt(n) *
# U32 * S except with probability 2 exp(-lam**2 / 2); lam = 4 per element
# (the worst case, Higham's gamma_n, is n * U32 * S). That bound is loose for
# long sums, so the RMS error over the output is bounded too, at 0.8 U32 * S,
# above what plain sequential fp32 summation gives on these data (about 0.6:
# the GEMM path, sequential over k panels of up to 1024, measures up to 0.61
# on the fuzz cases, the scalar decode path 0.41, the AVX2 one 0.24, a float32
# numpy matmul 0.2). A path that loses digits systematically fails it: with
# the zero point factored out, s * (sum(a*c) - z*sum(a)) (defect 9), the
# decode path reached 1.1 on the fuzz cases and 1.9 below. The RMS check
# needs K >= 64 and 16 outputs or more: shorter sums and fewer outputs are
# dominated by single roundings.
HOEFFDING_LAMBDA = 4.0
RMS_ERROR_ULPS = 0.8


def error_in_rounding_units(qw: QuantizedWeight, x: np.ndarray, y: np.ndarray,
                            bias: np.ndarray | None = None) -> tuple[float, float]:
    """The kernel's error against the float64 reference, in units of U32 * S.

    Args:
        qw: the weight; x: [..., K] input; y: the kernel's [..., N] output; bias: optional [N].
    Returns:
        (max over elements of |y - ref| / (U32 S), ||y - ref||_F / ||U32 S||_F). For float16
        outputs the output's own rounding, U16 * |ref| (or half the smallest subnormal), is
        subtracted first. 0/0 counts as 0 (an exact zero); x/0 as infinity.
    """
    ref = reference(qw, x, bias)
    size = np.abs(x.astype(np.float64)) @ np.abs(qw.dequantize().astype(np.float64)).T
    if bias is not None:
        size = size + np.abs(bias.astype(np.float64))
    err = np.abs(y.astype(np.float64) - ref)
    if y.dtype == np.float16:
        err = np.maximum(err - np.maximum(U16 * np.abs(ref), 2.0 ** -25), 0.0)
    unit = U32 * size
    with np.errstate(divide="ignore", invalid="ignore"):
        per_element = np.where(err == 0, 0.0, err / unit)
    total = float(np.sqrt((unit ** 2).sum()))
    rms = float(np.sqrt((err ** 2).sum())) / total if total > 0 else (0.0 if not err.any() else np.inf)
    return float(per_element.max(initial=0.0)), rms


def assert_within_rounding_bound(qw: QuantizedWeight, x: np.ndarray, y: np.ndarray,
                                 bias: np.ndarray | None = None) -> None:
    """Per element |y - ref| <= 4 sqrt(K + 2) U32 S; for K >= 64 and 16 outputs or more
    also ||y - ref||_F <= 0.8 ||U32 S||_F. See HOEFFDING_LAMBDA."""
    assert y.shape == x.shape[:-1] + (qw.shape[0],)
    k = qw.shape[1]
    worst, rms = error_in_rounding_units(qw, x, y, bias)
    per_element = HOEFFDING_LAMBDA * np.sqrt(k + 2)
    assert worst <= per_element, f"max error {worst:.3g} x U32 * sum|a||w| exceeds {per_element:.3g}"
    if k >= 64 and y.size >= 16:
        assert rms <= RMS_ERROR_ULPS, f"RMS error {rms:.3g} x U32 * sum|a||w| exceeds {RMS_ERROR_ULPS}"


# bits x (N, K, group) covering per-channel, groups smaller than a SIMD chunk,
# a ragged last group (K = 200, g = 64) and odd N.
SHAPES = [(33, 256, 128), (17, 200, 64), (40, 96, None), (24, 256, 32), (9, 144, 16)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_matches_dequantized_reference(bits: int, n: int, k: int, group: int | None, m: int) -> None:
    qw = make_weight(n, k, bits, group, seed=bits * 100 + n)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    assert_matches(run_op(qw, x), reference(qw, x), np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 100])
def test_every_instruction_set(monkeypatch: pytest.MonkeyPatch, isa: str, bits: int, m: int) -> None:
    """Each ISA path (the kernel reads ONNX_GPTQ_CPU_ISA on every run), decode and GEMM paths."""
    monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
    qw = make_weight(37, 320, bits, 64, seed=bits)
    x = np.random.default_rng(m).standard_normal((m, 320)).astype(np.float32)
    bias = np.random.default_rng(5).standard_normal(37).astype(np.float32)
    assert_matches(run_op(qw, x, bias), reference(qw, x, bias), np.float32)
    if isa != "avx512":
        assert custom_ops.cpu_isa() in (isa, "scalar")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("m", [1, 17])
def test_symmetric_and_asymmetric(bits: int, sym: bool, m: int) -> None:
    qw = make_weight(20, 192, bits, 64, sym=sym, seed=bits)
    assert (pack_custom(qw).zero_points is None) == sym
    x = np.random.default_rng(1).standard_normal((m, 192)).astype(np.float32)
    assert_matches(run_op(qw, x), reference(qw, x), np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 100])
@pytest.mark.parametrize("sym", [True, False])
def test_act_order_g_idx(bits: int, m: int, sym: bool) -> None:
    qw = make_weight(19, 200, bits, 64, sym=sym, act_order=True, seed=bits)
    x = np.random.default_rng(m).standard_normal((m, 200)).astype(np.float32)
    bias = np.linspace(-1, 1, 19).astype(np.float32)
    assert_matches(run_op(qw, x, bias), reference(qw, x, bias), np.float32)


@pytest.mark.parametrize("m", [1, 40])
def test_g_idx_with_more_groups_than_blocks(m: int) -> None:
    """n_groups is scales.shape[1] with g_idx, independent of ceil(K / block_size)."""
    qw = make_weight(12, 128, 4, 64, act_order=True, n_groups=7, seed=3)
    assert pack_custom(qw).scales.shape == (12, 7)
    x = np.random.default_rng(0).standard_normal((m, 128)).astype(np.float32)
    assert_matches(run_op(qw, x), reference(qw, x), np.float32)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m", [1, 3, 100])
@pytest.mark.parametrize("act_order", [False, True])
def test_float16(bits: int, m: int, act_order: bool) -> None:
    qw = make_weight(33, 200, bits, 64, act_order=act_order, dtype=np.float16, seed=bits)
    x = np.random.default_rng(m).standard_normal((m, 200)).astype(np.float16)
    bias = np.random.default_rng(2).standard_normal(33).astype(np.float16)
    y = run_op(qw, x, bias)
    assert y.dtype == np.float16
    assert_matches(y, reference(qw, x, bias), np.float16)


def test_leading_batch_dimensions() -> None:
    qw = make_weight(31, 96, 4, 32, seed=7)
    x = np.random.default_rng(0).standard_normal((2, 3, 96)).astype(np.float32)
    y = run_op(qw, x)
    assert y.shape == (2, 3, 31)
    assert_matches(y, reference(qw, x), np.float32)


def test_empty_batch() -> None:
    qw = make_weight(8, 64, 4, 32)
    y = run_op(qw, np.zeros((0, 64), np.float32))
    assert y.shape == (0, 8)


@pytest.mark.parametrize("k,group", [(1024, 1146), (4096, None)])
@pytest.mark.parametrize("m", [1, 3])
def test_decode_path_zero_point_does_not_cancel(k: int, group: int | None, m: int) -> None:
    """Defect 9: with 8-bit symmetric codes (zero point 128) the few-row path
    used to compute s * (sum(a*c) - z*sum(a)), two large sums that cancel: 2.7
    per element and 1.9 RMS (in U32 * S) on the first shape, 0.9 / 0.6 on the
    second; zero-centred codes give 0.5 / 0.15. Float32 numpy: 0.4 / 0.17.
    (The scalar path keeps two accumulators, so sums almost sequentially:
    0.56 RMS on the second shape, under the fuzz's bound but not this one.)"""
    if custom_ops.cpu_isa() == "scalar":
        pytest.skip("the scalar path sums almost sequentially; test_fuzz_gptq_matmul bounds it")
    qw = make_weight(64, k, 8, group, sym=True, seed=1)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    worst, rms = error_in_rounding_units(qw, x, run_op(qw, x))
    assert worst <= 1.0 and rms <= 0.3, (worst, rms)


_PEAK_RSS_CHILD = textwrap.dedent(r"""
    import re, sys
    import numpy as np
    from onnx_gptq import custom_ops
    from onnx_gptq.pack import CustomOpTensors
    K, N, bits, block_size, M = (int(v) for v in sys.argv[1:])
    blob = -(-block_size * bits // 8)
    codes = np.zeros((N, 1, blob), np.uint8)  # every code 0, zero point 2**(bits-1)
    tensors = CustomOpTensors(B=codes, scales=np.ones((N, 1), np.float32), zero_points=None, g_idx=None,
                              K=K, N=N, bits=bits, block_size=block_size)
    session = custom_ops.make_session(custom_ops.gptq_matmul_model(tensors))
    def status_kib(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    y = session.run(None, {"A": np.ones((M, K), np.float32)})[0]
    print(status_kib("VmHWM") - before, y.min(), y.max())
""")


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self")
def test_memory_follows_K_not_block_size(m: int) -> None:
    """Defect 6: K=3 with block_size=2**24 (allowed) used to size the kernel's
    buffers by n_blocks * block_size: 64 MiB for one row, 1 GiB for five. The
    run's peak RSS growth is measured in a child process (Linux /proc)."""
    k, n, bits, block_size = 3, 2, 2, 1 << 24
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, *map(str, (k, n, bits, block_size, m))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew_kib, y_min, y_max = out.stdout.split()
    assert float(y_min) == float(y_max) == -2.0 * k  # (0 - 2) * 1 per column
    assert int(grew_kib) < 16 * 1024, f"the run grew the peak RSS by {int(grew_kib) // 1024} MiB"


def test_large_prefill_shape_matches() -> None:
    """Several k panels and tile groups in the GEMM path (K spans many panels)."""
    qw = make_weight(70, 2304, 4, 128, seed=11)
    x = np.random.default_rng(0).standard_normal((65, 2304)).astype(np.float32)
    assert_matches(run_op(qw, x), reference(qw, x), np.float32)


def _ort_version() -> tuple[int, int]:
    major, minor = ort.__version__.split(".")[:2]
    return int(major), int(minor)


def test_output_shape_is_inferred() -> None:
    """onnxruntime learns Y's type, and from 1.24 its shape, from the op.

    (The library declares shape inference only to onnxruntime >= 1.24, whose
    shape-inference context survives absent optional inputs.)
    """
    qw = make_weight(24, 64, 4, 32)
    model = custom_ops.gptq_matmul_model(pack_custom(qw), input_shape=["batch", "seq", 64],
                                         bias=np.zeros(24, np.float32))
    assert list(model.graph.node[0].input)[3:] == ["zero_points", "", "bias"]
    model.graph.output[0].type.tensor_type.ClearField("shape")
    session = custom_ops.make_session(model)
    assert session.get_outputs()[0].type == "tensor(float)"
    if _ort_version() >= (1, 24):
        assert session.get_outputs()[0].shape == ["batch", "seq", 24]


def test_optional_inputs_as_empty_names_or_omitted() -> None:
    """Absent zero_points with g_idx given (empty name in the middle), and trailing inputs omitted."""
    qw = make_weight(16, 64, 4, 32, sym=True, act_order=True)
    model = custom_ops.gptq_matmul_model(pack_custom(qw))
    assert list(model.graph.node[0].input) == ["A", "B", "scales", "", "g_idx"]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert_matches(custom_ops.make_session(model).run(None, {"A": x})[0], reference(qw, x), np.float32)


# --------------------------------------------------------------------------- errors


def _model_with(qw: QuantizedWeight, replace: dict[str, np.ndarray] | None = None,
                attrs: dict[str, int] | None = None, input_shape: list | None = None) -> onnx.ModelProto:
    model = custom_ops.gptq_matmul_model(pack_custom(qw), input_shape=input_shape)
    for init in model.graph.initializer:
        if replace and init.name in replace:
            init.CopyFrom(numpy_helper.from_array(replace[init.name], init.name))
    for attr in model.graph.node[0].attribute:
        if attrs and attr.name in attrs:
            attr.CopyFrom(helper.make_attribute(attr.name, attrs[attr.name]))
    return model


def _run_error(model: onnx.ModelProto, x: np.ndarray) -> str:
    with pytest.raises(Exception) as info:  # onnxruntime's own exception types
        custom_ops.make_session(model).run(None, {"A": x})
    return str(info.value)


def test_wrong_B_shape_names_input() -> None:
    qw = make_weight(16, 128, 4, 32)
    t = pack_custom(qw)
    msg = _run_error(_model_with(qw, {"B": t.B[:, :3]}), np.zeros((1, 128), np.float32))
    assert "input 'B'" in msg and "expected shape [16, 4, 16]" in msg and "got [16, 3, 16]" in msg


def test_wrong_scales_shape_names_input() -> None:
    qw = make_weight(16, 128, 4, 32)
    t = pack_custom(qw)
    msg = _run_error(_model_with(qw, {"scales": t.scales[:, :2]}), np.zeros((1, 128), np.float32))
    assert "input 'scales'" in msg and "expected shape [16, 4]" in msg and "got [16, 2]" in msg


def test_wrong_scales_type_names_input() -> None:
    qw = make_weight(16, 128, 4, 32)
    t = pack_custom(qw)
    msg = _run_error(_model_with(qw, {"scales": t.scales.astype(np.float16)}), np.zeros((1, 128), np.float32))
    assert "input 'scales'" in msg and "expected type float32" in msg and "got float16" in msg


def test_wrong_zero_points_shape_names_input() -> None:
    qw = make_weight(16, 128, 4, 32)
    t = pack_custom(qw)
    msg = _run_error(_model_with(qw, {"zero_points": t.zero_points[:8]}), np.zeros((1, 128), np.float32))
    assert "input 'zero_points'" in msg and "expected shape [16, 4]" in msg and "got [8, 4]" in msg


def test_g_idx_out_of_range_names_input() -> None:
    qw = make_weight(16, 128, 4, 32, act_order=True)
    bad = pack_custom(qw).g_idx.copy()
    bad[77] = 4  # n_groups = 4
    msg = _run_error(_model_with(qw, {"g_idx": bad}), np.zeros((2, 128), np.float32))
    assert "input 'g_idx'" in msg and "entry 77 is 4" in msg and "[0, 4)" in msg
    bad[77] = -1
    assert "entry 77 is -1" in _run_error(_model_with(qw, {"g_idx": bad}), np.zeros((2, 128), np.float32))


def test_K_attribute_mismatch_names_input() -> None:
    qw = make_weight(16, 128, 4, 32)
    model = _model_with(qw, input_shape=["m", "k"])
    msg = _run_error(model, np.zeros((2, 96), np.float32))
    assert "input 'A'" in msg and "[..., 128]" in msg and "got [2, 96]" in msg
    # An attribute K that disagrees with the packed weight is reported on A as well.
    msg = _run_error(_model_with(qw, attrs={"K": 160}, input_shape=["m", "k"]), np.zeros((2, 128), np.float32))
    assert "input 'A'" in msg and "[..., 160]" in msg


@pytest.mark.parametrize("elem,name", [(onnx.TensorProto.BFLOAT16, "bfloat16"), (onnx.TensorProto.DOUBLE, "float64")])
def test_unsupported_activation_type_names_the_cpu_types(elem: int, name: str) -> None:
    """Defect 10: A of a type the CPU kernel lacks fails at session creation
    with the types it takes, not "could not find an implementation"."""
    qw = make_weight(16, 64, 4, 32)
    model = _model_with(qw)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = elem
    scales = next(init for init in model.graph.initializer if init.name == "scales")
    scales.CopyFrom(helper.make_tensor("scales", elem, qw.scales.shape, qw.scales.ravel().tolist()))
    with pytest.raises(Exception) as info:
        custom_ops.make_session(model)
    msg = str(info.value)
    assert f"GptqMatMul node 'gptq_matmul': input 'A' (#0, tensor 'A') is {name}" in msg
    assert "the CPU kernel takes float32 or float16" in msg
    assert ("CUDA" in msg) == (name == "bfloat16")


def test_bad_bits_attribute_fails_at_session_creation() -> None:
    qw = make_weight(16, 128, 4, 32)
    with pytest.raises(Exception, match="bits=5 must be 2, 3, 4 or 8"):
        custom_ops.make_session(_model_with(qw, attrs={"bits": 5}))


# --------------------------------------------------------------------------- module


def test_library_path_override(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(custom_ops.LIBRARY_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(custom_ops.CustomOpsLibraryError, match="is not a file"):
        custom_ops.library_path()


def test_missing_library_says_how_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(custom_ops.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(custom_ops, "_candidates", lambda: [])
    with pytest.raises(custom_ops.CustomOpsLibraryError, match="pip install"):
        custom_ops.library_path()


def test_library_introspection() -> None:
    assert isinstance(custom_ops.has_cuda_kernels(), bool)
    assert custom_ops.cpu_isa() in ISAS
    assert (custom_ops.DOMAIN, custom_ops.OP_TYPE) == ("onnx_gptq", "GptqMatMul")


def test_session_options_sets_threads() -> None:
    options = custom_ops.session_options(intra_op_num_threads=1)
    assert options.intra_op_num_threads == 1
    qw = make_weight(8, 64, 4, 32)
    session = ort.InferenceSession(custom_ops.gptq_matmul_model(pack_custom(qw)).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = np.ones((1, 64), np.float32)
    assert_matches(session.run(None, {"A": x})[0], reference(qw, x), np.float32)


def test_custom_op_tensors_model_roundtrip() -> None:
    """gptq_matmul_model stores exactly pack_custom's arrays."""
    qw = make_weight(8, 64, 3, 32, act_order=True)
    t = pack_custom(qw)
    model = custom_ops.gptq_matmul_model(t)
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(stored["B"], t.B)
    np.testing.assert_array_equal(stored["g_idx"], t.g_idx)
    assert isinstance(t, CustomOpTensors)
