"""The token embedding stage: a Gather of a constant table becomes com.microsoft.GatherBlockQuantized.

Runs after the MatMul/Gemm weights are rewritten (stage 5), before unused
initializers are dropped. A `Gather` (axis 0) of the `input_ids` (through
Cast/Reshape/...) whose data is a constant float table [V, H] (possibly
through `Transpose`/`Cast`/`Identity`) is replaced by
`GatherBlockQuantized(data, indices, scales[, zero_points])` with uint8 data,
`gather_axis` 0, `quantize_axis` 1, `block_size` the group size along H:

* **shared** (a tied embedding: the output head's weight is this table,
  transposed: one initializer read by both, as torch.onnx and the onnxruntime-genai
  builder write tied models), and the head was written as MatMulNBits with the same bits and
  block): the op reads the head's own B (reshaped to [V, padded_H * bits / 8])
  and scales (and zero points), so the table is stored once, with the head's
  GPTQ codes; a `Slice` keeps the first H columns when H is not a multiple of
  the block (the padding columns of B).
* otherwise: the table is quantized by round to nearest on the configured grid
  (`solve.solve` without a Hessian) and packed by `pack.pack_gather`.

The codes, scales and zero points are written exactly as the solver returned
them (`pack`), so the op's output rows equal `QuantizedWeight.dequantize()`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnx_gptq import contract, pack
from onnx_gptq.config import Algo, Format, QuantConfig
from onnx_gptq.layer_quantizer import scale_dtype
from onnx_gptq.qweight import QuantizedWeight
from onnx_gptq.report import Report
from onnx_gptq.rewrite import InitializerBuilder, TensorStore, WrittenWeight, in_memory, replace_output
from onnx_gptq.targets import WeightGroup, const_tensor, trace_weight

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_INDEX_TYPES = (ir.DataType.INT32, ir.DataType.INT64)
#: The token ids input, and the ops between it and the embedding Gather that keep its values.
TOKEN_IDS = "input_ids"
_ID_PASSTHROUGH = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten")


@dataclasses.dataclass
class Embedding:
    """One constant table [V, H] and the Gather nodes that read rows of it.

    Attributes:
        table: a pass-through view of the table (source and steps, as a weight group
            holds them; `table.load()` gives float32 [V, H]).
        nodes: the Gather nodes (axis 0) reading it.
    """

    table: WeightGroup
    nodes: list[ir.Node]

    @property
    def name(self) -> str:
        return self.table.source.name or self.nodes[0].name or "<unnamed>"

    @property
    def shape(self) -> tuple[int, int]:
        """(V, H)."""
        return self.table.shape

    @property
    def dtype(self) -> ir.DataType:
        """The dtype the Gather outputs (the table's after any Cast)."""
        dtype = const_tensor(self.table.source).dtype  # type: ignore[union-attr]
        for op, attr in self.table.steps:
            if op == "Cast":
                dtype = ir.DataType(attr)
        return dtype


def _reads_token_ids(value: ir.Value | None) -> bool:
    """Whether `value` is the graph's token ids (through value-keeping ops): position tables,
    rotary caches and other constant lookups are not embeddings and stay float."""
    while value is not None:
        if value.is_graph_input():
            return value.name == TOKEN_IDS
        producer = value.producer()
        if producer is None or producer.op_type not in _ID_PASSTHROUGH or not producer.inputs:
            return False
        value = producer.inputs[0]
    return False


def _gather_table(node: ir.Node) -> tuple[ir.Value, tuple[tuple[str, object], ...]] | str:
    """The constant table a Gather reads (source, steps), or why it is not one."""
    if node.attributes.get_int("axis", 0) not in (0, -2) or len(node.inputs) != 2 or node.inputs[0] is None:
        return "not a row gather (axis 0) of a table"
    if not _reads_token_ids(node.inputs[1]):
        return f"its indices are not the '{TOKEN_IDS}' input"
    traced = trace_weight(node.inputs[0])
    if isinstance(traced, str):
        return traced
    source, steps = traced
    tensor = const_tensor(source)
    if tensor is None or len(tensor.shape) != 2 or tensor.dtype not in _FLOAT_TYPES:
        return "its data is not a 2-D float table"
    indices = node.inputs[1]
    if indices is not None and indices.dtype is not None and indices.dtype not in _INDEX_TYPES:
        return f"indices of dtype {indices.dtype}"
    if source.shape is None:
        source.shape = ir.Shape(tensor.shape)
    return source, tuple(steps)


def find_embeddings(model: ir.Model) -> list[Embedding]:
    """The main graph's Gathers of constant float tables [V, H] by the token ids, grouped by table, in graph order."""
    found: dict[tuple, Embedding] = {}
    for node in model.graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        traced = _gather_table(node)
        if isinstance(traced, str):
            logger.debug("Gather %s stays: %s", node.name, traced)
            continue
        source, steps = traced
        key = (id(source), steps)
        if key not in found:
            found[key] = Embedding(WeightGroup(source=source, steps=steps, alpha=1.0, targets=[]), [])
        found[key].nodes.append(node)
    return list(found.values())


def _block(config: QuantConfig, h: int) -> int:
    block = pack.gather_block_size(h, h if config.group_size == -1 else config.group_size)
    assert block is not None, "QuantConfig refuses group sizes GatherBlockQuantized cannot take"
    return block


def _shared_head(embedding: Embedding, config: QuantConfig,
                 heads: dict[int, tuple[WeightGroup, WrittenWeight]]) -> tuple[WrittenWeight | None, str]:
    """The head's packed weight this table can read (or None), and a note saying why (not)."""
    entry = heads.get(id(embedding.table.source))
    if entry is None or not _transposed_views(entry[0].steps, embedding.table.steps):
        return None, "stored on its own (no quantized head has this table as its weight)"
    group, written = entry
    if not config.shared_embedding:
        return None, "tied, stored twice (shared_embedding off)"
    block = _block(config, embedding.shape[1])
    if written.format is not Format.ORT:
        return None, f"tied, stored twice (the head is written as {written.format.value}, not MatMulNBits)"
    if (written.bits, written.block_size) != (config.embedding_bits, block):
        return None, (f"tied, stored twice (head {written.bits}-bit block {written.block_size}, embedding "
                      f"{config.embedding_bits}-bit block {block})")
    if group.dtype != embedding.dtype:
        return None, f"tied, stored twice (head computes in {group.dtype}, the table is {embedding.dtype})"
    return written, f"shared with the head '{group.name}' (its GPTQ codes)"


def _transposed_views(head: tuple[tuple[str, object], ...], table: tuple[tuple[str, object], ...]) -> bool:
    """Whether the head's weight [H, V] is the table [V, H] transposed: one more (or one fewer)
    Transpose on the way from their common source, and the same Casts."""
    transposes = lambda steps: sum(op == "Transpose" for op, _ in steps)  # noqa: E731
    casts = lambda steps: [s for s in steps if s[0] != "Transpose"]  # noqa: E731
    return (transposes(head) - transposes(table)) % 2 == 1 and casts(head) == casts(table)


def _reshaped(graph: ir.Graph, before: ir.Node, value: ir.Value, shape: list[int],
              builder: InitializerBuilder) -> ir.Value:
    target = builder.initializer("shape", np.array(shape, dtype=np.int64))
    node = ir.Node("", "Reshape", [value, target], outputs=[ir.Value(name=builder.name("reshaped"))],
                   name=builder.name("Reshape"))
    graph.insert_before(before, node)
    return node.outputs[0]


def _shared_inputs(graph: ir.Graph, first: ir.Node, written: WrittenWeight, v: int, h: int,
                   builder: InitializerBuilder) -> tuple[list[ir.Value | None], int]:
    """The op's data, scales and zero points read from the head's MatMulNBits initializers (no copy)."""
    b = written.inputs["B"]
    n_blocks = int(b.shape[1])  # type: ignore[index]
    inputs: list[ir.Value | None] = [_reshaped(graph, first, b, [v, -1], builder),
                                     _reshaped(graph, first, written.inputs["scales"], [v, n_blocks], builder)]
    zero_points = written.inputs.get("zero_points")
    inputs.append(None if zero_points is None else _reshaped(graph, first, zero_points, [v, -1], builder))
    return inputs, n_blocks * written.block_size


def _quantized_inputs(embedding: Embedding, config: QuantConfig, builder: InitializerBuilder,
                      device: str | None) -> tuple[list[ir.Value | None], int, int, float]:
    """Round-to-nearest codes of the table, packed: (data, scales, zero points), columns, block, error."""
    from onnx_gptq.solve import solve

    rtn = dataclasses.replace(config, bits=config.embedding_bits, algo=Algo.RTN, act_order=False,
                              layer_rules=(), head_bits=None, embedding_bits=None)
    result = solve(embedding.table.load(), None, rtn, scale_dtype=scale_dtype(embedding.dtype), device=device,
                   name=embedding.name)
    t = pack.pack_gather(result.qweight)
    zero_points = None if t.zero_points is None else builder.initializer("zero_points", t.zero_points)
    inputs = [builder.initializer("data", t.data),
              builder.initializer("scales", t.scales.astype(embedding.dtype.numpy())), zero_points]
    return inputs, t.columns, t.block_size, result.error


def quantize_embeddings(model: ir.Model, config: QuantConfig, heads: dict[int, tuple[WeightGroup, WrittenWeight]],
                        report: Report, *, taken: set[str], store: TensorStore | None = None,
                        device: str | None = None) -> int:
    """Rewrite every embedding Gather of `model` as GatherBlockQuantized (`config.embedding_bits`).

    Args:
        model: modified in place.
        config: `embedding_bits`, `group_size`, `sym`, `mse`, `shared_embedding`.
        heads: id of the head weight's source -> (its group, what rewrite wrote), from the
            LayerQuantizer; a tied table shares the head's packed tensors.
        report: one row per table is appended to `report.embeddings`.
        taken: initializer names already used (updated).
        store: makes the new initializers' tensors (default: in memory).
        device: torch device for round to nearest.
    Returns:
        The number of tables rewritten.
    """
    if config.embedding_bits is None:
        return 0
    graph = model.graph
    embeddings = find_embeddings(model)
    for embedding in embeddings:
        v, h = embedding.shape
        builder = InitializerBuilder(graph, embedding.name, taken, store or in_memory)
        first = embedding.nodes[0]
        written, note = _shared_head(embedding, config, heads)
        error: float | None = None
        if written is not None:
            inputs, columns = _shared_inputs(graph, first, written, v, h, builder)
            bits, block = written.bits, written.block_size
        else:
            inputs, columns, block, error = _quantized_inputs(embedding, config, builder, device)
            bits = config.embedding_bits
        for node in embedding.nodes:
            _replace_gather(graph, node, inputs, bits, block, columns, h, builder)
        model.opset_imports.setdefault(contract.ORT_DOMAIN, 1)
        report.embeddings.append({"name": embedding.name, "nodes": [n.name for n in embedding.nodes],
                                  "shape": [v, h], "bits": bits, "block_size": block, "storage": note,
                                  "shared": written is not None, "error": error})
        logger.info("embedding %s [%d, %d]: %d-bit block %d, %s", embedding.name, v, h, bits, block, note)
    return len(embeddings)


def _replace_gather(graph: ir.Graph, node: ir.Node, inputs: list[ir.Value | None], bits: int, block: int,
                    columns: int, h: int, builder: InitializerBuilder) -> None:
    """One GatherBlockQuantized (then a Slice to H columns when its rows are wider) for `node`."""
    data, scales, zero_points = inputs
    args = [data, node.inputs[1], scales] + ([zero_points] if zero_points is not None else [])
    attributes = {"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1}
    out = ir.Value(name=builder.name("gathered"))
    gather = ir.Node(contract.ORT_DOMAIN, contract.GATHER_OP_TYPE, args, outputs=[out],
                     attributes=ir.convenience.convert_attributes(attributes),
                     name=f"{node.name or builder.name('embedding')}_{contract.GATHER_OP_TYPE}")
    graph.insert_before(node, gather)
    result = out
    if columns != h:  # padded rows (the head's blocks, or an odd H at 4 bits): keep the first H
        bounds = [builder.initializer(s, np.array([x], dtype=np.int64)) for s, x in
                  (("starts", 0), ("ends", h), ("axes", -1))]
        cut = ir.Node("", "Slice", [out, *bounds], outputs=[ir.Value(name=builder.name("rows"))],
                      name=f"{gather.name}_Slice")
        graph.insert_before(node, cut)
        result = cut.outputs[0]
    replace_output(graph, node, result)
    graph.remove(node, safe=True)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A constant input seen through the Reshapes the shared form adds (None when absent)."""
    if value is None:
        return None
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape":
        array, shape = _constant(producer.inputs[0]), _constant(producer.inputs[1])
        assert array is not None and shape is not None, f"Reshape '{producer.name}' of a non-constant"
        return array.reshape(shape)
    tensor = const_tensor(value)
    assert tensor is not None, f"'{value.name}' is not a constant"
    return tensor.numpy()


def read_embeddings(model: ir.Model) -> dict[str, QuantizedWeight]:
    """The tables held by a model's GatherBlockQuantized nodes (the inverse of `quantize_embeddings`).

    Args:
        model: a model with GatherBlockQuantized nodes (uint8 data, quantize_axis 1).
    Returns:
        Node name -> the table [V, H] (H: the Slice after the node, else the op's row width).
    """
    found: dict[str, QuantizedWeight] = {}
    for node in model.graph:
        if (node.domain, node.op_type) != (contract.ORT_DOMAIN, contract.GATHER_OP_TYPE):
            continue
        data, scales = _constant(node.inputs[0]), _constant(node.inputs[2])
        zero_points = _constant(node.inputs[3]) if len(node.inputs) > 3 else None
        bits, block = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size", 128)
        assert data is not None and scales is not None
        h = data.shape[1] * 8 // bits
        for consumer in node.outputs[0].consumers():
            if consumer.op_type == "Slice":
                h = int(_constant(consumer.inputs[2])[0])  # type: ignore[index]
        t = pack.GatherTensors(data=data, scales=scales, zero_points=zero_points, H=h, bits=bits, block_size=block)
        found[node.name] = pack.unpack_gather(t, min(block, h))
    return found


__all__ = ["Embedding", "find_embeddings", "quantize_embeddings", "read_embeddings"]
