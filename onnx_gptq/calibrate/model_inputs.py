"""What a model needs fed for calibration, read off its graph.

:class:`ModelInputs` classifies the declared inputs (``input_ids`` and the
ones that can be derived: ``attention_mask`` ones, ``position_ids``,
``cache_position``, ``token_type_ids``, empty ``past_key_values.*``), and reads
the vocabulary size (ids are checked against it) and a learned position
table's length (``seq_len`` is clipped to it) from the graph.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnx_gptq.calibrate import past_shapes
from onnx_gptq.errors import CalibrationError

_BATCH_DIM = re.compile(r"batch", re.IGNORECASE)
# Not "cache": the model builder's head dimension is "kv_cache_dim".
_SEQ_DIM = re.compile(r"past|seq|len|total", re.IGNORECASE)
# Where batch and sequence sit in a past key/value whose dims are not named
# usefully, by rank: [batch, heads, seq, head_dim] and GPT-2's [2, batch, heads, seq, head_dim].
_PAST_LAYOUT = {4: (0, 2), 5: (1, 3)}
# Ops between input_ids and the embedding Gather that keep the ids' values.
_ID_PASSTHROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One declared model input.

    Attributes:
        name: input name.
        dtype: numpy dtype of its element type.
        dims: per dimension, an int (static), a str (symbolic name) or None (unknown).
    """

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]

    @classmethod
    def from_value(cls, value: ir.Value) -> "InputSpec":
        """The spec of a graph input.

        Raises:
            CalibrationError: the input is not a tensor.
        """
        if not isinstance(value.type, ir.TensorType):
            raise CalibrationError(f"model input '{value.name}' is not a tensor; it cannot be filled "
                                   "automatically (pass feeds as dicts)")
        dims: list[int | str | None] = []
        for dim in value.shape or ():
            if isinstance(dim, int):
                dims.append(dim)
            else:
                dims.append(dim.value or None)
        return cls(value.name or "", np.dtype(value.type.dtype.numpy()), tuple(dims))


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """What a model needs fed, and how to derive everything but the token ids.

    Attributes:
        input_ids: the token-id input, or None when the model has none.
        others: the remaining inputs, each one `feeds` knows how to fill.
        vocab_size: rows of the embedding table (or the logits' last dim), if found.
        static_seq_len: a static sequence dim of input_ids, if any.
        static_batch: a static batch dim of input_ids, if any.
        max_positions: rows of a learned position-embedding table, if found
            (sequences longer than this would index past its end).
    """

    input_ids: InputSpec | None
    others: tuple[InputSpec, ...]
    vocab_size: int | None
    static_seq_len: int | None
    static_batch: int | None
    max_positions: int | None = None

    @classmethod
    def from_model(cls, model: ir.Model | onnx.ModelProto, *, check_fillable: bool = True,
                   folder: str | os.PathLike[str] | None = None) -> "ModelInputs":
        """Read and classify the model's graph inputs.

        Args:
            model: the model (a ModelProto is read through onnx_ir; external
                data need not be loaded, and no tensor is read).
            check_fillable: raise for an input `feeds` cannot derive (only
                checked when the model has an input_ids input).
            folder: the model's folder: its ``genai_config.json`` gives past
                key/value sizes the graph leaves symbolic (see `past_shapes`)
                and the context length (``seq_len`` is clipped to it).

        Raises:
            CalibrationError: an input is neither input_ids nor one that can be
                filled automatically (a past key/value whose sizes cannot be
                derived included); the message names it.
            ModelError: the folder's genai_config.json disagrees with the graph.
        """
        if isinstance(model, onnx.ModelProto):
            model = ir.serde.deserialize_model(model)
        graph = _Graph(model.graph)
        genai, origin = _genai_config(folder)
        decoder = (genai or {}).get("model", {}).get("decoder") if genai else None
        known = past_shapes.past_dims(model.graph, decoder, origin)
        specs = [_with_past_dims(InputSpec.from_value(v), known.get(v.name or ""))
                 for v in model.graph.inputs if v.name not in graph.inits]
        ids = next((s for s in specs if s.name == "input_ids"), None)
        others = tuple(s for s in specs if s is not ids)
        if check_fillable and ids is not None:
            for spec in others:
                _filler(spec)  # raises for an input nobody can fill
        static_seq = static_batch = None
        if ids is not None:
            if len(ids.dims) != 2:
                raise CalibrationError(f"model input 'input_ids' has rank {len(ids.dims)}; "
                                       "calibration expects [batch, sequence]")
            if isinstance(ids.dims[0], int) and ids.dims[0] > 0:
                static_batch = ids.dims[0]
            if isinstance(ids.dims[1], int) and ids.dims[1] > 0:
                static_seq = ids.dims[1]
        max_positions = _max_positions(graph)
        context = (genai or {}).get("model", {}).get("context_length") if genai else None
        if isinstance(context, int) and not isinstance(context, bool) and context > 0:
            max_positions = context if max_positions is None else min(max_positions, context)
        return cls(ids, others, _vocab_size(graph), static_seq, static_batch, max_positions)

    def feeds(self, input_ids: np.ndarray, given: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A complete feed dict for one run.

        Args:
            input_ids: int [batch, seq] token ids.
            given: inputs already provided (kept as they are).

        Returns:
            input name -> array: input_ids in the declared dtype, then every
            other input taken from `given` or derived (attention_mask ones
            [B, T], position_ids arange [B, T], token_type_ids zeros, empty past
            key/values with sequence dim 0, cache_position arange [T]).
        """
        given = dict(given or {})
        batch, seq = input_ids.shape
        out: dict[str, np.ndarray] = {}
        if self.input_ids is not None:
            out[self.input_ids.name] = np.ascontiguousarray(input_ids, dtype=self.input_ids.dtype)
        for spec in self.others:
            if spec.name in given:
                out[spec.name] = np.asarray(given.pop(spec.name))
            else:
                out[spec.name] = _filler(spec)(batch, seq)
        out.update(given)
        return out


def _filler(spec: InputSpec) -> Any:
    """A function (batch, seq) -> array for an input, or CalibrationError naming it."""
    name, dtype, rank = spec.name, spec.dtype, len(spec.dims)
    lower = name.lower()
    if lower == "attention_mask" and rank == 2:
        return lambda b, t: np.ones((b, t), dtype)
    if lower == "position_ids" and rank in (1, 2):
        if rank == 1:
            return lambda b, t: np.arange(t, dtype=dtype)
        return lambda b, t: np.ascontiguousarray(np.broadcast_to(np.arange(t, dtype=dtype), (b, t)))
    if lower == "cache_position" and rank == 1:
        return lambda b, t: np.arange(t, dtype=dtype)
    if lower == "token_type_ids" and rank == 2:
        return lambda b, t: np.zeros((b, t), dtype)
    if lower.startswith("past"):
        roles = _past_roles(spec)
        return lambda b, t: np.zeros(tuple(b if r == "batch" else 0 if r == "seq" else r for r in roles), dtype)
    raise CalibrationError(f"model input '{name}' (shape {list(spec.dims)}) cannot be filled automatically "
                           "for calibration; pass feeds as dicts that include it")


def _genai_config(folder: str | os.PathLike[str] | None) -> tuple[dict[str, Any] | None, str]:
    """The folder's genai_config.json (None when it has none) and its path for messages."""
    from onnx_gptq.model_folder import read_genai_config  # lazy: model_folder imports calibrate

    if folder is None:
        return None, "genai_config.json"
    return read_genai_config(Path(folder)), str(Path(folder) / "genai_config.json")


def _with_past_dims(spec: InputSpec, dims: past_shapes.PastDims | None) -> InputSpec:
    """`spec` with the symbolic heads and head-size dims of a past key/value made static from `dims`."""
    axes = past_shapes.FEATURE_AXES.get(len(spec.dims))
    if dims is None or axes is None:
        return spec
    filled = list(spec.dims)
    for axis, size in zip(axes, (dims.kv_heads, dims.head_size)):
        named = filled[axis]
        is_feature = not (isinstance(named, str) and (_BATCH_DIM.search(named) or _SEQ_DIM.search(named)))
        if size is not None and not isinstance(named, int) and is_feature:
            filled[axis] = size
    return dataclasses.replace(spec, dims=tuple(filled))


_FEATURE_NAMES = {0: "key/value heads (genai_config.json model.decoder.num_key_value_heads)",
                  1: "head size (genai_config.json model.decoder.head_size)"}


def _past_roles(spec: InputSpec) -> list[int | str]:
    """Per dim of an empty past key/value: a static size, "batch" or "seq"."""
    layout = _PAST_LAYOUT.get(len(spec.dims))
    roles: list[int | str] = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int) and dim > 0:
            roles.append(dim)
        elif isinstance(dim, str) and _BATCH_DIM.search(dim):
            roles.append("batch")
        elif isinstance(dim, str) and _SEQ_DIM.search(dim):
            roles.append("seq")
        elif layout is not None and axis == layout[0]:
            roles.append("batch")
        elif layout is not None and axis == layout[1]:
            roles.append("seq")
        elif axis in past_shapes.FEATURE_AXES.get(len(spec.dims), ()):
            which = _FEATURE_NAMES[past_shapes.FEATURE_AXES[len(spec.dims)].index(axis)]
            raise CalibrationError(f"model input '{spec.name}' (shape {list(spec.dims)}): dimension {axis} is the "
                                   f"{which}, which is missing: neither the model's folder nor its graph (a static "
                                   "present output, the attention node) gives it")
        else:
            raise CalibrationError(f"model input '{spec.name}' (shape {list(spec.dims)}): cannot tell the size "
                                   f"of dimension {axis} of an empty past key/value; pass feeds as dicts")
    return roles


