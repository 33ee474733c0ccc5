"""Stage 1: find the MatMul and Gemm nodes whose weight is a constant matrix.

A weight is constant when the node's weight input is an initializer or a
`Constant` node's output, possibly seen through `Transpose`, `Cast` and
`Identity` (a tied embedding used as the output head; fp16 weights cast up).
Consumers of one constant are grouped, so the weight is quantized once with
the Hessians of all its consumers summed. Every MatMul/Gemm left alone gets a
reason a user can read.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnx_gptq.config import LayerFilter, QuantConfig

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_PASS_THROUGH = ("Transpose", "Cast", "Identity")
# Ops a head's output may pass through on its way to a graph output.
_HEAD_TAIL_OPS = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Add",
                  "Mul", "Div", "Softmax", "LogSoftmax", "Tanh", "Sigmoid", "Slice", "Gather")


@dataclasses.dataclass(frozen=True)
class Skip:
    """A MatMul/Gemm left float, and why."""

    node: str
    reason: str


@dataclasses.dataclass
class Target:
    """One MatMul/Gemm node computing `activation @ W (+ bias)` with a constant W [K, N].

    Attributes:
        node: the node (MatMul, or Gemm with transA=0).
        activation: its data input; X^T X of this tensor is the node's Hessian.
        bias: Gemm's C input, or None.
        bias_scale: Gemm's beta (C is multiplied by it).
        module: torch module path from node metadata or name ("" when unknown).
    """

    node: ir.Node
    activation: ir.Value
    bias: ir.Value | None
    bias_scale: float
    module: str

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name or "<unnamed>"

    weight_dtype: ir.DataType = ir.DataType.FLOAT

    @property
    def dtype(self) -> ir.DataType:
        """The dtype the node computes in: its activation's, else its output's, else
        its weight's after any Cast (MatMul and Gemm take A and B of one type)."""
        return self.activation.dtype or self.node.outputs[0].dtype or self.weight_dtype


@dataclasses.dataclass
class WeightGroup:
    """A constant weight and every node that multiplies by it.

    Attributes:
        source: the initializer (or Constant output) holding the raw tensor.
        steps: the ops between `source` and the consumers, innermost first,
            as (op_type, attribute) pairs: ("Transpose", None), ("Cast", dtype), ...
        alpha: Gemm's alpha folded into the weight.
        targets: the consuming nodes.
        is_head: the weight feeds the model's output (the LM head).
    """

    source: ir.Value
    steps: tuple[tuple[str, object], ...]
    alpha: float
    targets: list[Target]
    is_head: bool = False

    @property
    def name(self) -> str:
        return self.source.name or self.targets[0].name

    @property
    def dtype(self) -> ir.DataType:
        return self.targets[0].dtype

    @property
    def names(self) -> list[str]:
        """What patterns match: the initializer's name, the nodes' names and their torch module paths."""
        names = [self.source.name or ""]
        for t in self.targets:
            names.extend([t.name, *module_names(t.node)])
        return names

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N) of the effective weight."""
        k, n = (int(d) for d in self.source.shape)  # type: ignore[union-attr]
        for op, _ in self.steps:
            if op == "Transpose":
                k, n = n, k
        return k, n

    def load(self) -> np.ndarray:
        """The effective weight as float32 [K, N] (read from disk only now)."""
        tensor = const_tensor(self.source)
        assert tensor is not None
        w = tensor.numpy()
        for op, attr in self.steps:
            if op == "Transpose":
                w = w.T
            elif op == "Cast":
                w = w.astype(ir.DataType(attr).numpy())
        w = np.array(w, dtype=np.float32, order="C")  # a private, writable copy
        if isinstance(tensor, ir.ExternalTensor):
            # Unmap the file: mapped pages would otherwise add up, layer after layer.
            tensor.release()
        if self.alpha != 1.0:
            w *= np.float32(self.alpha)
        return w


def const_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor()
    return None


def trace_weight(value: ir.Value) -> tuple[ir.Value, list[tuple[str, object]]] | str:
    """Follow `value` back through pass-through ops to a constant.

    Returns the constant and the steps from it (innermost first), or a reason.
    """
    steps: list[tuple[str, object]] = []
    current = value
    while const_tensor(current) is None:
        producer = current.producer()
        if producer is None:
            if current.is_graph_input():
                return f"weight '{value.name}' is a graph input, not a constant"
            return f"weight '{value.name}' is not a constant"
        if producer.op_type not in _PASS_THROUGH or producer.domain not in ("", "ai.onnx"):
            return f"weight '{value.name}' is computed at run time (by {producer.op_type} '{producer.name}')"
        if producer.op_type == "Transpose":
            perm = producer.attributes.get_ints("perm", None)
            if perm is not None and list(perm) != [1, 0]:
                return f"weight '{value.name}' comes from a Transpose with perm {list(perm)}"
            steps.append(("Transpose", None))
        elif producer.op_type == "Cast":
            steps.append(("Cast", producer.attributes.get_int("to")))
        current = producer.inputs[0]  # type: ignore[assignment]
        if current is None:
            return f"weight '{value.name}' has a missing producer input"
    steps.reverse()
    return current, steps


def module_names(node: ir.Node) -> list[str]:
    """Torch module paths recorded for `node` by torch.onnx (both exporters)."""
    names: list[str] = []
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        names.extend(s.strip(" '\"") for s in scopes.strip("[]").split(","))
    if node.name and node.name.startswith("/"):
        # TorchScript: "/model/layers.0/self_attn/q_proj/MatMul" -> "model.layers.0.self_attn.q_proj"
        names.append(".".join(node.name.strip("/").split("/")[:-1]))
    return [n for n in names if n]


def _main_module(node: ir.Node) -> str:
    names = module_names(node)
    dotted = [n for n in names if "." in n or n.isidentifier()]
    # The deepest torch module (name_scopes ends with the op's own name, e.g. 'linear').
    candidates = [n for n in dotted if "." in n] or dotted
    return max(candidates, key=len) if candidates else ""


NOT_INCLUDED = "not matched by any include pattern"
IN_SUBGRAPH = "inside a subgraph (If/Loop/Scan body): only main-graph MatMul/Gemm nodes are quantized"
# How the other reasons `_selection_reason` gives for a matched weight begin.
SELECTION_REASONS = ("excluded by pattern", "output head stays float", "weight of shape")


def _matches(patterns: Sequence[str], names: Iterable[str]) -> str | None:
    names = list(names)
    for pattern in patterns:
        if any(re.search(pattern, n) for n in names):
            return pattern
    return None


def _reaches_graph_output(node: ir.Node, graph: ir.Graph) -> bool:
    """Whether `node`'s output flows to a graph output through no other MatMul/Gemm."""
    stack = list(node.outputs)
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_output():
            return True
        for consumer in value.consumers():
            if consumer.op_type in _HEAD_TAIL_OPS:
                stack.extend(consumer.outputs)
    return False


