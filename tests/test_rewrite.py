"""targets + rewrite on real torch exports, independent of the solver.

Weights are quantized here by a plain numpy round-to-nearest; the rewritten
model, run by onnxruntime, must equal the float model whose weights are
replaced by the dequantized ones.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnx_gptq import embedding, model_io, rewrite, targets
from onnx_gptq.config import Format, QuantConfig
from onnx_gptq.qweight import QuantizedWeight
from tests import tiny_models


def numpy_rtn(w_nk: np.ndarray, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest per group, straight from the definition. w_nk: [N, K]."""
    n, k = w_nk.shape
    gs = k if group_size == -1 else group_size
    maxq = 2**bits - 1
    n_groups = -(-k // gs)
    codes = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, n_groups), np.float32)
    zeros = np.zeros((n, n_groups), np.uint8)
    for g in range(n_groups):
        block = w_nk[:, g * gs:(g + 1) * gs]
        lo, hi = np.minimum(block.min(1), 0), np.maximum(block.max(1), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        scale = np.where(hi > lo, (hi - lo) / maxq, 1.0).astype(np.float32)
        zero = np.full(n, 2 ** (bits - 1)) if sym else np.clip(np.round(-lo / scale), 0, maxq)
        codes[:, g * gs:(g + 1) * gs] = np.clip(np.round(block / scale[:, None]) + zero[:, None], 0, maxq)
        scales[:, g], zeros[:, g] = scale, zero
    return QuantizedWeight(codes, scales, zeros, bits, gs, sym=sym)


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    ir.external_data.load_to_model(model)  # in-memory session: no external files
    rewrite.remove_unused(model)
    options = ort.SessionOptions()
    # onnxruntime fuses DequantizeLinear(int4) + MatMul into MatMulNBits with int8
    # activations (accuracy level 4) unless told otherwise; compare exact math.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def dequantized_reference(path, config: QuantConfig, qweights: dict[str, QuantizedWeight],
                          quantized: ir.Model | None = None) -> ir.Model:
    """The float model with each target's weight input replaced by dequant(W) [K, N], and each embedding
    Gather's table by the one `quantized` holds (its GatherBlockQuantized codes read back, dequantized)."""
    model = ir.load(path)
    groups, _ = targets.find_targets(model, config)
    for group in groups:
        w = qweights[group.name].dequantize().T.astype(group.dtype.numpy())
        value = ir.Value(name=f"{group.name}_deq", const_value=ir.Tensor(np.ascontiguousarray(w)),
                         shape=ir.Shape(w.shape), type=ir.TensorType(group.dtype))
        model.graph.register_initializer(value)
        for t in group.targets:
            t.node.replace_input_with(1, value)
            if t.node.op_type == "Gemm":
                t.node.attributes["transB"] = ir.AttrInt64("transB", 0)
                t.node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
    tables = [] if quantized is None else list(embedding.read_embeddings(quantized).values())
    found = embedding.find_embeddings(model) if tables else []
    assert len(tables) == len(found), (len(tables), len(found))
    for i, (emb, table) in enumerate(zip(found, tables)):
        dtype = emb.nodes[0].inputs[0].dtype
        value = ir.Value(name=f"embedding_{i}_deq", const_value=ir.Tensor(table.dequantize().astype(dtype.numpy())),
                         shape=ir.Shape(table.shape), type=ir.TensorType(dtype))
        model.graph.register_initializer(value)
        for node in emb.nodes:
            node.replace_input_with(0, value)
    return model


def quantize_rtn(path, config: QuantConfig, fmt: Format) -> tuple[ir.Model, dict[str, QuantizedWeight]]:
    model = ir.load(path)
    if fmt is Format.QDQ:
        model = model_io.with_opset(model, rewrite.QDQ_MIN_OPSET)
    groups, _ = targets.find_targets(model, config)
    qweights = {}
    for group in groups:
        qw = numpy_rtn(group.load().T, config.bits, config.group_size, config.sym)
        qweights[group.name] = qw
        chosen, _ = rewrite.choose_format(fmt, qw, group.dtype)
        rewrite.rewrite_group(model, group, qw, chosen)
    rewrite.remove_unused(model)
    return model, qweights


FEEDS = {"input_ids": np.random.default_rng(0).integers(0, tiny_models.VOCAB, (2, 12)).astype(np.int64),
         "attention_mask": np.ones((2, 12), np.int64)}


