"""Graph taps: the augmented copy of a model that makes onnxruntime compute X^T X.

For each requested activation ``x`` (any leading dims, last dim K) the copy
computes ``xf = Cast<float32>(Reshape(x, [-1, K]))``, ``MatMul(Transpose(xf), xf)``
and ``Size(xf)`` and exposes them as its only outputs; nodes they do not depend
on are dropped (onnxruntime runs every node whatever outputs are asked for), so
the output head is never computed and early passes stop early in the graph.
K is read from declared shapes, else from the weight the activation multiplies,
else from shape inference on a weightless skeleton.

Large embedded tensors are not copied into the serialized copy: they become
external references to in-memory "files" (see `runtime.sessions.make_session`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnx_gptq.calibrate import masked_taps
from onnx_gptq.errors import ModelError
from onnx_gptq.graph import reads

logger = logging.getLogger(__name__)

# Above this many bytes of embedded tensor data, tensors are handed to
# onnxruntime from memory rather than copied into the serialized proto: needed
# below protobuf's 2 GiB limit, and faster well before it (SmolLM2's 543 MB:
# 2.4 s less per calibration pass, identical Hessians).
INLINE_BYTES_LIMIT = 64 << 20
# ...and then every embedded tensor of at least this many bytes is.
_INLINE_MIN_TENSOR_BYTES = 1 << 16

_PREFIX = "onnx_gptq_calib"


@dataclasses.dataclass(frozen=True)
class Tap:
    """One activation and the extra graph outputs that observe it."""

    name: str  # tensor in the user's graph
    k: int  # last dimension
    xtx_output: str  # float32 [K, K]
    size_output: str  # int64 scalar: number of elements of the activation (of its rows counted)
    order: int  # position of its producer in graph.node (-1: graph input or initializer)
    mapped_output: str = ""  # bool scalar, masked graphs only: padding was dropped (`masked_taps`)

    @property
    def output_bytes(self) -> int:
        return self.k * self.k * 4


def plan_taps(model: onnx.ModelProto, names: list[str]) -> list[Tap]:
    """One Tap per activation: its K (declared shape, else the weight it multiplies,
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
        taps.append(Tap(name=name, k=int(k), xtx_output=f"{stem}/xtx", size_output=f"{stem}/size",
                         order=producers.get(name, -1), mapped_output=f"{stem}/mapped"))
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



def _embedded_bytes(tensor: TensorProto) -> int:
    if tensor.data_location == TensorProto.EXTERNAL:
        return 0
    return tensor.ByteSize()


def _uses_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def external_folder(model: onnx.ModelProto, model_dir: str | os.PathLike[str] | None) -> Path | None:
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


def _needed_nodes(model: onnx.ModelProto, targets: set[str]) -> tuple[list[int], set[str]]:
    """The nodes `targets` depend on, read through onnx_ir like every other graph walk.

    Returns:
        (indices, read): the nodes' positions in `model.graph.node`, in order, and
        every name they read (subgraphs' outer-scope reads included) plus `targets`.
    """
    graph = ir.serde.deserialize_graph(model.graph)  # tensors are wrapped, not copied
    position = {id(node): i for i, node in enumerate(graph)}
    produced = {v.name: v for node in graph for v in node.outputs if v.name}
    keep: set[int] = set()
    read: set[str] = set(targets)
    stack = [produced[n].producer() for n in targets if n in produced]
    while stack:
        node = stack.pop()
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        for value in reads(node):
            if value.name:
                read.add(value.name)
            producer = value.producer()
            if producer is not None and id(producer) in position and id(producer) not in keep:
                stack.append(producer)
    return sorted(position[k] for k in keep), read


def augmented(model: onnx.ModelProto, taps: list[Tap], *,
              masked: bool = False) -> tuple[onnx.ModelProto, dict[str, TensorProto]]:
    """The pruned, augmented copy, and the embedded tensors to hand over separately.

    Args:
        model: the model to observe.
        taps: the activations, from `plan_taps`.
        masked: add the `masked_taps.TOKEN_MASK` input and keep masked-out
            (padded) rows out of every tap whose rows map to tokens; each tap
            then also outputs `Tap.mapped_output`.

    Returns:
        (model, in_memory): `model` holds every needed initializer, embedded ones
        copied unless their total exceeds INLINE_BYTES_LIMIT, in which case they
        become external references to names in `in_memory` (name -> original tensor).
    """
    src = model.graph
    aug = _without_initializers(model, nodes=False)
    graph = aug.graph
    keep, read = _needed_nodes(model, {t.name for t in taps})
    graph.node.extend(src.node[i] for i in keep)
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
    if masked:
        nodes, consts, mask_input = masked_taps.mask_nodes()
        graph.input.append(mask_input)
        graph.initializer.extend(consts)
        graph.node.extend(nodes)
    shapes: dict[int, str] = {}
    for tap in taps:
        if tap.k not in shapes:
            shapes[tap.k] = f"{_PREFIX}/shape_{tap.k}"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, tap.k], np.int64), shapes[tap.k]))
        stem = tap.xtx_output.rsplit("/", 1)[0]
        graph.node.extend([
            helper.make_node("Reshape", [tap.name, shapes[tap.k]], [f"{stem}/x2d"], name=f"{stem}/Reshape"),
            helper.make_node("Cast", [f"{stem}/x2d"], [f"{stem}/xf"], to=TensorProto.FLOAT, name=f"{stem}/Cast"),
        ])
        if masked:
            graph.node.extend(masked_taps.masked_tap_nodes(tap.name, f"{stem}/xf", stem, tap.k, tap.xtx_output,
                                                           tap.size_output, tap.mapped_output))
        else:
            graph.node.extend([
                helper.make_node("Transpose", [f"{stem}/xf"], [f"{stem}/xt"], perm=[1, 0], name=f"{stem}/Transpose"),
                helper.make_node("MatMul", [f"{stem}/xt", f"{stem}/xf"], [tap.xtx_output], name=f"{stem}/MatMul"),
                helper.make_node("Size", [f"{stem}/xf"], [tap.size_output], name=f"{stem}/Size"),
            ])
        graph.output.extend([
            helper.make_tensor_value_info(tap.xtx_output, TensorProto.FLOAT, [tap.k, tap.k]),
            helper.make_tensor_value_info(tap.size_output, TensorProto.INT64, []),
        ])
        if masked:
            graph.output.append(helper.make_tensor_value_info(tap.mapped_output, TensorProto.BOOL, []))
    return aug, in_memory


def _tensor_nbytes(tensor: TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def tensor_buffer(tensor: TensorProto) -> np.ndarray:
    if tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, dtype=np.uint8)
    return np.ascontiguousarray(numpy_helper.to_array(tensor)).view(np.uint8).reshape(-1)


__all__ = ["INLINE_BYTES_LIMIT", "Tap", "augmented", "external_folder", "plan_taps", "tensor_buffer"]