def _target_or_reason(node: ir.Node) -> tuple[Target, ir.Value, list, float] | str:
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return "missing inputs"
    activation, weight = node.inputs[0], node.inputs[1]
    alpha, bias, beta = 1.0, None, 1.0
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA=1 (transposed activation) is not supported"
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    traced = trace_weight(weight)
    if isinstance(traced, str):
        return traced
    source, steps = traced
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        steps = [*steps, ("Transpose", None)]
    shape = source.shape if source.shape is not None else const_tensor(source).shape  # type: ignore[union-attr]
    if shape is None or len(shape) != 2:
        return f"weight '{weight.name}' is {len(shape) if shape else '?'}-D (only 2-D weights are quantized)"
    tensor = const_tensor(source)
    if tensor is None or tensor.dtype not in _FLOAT_TYPES:
        return f"weight '{weight.name}' has dtype {tensor.dtype if tensor else '?'} (needs float)"
    if source.shape is None:
        source.shape = ir.Shape(tensor.shape)
    dtype = activation.dtype or node.outputs[0].dtype
    if dtype is not None and dtype not in _FLOAT_TYPES:
        return f"activation '{activation.name}' has dtype {dtype} (needs float)"
    weight_dtype = tensor.dtype
    for op, attr in steps:
        if op == "Cast":
            weight_dtype = ir.DataType(attr)
    target = Target(node=node, activation=activation, bias=bias, bias_scale=beta,
                    module=_main_module(node), weight_dtype=weight_dtype)
    return target, source, steps, alpha


def find_targets(model: ir.Model, layers: LayerFilter | QuantConfig) -> tuple[list[WeightGroup], list[Skip]]:
    """Group the quantizable MatMul/Gemm nodes of `model` by weight.

    Args:
        model: the model. Only main-graph nodes are quantized; those inside
            subgraphs (If/Loop/Scan bodies) are skipped with that reason.
        layers: include/exclude patterns and whether to quantize the head (a
            QuantConfig stands for its `layers`).
    Returns:
        (groups to quantize, nodes skipped with reasons), in graph order
        (subgraph nodes after the main graph's).
    """
    if isinstance(layers, QuantConfig):
        layers = layers.layers
    graph = model.graph
    groups: dict[tuple, WeightGroup] = {}
    skips: list[Skip] = []
    for node in graph.all_nodes():
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.outputs[0].name
        if node.graph is not graph:
            skips.append(Skip(name, IN_SUBGRAPH))
            continue
        found = _target_or_reason(node)
        if isinstance(found, str):
            skips.append(Skip(name, found))
            continue
        target, source, steps, alpha = found
        key = (id(source), tuple(steps), alpha)
        group = groups.get(key)
        if group is None:
            group = groups[key] = WeightGroup(source=source, steps=tuple(steps), alpha=alpha, targets=[])
        group.targets.append(target)

    selected: list[WeightGroup] = []
    for group in groups.values():
        group.is_head = any(_reaches_graph_output(t.node, graph) for t in group.targets)
        reason = _selection_reason(group, group.names, layers)
        if reason is None:
            selected.append(group)
        else:
            skips.extend(Skip(t.name, reason) for t in group.targets)
    for skip in skips:  # the CLI prints them under -v; DEBUG keeps them out of -v's log lines
        logger.debug("skipping %s: %s", skip.node, skip.reason)
    return selected, skips


def _selection_reason(group: WeightGroup, names: list[str], layers: LayerFilter) -> str | None:
    excluded_by = _matches(layers.exclude, names)
    if excluded_by is not None:
        return f"excluded by pattern '{excluded_by}'"
    included_by = _matches(layers.include, names) if layers.include else None
    if layers.include and included_by is None:
        return NOT_INCLUDED
    if group.is_head and not (layers.quantize_head or included_by is not None):
        return "output head stays float (--head float; --head BITS or --quantize-head quantize it)"
    k, n = group.shape
    if k < 2 or n < 1:
        return f"weight of shape [{k}, {n}] is too small to quantize"
    return None
