"""ctypes binding of the CUDA GptqMatMul kernels, for tests and benchmarks.

onnxruntime runs the kernels through the CUDA execution provider op
(custom_ops/ort/cuda_gptq_matmul.cc); this module calls the same plain C entry
point (custom_ops/kernels/cuda/gptq_cuda.h) on torch CUDA tensors, so the
kernels can be checked and timed where onnxruntime-gpu is not installed.

The packed layout is the one :func:`onnx_gptq.pack.pack_custom` writes
(docs/CUSTOM_OP.md); nothing here re-packs or re-quantizes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
from typing import Union

import numpy as np
import torch

from onnx_gptq.pack import CustomOpTensors, blob_size_of, n_blocks_of

logger = logging.getLogger(__name__)

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class CudaKernelInputError(ValueError):
    """Tensors handed to the CUDA kernel disagree with the op's attributes or each other."""


class CudaKernelUnavailableError(RuntimeError):
    """The custom-op library was built without CUDA, or no CUDA device is usable."""


class CudaKernelLaunchError(RuntimeError):
    """The CUDA runtime reported an error while launching the kernel."""


@dataclasses.dataclass(frozen=True)
class CudaGptqWeight:
    """`onnx_gptq.GptqMatMul` inputs 1-4 on one CUDA device, scales in the compute dtype T.

    Attributes:
        B: uint8 [N, n_blocks, blob_size], contiguous.
        scales: T [N, n_groups] (T = float32, float16 or bfloat16).
        zero_points: uint8 [N, n_groups], or None for the symmetric 2**(bits-1).
        g_idx: int32 [K], or None when column k is in group k // block_size.
        K, N, bits, block_size: the op's attributes.
    """

    B: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    g_idx: torch.Tensor | None
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    """The built custom-op library with its CUDA entry points typed."""
    from onnx_gptq.runtime import custom_ops  # lazily: the library may not be built yet

    path = custom_ops.library_path()
    lib = ctypes.CDLL(str(path))
    if not hasattr(lib, "onnx_gptq_cuda_matmul"):
        raise CudaKernelUnavailableError(
            f"{path} was built without CUDA kernels (no onnx_gptq_cuda_matmul symbol); "
            "rebuild with nvcc available and -DONNX_GPTQ_CUDA=ON")
    lib.onnx_gptq_cuda_matmul.restype = ctypes.c_int
    lib.onnx_gptq_cuda_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
    ]
    lib.onnx_gptq_cuda_check_g_idx.restype = ctypes.c_int
    lib.onnx_gptq_cuda_check_g_idx.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p,
    ]
    lib.onnx_gptq_cuda_last_launch_error.restype = ctypes.c_char_p
    lib.onnx_gptq_cuda_last_launch_error.argtypes = []
    return lib


def _status(name: str) -> int:
    """The number of status code `name` ("OK", "ERR_G_IDX", ...), as the library defines it."""
    from onnx_gptq.runtime import custom_ops

    return custom_ops.status_codes()[name]


def error_string(status: int) -> str:
    """The library's description of a kernel status code (custom_ops/kernels/gptq_status.h)."""
    from onnx_gptq.runtime import custom_ops

    return custom_ops.status_string(status)


def _stream_of(device: torch.device) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def _require_cuda(tensor: torch.Tensor, name: str) -> None:
    if not tensor.is_cuda:
        raise CudaKernelInputError(f"{name} must be a CUDA tensor, got one on {tensor.device}")


def check_g_idx(g_idx: torch.Tensor, n_groups: int) -> None:
    """Raise CudaKernelInputError if any g_idx entry lies outside [0, n_groups) (synchronises).

    Args:
        g_idx: int32 [K] CUDA tensor.
        n_groups: number of groups (columns of scales).
    """
    _require_cuda(g_idx, "g_idx")
    bad = ctypes.c_int64(-1)
    with torch.cuda.device(g_idx.device):
        status = _library().onnx_gptq_cuda_check_g_idx(
            g_idx.data_ptr(), g_idx.numel(), n_groups, ctypes.byref(bad), _stream_of(g_idx.device))
    if status == _status("ERR_G_IDX"):
        value = int(g_idx[bad.value].item())
        raise CudaKernelInputError(
            f"g_idx[{bad.value}] = {value} is outside [0, {n_groups}) (n_groups = scales.shape[1])")
    _raise_for_status(status, "check_g_idx", f"g_idx {tuple(g_idx.shape)}, n_groups {n_groups}")


