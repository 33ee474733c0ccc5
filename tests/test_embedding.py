"""The embedding stage: Gathers of constant tables as com.microsoft.GatherBlockQuantized, tied tables shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
from onnx import TensorProto, helper

from onnx_gptq import QuantConfig, contract, embedding, model_io, pack, quantize_with_report
from onnx_gptq.cli import main
from onnx_gptq.errors import ConfigError
from onnx_gptq.pipeline import GptqPass, run_pass
from onnx_gptq.solve import solve
from tests import tiny_models

V = 50
IDS = np.array([[0, 3, 49, 7, 3], [12, 1, 0, 30, 48]], dtype=np.int64)


def _table(h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((V, h)) * 0.05).astype(np.float32)


def _embedding_model(table: np.ndarray, *, tied: bool = False, builder_layout: bool = False) -> onnx.ModelProto:
    """input_ids -> Gather(table) -> emb; when `tied`, also x -> MatMul(x, table^T) -> logits.

    The table is one initializer: [V, H] with the head reading it through a Transpose (torch.onnx's
    layout), or with `builder_layout` the head's [H, V] weight, read by the Gather through a
    Transpose (onnxruntime-genai's builder).
    """
    h = table.shape[1]
    stored = np.ascontiguousarray(table.T if builder_layout else table)
    nodes = [helper.make_node("Transpose", ["stored"], ["transposed"], perm=[1, 0], name="tie"),
             helper.make_node("Gather", ["transposed" if builder_layout else "stored", "input_ids"], ["emb"],
                              name="embed_tokens")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])]
    outputs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", h])]
    if tied:
        nodes.append(helper.make_node("MatMul", ["x", "stored" if builder_layout else "transposed"], ["logits"],
                                      name="lm_head"))
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", h]))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", V]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(stored, "stored")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _quantize(model: onnx.ModelProto, config: QuantConfig) -> tuple[onnx.ModelProto, object]:
    loaded = ir.serde.deserialize_model(model)
    result = run_pass(GptqPass(config), loaded)
    return ir.serde.serialize_model(result.model), result.report


def _run(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _only_table(model: onnx.ModelProto) -> np.ndarray:
    (qw,) = embedding.read_embeddings(ir.serde.deserialize_model(model)).values()
    return qw.dequantize()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("h", [64, 40, 23])  # whole blocks; a ragged last block; odd (a padding nibble at 4 bits)
@pytest.mark.parametrize("sym", [False, True])  # zero points written / the op's default 2^(bits-1)
def test_gather_rows_equal_the_dequantized_table(bits: int, h: int, sym: bool) -> None:
    table = _table(h)
    config = QuantConfig(algo="rtn", group_size=16, sym=sym, embedding_bits=bits)
    quantized, report = _quantize(_embedding_model(table), config)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    assert not [i for i in quantized.graph.initializer if i.data_type == TensorProto.FLOAT and i.dims == [V, h]]
    gbq = next(n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized")
    assert (len(gbq.input) == 4) is not sym
    # The written codes are the round-to-nearest codes of the table, bit for bit.
    expected = solve(table, None, QuantConfig(algo="rtn", bits=bits, group_size=16, sym=sym, act_order=False)).qweight
    (read,) = embedding.read_embeddings(ir.serde.deserialize_model(quantized)).values()
    np.testing.assert_array_equal(read.codes, expected.codes)
    np.testing.assert_array_equal(read.scales, expected.scales)
    np.testing.assert_array_equal(read.zeros, expected.zeros)
    (emb,) = _run(quantized, input_ids=IDS)
    assert emb.shape == (*IDS.shape, h)
    np.testing.assert_array_equal(emb, expected.dequantize()[IDS])  # exact: (code - zero) * scale in fp32
    step = np.abs(table).max() / (2 ** (bits - 1) - 1)
    assert np.abs(emb - table[IDS]).max() <= step  # and close to the float rows
    assert report.embeddings[0]["shared"] is False and report.embeddings[0]["bits"] == bits


def test_other_constant_lookups_stay_float() -> None:
    """A table indexed by anything but input_ids (positions, rotary caches) is not the embedding."""
    model = _embedding_model(_table(32))
    model.graph.input[0].name = "position_ids"
    model.graph.node[1].input[1] = "position_ids"
    with pytest.raises(Exception, match="nothing to quantize"):
        _quantize(model, QuantConfig(algo="rtn", group_size=16, embedding_bits=4))


def test_vocabulary_is_read_through_the_quantized_gather() -> None:
    from onnx_gptq.calibrate.model_inputs import ModelInputs

    for tied in (False, True):
        config = QuantConfig(algo="rtn", group_size=16, head_bits=4 if tied else None, embedding_bits=4)
        quantized, _ = _quantize(_embedding_model(_table(32), tied=tied), config)
        assert ModelInputs.from_model(quantized, check_fillable=False).vocab_size == V


def test_pack_gather_round_trip_is_bit_exact() -> None:
    for h, bits in [(64, 4), (40, 8), (23, 4)]:
        qw = solve(_table(h), None, QuantConfig(algo="rtn", bits=bits, group_size=16, act_order=False)).qweight
        back = pack.unpack_gather(pack.pack_gather(qw), 16)
        for name in ("codes", "scales", "zeros"):
            np.testing.assert_array_equal(getattr(back, name), getattr(qw, name))


@pytest.mark.parametrize("h", [64, 40])  # 40: the head's B is padded to 48 columns, so a Slice follows
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("builder_layout", [False, True])
def test_tied_table_is_stored_once_and_both_consumers_are_exact(h: int, bits: int, builder_layout: bool) -> None:
    table = _table(h, seed=1)
    config = QuantConfig(algo="rtn", group_size=16, head_bits=bits, embedding_bits=bits, accuracy_level=0)
    quantized, report = _quantize(_embedding_model(table, tied=True, builder_layout=builder_layout), config)
    nodes = {n.op_type: n for n in quantized.graph.node}
    head, gather = nodes["MatMulNBits"], nodes["GatherBlockQuantized"]
    uint8 = [i for i in quantized.graph.initializer if i.data_type == TensorProto.UINT8]
    assert [i.name for i in uint8 if len(i.dims) == 3] == [head.input[1]]  # one code tensor, the head's B
    producers = {o: n for n in quantized.graph.node for o in n.output}
    assert producers[gather.input[0]].op_type == "Reshape" and producers[gather.input[0]].input[0] == head.input[1]
    assert ("Slice" in nodes) is (h % 16 != 0)
    assert not [i for i in quantized.graph.initializer if i.data_type == TensorProto.FLOAT and V * h in
                (int(np.prod(i.dims)),)]  # the float table is gone
    assert report.embeddings[0]["shared"] is True
    from onnx_gptq.rewrite import read_packed

    (qw,) = read_packed(ir.serde.deserialize_model(quantized)).values()  # the head's codes: [V, H]
    np.testing.assert_array_equal(_only_table(quantized), qw.dequantize())
    x = np.random.default_rng(2).standard_normal((3, h)).astype(np.float32)
    emb, logits = _run(quantized, input_ids=IDS, x=x)
    np.testing.assert_array_equal(emb, qw.dequantize()[IDS])
    np.testing.assert_allclose(logits, x @ qw.dequantize().T, rtol=1e-5, atol=1e-5)


def test_tied_table_with_other_grids_is_stored_twice() -> None:
    table = _table(64)
    for config, why in [(QuantConfig(algo="rtn", group_size=16, head_bits=8, embedding_bits=4), "head 8-bit"),
                        (QuantConfig(algo="rtn", group_size=16, head_bits=4, embedding_bits=4,
                                     shared_embedding=False), "shared_embedding off"),
                        (QuantConfig(algo="rtn", group_size=16, head_bits=3, embedding_bits=4), "custom")]:
        quantized, report = _quantize(_embedding_model(table, tied=True), config)
        row = report.embeddings[0]
        assert row["shared"] is False and why in row["storage"]
        expected = solve(table, None, QuantConfig(algo="rtn", bits=4, group_size=16, act_order=False)).qweight
        if "custom" not in why:  # a 3-bit head is a GptqMatMul: plain onnxruntime cannot run it
            emb, _ = _run(quantized, input_ids=IDS, x=np.zeros((1, 64), np.float32))
            np.testing.assert_array_equal(emb, expected.dequantize()[IDS])


def test_impossible_embedding_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="group_size: the embedding cannot be written with group size 48"):
        QuantConfig(group_size=48, embedding_bits=4)
    with pytest.raises(ConfigError, match="embedding_bits: 3"):
        QuantConfig(embedding_bits=3)
    with pytest.raises(ConfigError, match="head_bits: 5"):
        QuantConfig(head_bits=5)
    with pytest.raises(ConfigError, match="head_bits: bits: 3-bit weights cannot be written as"):
        QuantConfig(format="ort", head_bits=3)
    QuantConfig(group_size=48)  # a float embedding takes any group size


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Tied and untied tiny Llamas (dynamo export)."""
    out = {}
    for tie in (True, False):
        directory = tmp_path_factory.mktemp(f"llama_tie{tie}")
        out[tie] = tiny_models.export(tiny_models.build_llama(seed=3, tie=tie), directory / "model.onnx", dynamo=True)
    return out


def _logits(path: Path) -> np.ndarray:
    ids = np.random.default_rng(4).integers(0, tiny_models.VOCAB, (1, 24))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


@pytest.mark.parametrize("tie", [True, False])
def test_cli_end_to_end_tied_and_untied(tiny_llamas: dict[bool, Path], calib_ids: Path, tmp_path: Path,
                                        tie: bool) -> None:
    source = tiny_llamas[tie]
    common = [str(source), "--calib", str(calib_ids), "--num-samples", "8", "--seq-len", "32", "--group-size", "32",
              "-q"]
    paths = {}
    for name, extra in [("float", ["--head", "float", "--embedding", "float"]),
                        ("head", ["--head", "4", "--embedding", "float"]),
                        ("both", ["--head", "4", "--embedding", "4", "--report", str(tmp_path / "r.json")])]:
        paths[name] = tmp_path / f"{name}.onnx"
        assert main([*common, *extra, "-o", str(paths[name])]) == 0
    model = onnx.load(paths["both"])
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in [n.op_type for n in model.graph.node
                                                                     if n.input and "embed" in n.input[0]]
    rows = __import__("json").loads((tmp_path / "r.json").read_text())["embeddings"]
    assert [r["shared"] for r in rows] == [tie]
    # Tensor bytes are exact; a file also holds nodes and value infos that the rewrite adds or drops
    # (a few KB here), so its size is only checked against the tensors loosely.
    tensors = {k: _tensor_bytes(p) for k, p in paths.items()}
    files = {k: model_io.files_size(p) for k, p in paths.items()}
    table_fp32 = tiny_models.VOCAB * tiny_models.HIDDEN * 4
    table_q4 = tiny_models.VOCAB * (tiny_models.HIDDEN // 2 + tiny_models.HIDDEN // 32 * 4 + 1)  # codes, scales, zps
    head_q4 = table_q4
    if tie:  # the float table stays for the Gather until the embedding is quantized; then no copy at all
        want = {"head": -head_q4, "both": table_fp32}
    else:  # the untied head and table are each replaced by 4-bit codes
        want = {"head": table_fp32 - head_q4, "both": table_fp32 - table_q4}
    shape_consts = 3 * 2 * 8  # the shared table's reshape targets (int64 pairs) in "both"
    before = {"head": "float", "both": "head"}
    for name, saved in want.items():
        extra = shape_consts if (name == "both" and tie) else 0
        assert tensors[before[name]] - tensors[name] == saved - extra, name
        assert abs(files[before[name]] - files[name] - saved) < 4096, (name, files)
    float_logits = _logits(source)
    for name in ("head", "both"):
        err = np.abs(_logits(paths[name]) - float_logits).mean() / np.abs(float_logits).mean()
        assert err < 0.15, (name, err)


def _tensor_bytes(path: Path) -> int:
    """Bytes of every initializer `path` holds (raw data, inline or external)."""
    model = onnx.load(path)
    return sum(onnx.numpy_helper.to_array(t, base_dir=str(path.parent)).nbytes for t in model.graph.initializer)


def test_written_file_reads_back_the_shared_codes(tiny_llamas: dict[bool, Path], tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    _, report = quantize_with_report(tiny_llamas[True], None, QuantConfig(algo="rtn", group_size=32, head_bits=8,
                                                                          embedding_bits=8), output=out)
    assert report.embeddings[0]["shared"] and report.verified_tensors
    written = ir.load(out)
    from onnx_gptq.rewrite import read_packed

    heads = [qw for qw in read_packed(written).values() if qw.shape[0] == tiny_models.VOCAB]
    (table,) = embedding.read_embeddings(written).values()
    np.testing.assert_array_equal(table.codes, heads[0].codes)
    np.testing.assert_array_equal(table.scales, heads[0].scales)
    assert contract.GATHER_OP_TYPE in {n.op_type for n in written.graph}


@pytest.mark.slow
def test_smollm2_builder_folder_with_shared_4bit_embedding_is_under_the_builders_int4(tmp_path: Path) -> None:
    """The builder's fp32 folder, head and embedding 4-bit shared: smaller than the builder's own
    int4 (86 MB) and still generating in onnxruntime-genai."""
    import onnxruntime_genai as og

    from devtools import llm_folders

    out = tmp_path / "q4"
    assert main([str(llm_folders.builder_folder("fp32")), "-o", str(out), "--algo", "rtn", "--head", "4",
                 "--embedding", "4", "-q"]) == 0
    assert sum(p.stat().st_size for p in out.iterdir()) < 86e6
    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode("The capital of France is"))
    while not generator.is_done():
        generator.generate_next_token()
    assert "Paris" in tokenizer.decode(generator.get_sequence(0))