@pytest.mark.parametrize("fmt,bits,group_size,sym", [
    (Format.ORT, 4, 32, False),
    (Format.ORT, 8, -1, True),
    (Format.ORT, 2, 16, False),
    (Format.QDQ, 4, 32, True),
    (Format.QDQ, 8, -1, False),
])
def test_rewritten_model_equals_dequantized_reference(tiny_lm_onnx, fmt, bits, group_size, sym):
    which, path = tiny_lm_onnx
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym, format=fmt, quantize_head=True)
    model, qweights = quantize_rtn(path, config, fmt)
    ops = [n.op_type for n in model.graph]
    if fmt is Format.ORT:
        assert ops.count("MatMulNBits") == (15 if which == "llama" else 9)
    else:
        assert ops.count("DequantizeLinear") == (15 if which == "llama" else 9)
    got = run(model, FEEDS)
    want = run(dequantized_reference(path, config, qweights), FEEDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # And quantization changed something: the float model differs.
    assert np.abs(run(ir.load(path), FEEDS) - got).max() > 1e-3


def test_head_is_quantized_by_default_and_float_on_request(tiny_llama_onnx):
    model = ir.load(tiny_llama_onnx)
    groups, skips = targets.find_targets(model, QuantConfig())
    assert len(groups) == 15 and groups[-1].is_head  # 2 layers x (q, k, v, o, gate, up, down), then the head
    assert not [s for s in skips if "output head" in s.reason]
    groups, skips = targets.find_targets(model, QuantConfig(head_bits=None))
    assert len(groups) == 14  # the head left float
    heads = [s for s in skips if "output head" in s.reason]
    assert len(heads) == 1
    runtime = [s for s in skips if "computed at run time" in s.reason or "Transpose with perm" in s.reason]
    assert len(runtime) == 4  # attention score and value MatMuls


def test_include_exclude_match_module_names(tiny_llama_onnx):
    model = ir.load(tiny_llama_onnx)
    groups, skips = targets.find_targets(model, QuantConfig(include=(r"layers\.1\.mlp",)))
    assert sorted(g.targets[0].module.split(".")[-1] for g in groups) == ["down_proj", "gate_proj", "up_proj"]
    groups, _ = targets.find_targets(model, QuantConfig(exclude=(r"self_attn",)))
    assert len(groups) == 7  # 2 x (gate, up, down) and the head
    assert any("excluded by pattern 'self_attn'" in s.reason for s in targets.find_targets(
        model, QuantConfig(exclude=(r"self_attn",)))[1])


def test_gemm_bias_and_transb_fold_into_packed_op(tmp_path):
    """Gemm(transB=1, alpha=0.5, beta=2) with a [1, N] bias: the packed op must reproduce it."""
    rng = np.random.default_rng(1)
    k, n = 48, 20
    b = rng.standard_normal((n, k)).astype(np.float32)  # transB=1: stored [N, K]
    c = rng.standard_normal((1, n)).astype(np.float32)
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], name="g", opset_imports={"": 18})
    x = ir.Value(name="x", shape=ir.Shape([3, k]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(x)
    bv = ir.Value(name="B", const_value=ir.Tensor(b), shape=ir.Shape([n, k]), type=ir.TensorType(ir.DataType.FLOAT))
    cv = ir.Value(name="C", const_value=ir.Tensor(c), shape=ir.Shape([1, n]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.register_initializer(bv)
    graph.register_initializer(cv)
    node = ir.Node("", "Gemm", [x, bv, cv], attributes=ir.convenience.convert_attributes(
        {"transB": 1, "alpha": 0.5, "beta": 2.0}), name="gemm")
    graph.append(node)
    relu = ir.Node("", "Relu", [node.outputs[0]], name="relu")
    graph.append(relu)
    relu.outputs[0].name = "y"
    graph.outputs.append(relu.outputs[0])
    model = ir.Model(graph, ir_version=10)
    config = QuantConfig(bits=4, group_size=16, quantize_head=True)
    groups, _ = targets.find_targets(model, config)
    assert len(groups) == 1 and groups[0].shape == (k, n)
    np.testing.assert_allclose(groups[0].load(), 0.5 * b.T, rtol=1e-6)
    qw = numpy_rtn(groups[0].load().T, 4, 16, False)
    rewrite.rewrite_group(model, groups[0], qw, Format.ORT)
    rewrite.remove_unused(model)
    assert [nd.op_type for nd in model.graph] == ["MatMulNBits", "Relu"]
    xs = rng.standard_normal((3, k)).astype(np.float32)
    want = np.maximum(xs @ qw.dequantize().T + 2.0 * c, 0)
    np.testing.assert_allclose(run(model, {"x": xs}), want, rtol=1e-5, atol=1e-5)


def _four_bit(k: int = 64, n: int = 32, group: int = 32) -> QuantizedWeight:
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    return numpy_rtn(w, 4, group, sym=False)


@pytest.mark.parametrize("level", [0, 4])
def test_auto_format_follows_the_measured_speed_table(monkeypatch, level):
    qw = _four_bit()
    fmt, why = rewrite.choose_format(Format.AUTO, qw, ir.DataType.FLOAT, "w", accuracy_level=level)
    assert fmt is Format.ORT
    assert f"MatMulNBits is faster at accuracy_level {level}" in why
    key = (4, level == 4, True, False)
    monkeypatch.setitem(rewrite.SPEED_TABLE, key, (Format.CUSTOM, "GptqMatMul 1.5x at m=1"))
    fmt, why = rewrite.choose_format(Format.AUTO, qw, ir.DataType.FLOAT, "w", accuracy_level=level)
    assert (fmt, why) == (Format.CUSTOM, f"GptqMatMul is faster at accuracy_level {level} (GptqMatMul 1.5x at m=1)")
    # An explicit format is never second-guessed.
    assert rewrite.choose_format(Format.ORT, qw, ir.DataType.FLOAT, "w", accuracy_level=level) == (Format.ORT, "")


@pytest.mark.parametrize("level", [0, 4])
def test_custom_nodes_carry_accuracy_level(tiny_lm_onnx, level):
    _, path = tiny_lm_onnx
    model = ir.load(path)
    config = QuantConfig(bits=4, group_size=32, format=Format.CUSTOM)
    groups, _ = targets.find_targets(model, config)
    for group in groups:
        qw = numpy_rtn(group.load().T, 4, 32, False)
        rewrite.rewrite_group(model, group, qw, Format.CUSTOM, accuracy_level=level)
    nodes = [n for n in model.graph if n.op_type == rewrite.CUSTOM_OP_TYPE]
    assert nodes
    for node in nodes:
        attr = node.attributes.get("accuracy_level")
        assert (attr.as_int() if attr is not None else 0) == level
        assert (attr is None) == (level == 0)  # level 0 writes nothing: older libraries load the model
