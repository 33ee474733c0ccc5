"""The whole pass on real torch exports: API kinds, numbers against the dequantized reference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_gptq.config import CalibConfig, QuantConfig
from onnx_gptq.calibrate.statistics import plan_passes
from onnx_gptq.pipeline import activation_widths, quantize, quantize_with_report
from onnx_gptq.rewrite import read_packed
from onnx_gptq import targets
from tests.test_rewrite import FEEDS, dequantized_reference, run

CALIB = CalibConfig(num_samples=8, seq_len=32, batch_size=4)


def test_ort_output_equals_float_model_with_dequantized_weights(tiny_lm_onnx, calib_ids, tmp_path):
    which, path = tiny_lm_onnx
    # fp32 math (accuracy_level 0): the output must equal the dequantized reference.
    config = QuantConfig(bits=4, group_size=32, format="ort", accuracy_level=0)
    out, report = quantize_with_report(path, calib_ids, config, calib=CALIB, output=tmp_path / "q.onnx")
    assert out == tmp_path / "q.onnx"
    quantized = ir.load(out)
    qweights = read_packed(quantized)
    assert len(qweights) == len(report.layers) == (15 if which == "llama" else 9)  # with the head
    got = run(quantized, FEEDS)
    want = run(dequantized_reference(path, config, qweights, quantized), FEEDS)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # GPTQ beats round-to-nearest in the H-weighted error, layer by layer.
    assert all(r.error <= r.rtn_error * 1.0001 for r in report.layers)
    assert np.mean([r.error for r in report.layers]) < 0.9 * np.mean([r.rtn_error for r in report.layers])
    assert report.size_after < report.size_before


def test_api_returns_the_kind_it_was_given(tiny_llama_onnx, calib_ids):
    proto = onnx.load(tiny_llama_onnx)
    config = QuantConfig(bits=8, group_size=-1)
    result = quantize(proto, calib_ids, config, calib=CALIB)
    assert isinstance(result, onnx.ModelProto)
    assert sum(n.op_type == "MatMulNBits" for n in result.graph.node) == 15  # with the head
    assert sum(n.op_type == "MatMul" for n in proto.graph.node) == 19  # the caller's proto is untouched
    model = ir.load(tiny_llama_onnx)
    assert quantize(model, calib_ids, config, calib=CALIB) is model
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) == 15


def test_passes_and_jobs_do_not_change_the_result(tiny_llama_onnx, calib_ids, tmp_path):
    model = ir.load(tiny_llama_onnx)
    groups, _ = targets.find_targets(model, QuantConfig())
    assert len(plan_passes(groups, activation_widths, budget=12 * 64 * 64 + 1)) > 3  # about one activation a pass
    assert len(plan_passes(groups, activation_widths, budget=1 << 40)) == 1
    config = QuantConfig(bits=4, group_size=32)
    one_pass = CalibConfig(num_samples=8, seq_len=32, batch_size=4, sequential=False)  # passes are one-pass's
    one = quantize(tiny_llama_onnx, calib_ids, config, calib=one_pass, output=tmp_path / "one.onnx")
    many = quantize(tiny_llama_onnx, calib_ids, config, output=tmp_path / "many.onnx", jobs=2,
                    calib=dataclasses.replace(one_pass, memory_budget=12 * 64 * 64 + 1))
    a, b = ir.load(one), ir.load(many)
    for name, value in a.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), b.graph.initializers[name].const_value.numpy())


def test_report_json_has_every_layer(tiny_gpt2_onnx, calib_ids, tmp_path):
    report_path = tmp_path / "report.json"
    quantize(tiny_gpt2_onnx, calib_ids, QuantConfig(bits=3, group_size=16, format="custom"), calib=CALIB,
             output=tmp_path / "q.onnx", report=report_path)
    data = json.loads(report_path.read_text())
    assert len(data["layers"]) == 9  # with the head
    row = data["layers"][0]
    assert row["bits"] == 3 and row["group_size"] == 16 and row["format"] == "custom"
    assert 0 < row["error"] < row["rtn_error"] and row["damp"] == pytest.approx(0.01)
    assert row["calibration_rows"] == 8 * 32
    assert data["layers"][-1]["module"].endswith("lm_head") and data["layers"][-1]["bits"] == 4  # --head's default
    assert not [s for s in data["skipped"] if "output head" in s["reason"]]
    assert {"calibrate", "solve", "save"} <= set(data["phases"])


def test_large_outputs_get_external_data(tiny_llama_onnx, calib_ids, tmp_path, monkeypatch):
    """Above the protobuf-safe size the output gets <name>.data beside it, and it loads and runs."""
    from onnx_gptq import model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1024)  # stand-in for 2 GB
    out = quantize(tiny_llama_onnx, calib_ids, QuantConfig(bits=4, group_size=32), calib=CALIB,
                   output=tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    monkeypatch.undo()
    small = quantize(tiny_llama_onnx, calib_ids, QuantConfig(bits=4, group_size=32), calib=CALIB,
                     output=tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    np.testing.assert_array_equal(run(ir.load(out), FEEDS), run(ir.load(small), FEEDS))


def test_packed_weight_file_reads_back_every_array(tmp_path):
    from onnx_gptq import model_io

    store = model_io.PackedWeightFile(tmp_path)
    arrays = [np.arange(7, dtype=np.uint8), np.linspace(-1, 1, 12, dtype=np.float16).reshape(3, 4),
              np.arange(10, dtype=np.float32).reshape(5, 2), np.array([3], np.int32)]
    tensors = [store(a, f"t{i}") for i, a in enumerate(arrays)]
    store.close()
    for array, tensor in zip(arrays, tensors):
        assert isinstance(tensor, ir.ExternalTensor) and tensor.offset % store.ALIGN == 0
        assert tensor.dtype == ir.DataType.from_numpy(array.dtype) and tuple(tensor.shape.numpy()) == array.shape
        np.testing.assert_array_equal(tensor.numpy(), array)
    assert (tmp_path / store.location).stat().st_size == tensors[-1].offset + 4


@pytest.mark.parametrize("sequential", [False, True], ids=["one-pass", "sequential"])
def test_packed_weights_are_on_disk_until_saved(tiny_llama_onnx, calib_ids, tmp_path, monkeypatch, sequential):
    """A path-to-path run writes each packed tensor to the staging file as it is produced
    (nothing packed is held in memory), and the result equals the all-in-memory run."""
    from onnx_gptq import model_io

    calib = CalibConfig(num_samples=8, seq_len=32, batch_size=4, sequential=sequential)
    config = QuantConfig(bits=4, group_size=32)
    seen = {}
    save = model_io.save_atomic

    def checking_save(model, path, staging=None, **options):
        packed = [v for n in model.graph if n.op_type == "MatMulNBits" for v in n.inputs[1:] if v is not None]
        seen["packed"] = len(packed)
        seen["on_disk"] = sum(isinstance(v.const_value, ir.ExternalTensor)
                              and Path(v.const_value.base_dir) == staging for v in packed)
        return save(model, path, staging, **options)

    monkeypatch.setattr(model_io, "save_atomic", checking_save)
    out = quantize(tiny_llama_onnx, calib_ids, config, calib=calib, output=tmp_path / "q.onnx")
    assert seen["packed"] == 15 * 3 and seen["on_disk"] == seen["packed"]  # B, scales, zero points; 14 + head
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # staging directory removed
    in_memory = quantize(ir.load(tiny_llama_onnx), calib_ids, config, calib=calib)
    saved = ir.load(out)
    for name, value in in_memory.graph.initializers.items():
        np.testing.assert_array_equal(saved.graph.initializers[name].const_value.numpy(),
                                      value.const_value.numpy())
