"""Calibration through onnxruntime: the X^T X of every target MatMul/Gemm input.

The graph is augmented so that onnxruntime itself computes, per batch, the
float32 product ``X^T X`` of each requested activation ``X`` (reshaped to
``[rows, K]``) and its element count; the host only sums those small outputs in
float64. Activations are never materialised on the host, and nothing is
written next to the user's model: the augmented model is serialised to bytes
(external data is read from the user's directory through onnxruntime's
``session.model_external_initializers_file_folder_path`` option, or, for an
in-memory model too big for one protobuf, handed over as in-memory "files").

Nodes that do not contribute to the requested outputs are pruned from the
augmented copy (onnxruntime itself runs every node whatever outputs are
asked for), so the output head is never computed and, when the activations are
split over several passes to bound memory, early passes stop early in the graph.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_gptq import custom_ops
from onnx_gptq.errors import CalibrationError, ConfigError, ModelError

logger = logging.getLogger(__name__)

# Share of the available memory one run's X^T X outputs (float32 K x K each)
# may take by default; above it the activations are split over several passes.
OUTPUT_MEMORY_SHARE = 0.25

# Above this many bytes of embedded tensor data, tensors are handed to
# onnxruntime from memory rather than copied into the serialized proto: needed
# below protobuf's 2 GiB limit, and faster well before it (SmolLM2's 543 MB:
# 2.4 s less per calibration pass, identical Hessians).
INLINE_BYTES_LIMIT = 64 << 20
# ...and then every embedded tensor of at least this many bytes is.
_INLINE_MIN_TENSOR_BYTES = 1 << 16

_PREFIX = "onnx_gptq_calib"
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# Caller-supplied SessionOptions the custom-op library is already registered on.
_HAS_CUSTOM_OPS: "weakref.WeakSet[ort.SessionOptions]" = weakref.WeakSet()


@dataclasses.dataclass
class HessianStats:
    """Running sum of ``x^T x`` over the rows ``x`` seen by one MatMul input.

    Attributes:
        xtx: float64 [K, K], sum over rows of the outer products x^T x.
        rows: number of rows (tokens, or leading-dim positions) summed.
    """

    xtx: np.ndarray
    rows: int

    @property
    def k(self) -> int:
        """Input features K."""
        return int(self.xtx.shape[0])

    def hessian(self) -> np.ndarray:
        """float64 [K, K]: ``H = 2 X^T X / rows``, the paper's Hessian as a mean over rows.

        Raises:
            CalibrationError: no row was seen (the activation never got computed).
        """
        if self.rows <= 0:
            raise CalibrationError("calibration saw no rows for this activation (empty calibration data?)")
        return 2.0 * self.xtx / self.rows

    def __add__(self, other: "HessianStats") -> "HessianStats":
        """Stats of several consumers of one weight (or of two data sets) summed."""
        if not isinstance(other, HessianStats):
            return NotImplemented
        if other.xtx.shape != self.xtx.shape:
            raise ValueError(f"cannot add HessianStats of shapes {self.xtx.shape} and {other.xtx.shape}")
        return HessianStats(self.xtx + other.xtx, self.rows + other.rows)


@dataclasses.dataclass(frozen=True)
class _Tap:
    """One activation and the extra graph outputs that observe it."""

    name: str  # tensor in the user's graph
    k: int  # last dimension
    xtx_output: str  # float32 [K, K]
    size_output: str  # int64 scalar: number of elements of the activation
    order: int  # position of its producer in graph.node (-1: graph input or initializer)

    @property
    def output_bytes(self) -> int:
        return self.k * self.k * 4


def default_providers() -> tuple[str, ...]:
    """CUDA then CPU when this onnxruntime build has CUDA, else CPU alone."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


Provider = str | tuple[str, dict[str, Any]]


def default_output_budget() -> int:
    """Bytes of X^T X outputs one run may produce: a quarter of the memory available now."""
    import psutil

    return int(psutil.virtual_memory().available * OUTPUT_MEMORY_SHARE)


