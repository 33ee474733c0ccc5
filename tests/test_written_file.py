"""What is written to disk is exactly what the solver chose (issue 9).

Each test quantizes a tiny hand-built model (embedding -> MatMul -> Relu ->
MatMul head) to a file, through the CLI or the path API, reads the file back
from disk, unpacks every weight and compares it bit for bit with the solver's
QuantizedWeight (captured as it is handed to the rewrite); onnxruntime's output
on the file must equal a numpy ``x @ dequant(W)`` reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from onnx_gptq import cli, embedding, grid, model_io, rewrite
from onnx_gptq.config import CalibConfig, QuantConfig
from onnx_gptq.errors import ModelError, NonFiniteError
from onnx_gptq.pipeline import quantize
from onnx_gptq.qweight import QuantizedWeight
from onnx_gptq.runtime import custom_ops
from onnx_gptq.solve import solve

VOCAB, HIDDEN, INNER, OUT = 50, 64, 48, 40
GROUP = 32
# (format, bits) pairs each format can write.
FORMAT_BITS = [("ort", 2), ("ort", 4), ("ort", 8), ("custom", 2), ("custom", 3), ("custom", 4), ("custom", 8),
               ("qdq", 4), ("qdq", 8), ("auto", 2), ("auto", 3), ("auto", 4), ("auto", 8)]
IDS = np.random.default_rng(1).integers(0, VOCAB, size=(1, 7), dtype=np.int64)


def tiny_model(path: Path, dtype: np.dtype, opset: int = 17) -> dict[str, np.ndarray]:
    """Write the test model to `path`; returns its weights (E [V, K], W1 [K, I], W2 [I, N])."""
    rng = np.random.default_rng(0)
    weights = {"E": rng.normal(0, 1, (VOCAB, HIDDEN)), "W1": rng.normal(0, 0.1, (HIDDEN, INNER)),
               "W2": rng.normal(0, 0.1, (INNER, OUT))}
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["x"]),
         helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["logits"], name="head")],
        "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", elem, ["batch", "seq", OUT])],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return weights


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, QuantizedWeight]:
    """The solver's QuantizedWeight of each weight, as handed to the rewrite."""
    seen: dict[str, QuantizedWeight] = {}
    original = rewrite.rewrite_group

    def recording(model, group, qw, fmt, **kwargs):
        seen[group.name] = qw
        return original(model, group, qw, fmt, **kwargs)

    monkeypatch.setattr(rewrite, "rewrite_group", recording)
    return seen


def read_back(path: Path) -> dict[str, QuantizedWeight]:
    """Every packed weight of the file at `path`, read from disk and unpacked."""
    model = ir.load(path)
    return {**rewrite.read_packed(model), **rewrite.read_qdq(model)}


def assert_same(written: QuantizedWeight, solved: QuantizedWeight) -> None:
    np.testing.assert_array_equal(written.codes, solved.codes)
    np.testing.assert_array_equal(written.zeros, solved.zeros)
    np.testing.assert_array_equal(written.scales.astype(np.float32), solved.scales.astype(np.float32))
    assert (written.g_idx is None) == (solved.g_idx is None)
    if solved.g_idx is not None:
        np.testing.assert_array_equal(written.g_idx, solved.g_idx)


def numpy_reference(weights: dict[str, np.ndarray], solved: dict[str, QuantizedWeight],
                    written: Path | None = None) -> np.ndarray:
    """logits of `IDS` with dequantized weights, in float64; the embedding table is the one the file at
    `written` holds (GatherBlockQuantized codes read back and dequantized), else E as it was."""
    tables = {} if written is None else embedding.read_embeddings(ir.load(written))
    assert len(tables) <= 1, tables
    table = next(iter(tables.values())).dequantize() if tables else weights["E"]
    x = table.astype(np.float64)[IDS]
    h = np.maximum(x @ solved["W1"].dequantize().T.astype(np.float64), 0)
    return h @ solved["W2"].dequantize().T.astype(np.float64)


def run_file(path: Path) -> np.ndarray:
    options = custom_ops.session_options()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # exact math, no int8
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": IDS})[0].astype(np.float64)


