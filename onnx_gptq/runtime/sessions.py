"""onnxruntime, in one place: providers, the session factory, feeds and errors.

Every onnxruntime session onnx-gptq opens (calibration, sequential stages,
self-calibration, evaluation, the export check, the custom-op helpers) comes
from :func:`make_session`, which knows how to hand onnxruntime a model whose
weights are external files in the user's directory or tensors in memory, when
to register the custom-op library, and how to quiet onnxruntime's logging.
Errors onnxruntime raises are turned into one-line :class:`UserError`s by
:func:`onnx_gptq.errors.first_line` and :meth:`Session.run`. Only this module and the custom-op
loader (`runtime.custom_ops`) import onnxruntime.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnx_gptq.contract import GPTQ_DOMAIN
from onnx_gptq.errors import CalibrationError, ConfigError, ModelError, UserError, first_line

logger = logging.getLogger(__name__)

#: onnxruntime's session option naming the folder external data locations are relative to.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
#: onnxruntime's ERROR level: its "removing unused initializer" warnings say nothing to a user.
QUIET_LOG_SEVERITY = 3

Provider = str | tuple[str, dict[str, Any]]
ModelSource = str | os.PathLike | bytes | onnx.ModelProto

# Caller-supplied SessionOptions the custom-op library is already registered on:
# onnxruntime rejects a second registration of the domain.
_HAS_CUSTOM_OPS: "weakref.WeakSet[ort.SessionOptions]" = weakref.WeakSet()


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build has."""
    return list(ort.get_available_providers())


def default_providers() -> tuple[str, ...]:
    """CUDA then CPU when this onnxruntime build has CUDA, else CPU alone."""
    if "CUDAExecutionProvider" in available_providers():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def provider_name(entry: Provider) -> str:
    """The name of a provider given bare or as a (name, options) pair."""
    return entry if isinstance(entry, str) else entry[0]


def check_providers(providers: Iterable[Provider]) -> tuple[Provider, ...]:
    """Refuse execution providers this onnxruntime build lacks (instead of a silent CPU fallback).

    Args:
        providers: provider names, or (name, options) pairs, in order of preference.

    Returns:
        The same entries as a tuple.

    Raises:
        ConfigError: none given, or a provider is not available; the message
            lists those that are.
    """
    providers = tuple(providers)
    if not providers:
        raise ConfigError("providers: at least one execution provider is needed")
    available = available_providers()
    for entry in providers:
        if provider_name(entry) not in available:
            raise ConfigError(f"providers: {provider_name(entry)} is not available in this onnxruntime build "
                              f"(available: {', '.join(available)})")
    return providers


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    """Whether any node of `model` (main graph, subgraphs, local functions) is in our
    domain, i.e. whether a session for it needs the custom-op library registered."""
    def walk(nodes: Iterable[onnx.NodeProto]) -> bool:
        for node in nodes:
            if node.domain == GPTQ_DOMAIN:
                return True
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH and walk(attr.g.node):
                    return True
                if attr.type == onnx.AttributeProto.GRAPHS and any(walk(g.node) for g in attr.graphs):
                    return True
        return False

    return walk(model.graph.node) or any(walk(f.node) for f in model.functions)


def ort_feeds(feeds: Mapping[str, Any]) -> dict[str, Any]:
    """Feeds onnxruntime's numpy bridge accepts: bfloat16 arrays (ml_dtypes) become OrtValues.

    Args:
        feeds: input name -> array (any dtype; bfloat16 as ``ml_dtypes.bfloat16``).

    Returns:
        input name -> numpy array or ``ort.OrtValue``, ready for ``session.run``.
    """
    out: dict[str, Any] = {}
    for name, value in feeds.items():
        array = np.asarray(value)
        if array.dtype.name == "bfloat16":
            array = np.ascontiguousarray(array)
            out[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16),
                                                                        onnx.TensorProto.BFLOAT16)
        else:
            out[name] = array
    return out


class Session:
    """An onnxruntime session and the buffers it reads weights from.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        what: what the session runs, for messages ("calibration", "model 'x.onnx'").
    """

    def __init__(self, session: ort.InferenceSession, what: str, keepalive: list[Any]) -> None:
        self.session = session
        self.what = what
        self._keepalive = keepalive  # in-memory "files" onnxruntime may still read

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, outputs: Sequence[str] | None, feeds: Mapping[str, Any], *, context: str = "",
            error: type[UserError] = CalibrationError) -> list[Any]:
        """Run once; onnxruntime's failure becomes `error` with its first line.

        Args:
            outputs: output names (None: all).
            feeds: input name -> array (bfloat16 handled, see :func:`ort_feeds`).
            context: prefix for the message ("calibration batch 3").
            error: the UserError subclass raised.
        Returns:
            The outputs, in order.
        """
        try:
            return self.session.run(list(outputs) if outputs is not None else None, ort_feeds(feeds))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's error types are not exported stably
            raise error(f"{context or self.what}: onnxruntime failed: {first_line(exc)}") from exc


def _cuda_full_float32(providers: Sequence[Provider]) -> list[Provider]:
    """CUDA named bare gets full-float32 GEMMs.

    onnxruntime's CUDA provider runs float32 MatMuls in TF32 (10-bit mantissa) by
    default; X^T X sums are worth their full precision, as in the reference,
    whose torch matmuls do not use TF32 by default.
    """
    return [("CUDAExecutionProvider", {"use_tf32": "0"}) if entry == "CUDAExecutionProvider" else entry
            for entry in providers]


