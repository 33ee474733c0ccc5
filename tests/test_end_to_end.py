"""The core pass with our custom op: real exports quantized, run in onnxruntime with the library.

- 3-bit (which MatMulNBits cannot hold) in `custom` format equals the float
  model carrying the dequantized weights;
- the same 4-bit weights written as `custom` and as `ort` give the same outputs;
- `auto` picks MatMulNBits where it can and our op where it cannot.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnx_gptq.runtime import custom_ops
from onnx_gptq.config import CalibConfig, QuantConfig
from onnx_gptq.pipeline import quantize, quantize_with_report
from onnx_gptq.rewrite import read_packed
from tests.test_rewrite import FEEDS, dequantized_reference, run

CALIB = CalibConfig(num_samples=8, seq_len=32, batch_size=4)


def run_with_library(model: ir.Model) -> np.ndarray:
    ir.external_data.load_to_model(model)
    session = custom_ops.make_session(ir.serde.serialize_model(model), providers=["CPUExecutionProvider"])
    return session.run(None, FEEDS)[0]


@pytest.mark.parametrize("act_order,static", [(False, True), (True, True), (True, False)])
def test_three_bit_custom_equals_dequantized_reference(tiny_lm_onnx, calib_ids, tmp_path, act_order, static):
    which, path = tiny_lm_onnx
    config = QuantConfig(bits=3, group_size=32, act_order=act_order, static_groups=static, format="custom",
                         accuracy_level=0)  # fp32 math: compared with the dequantized reference
    out = quantize(path, calib_ids, config, calib=CALIB, output=tmp_path / "q3.onnx")
    model = ir.load(out)
    weights = read_packed(model)
    assert len(weights) == (15 if which == "llama" else 9)  # with the head
    assert all((w.g_idx is not None) == (act_order and not static) for w in weights.values())
    got = run_with_library(model)
    want = run(dequantized_reference(path, config, weights, model), FEEDS)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_four_bit_custom_and_ort_give_the_same_outputs(tiny_lm_onnx, calib_ids, tmp_path):
    _, path = tiny_lm_onnx
    outputs, weights = {}, {}
    # One pass: both formats then solve on the float model's Hessians, so they hold the same weights
    # (sequential stages would see each format's own kernels upstream and may round a code differently).
    one_pass = CalibConfig(num_samples=8, seq_len=32, batch_size=4, sequential=False)
    for fmt in ("custom", "ort"):
        out = quantize(path, calib_ids, QuantConfig(bits=4, group_size=32, format=fmt, shared_embedding=False),
                       calib=one_pass, output=tmp_path / f"{fmt}.onnx")
        model = ir.load(out)
        weights[fmt] = read_packed(model)
        outputs[fmt] = run_with_library(model)
    assert sorted(weights["custom"]) == sorted(weights["ort"])
    for name, qw in weights["custom"].items():
        np.testing.assert_array_equal(qw.codes, weights["ort"][name].codes)
    np.testing.assert_allclose(outputs["custom"], outputs["ort"], rtol=1e-4, atol=1e-4)


def test_auto_mixes_formats_and_says_why(tiny_llama_onnx, calib_ids, tmp_path):
    # Group 48 is no power of two, so MatMulNBits can hold no layer; 3 bits neither; 4-bit g32 all.
    config = QuantConfig(bits=4, group_size=48, embedding_bits=None)  # no GatherBlockQuantized block either
    out, report = quantize_with_report(tiny_llama_onnx, calib_ids, config, calib=CALIB,
                                       output=tmp_path / "auto.onnx")
    formats = {row.format for row in report.layers}
    assert formats == {"custom"}
    assert all("group size 48" in note for note in report.format_notes)
    # The body at 3 bits: custom; the head at --head's default 4 bits, per channel: MatMulNBits.
    out, report = quantize_with_report(tiny_llama_onnx, calib_ids, QuantConfig(bits=3, group_size=-1),
                                       calib=CALIB, output=tmp_path / "auto3.onnx")
    assert [row.format for row in report.layers] == ["custom"] * 14 + ["ort"]
    assert report.layers[-1].module.endswith("lm_head") and report.layers[-1].bits == 4
    # 2 bits fit MatMulNBits, but its CPU kernel for them is a slow fallback: auto takes ours.
    out, report = quantize_with_report(tiny_llama_onnx, calib_ids, QuantConfig(bits=2, group_size=32,
                                                                               quantize_head=True),
                                       calib=CALIB, output=tmp_path / "auto2.onnx")
    assert {row.format for row in report.layers} == {"custom"}  # the head too, at --bits (--quantize-head)
    assert all("2-bit CPU kernel is a slow fallback" in note for note in report.format_notes)
    out, report = quantize_with_report(tiny_llama_onnx, calib_ids, QuantConfig(bits=4, group_size=32),
                                       calib=CALIB, output=tmp_path / "auto4.onnx")
    assert {row.format for row in report.layers} == {"ort"}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # stock onnxruntime
    assert session.run(None, FEEDS)[0].shape == (2, 12, 256)