def _run_entry(entry: str, source: Path, output: Path, calib: Path, fmt: str, bits: int, extra: list[str]) -> None:
    if entry == "cli":
        argv = [str(source), "-o", str(output), "--calib", str(calib), "--num-samples", "4", "--seq-len", "8",
                "--format", fmt, "--bits", str(bits), "--group-size", str(GROUP), "--quantize-head", "-q",
                "--accuracy-level", "0", *extra]  # fp32 math: outputs compared with the reference
        assert cli.main(argv) == 0
    else:
        config = QuantConfig(bits=bits, group_size=GROUP, format=fmt, quantize_head=True, accuracy_level=0,
                             static_groups="--dynamic-groups" not in extra)
        quantize(source, str(calib), config, calib=CalibConfig(num_samples=4, seq_len=8), output=output)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "ids.npy"
    np.save(path, np.random.default_rng(2).integers(0, VOCAB, size=(4, 8), dtype=np.int64))
    return path


@pytest.mark.parametrize("entry", ["cli", "api"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("fmt", "bits"), FORMAT_BITS, ids=[f"{f}-{b}bit" for f, b in FORMAT_BITS])
def test_written_file_holds_the_solvers_weights(tmp_path, calib_file, captured, entry, dtype, fmt, bits):
    source, output = tmp_path / "model.onnx", tmp_path / "q.onnx"
    weights = tiny_model(source, dtype)
    _run_entry(entry, source, output, calib_file, fmt, bits, [])
    written = read_back(output)
    assert sorted(written) == sorted(captured) == ["W1", "W2"]
    for name, solved in captured.items():
        assert_same(written[name], solved)
    reference = numpy_reference(weights, captured, output)
    tolerance = 1e-2 if dtype is np.float16 else 1e-4  # fp16 models compute in fp16
    np.testing.assert_allclose(run_file(output), reference, rtol=0, atol=tolerance * np.abs(reference).max())


@pytest.mark.parametrize("entry", ["cli", "api"])
def test_act_order_g_idx_is_written_as_solved(tmp_path, calib_file, captured, entry):
    source, output = tmp_path / "model.onnx", tmp_path / "q.onnx"
    weights = tiny_model(source, np.float16)
    _run_entry(entry, source, output, calib_file, "custom", 4, ["--dynamic-groups"])
    written = read_back(output)
    assert captured["W1"].g_idx is not None and captured["W1"].g_idx.dtype == np.int32
    for name, solved in captured.items():
        assert_same(written[name], solved)
    reference = numpy_reference(weights, captured, output)
    np.testing.assert_allclose(run_file(output), reference, rtol=0, atol=1e-2 * np.abs(reference).max())


@pytest.mark.parametrize(("fmt", "bits"), [("qdq", 4), ("qdq", 8), ("ort", 4), ("custom", 3)])
@pytest.mark.parametrize(("sym", "group_size"), [(True, GROUP), (False, -1), (True, -1)],
                         ids=["sym-g32", "asym-per-channel", "sym-per-channel"])
def test_symmetric_and_per_channel_weights_are_written_as_solved(tmp_path, calib_file, captured, fmt, bits,
                                                                  sym, group_size):
    source, output = tmp_path / "model.onnx", tmp_path / "q.onnx"
    weights = tiny_model(source, np.float16)
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym, format=fmt, quantize_head=True, accuracy_level=0)
    quantize(source, str(calib_file), config, calib=CalibConfig(num_samples=4, seq_len=8), output=output)
    written = read_back(output)
    assert sorted(written) == ["W1", "W2"]
    for name, solved in captured.items():
        assert_same(written[name], solved)
    reference = numpy_reference(weights, captured, output)
    np.testing.assert_allclose(run_file(output), reference, rtol=0, atol=1e-2 * np.abs(reference).max())


def test_packed_weight_file_serializes_sub_byte_and_16_bit_types(tmp_path):
    """int4/uint4 go to disk two per byte (as TensorProto holds them); bf16/fp16 as their bits."""
    store = model_io.PackedWeightFile(tmp_path)
    arrays = {"u4": np.arange(15, dtype=np.uint8).reshape(5, 3).astype(ml_dtypes.uint4),
              "i4": (np.arange(15).reshape(3, 5) % 16 - 8).astype(ml_dtypes.int4),
              "bf16": np.linspace(-3, 3, 6).astype(ml_dtypes.bfloat16),
              "g_idx": np.array([2, 0, 1], np.int32)}
    tensors = {name: store(array, name) for name, array in arrays.items()}
    store.close()
    assert tensors["u4"].nbytes == 8 and tensors["i4"].nbytes == 8
    raw = (tmp_path / store.location).read_bytes()
    assert raw[tensors["u4"].offset:tensors["u4"].offset + 2] == bytes([0x10, 0x32])  # low nibble first
    for name, array in arrays.items():
        assert tensors[name].dtype == ir.DataType.from_numpy(array.dtype)
        np.testing.assert_array_equal(tensors[name].numpy(), array)


