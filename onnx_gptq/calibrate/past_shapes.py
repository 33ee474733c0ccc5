"""The feature sizes of a KV cache: key/value heads and head size of each ``past_*`` input.

Calibration and evaluation feed an empty past (sequence length 0), but its
other dimensions must be real: onnxruntime's GroupQueryAttention checks the
head dimension even of an empty cache. The onnxruntime-genai model builder
declares them symbolic (``[batch_size, kv_heads, past_sequence_length,
kv_cache_dim]``), so they are derived, in this order, from

1. the input's own static dimensions;
2. the model folder's ``genai_config.json`` (``model.decoder.head_size`` and
   ``num_key_value_heads``), checked against the graph where the graph says too;
3. the graph: static dimensions of the matching ``present*`` output, or the
   attention node reading the past (GroupQueryAttention's ``kv_num_heads`` and
   ``num_heads``, MultiHeadAttention's ``num_heads``) with the width of the
   projection feeding it.

A past input is laid out ``[batch, heads, sequence, head_size]`` (rank 4) or
``[2, batch, heads, sequence, head_size]`` (rank 5, GPT-2's stacked key/value).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

from onnx_gptq.errors import ModelError

logger = logging.getLogger(__name__)

#: rank -> (heads axis, head-size axis) of a past key/value.
FEATURE_AXES = {4: (1, 3), 5: (2, 4)}
_PAST_PREFIX = re.compile(r"^past(_key_values)?")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class PastDims:
    """The feature sizes of one past key/value input, each None when unknown.

    Attributes:
        kv_heads: key/value heads (the heads axis).
        head_size: features per head (the last axis).
        source: where they were read, for messages.
    """

    kv_heads: int | None
    head_size: int | None
    source: str


def is_past(name: str) -> bool:
    """Whether a graph input is a past key/value (``past_key_values.N.key``, ``past.N``, ...)."""
    return name.lower().startswith("past")


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _attr_int(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None and attr.type == ir.AttributeType.INT else None


def _width(value: ir.Value | None, depth: int = 0) -> int | None:
    """The static last dimension of `value`: declared, or the output width of the node producing it.

    Follows Add (a bias) and Cast; reads MatMul/Gemm constant weights and the
    N attribute of packed MatMulNBits / GptqMatMul nodes.
    """
    if value is None or depth > 4:
        return None
    if value.shape is not None and len(value.shape) and _static(value.shape[-1]):
        return int(value.shape[-1])
    node = value.producer()
    if node is None:
        return None
    if node.op_type in ("MatMulNBits", "GptqMatMul"):
        return _attr_int(node, "N")
    if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
        weight = node.inputs[1]
        shape = weight.shape if weight.const_value is None else weight.const_value.shape
        if shape is None or len(shape) != 2:
            return None
        trans_b = node.op_type == "Gemm" and bool(_attr_int(node, "transB"))
        return _static(shape[0] if trans_b else shape[1])
    if node.op_type in ("Add", "Cast", "Identity"):
        for parent in node.inputs:
            width = _width(parent, depth + 1)
            if width is not None:
                return width
    return None


def _from_attention(value: ir.Value) -> tuple[int | None, int | None]:
    """(kv_heads, head_size) from the attention node that reads past input `value`."""
    for node, index in value.uses():
        if node.domain != _MS_DOMAIN:
            continue
        if node.op_type == "GroupQueryAttention" and index in (3, 4):
            heads, kv_heads = _attr_int(node, "num_heads"), _attr_int(node, "kv_num_heads")
            width = _width(node.inputs[0])
            packed = len(node.inputs) < 2 or node.inputs[1] is None  # q, k and v in one tensor
            per_head = (heads or 0) + 2 * (kv_heads or 0) if packed else heads
            head_size = width // per_head if width and per_head and width % per_head == 0 else None
            return kv_heads, head_size
        if node.op_type == "MultiHeadAttention" and index in (6, 7):
            heads = _attr_int(node, "num_heads")
            width = _width(node.inputs[0])
            return heads, width // heads if width and heads and width % heads == 0 else None
    return None, None


def _from_present(value: ir.Value, outputs: Mapping[str, ir.Value]) -> tuple[int | None, int | None]:
    """(kv_heads, head_size) from the static dimensions of the matching present output."""
    present = outputs.get(_PAST_PREFIX.sub("present", value.name or "", count=1))
    axes = FEATURE_AXES.get(len(value.shape or ()))
    if present is None or axes is None or present.shape is None or len(present.shape) != len(value.shape or ()):
        return None, None
    return _static(present.shape[axes[0]]), _static(present.shape[axes[1]])


def graph_past_dims(graph: ir.Graph) -> dict[str, PastDims]:
    """Per past input of `graph`, the feature sizes the graph itself shows (no config read)."""
    outputs = {v.name: v for v in graph.outputs if v.name}
    found: dict[str, PastDims] = {}
    for value in graph.inputs:
        name = value.name or ""
        axes = FEATURE_AXES.get(len(value.shape or ()))
        if not is_past(name) or axes is None:
            continue
        kv_heads, head_size = _static(value.shape[axes[0]]), _static(value.shape[axes[1]])
        sources = ["the input's shape"]
        if kv_heads is None or head_size is None:
            heads2, size2 = _from_present(value, outputs)
            if heads2 is None or size2 is None:
                heads3, size3 = _from_attention(value)
                heads2, size2 = heads2 or heads3, size2 or size3
            sources.append("the graph")
            kv_heads, head_size = kv_heads or heads2, head_size or size2
        found[name] = PastDims(kv_heads, head_size, " and ".join(sources))
    return found


def _config_int(decoder: Mapping[str, Any], key: str, origin: str) -> int | None:
    value = decoder.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{origin}: model.decoder.{key} is {value!r}, not a positive integer")
    return value


def past_dims(graph: ir.Graph, decoder: Mapping[str, Any] | None = None,
              origin: str = "genai_config.json") -> dict[str, PastDims]:
    """Per past input, its key/value heads and head size from the graph and the decoder config.

    Args:
        graph: the model's main graph (no tensor is read).
        decoder: ``genai_config.json``'s ``model.decoder`` section, or None.
        origin: how to name the config in messages (its path).
    Returns:
        past input name -> :class:`PastDims` (a size the graph and config both
        leave unknown stays None).
    Raises:
        ModelError: the config disagrees with the graph (head size, key/value
            heads, or ``num_hidden_layers`` against the number of past inputs).
    """
    from_graph = graph_past_dims(graph)
    if decoder is None:
        return from_graph
    head_size = _config_int(decoder, "head_size", origin)
    kv_heads = _config_int(decoder, "num_key_value_heads", origin)
    layers = _config_int(decoder, "num_hidden_layers", origin)
    if layers is not None and from_graph:
        indices = {int(m.group(1)) for name in from_graph if (m := _LAYER_INDEX.search(name))}
        if indices and len(indices) != layers:
            raise ModelError(f"{origin}: model.decoder.num_hidden_layers is {layers} but the graph has past "
                             f"inputs for {len(indices)} layers")
    merged: dict[str, PastDims] = {}
    for name, dims in from_graph.items():
        for key, said, seen in (("head_size", head_size, dims.head_size),
                                ("num_key_value_heads", kv_heads, dims.kv_heads)):
            if said is not None and seen is not None and said != seen:
                raise ModelError(f"{origin}: model.decoder.{key} is {said} but the graph's '{name}' has "
                                 f"{seen} (from {dims.source})")
        merged[name] = PastDims(dims.kv_heads or kv_heads, dims.head_size or head_size,
                                f"{dims.source} and {origin}")
    return merged


__all__ = ["FEATURE_AXES", "PastDims", "graph_past_dims", "is_past", "past_dims"]