class _Graph:
    """Name-keyed views of an onnx_ir main graph: producers, consumers, 2-D constant shapes."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes = list(graph)
        self.inits = {name: list(value.shape or ()) for name, value in graph.initializers.items()}
        self.inputs = {v.name for v in graph.inputs}
        self.producers = {out.name: node for node in self.nodes for out in node.outputs if out.name}
        self.consumers: dict[str, list[ir.Node]] = {}
        for node in self.nodes:
            for value in node.inputs:
                if value is not None and value.name:
                    self.consumers.setdefault(value.name, []).append(node)


def _name(node: ir.Node, index: int) -> str:
    value = node.inputs[index] if len(node.inputs) > index else None
    return value.name or "" if value is not None else ""


def _vocab_size(graph: _Graph) -> int | None:
    """Rows of the embedding table read by input_ids, else the logits' static last dim."""
    frontier, seen = ["input_ids"], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in graph.consumers.get(name, []):
            if node.op_type in ("Gather", "GatherBlockQuantized") and len(node.inputs) > 1 and _name(node, 1) == name:
                axis = node.attributes.get_int("axis", 0)
                rows = _table_rows(_name(node, 0), graph) if axis == 0 else None
                if rows:
                    return rows
            elif node.op_type in _ID_PASSTHROUGH and _name(node, 0) == name:
                frontier.extend(o.name for o in node.outputs if o.name)
    for value in graph.graph.outputs:
        if value.name == "logits" and value.shape is not None and len(value.shape):
            last = value.shape[-1]
            if isinstance(last, int) and last > 0:
                return int(last)
    return None