def test_verify_catches_a_written_tensor_that_differs(tmp_path):
    store = model_io.PackedWeightFile(tmp_path)
    codes = np.arange(8, dtype=np.uint8).reshape(2, 4).astype(ml_dtypes.uint4)
    store(codes, "codes")
    store.close()
    wrong = codes.astype(np.uint8)
    wrong[0, 1] = 0
    graph = helper.make_graph([], "g", [], [], [onnx.numpy_helper.from_array(np.array([1.0], np.float32), "x")])
    graph.initializer.append(ir.serde.serialize_tensor(ir.Tensor(wrong.astype(ml_dtypes.uint4), name="codes")))
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(model_io.WrittenFileMismatch, match="'codes' differs"):
        store.verify(tmp_path / "m.onnx")


# --------------------------------------------------------------------------- scales


def _denormal_row_weight() -> np.ndarray:
    """W [N, K] with one group of one output row at 1e-44 (denormal in float32)."""
    W = np.random.default_rng(3).normal(0, 0.05, (8, 64)).astype(np.float32)
    W[5, :32] = np.float32(1e-44)  # the first group: its grid comes from these very weights
    return W


@pytest.mark.parametrize("act_order", [False, True], ids=["no-act-order", "act-order"])
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_denormal_group_gets_a_finite_normal_scale(act_order, scale_dtype):
    W = _denormal_row_weight()
    X = np.random.default_rng(4).normal(0, 1, (256, 64))
    H = 2 * X.T @ X / len(X)
    config = QuantConfig(bits=4, group_size=GROUP, act_order=act_order, accuracy_level=0)
    qw = solve(W, H, config, scale_dtype=scale_dtype, device="cpu").qweight
    scales = qw.scales.astype(np.float32)
    assert np.isfinite(scales).all()
    assert (np.abs(scales) >= grid.smallest_scale(torch.float16 if scale_dtype is np.float16 else torch.float32)).all()
    err = np.abs(qw.dequantize() - W).max(axis=1)  # [N]
    assert np.isfinite(err).all()
    assert err[5] <= 1.5 * np.delete(err, 5).max()  # the row is as good as the others


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_all_tiny_range_scale_reproduces_zero(scale_dtype):
    """A group whose range underflows gets the dtype's smallest usable scale and codes giving ~0."""
    x = torch.full((1, 32), 1e-44)
    torch_dtype = {np.float32: torch.float32, np.float16: torch.float16}.get(scale_dtype, torch.bfloat16)
    for sym in (False, True):
        scale, zero = grid.find_params(x, 4, sym, scale_dtype=torch_dtype)
        assert float(scale.abs()) == grid.smallest_scale(torch_dtype) > 0
        assert float(scale.abs()) >= torch.finfo(torch.float32).tiny  # normal once upcast to float32
        codes = grid.quantize(x, scale[..., None], zero[..., None], 15)
        q = grid.dequantize(codes, scale[..., None], zero[..., None])
        assert torch.isfinite(q).all() and float(q.abs().max()) == 0.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_huge_range_rtn_scale_and_dequantized_weights_are_finite(bits):
    W = np.random.default_rng(5).uniform(-3e38, 3e38, (4, 64)).astype(np.float32)
    W[:, 0], W[:, 1] = 3e38, -3e38
    qw = solve(W, None, QuantConfig(bits=bits, group_size=GROUP, algo="rtn"), device="cpu").qweight
    assert np.isfinite(qw.scales).all()
    deq = qw.dequantize()
    assert np.isfinite(deq).all()
    # round to nearest except where the extremes had to be clipped to stay finite
    assert np.median(np.abs(deq - W)) <= 0.51 * np.abs(qw.scales).max()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_huge_fp16_weights_keep_fp16_scales_and_weights_finite(bits):
    W = np.full((2, 32), 65504, np.float32)
    W[:, ::2] = -65504
    qw = solve(W, None, QuantConfig(bits=bits, group_size=GROUP, algo="rtn"), scale_dtype=np.float16,
               device="cpu").qweight
    assert qw.scales.dtype == np.float16 and np.isfinite(qw.scales).all()
    assert np.abs(qw.dequantize()).max() <= 65504  # fp16 kernels compute (code - zero) * scale in fp16


