"""The custom-op loader: finds the library that runs ``onnx_gptq.GptqMatMul`` (docs/CUSTOM_OP.md).

The op lives in a shared library built from ``custom_ops/`` by ``pip install .``
(or ``pip install -e .``) and shipped in ``onnx_gptq/_lib/``. This module finds
that library and registers it on onnxruntime session options; sessions
themselves come from :func:`onnx_gptq.runtime.sessions.make_session`
(:func:`make_session` here is its shortcut with the library always registered).
The environment variable ``ONNX_GPTQ_CUSTOM_OPS_LIB`` overrides where the
library is looked for (e.g. a sanitizer build).

The packed layout of the op's inputs comes from :func:`onnx_gptq.pack.pack_custom`;
:func:`gptq_matmul_model` wraps such tensors in a one-node model (tests,
benchmarks), with the input order of :data:`onnx_gptq.contract.GPTQ_INPUTS`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import pathlib
import sys
from typing import Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_gptq.contract import GPTQ_DOMAIN, GPTQ_INPUTS, GPTQ_OP_TYPE, GPTQ_OP_VERSION
from onnx_gptq.errors import UserError
from onnx_gptq.pack import CustomOpTensors

logger = logging.getLogger(__name__)

DOMAIN = GPTQ_DOMAIN
OP_TYPE = GPTQ_OP_TYPE
OP_VERSION = GPTQ_OP_VERSION
LIBRARY_ENV = "ONNX_GPTQ_CUSTOM_OPS_LIB"

if sys.platform == "darwin":
    LIBRARY_NAME = "libonnx_gptq_ops.dylib"
elif sys.platform == "win32":
    LIBRARY_NAME = "onnx_gptq_ops.dll"
else:
    LIBRARY_NAME = "libonnx_gptq_ops.so"

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]

_BUILD_HINT = (
    "build it from the onnx-gptq checkout with `pip install .` or `pip install -e .` "
    "(needs a C++17 compiler and CMake; `make install` does the latter), "
    f"or set {LIBRARY_ENV} to a built {LIBRARY_NAME}"
)


class CustomOpsLibraryError(UserError):
    """The custom-op library is not built, not found, or cannot be loaded."""


def _candidates() -> list[pathlib.Path]:
    """Where a build may have put the library, most specific first."""
    package_dir = pathlib.Path(__file__).resolve().parents[1]
    found = [package_dir / "_lib" / LIBRARY_NAME]
    # An editable install may keep compiled files next to the installed
    # package metadata rather than in the source tree.
    for entry in sys.path:
        if entry:
            found.append(pathlib.Path(entry) / "onnx_gptq" / "_lib" / LIBRARY_NAME)
    return found


def library_path() -> pathlib.Path:
    """Path of the built custom-op library.

    Returns:
        ``$ONNX_GPTQ_CUSTOM_OPS_LIB`` when set, else the library installed with
        the package (``onnx_gptq/_lib/``).

    Raises:
        CustomOpsLibraryError: the variable names no file, or the library was
            never built; the message says how to build it.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = pathlib.Path(override).expanduser()
        if not path.is_file():
            raise CustomOpsLibraryError(f"{LIBRARY_ENV}={override} is not a file; unset it or {_BUILD_HINT}")
        return path
    for path in _candidates():
        if path.is_file():
            return path
    raise CustomOpsLibraryError(f"the onnx_gptq custom-op library ({LIBRARY_NAME}) is not built: {_BUILD_HINT}")


