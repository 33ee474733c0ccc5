"""Stage 5: replace each quantized MatMul/Gemm with its packed form.

Formats (see `onnx_gptq.config.Format`):

* ort:    `com.microsoft.MatMulNBits` (A, B, scales, zero_points, -, bias)
* custom: `onnx_gptq.GptqMatMul` (A, B, scales, zero_points, g_idx, bias), docs/CUSTOM_OP.md
* qdq:    `DequantizeLinear` (blocked, opset 21) feeding the original MatMul/Gemm

Packed tensors come from `onnx_gptq.pack` and hold the solver's codes, scales
and zero points unchanged; they are shared by all consumers of one weight.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from onnx_gptq import contract, model_io, pack
from onnx_gptq.config import Format
from onnx_gptq.errors import ConfigError, NonFiniteError
from onnx_gptq.qweight import QuantizedWeight
from onnx_gptq.targets import Target, WeightGroup

logger = logging.getLogger(__name__)

ORT_DOMAIN = contract.ORT_DOMAIN
CUSTOM_DOMAIN = contract.GPTQ_DOMAIN
CUSTOM_OP_TYPE = contract.GPTQ_OP_TYPE
QDQ_MIN_OPSET = contract.QDQ_MIN_OPSET
_ORT_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


#: Which op is faster on CPU where both can hold the weight, measured with
#: bench/bench_kernels_cpu.py on 2026-12-03 (docs/BENCHMARKS.md, "With the int8
#: GEMM path", one thread, CPU time): (bits, int8 activations?, group <= 32?, large
#: weight? (K*N >= 4096*4096)) -> (format, GptqMatMul's speed against MatMulNBits
#: at m=1 / m=128). GptqMatMul is chosen only where it is at least as fast at both
#: m=1 (decode) and m=128 (prefill), beyond the run-to-run noise; missing keys keep
#: MatMulNBits.
SPEED_TABLE: dict[tuple[int, bool, bool, bool], tuple[Format, str]] = {
    (4, False, False, False): (Format.ORT, "GptqMatMul 1.08x at m=1, 0.86x at m=128 on 2048x2048"),
    (4, False, False, True): (Format.ORT, "GptqMatMul 1.07x at m=1, 0.89x at m=128 on 4096x4096"),
    (4, False, True, False): (Format.ORT, "GptqMatMul 0.96x at m=1, 0.86x at m=128 on 2048x2048"),
    (4, False, True, True): (Format.ORT, "GptqMatMul 1.10x at m=1, 0.91x at m=128 on 4096x4096"),
    (4, True, False, False): (Format.ORT, "GptqMatMul 0.93-0.98x at m=1, 1.11x at m=128 on 2048x2048"),
    (4, True, False, True): (Format.ORT, "GptqMatMul 0.76-1.15x at m=1 (noise), 1.17x at m=128 on 4096x4096"),
    (4, True, True, False): (Format.ORT, "GptqMatMul 1.18x at m=1, 1.03x at m=128 on 2048x2048, one loaded run"),
    (4, True, True, True): (Format.ORT, "GptqMatMul 0.88x at m=1, 0.93x at m=128 on 4096x4096"),
}
_LARGE_WEIGHT = 4096 * 4096


def _faster_op(qw: QuantizedWeight, accuracy_level: int) -> tuple[Format, str]:
    """SPEED_TABLE's entry for this weight (MatMulNBits where nothing was measured)."""
    n, k = qw.shape
    key = (qw.bits, accuracy_level == 4, 0 < qw.group_size <= 32, k * n >= _LARGE_WEIGHT)
    return SPEED_TABLE.get(key, (Format.ORT, "not measured; MatMulNBits kept"))


