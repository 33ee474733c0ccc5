"""Past key/value feature sizes (calibrate/past_shapes.py): static dims, genai_config.json, the graph.

Each graph is a few nodes of ONNX built by hand: only its structure is read.
The feeds `ModelInputs` makes from them are checked too: an empty past never
has 0 in a feature dimension.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gptq.calibrate.model_inputs import ModelInputs
from onnx_gptq.calibrate.past_shapes import PastDims, past_dims
from onnx_gptq.errors import CalibrationError, ModelError

PAST = ("past_key_values.0.key", "past_key_values.0.value")
SYMBOLIC = ["batch_size", "kv_heads", "past_sequence_length", "kv_cache_dim"]
VOCAB, HIDDEN = 32, 64


def _lm(nodes: list, inits: list, past_dims_: list, present_dims: list | None = None,
        extra_inputs: list | None = None) -> onnx.ModelProto:
    """input_ids -> embedding -> ... -> logits, plus two past inputs and their present outputs."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "head"), *inits]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["hidden"]), *nodes,
             helper.make_node("MatMul", ["hidden", "head"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              *[helper.make_tensor_value_info(name, TensorProto.FLOAT, past_dims_) for name in PAST],
              *(extra_inputs or [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB]),
               *[helper.make_tensor_value_info(name.replace("past_key_values", "present"), TensorProto.FLOAT,
                                               present_dims or ["batch_size", None, "total", None])
                 for name in PAST]]
    if not any(n.op_type == "GroupQueryAttention" for n in nodes):
        nodes += [helper.make_node("Identity", [name], [name.replace("past_key_values", "present")]) for name in PAST]
    graph = helper.make_graph(nodes, "lm", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def opaque_past_model() -> onnx.ModelProto:
    """A past input whose head size nothing gives: symbolic, no config, no attention node, no static present.

    One hidden layer (``mlp``) for the CLI to quantize.
    """
    weight = numpy_helper.from_array(np.random.default_rng(2).standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
                                     "mlp_weight")
    model = _lm([helper.make_node("MatMul", ["hidden", "mlp_weight"], ["hidden2"], name="mlp")], [weight],
                ["batch_size", 2, "past_sequence_length", "head_dim"])
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] == "head":
            node.input[0] = "hidden2"
    return model


def _gqa_model(packed: bool) -> onnx.ModelProto:
    """GroupQueryAttention (4 heads, 2 KV heads, head size 16) reading symbolic pasts, as the builder writes it."""
    rng = np.random.default_rng(1)
    width = (4 + 2 * 2) * 16 if packed else 4 * 16
    inits = [numpy_helper.from_array(rng.standard_normal((HIDDEN, width)).astype(np.float32), "qkv_weight")]
    nodes = [helper.make_node("MatMul", ["hidden", "qkv_weight"], ["qkv"])]
    attention_inputs = ["qkv", "", ""] if packed else ["qkv", "k", "v"]
    nodes.append(helper.make_node(
        "GroupQueryAttention", [*attention_inputs, *PAST, "seqlens_k", "total_sequence_length"],
        ["attn", "present.0.key", "present.0.value"], domain="com.microsoft", num_heads=4, kv_num_heads=2))
    nodes.append(helper.make_node("Add", ["hidden", "attn"], ["hidden2"]))
    extra = [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size", 1]),
             helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    model = _lm(nodes, inits, SYMBOLIC, extra_inputs=extra)
    for node in model.graph.node:  # the head reads the attention's result
        if node.op_type == "MatMul" and node.input[1] == "head":
            node.input[0] = "hidden2"
    return model


def _dims(model: onnx.ModelProto, decoder: dict | None = None) -> dict[str, PastDims]:
    return past_dims(ir.serde.deserialize_model(model).graph, decoder, "cfg/genai_config.json")


def test_static_dims_are_read_from_the_input() -> None:
    dims = _dims(_lm([], [], ["batch_size", 2, "past_sequence_length", 16]))
    assert {(d.kv_heads, d.head_size) for d in dims.values()} == {(2, 16)}
    assert dims[PAST[0]].source == "the input's shape"


def test_rank5_stacked_past_is_read() -> None:
    dims = _dims(_lm([], [], [2, "batch_size", 4, "past_sequence_length", 8]))
    assert (dims[PAST[0]].kv_heads, dims[PAST[0]].head_size) == (4, 8)


def test_static_present_output_gives_symbolic_past_dims() -> None:
    dims = _dims(_lm([], [], SYMBOLIC, present_dims=["batch_size", 3, "total", 24]))
    assert (dims[PAST[1]].kv_heads, dims[PAST[1]].head_size) == (3, 24)
    assert "graph" in dims[PAST[1]].source


@pytest.mark.parametrize("packed", [True, False], ids=["packed-qkv", "separate-q"])
def test_group_query_attention_gives_symbolic_past_dims(packed: bool) -> None:
    dims = _dims(_gqa_model(packed))
    assert {(d.kv_heads, d.head_size) for d in dims.values()} == {(2, 16)}


def test_genai_config_gives_symbolic_past_dims() -> None:
    decoder = {"head_size": 12, "num_key_value_heads": 3, "num_hidden_layers": 1}
    dims = _dims(_lm([], [], SYMBOLIC), decoder)
    assert (dims[PAST[0]].kv_heads, dims[PAST[0]].head_size) == (3, 12)
    assert "cfg/genai_config.json" in dims[PAST[0]].source


@pytest.mark.parametrize(("decoder", "words"), [
    ({"head_size": 32}, "model.decoder.head_size is 32 but the graph's 'past_key_values.0.key' has 16"),
    ({"num_key_value_heads": 4}, "model.decoder.num_key_value_heads is 4 but"),
    ({"num_hidden_layers": 2}, "num_hidden_layers is 2 but the graph has past inputs for 1 layers"),
    ({"head_size": 0}, "model.decoder.head_size is 0, not a positive integer"),
    ({"head_size": "16"}, "model.decoder.head_size is '16', not a positive integer"),
])
def test_genai_config_that_disagrees_with_the_graph_is_refused(decoder: dict, words: str) -> None:
    with pytest.raises(ModelError, match="cfg/genai_config.json") as caught:
        _dims(_gqa_model(True), decoder)
    assert words in str(caught.value)


def test_empty_past_feeds_have_real_feature_dims() -> None:
    inputs = ModelInputs.from_model(_gqa_model(True), check_fillable=False)
    feeds = inputs.feeds(np.zeros((3, 5), dtype=np.int64), {"seqlens_k": np.zeros((3, 1), np.int32),
                                                           "total_sequence_length": np.array(5, np.int32)})
    assert feeds[PAST[0]].shape == feeds[PAST[1]].shape == (3, 2, 0, 16)


def test_past_sizes_that_cannot_be_derived_are_refused() -> None:
    with pytest.raises(CalibrationError) as caught:
        ModelInputs.from_model(opaque_past_model())
    message = str(caught.value)
    assert message.startswith("model input 'past_key_values.0.key'")
    assert "head size (genai_config.json model.decoder.head_size), which is missing" in message