def check_providers(providers: Sequence[Provider]) -> tuple[Provider, ...]:
    """Refuse execution providers this onnxruntime build lacks (instead of a silent CPU fallback).

    Args:
        providers: provider names, or (name, options) pairs, in order of preference.

    Returns:
        The same entries as a tuple.

    Raises:
        ConfigError: a provider is not available; the message lists those that are.
    """
    providers = tuple(providers)
    if not providers:
        raise ConfigError("providers: at least one execution provider is needed")
    available = ort.get_available_providers()
    for entry in providers:
        name = entry if isinstance(entry, str) else entry[0]
        if name not in available:
            raise ConfigError(f"providers: {name} is not available in this onnxruntime build "
                              f"(available: {', '.join(available)})")
    return providers


def collect_hessians(model: onnx.ModelProto, activations: Sequence[str],
                     batches: Iterable[dict[str, np.ndarray]], *, model_dir: str | os.PathLike[str] | None = None,
                     providers: Sequence[Provider] = ("CPUExecutionProvider",),
                     session_options: ort.SessionOptions | None = None, progress: bool = False,
                     max_output_bytes: int | None = None) -> dict[str, HessianStats]:
    """Run the calibration batches through onnxruntime and sum X^T X of each activation.

    The caller's `model` is not modified. For each activation ``x`` (any
    leading dims, last dim K; float32/float16/bfloat16) the augmented copy
    computes ``xf = Cast<float32>(Reshape(x, [-1, K]))``, ``MatMul(Transpose(xf), xf)``
    and ``Size(xf)``, and exposes them as its only outputs; nodes they do not
    depend on are dropped from the copy.

    Args:
        model: the model; large initializers may be external data (loaded with
            ``load_external_data=False``), their locations relative to `model_dir`.
        activations: names of tensors in the main graph (duplicates allowed).
        batches: feeds, input name -> array, one dict per onnxruntime run. Read
            once per pass; a one-shot iterator is materialised when several
            passes are needed.
        model_dir: directory the external data locations are relative to.
        providers: onnxruntime execution providers, in order of preference (names,
            or (name, options) pairs; a bare "CUDAExecutionProvider" runs with TF32 off).
        session_options: used when passed (the external-data folder option is
            set on it, and the custom-op library registered once if the graph
            needs it); by default extended graph optimisations, which keep the
            observed tensors (they are consumed by the added nodes).
        progress: show a tqdm progress bar per pass.
        max_output_bytes: budget for one run's float32 K x K outputs; when the
            activations need more, they are split into several passes over the
            data (each pass one session, pruned to the graph its activations
            need). None: a quarter of the memory available (`default_output_budget`).
            The float64 sums returned take twice the outputs' total on top.

    Returns:
        activation name -> HessianStats (float64 sums), for every requested name.

    Raises:
        ModelError: an activation is not a tensor of the main graph, or its last
            dimension cannot be determined; external data without `model_dir`.
        CalibrationError: no batches; a batch lacks a model input or names an
            unknown one; onnxruntime fails on a batch (its message is kept).
        ConfigError: a requested execution provider is not available.
    """
    providers = check_providers(providers)
    names = list(dict.fromkeys(activations))
    if not names:
        return {}
    taps = _plan_taps(model, names)
    if max_output_bytes is None:
        max_output_bytes = default_output_budget()
    passes = _split_passes(taps, max_output_bytes)
    if len(passes) > 1:
        logger.info("calibration: %d activations need %.2f GB of outputs per run, over the %.2f GB budget; "
                    "running %d passes over the data", len(taps),
                    sum(t.output_bytes for t in taps) / 1e9, max_output_bytes / 1e9, len(passes))
        if not isinstance(batches, (list, tuple)):
            batches = list(batches)
    folder = _external_folder(model, model_dir)

    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for index, group in enumerate(passes):
        session, keepalive = _make_session(model, group, folder, providers, session_options)
        try:
            _run_pass(session, group, batches, sums, rows, progress=progress,
                      label=f"calibration pass {index + 1}/{len(passes)}" if len(passes) > 1 else "calibration")
        finally:
            del session, keepalive
    out: dict[str, HessianStats] = {}
    for tap in taps:
        xtx = sums.pop(tap.name)
        np.add(xtx, xtx.T, out=xtx)  # the float32 GEMM need not be bitwise symmetric
        xtx *= 0.5
        out[tap.name] = HessianStats(xtx=xtx, rows=rows[tap.name])
    return out


