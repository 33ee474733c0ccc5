"""devtools.hessian_memo: a damping sweep calibrates once and solves exactly as without the memo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from devtools.hessian_memo import reuse_hessians
from onnx_gptq import calibrate
from onnx_gptq.config import CalibConfig, QuantConfig
from onnx_gptq.pipeline import quantize


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("tiny_llama_onnx", [False], indirect=True, ids=["torchscript"])
def test_rows_after_the_first_reuse_its_hessians(tiny_llama_onnx: Path, calib_ids: Path, tmp_path: Path) -> None:
    calib = CalibConfig(num_samples=8, seq_len=32, batch_size=4, sequential=False)  # the memo serves one pass
    plain = quantize(tiny_llama_onnx, str(calib_ids), QuantConfig(damp=0.1), calib=calib, output=tmp_path / "p.onnx")
    original = calibrate.collect_hessians
    with reuse_hessians() as memo:
        for damp in (0.01, 0.1):
            quantize(tiny_llama_onnx, str(calib_ids), QuantConfig(damp=damp), calib=calib,
                     output=tmp_path / f"m{damp}.onnx")
        assert len(memo) == 1  # the second row collected nothing
    assert calibrate.collect_hessians is original
    want, got, other = _weights(plain), _weights(tmp_path / "m0.1.onnx"), _weights(tmp_path / "m0.01.onnx")
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)
    assert any(not np.array_equal(want[k], other[k]) for k in want)  # damping changed the codes


@pytest.mark.parametrize("tiny_llama_onnx", [False], indirect=True, ids=["torchscript"])
def test_a_fixed_damp_row_reuses_the_held_out_calibration_of_an_auto_row(tiny_llama_onnx: Path, calib_ids: Path,
                                                                         tmp_path: Path) -> None:
    calib = CalibConfig(num_samples=8, seq_len=32, batch_size=1, sequential=False)
    plain = quantize(tiny_llama_onnx, str(calib_ids), QuantConfig(), calib=calib, output=tmp_path / "p.onnx")
    with reuse_hessians() as memo:
        quantize(tiny_llama_onnx, str(calib_ids), QuantConfig(damp="auto"), calib=calib, output=tmp_path / "a.onnx")
        quantize(tiny_llama_onnx, str(calib_ids), QuantConfig(), calib=calib, output=tmp_path / "f.onnx")
        assert len(memo) == 1 and next(iter(memo.values()))[0]  # one calibration, held-out sums kept
    want, got = _weights(plain), _weights(tmp_path / "f.onnx")
    assert all(np.array_equal(want[k], got[k]) for k in want)