@functools.lru_cache(maxsize=None)
def _load(path: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise CustomOpsLibraryError(f"cannot load the custom-op library {path}: {exc}") from exc
    lib.onnx_gptq_has_cuda_kernels.restype = ctypes.c_int
    lib.onnx_gptq_cpu_isa.restype = ctypes.c_char_p
    lib.onnx_gptq_cpu_int8_isa.restype = ctypes.c_char_p
    if hasattr(lib, "onnx_gptq_status_name"):  # a library built before the shared codes lacks them
        lib.onnx_gptq_status_name.restype = ctypes.c_char_p
        lib.onnx_gptq_status_name.argtypes = [ctypes.c_int]
        lib.onnx_gptq_status_string.restype = ctypes.c_char_p
        lib.onnx_gptq_status_string.argtypes = [ctypes.c_int]
    return lib


def _status_library() -> ctypes.CDLL:
    path = str(library_path())
    lib = _load(path)
    if not hasattr(lib, "onnx_gptq_status_name"):
        raise CustomOpsLibraryError(f"{path} predates the kernels' shared status codes; rebuild it: {_BUILD_HINT}")
    return lib


def status_codes() -> dict[str, int]:
    """The kernels' status codes, as the library defines them (custom_ops/kernels/gptq_status.h).

    Read from the library rather than copied, so Python and C cannot disagree.

    Returns:
        ``{"OK": 0, "ERR_NULL_POINTER": 1, ...}``: every code, in order.

    Raises:
        CustomOpsLibraryError: the library is missing, cannot be loaded, or predates the codes.
    """
    lib = _status_library()
    codes: dict[str, int] = {}
    while (name := lib.onnx_gptq_status_name(len(codes))) is not None:  # codes are contiguous from 0
        codes[name.decode()] = len(codes)
    return codes


def status_string(status: int) -> str:
    """The library's description of a kernel status code ("success" for 0).

    Raises:
        CustomOpsLibraryError: the library is missing, cannot be loaded, or predates the codes.
    """
    return _status_library().onnx_gptq_status_string(status).decode()


def has_cuda_kernels() -> bool:
    """Whether the library was built with the CUDA kernels (nvcc was found at build time).

    Raises:
        CustomOpsLibraryError: the library is missing or cannot be loaded.
    """
    return bool(_load(str(library_path())).onnx_gptq_has_cuda_kernels())


def cpu_isa() -> str:
    """Instruction set the CPU kernel uses now: ``"avx512"``, ``"avx2"`` or ``"scalar"``.

    The best one the CPU has, unless the environment variable ``ONNX_GPTQ_CPU_ISA``
    asks for a lower one (``avx2`` or ``scalar``), which the kernel reads on every run.
    """
    return _load(str(library_path())).onnx_gptq_cpu_isa().decode()


def register(options: ort.SessionOptions) -> ort.SessionOptions:
    """Register the library on `options` (in place; once per object: onnxruntime
    rejects a second registration of the domain).

    Raises:
        CustomOpsLibraryError: the library is missing.
    """
    path = library_path()
    logger.debug("registering custom-op library %s", path)
    options.register_custom_ops_library(str(path))
    return options


def cpu_int8_isa() -> str:
    """Instruction set of the CPU kernel's int8 path (``accuracy_level=4``) now.

    ``"avx512vnni"``, ``"avxvnni"``, ``"avx2"`` or ``"scalar"``: the best one the
    CPU has, capped by ``ONNX_GPTQ_CPU_ISA`` (``avx2`` or ``scalar``) as :func:`cpu_isa` is.
    """
    return _load(str(library_path())).onnx_gptq_cpu_int8_isa().decode()


def session_options(sess_options: ort.SessionOptions | None = None, *,
                    intra_op_num_threads: int | None = None) -> ort.SessionOptions:
    """Session options with the custom-op library registered.

    Args:
        sess_options: options to register the library on (modified in place);
            None makes new ones. Register a given object only once:
            onnxruntime rejects a second registration of the domain.
        intra_op_num_threads: if given, the session's intra-op thread count
            (the CPU kernel runs on that pool on onnxruntime >= 1.17).
    Returns:
        The options, ready for ``onnxruntime.InferenceSession``.
    Raises:
        CustomOpsLibraryError: the library is missing.
    """
    options = sess_options if sess_options is not None else ort.SessionOptions()
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = intra_op_num_threads
    return register(options)


def make_session(model: ModelLike, providers: Sequence[str] | None = None,
                 sess_options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An onnxruntime session that can run ``onnx_gptq.GptqMatMul`` nodes.

    Args:
        model: path of an .onnx file, serialized model bytes, or a ModelProto
            (serialized here, so under 2 GiB; pass a path for larger models).
        providers: execution providers, default ``["CPUExecutionProvider"]``.
        sess_options: options to use (the library is registered on them);
            None makes new ones.
    Returns:
        The ``onnxruntime.InferenceSession``.
    Raises:
        CustomOpsLibraryError: the library is missing.
        Exception: onnxruntime's own, when it cannot load the model.
    """
    from onnx_gptq.runtime.sessions import make_session as open_session

    what = f"model '{os.fspath(model)}'" if isinstance(model, (str, os.PathLike)) else "the model"
    return open_session(model, providers=list(providers) if providers else ["CPUExecutionProvider"],
                        options=sess_options if sess_options is not None else ort.SessionOptions(),
                        what=what, custom_ops=True, error=None).session


_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def gptq_matmul_model(tensors: CustomOpTensors, dtype: np.dtype | type = np.float32,
                      bias: np.ndarray | None = None, input_shape: Sequence[int | str] | None = None,
                      opset: int = 17, accuracy_level: int = 0) -> onnx.ModelProto:
    """A model with one ``GptqMatMul`` node: input ``A`` -> output ``Y``, weights as initializers.

    Args:
        tensors: the packed weight from :func:`onnx_gptq.pack.pack_custom`.
        dtype: T, float32 or float16 (scales and bias are cast to it).
        bias: optional [N] bias.
        input_shape: shape of A (ints or symbolic names); default ``["M", K]``.
        opset: default-domain opset of the model.
        accuracy_level: the node's ``accuracy_level`` (4: int8 activations on CPU); 0 writes none.
    Returns:
        The model (onnx.checker-valid).
    """
    dtype = np.dtype(dtype)
    if dtype not in _ONNX_TYPES:
        raise ValueError(f"gptq_matmul_model: dtype must be float32 or float16, got {dtype}")
    elem = _ONNX_TYPES[dtype]
    shape = list(input_shape) if input_shape is not None else ["M", tensors.K]
    arrays = {
        "B": np.ascontiguousarray(tensors.B, dtype=np.uint8),
        "scales": np.ascontiguousarray(tensors.scales, dtype=dtype),
        "zero_points": None if tensors.zero_points is None else np.ascontiguousarray(tensors.zero_points,
                                                                                      dtype=np.uint8),
        "g_idx": None if tensors.g_idx is None else np.ascontiguousarray(tensors.g_idx, dtype=np.int32),
        "bias": None if bias is None else np.ascontiguousarray(bias, dtype=dtype),
    }
    inits = [numpy_helper.from_array(array, name) for name, array in arrays.items() if array is not None]
    names = [GPTQ_INPUTS[0]] + [name if arrays[name] is not None else "" for name in GPTQ_INPUTS[1:]]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(OP_TYPE, names, ["Y"], domain=DOMAIN, name="gptq_matmul",
                            K=tensors.K, N=tensors.N, bits=tensors.bits, block_size=tensors.block_size)
    if accuracy_level:
        node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    out_shape = shape[:-1] + [tensors.N]
    graph = helper.make_graph([node], "gptq_matmul",
                              [helper.make_tensor_value_info("A", elem, shape)],
                              [helper.make_tensor_value_info("Y", elem, out_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DOMAIN, OP_VERSION)])
    model.ir_version = 8
    return model