def choose_format(requested: Format, qw: QuantizedWeight, dtype: ir.DataType, layer: str = "",
                  accuracy_level: int = 0) -> tuple[Format, str]:
    """The format a weight is written in, and why (for AUTO).

    Args:
        requested: the configured format.
        qw: the solver's result.
        dtype: the dtype the consuming nodes compute in.
        layer: the weight's name, for errors.
        accuracy_level: the accuracy_level the node will get (AUTO compares the
            ops at that level, SPEED_TABLE).
    Returns:
        (format, reason); for AUTO the reason says why (MatMulNBits cannot hold
        the weight, runs it slowly: 2 bits, or the measured speeds); "" otherwise.
    Raises:
        ConfigError: an explicit 'ort' format that cannot hold this weight.
    """
    if requested not in (Format.AUTO, Format.ORT):
        return requested, ""
    reason = pack.can_pack_matmulnbits(qw)
    if reason is None and dtype not in _ORT_DTYPES:
        reason = f"{dtype} activations"
    if reason is None and requested is Format.AUTO and qw.bits == 2:
        # Measured (docs/BENCHMARKS.md): onnxruntime 1.32 runs 2-bit MatMulNBits through a
        # slow reference path on CPU, 60-250x slower than GptqMatMul at batch 1.
        return Format.CUSTOM, "MatMulNBits' 2-bit CPU kernel is a slow fallback"
    if reason is None:
        if requested is Format.ORT:
            return Format.ORT, ""
        fmt, measured = _faster_op(qw, accuracy_level)
        which = "GptqMatMul" if fmt is Format.CUSTOM else "MatMulNBits"
        return fmt, f"{which} is faster at accuracy_level {accuracy_level} ({measured})"
    if requested is Format.ORT:
        raise ConfigError(f"layer '{layer}': format 'ort' (MatMulNBits) cannot express {reason}; "
                          "use --format auto or custom")
    return Format.CUSTOM, f"MatMulNBits cannot express {reason}"