def _config_entry(options: ort.SessionOptions, key: str) -> str | None:
    try:
        return str(options.get_session_config_entry(key))
    except RuntimeError:  # onnxruntime's way of saying "not set"
        return None


def _register_custom_ops(options: ort.SessionOptions) -> None:
    from onnx_gptq.runtime import custom_ops

    if options not in _HAS_CUSTOM_OPS:
        custom_ops.register(options)  # raises CustomOpsLibraryError (a UserError) saying how to build it
        _HAS_CUSTOM_OPS.add(options)


def _needs_custom_ops(model: ModelSource) -> bool:
    if isinstance(model, onnx.ModelProto):
        return uses_custom_ops(model)
    if isinstance(model, bytes):
        return GPTQ_DOMAIN.encode() in model  # cheap: the domain string appears in any node using it
    return uses_custom_ops(onnx.load(os.fspath(model), load_external_data=False))


def make_session(model: ModelSource, *, providers: Sequence[Provider] = ("CPUExecutionProvider",),
                 options: ort.SessionOptions | None = None, what: str = "model",
                 custom_ops: bool | None = None, external_folder: Path | None = None,
                 in_memory: Mapping[str, np.ndarray] | None = None, optimize: bool = False,
                 intra_op_num_threads: int | None = None, full_float32: bool = False,
                 require_providers: bool = False, error: type[UserError] | None = ModelError) -> Session:
    """Open an onnxruntime session: the one place onnx-gptq does.

    Args:
        model: an .onnx path, serialized bytes, or a ModelProto (serialized here,
            so under 2 GiB; use `in_memory` or a path for more).
        providers: execution providers in order of preference (names or
            (name, options) pairs).
        options: session options to use (modified: the custom-op library and
            the external-data folder are set on them); None makes quiet ones.
        what: what the model is, for messages ("model 'x.onnx'", "the stage submodel").
        custom_ops: register the onnx_gptq custom-op library: True, False, or
            None to register it exactly when the graph has nodes of our domain.
        external_folder: the folder external data locations are relative to
            (for a model given as bytes or a proto).
        in_memory: external data "files" held in memory, location -> uint8
            buffer; onnxruntime then looks every external location up there, so
            files in `external_folder` are memory-mapped into the table too.
        optimize: extended graph optimizations (calibration graphs) instead of
            onnxruntime's default level.
        intra_op_num_threads: the session's intra-op thread count.
        full_float32: run float32 GEMMs in full precision on CUDA (no TF32).
        require_providers: refuse a session that silently fell back from a
            requested provider (e.g. CUDA libraries missing).
        error: the UserError subclass raised when onnxruntime refuses the model;
            None lets onnxruntime's own exception through (for callers of the public helpers).
    Returns:
        The :class:`Session`.
    Raises:
        `error`: onnxruntime cannot load the model; the message names `what`.
        ConfigError: a requested provider could not be initialised (with `require_providers`).
        CustomOpsLibraryError: the graph needs the custom-op library and it is not built.
    """
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = QUIET_LOG_SEVERITY
    if optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = intra_op_num_threads
    if custom_ops if custom_ops is not None else _needs_custom_ops(model):
        _register_custom_ops(options)
    keepalive: list[Any] = []
    if in_memory:
        names, buffers = list(in_memory), list(in_memory.values())
        if external_folder is not None and isinstance(model, onnx.ModelProto):
            for location in sorted(_external_files(model) - set(in_memory)):
                path = external_folder / location
                try:
                    buffers.append(np.memmap(path, dtype=np.uint8, mode="r"))
                except OSError as exc:
                    raise ModelError(f"{what}: cannot read external data file '{path}' ({exc})") from exc
                names.append(location)
        options.add_external_initializers_from_files_in_memory(names, buffers, [b.nbytes for b in buffers])
        keepalive.extend(buffers)
    elif external_folder is not None and _config_entry(options, EXTERNAL_FOLDER_KEY) != str(external_folder):
        options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(external_folder))
    source: str | bytes = (model.SerializeToString() if isinstance(model, onnx.ModelProto)
                           else model if isinstance(model, bytes) else os.fspath(model))
    session_providers = _cuda_full_float32(providers) if full_float32 else list(providers)
    try:
        session = ort.InferenceSession(source, options, providers=session_providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unrelated types
        if error is None:
            raise
        raise error(f"onnxruntime cannot load {what}: {first_line(exc)}") from exc
    if require_providers:
        active = session.get_providers()
        for entry in providers:
            if provider_name(entry) not in active:
                raise ConfigError(f"providers: {provider_name(entry)} could not be initialised by onnxruntime "
                                  f"(the session runs on {', '.join(active)})")
    return Session(session, what, keepalive)


def _external_files(model: onnx.ModelProto) -> set[str]:
    files: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in tensor.external_data if e.key == "location")
    return files


__all__ = ["EXTERNAL_FOLDER_KEY", "Provider", "Session", "available_providers", "check_providers",
           "default_providers", "first_line", "make_session", "ort_feeds", "provider_name", "uses_custom_ops"]