def _table_rows(name: str, graph: _Graph) -> int | None:
    """First dim of a constant table, following Identity/Cast/DequantizeLinear/Reshape back to it
    (a shared GatherBlockQuantized reads the head's [V, blocks, blob] codes through a Reshape)."""
    reshaped = False
    for _ in range(3):
        if name in graph.inits:
            dims = graph.inits[name]
            return int(dims[0]) if len(dims) == 2 or (reshaped and len(dims) == 3) else None
        node = graph.producers.get(name)
        if node is not None and node.op_type == "Constant":
            attr = node.attributes.get("value")
            tensor = attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None
            return int(tensor.shape[0]) if tensor is not None and len(tensor.shape) == 2 else None
        if node is None or node.op_type not in ("Identity", "Cast", "DequantizeLinear", "Reshape") or not node.inputs:
            return None
        reshaped = reshaped or node.op_type == "Reshape"
        name = _name(node, 0)
    return None


def _max_positions(graph: _Graph) -> int | None:
    """Rows of a learned position-embedding table (GPT-2's wpe), if the graph has one.

    A position table is a constant 2-D Gather table whose indices derive from a
    ``position_ids`` input or from Range/CumSum, and not from the values of
    input_ids or token_type_ids (their *shape* may be involved: Shape stops the search).
    """
    found: list[int] = []
    for node in graph.nodes:
        if node.op_type != "Gather" or len(node.inputs) < 2:
            continue
        if node.attributes.get_int("axis", 0) != 0:
            continue
        rows = _table_rows(_name(node, 0), graph)
        if rows is None:
            continue
        positional = token_valued = False
        stack, seen = [_name(node, 1)], set()
        while stack and len(seen) < 64:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in graph.inputs:
                positional |= name == "position_ids"
                token_valued |= name in ("input_ids", "token_type_ids")
                continue
            parent = graph.producers.get(name)
            if parent is None or parent.op_type == "Shape":
                continue
            positional |= parent.op_type in ("Range", "CumSum")
            stack.extend(v.name for v in parent.inputs if v is not None and v.name)
        if positional and not token_valued:
            found.append(rows)
    return min(found) if found else None


__all__ = ["InputSpec", "ModelInputs"]