def to_device(t: CustomOpTensors, device: torch.device | str, dtype: torch.dtype) -> CudaGptqWeight:
    """Copy packed GptqMatMul inputs to a CUDA device, scales cast to the compute dtype.

    Args:
        t: the output of :func:`onnx_gptq.pack.pack_custom`.
        device: a CUDA device.
        dtype: T, the activations' dtype (float32, float16 or bfloat16); an ONNX
            graph computing in T holds its scales in T too.
    Returns:
        The device tensors; g_idx, when present, has been range-checked.
    """
    if dtype not in _DTYPE_CODES:
        raise CudaKernelInputError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    device = torch.device(device)
    scales = torch.from_numpy(np.ascontiguousarray(t.scales, dtype=np.float32)).to(device=device, dtype=dtype)
    weight = CudaGptqWeight(
        B=torch.from_numpy(np.ascontiguousarray(t.B, dtype=np.uint8)).to(device),
        scales=scales.contiguous(),
        zero_points=None if t.zero_points is None
        else torch.from_numpy(np.ascontiguousarray(t.zero_points, dtype=np.uint8)).to(device),
        g_idx=None if t.g_idx is None else torch.from_numpy(np.ascontiguousarray(t.g_idx, dtype=np.int32)).to(device),
        K=int(t.K), N=int(t.N), bits=int(t.bits), block_size=int(t.block_size),
    )
    if weight.g_idx is not None:
        check_g_idx(weight.g_idx, weight.n_groups)
    return weight


def _expect(tensor: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...],
            device: torch.device) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape or tensor.device != device:
        raise CudaKernelInputError(
            f"{name} must be {dtype} {list(shape)} on {device}, "
            f"got {tensor.dtype} {list(tensor.shape)} on {tensor.device}")
    if not tensor.is_contiguous():
        raise CudaKernelInputError(f"{name} {list(tensor.shape)} must be contiguous")


def _check_inputs(x: torch.Tensor, w: CudaGptqWeight, bias: torch.Tensor | None) -> None:
    _require_cuda(x, "x")
    if x.dtype not in _DTYPE_CODES:
        raise CudaKernelInputError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != w.K:
        raise CudaKernelInputError(f"x must have shape [..., K={w.K}], got {list(x.shape)}")
    n_blocks = n_blocks_of(w.K, w.block_size)
    _expect(w.B, "B", torch.uint8, (w.N, n_blocks, blob_size_of(w.block_size, w.bits)), x.device)
    if w.scales.dim() != 2:
        raise CudaKernelInputError(f"scales must be 2-D [N, n_groups], got {list(w.scales.shape)}")
    n_groups = w.n_groups if w.g_idx is not None else n_blocks
    _expect(w.scales, "scales", x.dtype, (w.N, n_groups), x.device)
    if w.zero_points is not None:
        _expect(w.zero_points, "zero_points", torch.uint8, (w.N, n_groups), x.device)
    if w.g_idx is not None:
        _expect(w.g_idx, "g_idx", torch.int32, (w.K,), x.device)
    if bias is not None:
        _expect(bias, "bias", x.dtype, (w.N,), x.device)


def _raise_for_status(status: int, what: str, shapes: str) -> None:
    if status == _status("OK"):
        return
    message = f"{what}: {error_string(status)} ({shapes})"
    if status == _status("ERR_LAUNCH"):
        raise CudaKernelLaunchError(f"{message}: {_library().onnx_gptq_cuda_last_launch_error().decode()}")
    raise CudaKernelInputError(message)


def gptq_matmul_cuda(x: torch.Tensor, t: Union[CustomOpTensors, CudaGptqWeight],
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y = x @ dequant(W)^T (+ bias) with the CUDA GptqMatMul kernels.

    Args:
        x: T [..., K] CUDA tensor, T = float32, float16 or bfloat16.
        t: packed weight: host tensors from `pack_custom` (copied to x's device
            with scales cast to T on every call) or a :class:`CudaGptqWeight`.
        bias: optional T [N] on x's device.
    Returns:
        T [..., N] on x's device, computed on the current CUDA stream.
    Raises:
        CudaKernelInputError: a tensor's dtype, shape or device disagrees.
        CudaKernelUnavailableError: the library has no CUDA kernels.
        CudaKernelLaunchError: the CUDA runtime refused the launch.
    """
    _require_cuda(x, "x")
    w = t if isinstance(t, CudaGptqWeight) else to_device(t, x.device, x.dtype)
    _check_inputs(x, w, bias)
    x2 = x.reshape(-1, w.K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((*x.shape[:-1], w.N), dtype=x.dtype, device=x.device)

    def ptr(tensor: torch.Tensor | None) -> int | None:
        return None if tensor is None else tensor.data_ptr()

    with torch.cuda.device(x.device):
        status = _library().onnx_gptq_cuda_matmul(
            ptr(x2), ptr(w.B), ptr(w.scales), ptr(w.zero_points), ptr(w.g_idx), ptr(bias), ptr(y),
            m, w.K, w.N, w.bits, w.block_size, w.n_groups, _DTYPE_CODES[x.dtype], _stream_of(x.device))
    _raise_for_status(status, "gptq_matmul_cuda",
                      f"x {list(x.shape)}, B {list(w.B.shape)}, scales {list(w.scales.shape)}, "
                      f"K={w.K} N={w.N} bits={w.bits} block_size={w.block_size}")
    return y