def _unique_name(graph: ir.Graph, base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken or name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


@dataclasses.dataclass(frozen=True)
class WrittenWeight:
    """What `rewrite_group` wrote for one weight: its format and packed initializers.

    Attributes:
        format: the concrete format.
        inputs: packed input name ("B", "scales", "zero_points", "g_idx", "codes") -> its initializer.
        bits: code width.
        block_size: the op's block (the group size, or MatMulNBits' power of two holding it).
    """

    format: Format
    inputs: dict[str, ir.Value]
    bits: int
    block_size: int


#: Turns a new initializer's array into the tensor the graph holds (e.g. one written to disk).
TensorStore = Callable[[np.ndarray, str], ir.TensorProtocol]


def in_memory(array: np.ndarray, name: str) -> ir.TensorProtocol:
    return ir.Tensor(np.ascontiguousarray(array), name=name)


class InitializerBuilder:
    """Adds initializers with unique names derived from a weight's name."""

    def __init__(self, graph: ir.Graph, base: str, taken: set[str], store: TensorStore) -> None:
        self.graph, self.base, self.taken, self.store = graph, base, taken, store

    def initializer(self, suffix: str, array: np.ndarray) -> ir.Value:
        name = _unique_name(self.graph, f"{self.base}_{suffix}", self.taken)
        tensor = self.store(array, name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def name(self, suffix: str) -> str:
        return _unique_name(self.graph, f"{self.base}_{suffix}", self.taken)


def _cast(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    return array.astype(dtype.numpy())


def _const_bias(target: Target, n: int, dtype: ir.DataType) -> np.ndarray | None:
    """Gemm's beta*C as a [N] array when C is a constant broadcastable to [N]."""
    if target.bias is None:
        return None
    tensor = target.bias.const_value
    if tensor is None:
        return None
    c = tensor.numpy().astype(np.float32)
    if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
        return None
    return _cast(np.broadcast_to(c.reshape(-1), (n,)) * np.float32(target.bias_scale), dtype)


def replace_output(graph: ir.Graph, old: ir.Node, new_output: ir.Value) -> None:
    old_output = old.outputs[0]
    new_output.shape = old_output.shape
    new_output.type = old_output.type
    if old_output.is_graph_output():
        index = [i for i, v in enumerate(graph.outputs) if v is old_output]
        name = old_output.name
        old_output.name = f"{name}__float"
        new_output.name = name
        for i in index:
            graph.outputs[i] = new_output
    old_output.replace_all_uses_with(new_output)


def _packed_node(target: Target, op: tuple[str, str], inputs: list[ir.Value | None],
                 attributes: dict[str, int], builder: InitializerBuilder, n: int) -> None:
    """Put a packed op in place of `target.node` (Gemm's bias folded in when constant)."""
    graph = target.node.graph
    assert graph is not None
    bias = _const_bias(target, n, target.dtype)
    bias_value = builder.initializer("bias", bias) if bias is not None else None
    args = [target.activation, *inputs, bias_value]
    while args and args[-1] is None:
        args.pop()
    output = ir.Value(name=builder.name("out"))
    node = ir.Node(op[0], op[1], args, attributes=ir.convenience.convert_attributes(attributes),
                   outputs=[output], name=f"{target.name}_{op[1]}")
    graph.insert_before(target.node, node)
    result = output
    if target.bias is not None and bias is None:
        # Gemm's C is not a constant [N]: keep it as an Add (and Mul by beta).
        c = target.bias
        if target.bias_scale != 1.0:
            beta = builder.initializer("beta", np.array(target.bias_scale, dtype=target.dtype.numpy()))
            mul = ir.Node("", "Mul", [c, beta], outputs=[ir.Value(name=builder.name("scaled_bias"))])
            graph.insert_before(target.node, mul)
            c = mul.outputs[0]
        add = ir.Node("", "Add", [output, c], outputs=[ir.Value(name=builder.name("biased"))],
                      name=f"{target.name}_bias")
        graph.insert_before(target.node, add)
        result = add.outputs[0]
    replace_output(graph, target.node, result)
    graph.remove(target.node, safe=True)


def _rewrite_ort(group: WeightGroup, qw: QuantizedWeight, builder: InitializerBuilder,
                 accuracy_level: int) -> WrittenWeight:
    t = pack.pack_matmulnbits(qw)
    dtype = group.dtype
    inputs = [builder.initializer("B", t.B), builder.initializer("scales", _cast(t.scales, dtype))]
    if t.zero_points is not None:
        inputs.append(builder.initializer("zero_points", t.zero_points))
    else:
        inputs.append(None)
    inputs.append(None)  # g_idx: never written for MatMulNBits
    attributes = {"K": t.K, "N": t.N, "bits": t.bits, "block_size": t.block_size,
                  "accuracy_level": accuracy_level}
    for target in group.targets:
        _packed_node(target, (ORT_DOMAIN, contract.MATMULNBITS_OP_TYPE), inputs, attributes, builder, t.N)
    return _written(Format.ORT, contract.MATMULNBITS_INPUTS[1:], inputs, t.bits, t.block_size)


def _written(fmt: Format, names: tuple[str, ...], inputs: list[ir.Value | None], bits: int,
             block_size: int) -> WrittenWeight:
    return WrittenWeight(fmt, {n: v for n, v in zip(names, inputs) if v is not None}, bits, block_size)


def _rewrite_custom(group: WeightGroup, qw: QuantizedWeight, builder: InitializerBuilder,
                    accuracy_level: int) -> WrittenWeight:
    t = pack.pack_custom(qw)
    dtype = group.dtype
    inputs = [
        builder.initializer("B", t.B),
        builder.initializer("scales", _cast(t.scales, dtype)),
        builder.initializer("zero_points", t.zero_points) if t.zero_points is not None else None,
        builder.initializer("g_idx", t.g_idx) if t.g_idx is not None else None,
    ]
    attributes = {"K": t.K, "N": t.N, "bits": t.bits, "block_size": t.block_size}
    if accuracy_level:  # absent means 0; older libraries then still load the model
        attributes[contract.GPTQ_OPTIONAL_ATTRIBUTES[0]] = accuracy_level
    for target in group.targets:
        _packed_node(target, (CUSTOM_DOMAIN, CUSTOM_OP_TYPE), inputs, attributes, builder, t.N)
    return _written(Format.CUSTOM, contract.GPTQ_INPUTS[1:], inputs, t.bits, t.block_size)


def _rewrite_qdq(group: WeightGroup, qw: QuantizedWeight, builder: InitializerBuilder) -> WrittenWeight:
    t = pack.pack_qdq(qw)
    dtype = group.dtype
    inputs: list[ir.Value | None] = [builder.initializer("codes", t.codes),
                                     builder.initializer("scales", _cast(t.scales, dtype))]
    if t.zero_points is not None:
        inputs.append(builder.initializer("zero_points", t.zero_points))
    attributes = {"axis": t.axis}
    if t.block_size:
        attributes["block_size"] = t.block_size
    weight = ir.Value(name=builder.name("dequantized"), type=ir.TensorType(dtype),
                      shape=ir.Shape(list(qw.shape[::-1])))
    dq = ir.Node("", "DequantizeLinear", inputs, attributes=ir.convenience.convert_attributes(attributes),
                 outputs=[weight], name=f"{group.name}_DequantizeLinear")
    first = group.targets[0].node
    assert first.graph is not None
    first.graph.insert_before(first, dq)
    for target in group.targets:
        target.node.replace_input_with(1, weight)
        if target.node.op_type == "Gemm":
            # The codes already hold transB and alpha: W is [K, N] and scaled.
            target.node.attributes["transB"] = ir.AttrInt64("transB", 0)
            target.node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
    return _written(Format.QDQ, ("codes", "scales", "zero_points"), inputs, qw.bits, t.block_size)


def rewrite_group(model: ir.Model, group: WeightGroup, qw: QuantizedWeight, fmt: Format,
                  *, accuracy_level: int = 0, taken_names: set[str] | None = None,
                  store: TensorStore | None = None) -> WrittenWeight:
    """Replace every consumer of `group`'s weight by the packed form of `qw`.

    Args:
        model: the model, modified in place.
        group: the weight and its consumers (from `targets.find_targets`).
        qw: the solver's result for this weight, [N, K].
        fmt: a concrete format (not AUTO; see `choose_format`).
        accuracy_level: the accuracy_level attribute of MatMulNBits / GptqMatMul nodes
            (4: int8 activations on CPU; GptqMatMul omits 0).
        taken_names: names already used by earlier rewrites (updated).
        store: makes the tensor of each new initializer (default: in memory;
            `model_io.PackedWeightFile` writes them to disk instead).
    Returns:
        The format and the packed initializers written (a tied embedding may share them).
    """
    builder = InitializerBuilder(model.graph, group.name, taken_names if taken_names is not None else set(),
                                 store or in_memory)
    if fmt is Format.ORT:
        model.opset_imports.setdefault(ORT_DOMAIN, 1)
        return _rewrite_ort(group, qw, builder, accuracy_level)
    if fmt is Format.CUSTOM:
        model.opset_imports.setdefault(CUSTOM_DOMAIN, 1)
        return _rewrite_custom(group, qw, builder, accuracy_level)
    if fmt is Format.QDQ:
        if model_io.default_opset(model) < QDQ_MIN_OPSET:
            raise ValueError(f"blocked DequantizeLinear needs opset >= {QDQ_MIN_OPSET}: "
                             "convert with model_io.with_opset first")
        return _rewrite_qdq(group, qw, builder)
    raise ValueError(f"rewrite_group needs a concrete format, got {fmt}")


def remove_unused(model: ir.Model) -> None:
    """Drop float weights and pass-through nodes that no node uses any more."""
    ir.passes.common.RemoveUnusedNodesPass()(model)
    graph = model.graph
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)


def read_packed(model: ir.Model, suffix: str = "_B") -> dict[str, QuantizedWeight]:
    """The quantized weights held by a model's MatMulNBits and GptqMatMul nodes.

    The inverse of `rewrite_group` for the ort and custom formats (also reads
    MatMulNBits nodes other quantizers wrote).

    Args:
        model: a quantized model.
        suffix: regex for what the quantizer appended to the weight's name on
            its packed `B` input (ours "_B"; onnxruntime's quantizer "_Q4" or "_Q4G128").
    Returns:
        Original weight name -> the weight, [N, K], scales as float32.
    """
    strip = re.compile(f"(?:{suffix})$")
    found: dict[str, QuantizedWeight] = {}
    for node in model.graph.all_nodes():
        if (node.domain, node.op_type) not in ((ORT_DOMAIN, contract.MATMULNBITS_OP_TYPE),
                                               (CUSTOM_DOMAIN, CUSTOM_OP_TYPE)):
            continue

        order = contract.MATMULNBITS_INPUTS if node.op_type == contract.MATMULNBITS_OP_TYPE else contract.GPTQ_INPUTS

        def const(input_name: str, node: ir.Node = node, order: tuple[str, ...] = order) -> np.ndarray | None:
            i = order.index(input_name)
            value = node.inputs[i] if len(node.inputs) > i else None
            return None if value is None or value.const_value is None else value.const_value.numpy()

        attrs = {a: node.attributes.get_int(a) for a in contract.GPTQ_ATTRIBUTES}  # MatMulNBits has them too
        scales = const("scales")
        assert scales is not None, f"{node.name}: scales are not a constant"
        if node.op_type == contract.MATMULNBITS_OP_TYPE:
            qw = pack.unpack_matmulnbits(
                pack.MatMulNBitsTensors(B=const("B"), scales=scales.astype(np.float32),
                                        zero_points=const("zero_points"), **attrs),
                group_size=min(attrs["block_size"], attrs["K"]))
        else:
            qw = pack.unpack_custom(pack.CustomOpTensors(B=const("B"), scales=scales.astype(np.float32),
                                                         zero_points=const("zero_points"), g_idx=const("g_idx"),
                                                         **attrs))
        found[strip.sub("", node.inputs[1].name or "")] = qw
    return found


def read_qdq(model: ir.Model, suffix: str = "_codes") -> dict[str, QuantizedWeight]:
    """The quantized weights held by a model's constant 4/8-bit `DequantizeLinear` nodes.

    The inverse of `rewrite_group` for the qdq format (symmetric weights, with
    no zero point input, read back with zero point 2**(bits-1)).

    Args:
        model: a quantized model.
        suffix: regex for what the quantizer appended to the weight's name on
            the codes input (ours "_codes").
    Returns:
        Original weight name -> the weight, [N, K], scales as float32.
    """
    strip = re.compile(f"(?:{suffix})$")
    found: dict[str, QuantizedWeight] = {}
    for node in model.graph.all_nodes():
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        arrays = [None if v is None or v.const_value is None else v.const_value.numpy() for v in node.inputs]
        if arrays[0] is None or arrays[1] is None or arrays[0].ndim != 2:
            continue
        bits = 4 if arrays[0].dtype.name in ("int4", "uint4") else 8
        block_size = node.attributes.get_int("block_size", 0)
        tensors = pack.QDQTensors(codes=arrays[0], scales=arrays[1].astype(np.float32),
                                  zero_points=arrays[2] if len(arrays) > 2 else None,
                                  block_size=block_size, axis=node.attributes.get_int("axis", 1))
        found[strip.sub("", node.inputs[0].name or "")] = pack.unpack_qdq(tensors, bits)
    return found


def _float_types() -> tuple[ir.DataType, ...]:
    return (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _check_produced(name: str, array: np.ndarray) -> None:
    """NonFiniteError naming `name` when a tensor this run produced holds NaN or Inf."""
    if not np.isfinite(array).all():
        bad = "NaN" if np.isnan(array).any() else "Inf"
        raise NonFiniteError(f"quantized tensor '{name}' would be written with {bad} values "
                             "(the weight's range does not fit the scale dtype); nothing written")


def check_written_finite(written: "WrittenWeight") -> None:
    """`check_finite` for one weight's packed float tensors (scales), as soon as they are written:
    a sequential run would otherwise carry a NaN scale into the next stage's calibration.

    Raises:
        NonFiniteError: naming the tensor.
    """
    for value in written.inputs.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype in _float_types():
            _check_produced(value.name, tensor.numpy().astype(np.float32))


def check_finite(model: ir.Model, produced: set[str]) -> None:
    """Refuse to write a model whose tensors hold NaN or Inf.

    Tensors this run produced (scales, folded bias, Gemm beta) must be finite.
    Float weights left as they were may hold +-Inf (models keep -inf attention
    masks as constants) but never NaN.

    Args:
        model: the rewritten model (reads every float initializer once).
        produced: names of the initializers the rewrite added.
    Raises:
        NonFiniteError: naming the first offending initializer.
    """
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in _float_types():
            continue
        array = tensor.numpy().astype(np.float32)
        if name in produced:
            _check_produced(name, array)
        elif np.isnan(array).any():
            raise NonFiniteError(f"float weight '{name}' holds NaN; nothing written")