# ---------------------------------------------------------------------------
# Planning: which tensors, what K, how many passes


def _plan_taps(model: onnx.ModelProto, names: list[str]) -> list[_Tap]:
    """One _Tap per activation: its K (declared shape, else the weight it multiplies,
    else shape inference), unique output names, and its producer's position."""
    graph = model.graph
    producers: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producers[out] = i
    inputs = {v.name for v in graph.input}
    inits = {t.name: t for t in graph.initializer}
    used = set(producers) | inputs | set(inits) | {v.name for v in graph.output}
    static_k = _static_last_dims(model)
    weight_k = _k_from_consumers(model)
    inferred: dict[str, int] | None = None
    taps = []
    for j, name in enumerate(names):
        if name not in producers and name not in inputs and name not in inits:
            raise ModelError(f"calibration: activation '{name}' is not a tensor of the model's main graph")
        k = static_k.get(name) or weight_k.get(name)
        if k is None:
            inferred = _inferred_last_dims(model) if inferred is None else inferred
            k = inferred.get(name)
        if k is None:
            raise ModelError(f"calibration: cannot determine the last dimension (K) of activation '{name}'")
        stem = f"{_PREFIX}/{j}"
        while f"{stem}/xtx" in used or f"{stem}/size" in used:
            stem += "_"
        taps.append(_Tap(name=name, k=int(k), xtx_output=f"{stem}/xtx", size_output=f"{stem}/size",
                         order=producers.get(name, -1)))
    return taps


def _dims_of(value: onnx.ValueInfoProto) -> list[int | None] | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value.type.tensor_type.shape.dim]


