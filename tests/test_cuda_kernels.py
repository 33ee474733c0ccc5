"""CUDA GptqMatMul kernels against torch `x @ dequant(W).T`.

Every `cuda`-marked test needs an NVIDIA GPU (run with `pytest -m cuda`); the
unmarked tests check the library's C entry points without one (argument
validation happens before any CUDA call).
"""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np
import pytest
import torch

from onnx_gptq.pack import pack_custom
from onnx_gptq.qweight import QuantizedWeight

# Shapes: (K, N). 328 = 10*32 + 8 (a partial last 32-column chunk, K % 8 == 0),
# 333 is odd (tensor cores cannot take it: SIMT path), N values are odd;
# 4104 with N = 33 makes the GEMV split K over 4 warps, with a partial last chunk.
SHAPES = [(328, 77), (1024, 300), (333, 45), (4104, 33)]
MS = (1, 2, 3, 7, 17, 100, 256, 512)
# Group sizes: multiples of 32 (fast paths; 128 leaves a ragged last block),
# 48 and 7 (generic paths), and None = per-channel (block_size = K).
GROUP_SIZES = (32, 64, 128, 48, 7, None)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Allowed |kernel - reference| as a fraction of sum_k |x||W| (rounding of W to T
# on the tensor-core path, and of Y to T).
REL_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _random_weight(rng: np.random.Generator, n: int, k: int, bits: int, group_size: int | None,
                   sym: bool, act_order: bool) -> QuantizedWeight:
    """A QuantizedWeight with random codes, positive scales and (a)symmetric zero points."""
    gs = k if group_size is None else group_size
    n_groups = -(-k // gs)
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    scales = rng.uniform(0.005, 0.05, size=(n, n_groups)).astype(np.float32)
    if sym:
        zeros = np.full((n, n_groups), 1 << (bits - 1), dtype=np.uint8)
    else:
        zeros = rng.integers(0, 1 << bits, size=(n, n_groups), dtype=np.uint8)
    g_idx = None
    if act_order:
        g_idx = (np.arange(k) // gs)[rng.permutation(k)].astype(np.int32)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=gs,
                           g_idx=g_idx, sym=sym)


def _reference(x: torch.Tensor, qw: QuantizedWeight, scales_t: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 x @ W^T (+ bias) with W dequantized from the codes and T-rounded scales.

    Returns:
        (reference [M, N], magnitude [M, N] = |x| @ |W|^T (+ |bias|), the error scale).
    """
    g = torch.from_numpy(qw.group_of_column()).to(x.device)
    codes = torch.from_numpy(qw.codes).to(x.device, torch.float64)
    zeros = torch.from_numpy(qw.zeros).to(x.device, torch.float64)[:, g]
    w = (codes - zeros) * scales_t.double()[:, g]
    y = x.double() @ w.T
    magnitude = x.double().abs() @ w.abs().T
    if bias is not None:
        y = y + bias.double()
        magnitude = magnitude + bias.double().abs()
    return y, magnitude


def _assert_close(y: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype,
                  what: str) -> None:
    err = (y.double() - ref).abs()
    allowed = REL_TOL[dtype] * (magnitude + 1e-3)
    worst = (err / allowed).max().item()
    assert torch.isfinite(y).all(), f"{what}: non-finite outputs"
    assert worst <= 1.0, f"{what}: max error {err.max().item():.3g} is {worst:.2f}x the allowed bound"


@pytest.fixture(scope="module")
def cuda_kernels():
    if not torch.cuda.is_available():
        pytest.fail("cuda-marked tests need a CUDA device (torch.cuda.is_available() is False)")
    from devtools import cuda_kernels

    return cuda_kernels


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: "perchannel" if g is None else f"g{g}")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_dequantized_reference(cuda_kernels, bits: int, group_size: int | None, sym: bool,
                                       dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1000 * bits + (group_size or 0) + 7 * sym)
    for k, n in SHAPES:
        for act_order in (False, True):
            if act_order and group_size is None:
                continue  # one group: g_idx is all zeros, same as no g_idx
            qw = _random_weight(rng, n, k, bits, group_size, sym, act_order)
            w = cuda_kernels.to_device(pack_custom(qw), "cuda", dtype)
            bias = torch.randn(n, device="cuda").to(dtype)
            for m in MS:
                x = torch.randn(m, k, device="cuda").to(dtype)
                with_bias = m % 2 == 1
                y = cuda_kernels.gptq_matmul_cuda(x, w, bias if with_bias else None)
                assert y.shape == (m, n) and y.dtype == dtype
                ref, mag = _reference(x, qw, w.scales, bias if with_bias else None)
                _assert_close(y, ref, mag, dtype,
                              f"bits={bits} group={group_size} sym={sym} g_idx={act_order} K={k} N={n} M={m}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m", [1, 5, 300])
def test_leading_dims_host_tensors_and_misaligned_input(cuda_kernels, dtype: torch.dtype, m: int) -> None:
    rng = np.random.default_rng(m)
    k, n = 256, 96
    qw = _random_weight(rng, n, k, 4, 64, sym=False, act_order=False)
    t = pack_custom(qw)
    x = torch.randn(m, 2, k, device="cuda").to(dtype)
    y = cuda_kernels.gptq_matmul_cuda(x, t)  # host CustomOpTensors: copied per call
    scales_t = torch.from_numpy(qw.scales).to("cuda", dtype)
    ref, mag = _reference(x.reshape(-1, k), qw, scales_t, None)
    assert y.shape == (m, 2, n)
    _assert_close(y.reshape(-1, n), ref, mag, dtype, "leading dims")
    # A whose data pointer is not 16-byte aligned: scalar loads / SIMT path.
    storage = torch.randn(2 * m * k + 1, device="cuda").to(dtype)
    x_odd = storage[1:].view(2 * m, k)
    assert x_odd.data_ptr() % 16 != 0
    y_odd = cuda_kernels.gptq_matmul_cuda(x_odd, t)
    ref, mag = _reference(x_odd, qw, scales_t, None)
    _assert_close(y_odd, ref, mag, dtype, "misaligned A")


@pytest.mark.cuda
def test_large_layer_all_paths_agree(cuda_kernels) -> None:
    """A 4096 x 4096 4-bit layer: GEMV (split-K), tensor cores and SIMT against float64."""
    rng = np.random.default_rng(0)
    k = n = 4096
    qw = _random_weight(rng, n, k, 4, 128, sym=False, act_order=False)
    t = pack_custom(qw)
    for dtype in DTYPES:
        w = cuda_kernels.to_device(t, "cuda", dtype)
        for m in (1, 8, 256):
            x = torch.randn(m, k, device="cuda").to(dtype)
            ref, mag = _reference(x, qw, w.scales, None)
            _assert_close(cuda_kernels.gptq_matmul_cuda(x, w), ref, mag, dtype, f"4096^2 {dtype} M={m}")


@pytest.mark.cuda
def test_bad_inputs_raise_naming_shapes(cuda_kernels) -> None:
    rng = np.random.default_rng(3)
    k, n = 128, 64
    qw = _random_weight(rng, n, k, 4, 32, sym=False, act_order=True)
    w = cuda_kernels.to_device(pack_custom(qw), "cuda", torch.float16)
    x = torch.randn(4, k, device="cuda", dtype=torch.float16)
    err = cuda_kernels.CudaKernelInputError
    with pytest.raises(err, match=r"x must have shape \[\.\.\., K=128\], got \[4, 127\]"):
        cuda_kernels.gptq_matmul_cuda(x[:, :127].contiguous(), w)
    with pytest.raises(err, match=r"scales must be torch.float32 \[64, 4\]"):
        cuda_kernels.gptq_matmul_cuda(x.float(), w)
    with pytest.raises(err, match=r"B must be torch.uint8 \[64, 4, 16\].*got torch.uint8 \[64, 4, 15\]"):
        cuda_kernels.gptq_matmul_cuda(x, dataclasses.replace(w, B=w.B[:, :, :15].contiguous()))
    with pytest.raises(err, match=r"bias must be torch.float16 \[64\]"):
        cuda_kernels.gptq_matmul_cuda(x, w, torch.zeros(65, device="cuda", dtype=torch.float16))
    with pytest.raises(err, match="must be a CUDA tensor"):
        cuda_kernels.gptq_matmul_cuda(x.cpu(), w)
    bad_g_idx = w.g_idx.clone()
    bad_g_idx[17] = 4  # n_groups is 4
    with pytest.raises(err, match=r"g_idx\[17\] = 4 is outside \[0, 4\)"):
        cuda_kernels.check_g_idx(bad_g_idx, w.n_groups)
    # Without g_idx, n_groups must equal n_blocks (checked again in C).
    no_g = dataclasses.replace(w, g_idx=None, scales=w.scales[:, :3].contiguous(),
                               zero_points=w.zero_points[:, :3].contiguous())
    with pytest.raises(err, match=r"scales must be torch.float16 \[64, 4\].*got torch.float16 \[64, 3\]"):
        cuda_kernels.gptq_matmul_cuda(x, no_g)


# ------------------------------------------------------------------ without a GPU


def _cuda_library() -> ctypes.CDLL | None:
    """The built library when it was built with CUDA kernels, else None."""
    from onnx_gptq.runtime import custom_ops

    if not custom_ops.has_cuda_kernels():
        return None
    lib = ctypes.CDLL(str(custom_ops.library_path()))
    lib.onnx_gptq_cuda_matmul.restype = ctypes.c_int
    lib.onnx_gptq_cuda_matmul.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [
        ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    return lib


def test_library_exports_cuda_entry_points_consistently() -> None:
    """has_cuda_kernels() agrees with the symbols, and the C validation runs without a GPU."""
    from onnx_gptq.runtime import custom_ops

    lib = ctypes.CDLL(str(custom_ops.library_path()))
    names = ("onnx_gptq_cuda_matmul", "onnx_gptq_cuda_check_g_idx", "onnx_gptq_cuda_last_launch_error")
    exported = [hasattr(lib, name) for name in names]
    assert exported == [custom_ops.has_cuda_kernels()] * len(names)
    cuda = _cuda_library()
    if cuda is None:
        return  # a CPU-only build: nothing more to check
    status = custom_ops.status_codes()
    fake = ctypes.c_void_p(0x1000)  # never dereferenced: every call below fails validation first

    def call(m: int = 4, k: int = 64, n: int = 8, bits: int = 4, block: int = 32, n_groups: int = 2,
             dtype: int = 1, g_idx: ctypes.c_void_p | None = None, a: ctypes.c_void_p | None = fake) -> int:
        return cuda.onnx_gptq_cuda_matmul(a, fake, fake, None, g_idx, None, fake, m, k, n, bits, block,
                                          n_groups, dtype, None)

    assert call(bits=5) == status["ERR_BITS"]
    assert call(bits=1) == status["ERR_BITS"]
    assert call(block=0) == status["ERR_BLOCK_SIZE"]
    assert call(k=0) == status["ERR_SHAPE"]
    assert call(m=-1) == status["ERR_SHAPE"]
    assert call(n_groups=3) == status["ERR_N_GROUPS"]  # ceil(64 / 32) = 2 without g_idx
    assert call(n_groups=65, g_idx=fake) == status["ERR_N_GROUPS"]  # more groups than columns
    assert call(dtype=3) == status["ERR_DTYPE"]
    assert call(a=None) == status["ERR_NULL_POINTER"]
    assert call(m=0) == status["OK"]  # empty output: nothing launched


# ------------------------------------------------------------------ through onnxruntime's CUDA EP


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("m", [1, 37])
def test_onnxruntime_cuda_provider_runs_the_op(tmp_path, dtype: type, m: int) -> None:
    """The CUDA EP op (custom_ops/ort/cuda_gptq_matmul.cc) is picked, and matches the reference.

    Needs onnxruntime-gpu (CUDAExecutionProvider) next to the CUDA build of the library.
    """
    import json

    import onnxruntime as ort

    from onnx_gptq.runtime import custom_ops

    assert "CUDAExecutionProvider" in ort.get_available_providers(), (
        "this test needs onnxruntime-gpu (CUDAExecutionProvider); available: "
        f"{ort.get_available_providers()}")
    assert custom_ops.has_cuda_kernels(), "the custom-op library was built without CUDA kernels"
    rng = np.random.default_rng(m)
    k, n = 200, 72
    qw = _random_weight(rng, n, k, 4, 64, sym=False, act_order=True)
    bias = rng.standard_normal(n).astype(dtype)
    model = custom_ops.gptq_matmul_model(pack_custom(qw), dtype=dtype, bias=bias, input_shape=[m, 2, k])
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = custom_ops.make_session(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                      sess_options=options)
    x = rng.standard_normal((m, 2, k)).astype(dtype)
    y = session.run(None, {"A": x})[0]
    profile = json.loads(open(session.end_profiling()).read())
    providers = {e["args"].get("provider") for e in profile
                 if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "GptqMatMul"}
    assert providers == {"CUDAExecutionProvider"}, f"GptqMatMul ran on {providers}"
    scales_t = torch.from_numpy(qw.scales.astype(dtype).astype(np.float32))
    ref, mag = _reference(torch.from_numpy(x.reshape(-1, k).astype(np.float32)), qw, scales_t,
                          torch.from_numpy(bias.astype(np.float32)))
    _assert_close(torch.from_numpy(y.reshape(-1, n).astype(np.float32)), ref, mag,
                  torch.float32 if dtype == np.float32 else torch.float16, "onnxruntime CUDA EP")