def test_denormal_weights_through_the_cli_write_finite_logits(tmp_path, calib_file):
    """The issue's run: a denormal group, --no-act-order, exit 0 and finite output."""
    source, output = tmp_path / "model.onnx", tmp_path / "q.onnx"
    tiny_model(source, np.float32)
    model = onnx.load(source)
    w1 = onnx.numpy_helper.to_array(model.graph.initializer[1]).copy()
    w1[:GROUP, 3] = np.float32(1e-44)  # [K, N]: 32 weights of output row 3, one group
    model.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(w1, "W1"))
    onnx.save(model, source)
    argv = [str(source), "-o", str(output), "--calib", str(calib_file), "--num-samples", "4", "--seq-len", "8",
            "--group-size", str(GROUP), "--no-act-order", "--format", "custom", "-q"]
    assert cli.main(argv) == 0
    assert np.isfinite(run_file(output)).all()


def test_nan_in_a_written_tensor_is_refused_naming_it(tmp_path, calib_file, capsys, monkeypatch):
    source, output = tmp_path / "model.onnx", tmp_path / "q.onnx"
    tiny_model(source, np.float32)
    before = source.read_bytes()
    real = rewrite.rewrite_group

    def nan_scales(model, group, qw, fmt, **kwargs):
        scales = qw.scales.copy()
        scales[0, 0] = np.nan  # what a broken grid would produce
        return real(model, group, QuantizedWeight(qw.codes, scales, qw.zeros, qw.bits, qw.group_size,
                                                  qw.g_idx, qw.sym), fmt, **kwargs)

    monkeypatch.setattr(rewrite, "rewrite_group", nan_scales)
    argv = [str(source), "-o", str(output), "--calib", str(calib_file), "--num-samples", "4", "--seq-len", "8",
            "--group-size", str(GROUP), "--format", "custom", "-q"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "'W1_scales'" in err and "NaN" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert source.read_bytes() == before


def test_nan_float_weight_left_unquantized_is_refused(tmp_path, calib_file):
    source = tmp_path / "model.onnx"
    tiny_model(source, np.float32)
    model = onnx.load(source)
    e = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    e[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(e, "E"))
    onnx.save(model, source)
    with pytest.raises(NonFiniteError, match="'E' holds NaN"):
        quantize(source, None, QuantConfig(group_size=GROUP, algo="rtn", embedding_bits=None), output=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(ModelError, match="^E: weight contains NaN or Inf"):  # the default quantizes the table
        quantize(source, None, QuantConfig(group_size=GROUP, algo="rtn"), output=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_a_staged_tensor_corrupted_on_disk_fails_the_run_and_writes_nothing(tmp_path, calib_file, capsys,
                                                                            monkeypatch):
    """The run reads its output back: bytes that differ from the solver's packing are an internal error."""
    source, output = tmp_path / "model.onnx", tmp_path / "q.onnx"
    tiny_model(source, np.float32)
    stage = model_io.PackedWeightFile.__call__

    def corrupting(self, array, name):
        tensor = stage(self, array, name)
        if name.endswith("_B"):
            with open(self.directory / self.location, "r+b") as f:  # what a broken writer would leave
                f.seek(tensor.offset)
                f.write(bytes([f.read(1)[0] ^ 0x10]))
        return tensor

    monkeypatch.setattr(model_io.PackedWeightFile, "__call__", corrupting)
    argv = [str(source), "-o", str(output), "--calib", str(calib_file), "--num-samples", "4", "--seq-len", "8",
            "--group-size", str(GROUP), "--format", "ort", "-q"]
    assert cli.main(argv) == 1
    assert "differs from what the solver produced" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_summary_says_the_written_file_was_read_back(tmp_path, calib_file, capsys):
    source, output = tmp_path / "model.onnx", tmp_path / "q.onnx"
    tiny_model(source, np.float32)
    argv = [str(source), "-o", str(output), "--calib", str(calib_file), "--num-samples", "4", "--seq-len", "8",
            "--group-size", str(GROUP), "--format", "ort", "--quantize-head", "--report", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    # W1, W2 and the embedding table E (GatherBlockQuantized by default), each as codes, scales and zero points
    assert "written file read back: 9 packed tensors bit-identical" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["verified_tensors"] == 9