def _static_last_dims(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> static last dim, from declared inputs, value_info, outputs, initializers."""
    graph = model.graph
    out: dict[str, int] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = _dims_of(value)
        if dims and dims[-1]:
            out[value.name] = int(dims[-1])
    for tensor in graph.initializer:
        if tensor.dims:
            out[tensor.name] = int(tensor.dims[-1])
    return out


def _k_from_consumers(model: onnx.ModelProto) -> dict[str, int]:
    """K of a MatMul/Gemm input read off the constant weight it multiplies."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    weights[node.output[0]] = list(attr.t.dims)
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        dims = weights.get(node.input[1])
        if not dims:
            continue
        if node.op_type == "MatMul" and len(dims) >= 2:
            out.setdefault(node.input[0], int(dims[-2]))
        elif node.op_type == "Gemm" and len(dims) == 2:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                continue  # K is then the first dim of A, not what a row-wise tap needs
            out.setdefault(node.input[0], int(dims[1] if attrs.get("transB", 0) else dims[0]))
    return out


def _inferred_last_dims(model: onnx.ModelProto) -> dict[str, int]:
    """Shape inference on a weightless copy (big tensors become dims-only external refs)."""
    skeleton = _without_initializers(model)
    for tensor in model.graph.initializer:
        slim = skeleton.graph.initializer.add()
        if _embedded_bytes(tensor) > 1024:
            slim.name, slim.data_type = tensor.name, tensor.data_type
            slim.dims.extend(tensor.dims)
            slim.data_location = TensorProto.EXTERNAL
            slim.external_data.add(key="location", value="__onnx_gptq_shape_only__")
        else:
            slim.CopyFrom(tensor)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - shape inference is a best-effort fallback
        logger.debug("shape inference failed: %s", exc)
        return {}
    return _static_last_dims(inferred)


def _split_passes(taps: list[_Tap], budget: int) -> list[list[_Tap]]:
    """Group activations, in graph order, so each group's outputs fit the budget."""
    ordered = sorted(taps, key=lambda t: t.order)
    passes: list[list[_Tap]] = []
    current: list[_Tap] = []
    used = 0
    for tap in ordered:
        if current and used + tap.output_bytes > budget:
            passes.append(current)
            current, used = [], 0
        if tap.output_bytes > budget:
            logger.warning("calibration: activation '%s' alone needs %.2f GB of output (K=%d), over the "
                           "%.2f GB budget; it gets a pass of its own", tap.name, tap.output_bytes / 1e9,
                           tap.k, budget / 1e9)
        current.append(tap)
        used += tap.output_bytes
    if current:
        passes.append(current)
    return passes


# ---------------------------------------------------------------------------
# The augmented copy


def _embedded_bytes(tensor: TensorProto) -> int:
    if tensor.data_location == TensorProto.EXTERNAL:
        return 0
    return tensor.ByteSize()


def _uses_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _external_folder(model: onnx.ModelProto, model_dir: str | os.PathLike[str] | None) -> Path | None:
    if not any(_uses_external(t) for t in model.graph.initializer):
        return None
    if model_dir is None:
        raise ModelError("calibration: the model has external data but no model_dir was given "
                         "to resolve its locations")
    folder = Path(model_dir).resolve()
    if not folder.is_dir():
        raise ModelError(f"calibration: model_dir '{folder}' is not a directory")
    return folder


def _is_repeated(field: Any) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28 deprecates .label
    if is_repeated is not None:
        return bool(is_repeated)
    return field.label == field.LABEL_REPEATED


def _without_initializers(model: onnx.ModelProto, *, nodes: bool = True) -> onnx.ModelProto:
    """A copy of `model` whose graph has no initializers (and no nodes unless `nodes`)."""
    copy = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name == "graph":
            continue
        if _is_repeated(field):
            getattr(copy, field.name).extend(value)
        elif field.message_type is not None:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    for field, value in model.graph.ListFields():
        if field.name == "initializer" or (field.name == "node" and not nodes):
            continue
        if _is_repeated(field):
            getattr(copy.graph, field.name).extend(value)
        elif field.message_type is not None:
            getattr(copy.graph, field.name).CopyFrom(value)
        else:
            setattr(copy.graph, field.name, value)
    return copy


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read by the subgraphs of `node` (If/Loop/Scan bodies)."""
    reads: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else \
            list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            local = {v.name for v in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                local.update(inner.output)
            for inner in g.node:
                reads.update(n for n in inner.input if n and n not in local)
                reads.update(n for n in _subgraph_reads(inner) if n not in local)
            reads.update(v.name for v in g.output if v.name not in local)
    return reads


def _needed_nodes(graph: onnx.GraphProto, targets: set[str]) -> list[int]:
    """Indices (in order) of the nodes that `targets` depend on."""
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer[out] = i
    keep: set[int] = set()
    stack = [producer[n] for n in targets if n in producer]
    while stack:
        i = stack.pop()
        if i in keep:
            continue
        keep.add(i)
        node = graph.node[i]
        for name in list(node.input) + sorted(_subgraph_reads(node)):
            if name and name in producer and producer[name] not in keep:
                stack.append(producer[name])
    return sorted(keep)


def _augmented(model: onnx.ModelProto, taps: list[_Tap]) -> tuple[onnx.ModelProto, dict[str, TensorProto]]:
    """The pruned, augmented copy, and the embedded tensors to hand over separately.

    Returns:
        (model, in_memory): `model` holds every needed initializer, embedded ones
        copied unless their total exceeds INLINE_BYTES_LIMIT, in which case they
        become external references to names in `in_memory` (name -> original tensor).
    """
    src = model.graph
    aug = _without_initializers(model, nodes=False)
    graph = aug.graph
    keep = _needed_nodes(src, {t.name for t in taps})
    graph.node.extend(src.node[i] for i in keep)
    read: set[str] = {t.name for t in taps}
    for node in graph.node:
        read.update(node.input)
        read.update(_subgraph_reads(node))
    needed_inits = [t for t in src.initializer if t.name in read]
    inline_total = sum(_embedded_bytes(t) for t in needed_inits)
    in_memory: dict[str, TensorProto] = {}
    for i, tensor in enumerate(needed_inits):
        if inline_total > INLINE_BYTES_LIMIT and _embedded_bytes(tensor) >= _INLINE_MIN_TENSOR_BYTES:
            location = f"{_PREFIX}_inline_{i}.bin"
            ref = graph.initializer.add()
            ref.name, ref.data_type = tensor.name, tensor.data_type
            ref.dims.extend(tensor.dims)
            ref.data_location = TensorProto.EXTERNAL
            length = _tensor_nbytes(tensor)
            for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
                ref.external_data.add(key=key, value=value)
            in_memory[location] = tensor
        else:
            graph.initializer.append(tensor)
    kept_values = set(read)
    for node in graph.node:
        kept_values.update(node.output)
    vi = [v for v in graph.value_info if v.name in kept_values]
    del graph.value_info[:]
    graph.value_info.extend(vi)
    # Old (IR < 4) models list initializers among the inputs: keep only the live ones.
    pruned = {t.name for t in src.initializer} - {t.name for t in needed_inits}
    live_inputs = [v for v in graph.input if v.name not in pruned]
    del graph.input[:]
    graph.input.extend(live_inputs)

    if not any(o.domain in ("", "ai.onnx") for o in aug.opset_import):
        aug.opset_import.append(helper.make_opsetid("", 17))
    del graph.output[:]
    shapes: dict[int, str] = {}
    for tap in taps:
        if tap.k not in shapes:
            shapes[tap.k] = f"{_PREFIX}/shape_{tap.k}"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, tap.k], np.int64), shapes[tap.k]))
        stem = tap.xtx_output.rsplit("/", 1)[0]
        graph.node.extend([
            helper.make_node("Reshape", [tap.name, shapes[tap.k]], [f"{stem}/x2d"], name=f"{stem}/Reshape"),
            helper.make_node("Cast", [f"{stem}/x2d"], [f"{stem}/xf"], to=TensorProto.FLOAT, name=f"{stem}/Cast"),
            helper.make_node("Transpose", [f"{stem}/xf"], [f"{stem}/xt"], perm=[1, 0], name=f"{stem}/Transpose"),
            helper.make_node("MatMul", [f"{stem}/xt", f"{stem}/xf"], [tap.xtx_output], name=f"{stem}/MatMul"),
            helper.make_node("Size", [f"{stem}/xf"], [tap.size_output], name=f"{stem}/Size"),
        ])
        graph.output.extend([
            helper.make_tensor_value_info(tap.xtx_output, TensorProto.FLOAT, [tap.k, tap.k]),
            helper.make_tensor_value_info(tap.size_output, TensorProto.INT64, []),
        ])
    return aug, in_memory


def _tensor_nbytes(tensor: TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def _tensor_buffer(tensor: TensorProto) -> np.ndarray:
    if tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, dtype=np.uint8)
    return np.ascontiguousarray(numpy_helper.to_array(tensor)).view(np.uint8).reshape(-1)


def _external_files(model: onnx.ModelProto) -> set[str]:
    files: set[str] = set()
    for tensor in model.graph.initializer:
        if _uses_external(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(entry.value)
    return files


def _session_providers(providers: Sequence[Provider]) -> list[Provider]:
    """Providers for the calibration session: CUDA named bare gets full-float32 GEMMs.

    onnxruntime's CUDA provider runs float32 MatMuls in TF32 (10-bit mantissa) by
    default; the X^T X sums are worth their full precision, as in the reference,
    whose torch matmuls do not use TF32 by default.
    """
    return [("CUDAExecutionProvider", {"use_tf32": "0"}) if entry == "CUDAExecutionProvider" else entry
            for entry in providers]


def _config_entry(options: ort.SessionOptions, key: str) -> str | None:
    try:
        return str(options.get_session_config_entry(key))
    except RuntimeError:  # onnxruntime's way of saying "not set"
        return None


def _make_session(model: onnx.ModelProto, taps: list[_Tap], folder: Path | None, providers: tuple[Provider, ...],
                  session_options: ort.SessionOptions | None) -> tuple[ort.InferenceSession, list[Any]]:
    """An InferenceSession over the augmented copy, and buffers it needs kept alive."""
    aug, in_memory = _augmented(model, taps)
    options = session_options
    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3  # onnxruntime's "removing unused initializer" chatter
    if custom_ops.uses_custom_ops(aug):
        if options not in _HAS_CUSTOM_OPS:  # registering twice fails the session
            custom_ops.session_options(options)
            _HAS_CUSTOM_OPS.add(options)
    keepalive: list[Any] = []
    if in_memory:
        # onnxruntime then looks every external location up in this table only.
        names, buffers = [], []
        for location, tensor in in_memory.items():
            names.append(location)
            buffers.append(_tensor_buffer(tensor))
        for location in sorted(_external_files(aug) - set(in_memory)):
            assert folder is not None
            path = folder / location
            try:
                buffers.append(np.memmap(path, dtype=np.uint8, mode="r"))
            except OSError as exc:
                raise ModelError(f"calibration: cannot read external data file '{path}' ({exc})") from exc
            names.append(location)
        options.add_external_initializers_from_files_in_memory(names, buffers, [b.nbytes for b in buffers])
        keepalive.extend(buffers)
    elif folder is not None and _config_entry(options, _EXTERNAL_FOLDER_KEY) != str(folder):
        options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(folder))
    blob = aug.SerializeToString()
    del aug
    try:
        session = ort.InferenceSession(blob, options, providers=_session_providers(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unrelated types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"calibration: onnxruntime cannot load the augmented model: {message}") from exc
    active = session.get_providers()
    for entry in providers:
        name = entry if isinstance(entry, str) else entry[0]
        if name not in active:  # e.g. CUDA libraries missing: onnxruntime falls back quietly
            raise ConfigError(f"providers: {name} could not be initialised by onnxruntime "
                              f"(the session runs on {', '.join(active)})")
    return session, keepalive


# ---------------------------------------------------------------------------
# Running


def ort_feeds(feeds: dict[str, np.ndarray]) -> dict[str, Any]:
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
                                                                        TensorProto.BFLOAT16)
        else:
            out[name] = array
    return out


_ort_feeds = ort_feeds  # the name sequential.py first used


def _run_pass(session: ort.InferenceSession, taps: list[_Tap], batches: Iterable[dict[str, np.ndarray]],
              sums: dict[str, np.ndarray], rows: dict[str, int], *, progress: bool, label: str) -> None:
    """Run every batch once, adding each tap's float32 X^T X into its float64 sum (in place)."""
    inputs = {i.name for i in session.get_inputs()}
    output_names = [n for t in taps for n in (t.xtx_output, t.size_output)]
    for tap in taps:
        sums.setdefault(tap.name, np.zeros((tap.k, tap.k), np.float64))
        rows.setdefault(tap.name, 0)
    iterator: Iterator[dict[str, np.ndarray]] = iter(batches)
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) if isinstance(batches, Sequence) else None
        iterator = iter(tqdm(iterator, total=total, desc=label, unit="batch"))
    seen = 0
    for index, feeds in enumerate(iterator):
        unknown = sorted(set(feeds) - inputs)
        if unknown:
            raise CalibrationError(f"calibration batch {index}: '{unknown[0]}' is not an input of the model "
                                   f"(inputs: {', '.join(sorted(inputs))})")
        missing = sorted(inputs - set(feeds))
        if missing:
            raise CalibrationError(f"calibration batch {index}: model input '{missing[0]}' is not fed")
        try:
            results = session.run(output_names, ort_feeds(feeds))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's error types are not exported stably
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CalibrationError(f"calibration batch {index}: onnxruntime failed: {message}") from exc
        for j, tap in enumerate(taps):
            xtx, size = results[2 * j], int(results[2 * j + 1])
            sums[tap.name] += xtx
            rows[tap.name] += size // tap.k
        seen += 1
    if seen == 0:
        raise CalibrationError("calibration data is empty: no batch was given")
    logger.debug("%s: %d batches", label, seen)


__all__ = ["HessianStats", "collect_hessians", "check_providers", "default_providers", "ort_feeds",
           "default_output_budget"]
