"""damp "auto": per-layer damping chosen by held-out error (onnx_gptq.damp_search)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_gptq import calibrate, damp_search, targets
from onnx_gptq.calibrate import statistics
from onnx_gptq.calibrate.statistics import HessianStats
from onnx_gptq.config import CalibConfig, QuantConfig
from onnx_gptq.errors import CalibrationError, ConfigError
from onnx_gptq.pipeline import activation_widths, quantize_with_report
from onnx_gptq.solve import solve
from onnx_gptq.error_traces import relative_error
from tests.test_rewrite import FEEDS, run

# 16 rows of ids, one per batch: batches 3, 7, 11 and 15 are held out.
ONE_PASS = CalibConfig(num_samples=16, seq_len=32, batch_size=1, sequential=False)
AUTO = QuantConfig(bits=4, group_size=16, damp="auto")


def _stats(rng: np.random.Generator, rows: int, k: int, scale: np.ndarray) -> HessianStats:
    x = rng.standard_normal((rows, k)) * scale
    return HessianStats(x.T @ x, rows)


def test_choice_is_the_candidate_with_the_lowest_held_out_error() -> None:
    rng = np.random.default_rng(3)
    n, k = 24, 48
    scale = np.exp(rng.standard_normal(k))  # uneven input scales, few rows: an over-fitted H
    fit, held = _stats(rng, 40, k, scale), _stats(rng, 40, k, scale)
    W = rng.standard_normal((n, k)).astype(np.float32)
    config = QuantConfig(bits=3, group_size=16)
    choice = damp_search.choose_damp(W, fit, held, config, device="cpu")
    want = {}
    for d in damp_search.CANDIDATES:
        Q = solve(W, fit.hessian(), dataclasses.replace(config, damp=d), device="cpu").qweight.dequantize()
        want[d] = relative_error(W, Q, held.hessian())
    assert choice.held_errors == pytest.approx(want, rel=1e-9)
    assert choice.damp == min(want, key=want.get)
    assert len(set(np.round(list(want.values()), 12))) > 1  # the candidates do differ here


def test_split_statistics_and_the_held_out_batches() -> None:
    held = [i for i in range(16) if statistics.is_held_out(i, 16)]
    assert held == [3, 7, 11, 15]
    assert [i for i in range(3) if statistics.is_held_out(i, 3)] == [2]
    with pytest.raises(CalibrationError, match="at least 2"):
        statistics.is_held_out(0, 1)
    stats = HessianStats(np.eye(2) * 5, 10, np.eye(2) * 2, 4)
    fit, hold = stats.split()
    np.testing.assert_array_equal(fit.xtx, np.eye(2) * 3)
    assert (fit.rows, hold.rows) == (6, 4)
    with pytest.raises(CalibrationError, match="no held-out slice"):
        HessianStats(np.eye(2), 3).split()
    assert statistics.hessian_bytes(64, held_out=True) == 20 * 64 * 64
    with pytest.raises(ConfigError, match="damp 'auto'"):
        solve(np.ones((2, 4), np.float32), np.eye(4), QuantConfig(damp="auto", group_size=-1))


@pytest.mark.parametrize("tiny_llama_onnx", [False], indirect=True, ids=["torchscript"])
def test_memory_plan_counts_the_held_out_sums(tiny_llama_onnx) -> None:
    groups, _ = targets.find_targets(ir.load(tiny_llama_onnx), QuantConfig())
    budget = 12 * 64 * 64 * 3  # three plain activations of K = 64 a pass
    plain = statistics.plan_passes(groups, activation_widths, budget)
    held = statistics.plan_passes(groups, activation_widths, budget, held_out=True)
    assert len(held) > len(plain)


@pytest.mark.parametrize("tiny_llama_onnx", [False], indirect=True, ids=["torchscript"])
def test_report_damp_is_the_argmin_of_held_out_errors_computed_apart(tiny_llama_onnx, calib_ids, tmp_path) -> None:
    out, report = quantize_with_report(tiny_llama_onnx, calib_ids, AUTO, calib=ONE_PASS, output=tmp_path / "a.onnx",
                                       report=tmp_path / "a.json")
    # Independently: the fit and held-out Hessians from two separate calibrations of the float model.
    ids = np.load(calib_ids)
    model = ir.load(tiny_llama_onnx)
    groups, _ = targets.find_targets(model, AUTO)
    batches = calibrate.make_batches(calib_ids, model, ONE_PASS)
    assert len(batches) == 16
    proto = onnx.load(tiny_llama_onnx)
    names = sorted({t.activation.name for g in groups for t in g.targets})
    fit_stats = calibrate.collect_hessians(proto, names, [b for i, b in enumerate(batches) if i % 4 != 3])
    held_stats = calibrate.collect_hessians(proto, names, [b for i, b in enumerate(batches) if i % 4 == 3])
    rows = {r.name: r for r in report.layers}
    assert ids.shape == (16, 32)
    chosen = []
    for group in groups:
        acts = [t.activation.name for t in group.targets]
        H_fit, _ = statistics.weight_hessian(acts, fit_stats)
        H_hold, _ = statistics.weight_hessian(acts, held_stats)
        config = AUTO.for_layer(group.names, is_head=group.is_head)
        W = group.load().T
        errors = {}
        for d in damp_search.CANDIDATES:
            Q = solve(W, H_fit, dataclasses.replace(config, damp=d)).qweight.dequantize()
            errors[d] = relative_error(W, Q, H_hold)
        row = rows[group.name]
        assert row.damp == min(errors, key=errors.get), group.name
        assert row.damp_held_errors == pytest.approx({f"{d:g}": e for d, e in errors.items()}, rel=1e-4)
        chosen.append(row.damp)
    assert len(chosen) == 15
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["config"]["damp"] == "auto"
    assert [r["damp"] for r in data["layers"]] == [rows[g.name].damp for g in groups]
    got = run(ir.load(out), FEEDS)  # the written file runs in onnxruntime
    assert np.isfinite(got).all()


@pytest.mark.parametrize("tiny_llama_onnx", [False], indirect=True, ids=["torchscript"])
def test_auto_final_solve_uses_all_batches_and_fixed_damp_is_unchanged(tiny_llama_onnx, calib_ids, tmp_path) -> None:
    _, auto = quantize_with_report(tiny_llama_onnx, calib_ids, AUTO, calib=ONE_PASS, output=tmp_path / "a.onnx")
    fixed = {}
    for d in sorted({r.damp for r in auto.layers}):
        config = dataclasses.replace(AUTO, damp=d)
        out, rep = quantize_with_report(tiny_llama_onnx, calib_ids, config, calib=ONE_PASS,
                                        output=tmp_path / f"f{d}.onnx")
        fixed[d] = {r.name: r for r in rep.layers}
        assert all(r.damp_held_errors is None for r in rep.layers)
    for row in auto.layers:  # same codes' error as the fixed-damp run on the full H with the chosen value
        assert row.error == fixed[row.damp][row.name].error
        assert row.calibration_rows == 16 * 32


@pytest.mark.parametrize("tiny_llama_onnx", [False], indirect=True, ids=["torchscript"])
def test_fixed_damp_statistics_are_bit_for_bit_those_without_a_held_out_slice(tiny_llama_onnx, calib_ids) -> None:
    model = ir.load(tiny_llama_onnx)
    batches = calibrate.make_batches(calib_ids, model, ONE_PASS)
    proto = onnx.load(tiny_llama_onnx)
    names = sorted({t.activation.name for g in targets.find_targets(model, AUTO)[0] for t in g.targets})
    plain = calibrate.collect_hessians(proto, names, batches)
    held = calibrate.collect_hessians(proto, names, batches, hold_out=True)
    for name in names:
        np.testing.assert_array_equal(plain[name].xtx, held[name].xtx)
        assert plain[name].held_xtx is None and held[name].held_rows == 4 * 32


@pytest.mark.parametrize("tiny_llama_onnx", [False], indirect=True, ids=["torchscript"])
def test_sequential_auto_runs_and_writes_a_loadable_file(tiny_llama_onnx, calib_ids, tmp_path) -> None:
    calib = dataclasses.replace(ONE_PASS, sequential=True)
    out, report = quantize_with_report(tiny_llama_onnx, calib_ids, AUTO, calib=calib, output=tmp_path / "s.onnx")
    assert report.calib["sequential"] is True
    assert {r.damp for r in report.layers} <= set(damp_search.CANDIDATES)
    assert all(r.damp_held_errors[f"{r.damp:g}"] == min(r.damp_held_errors.values()) for r in report.layers)
    assert np.isfinite(run(ir.load(out), FEEDS)).all()


@pytest.mark.parametrize("tiny_llama_onnx", [False], indirect=True, ids=["torchscript"])
@pytest.mark.parametrize("value,message", [("-1", "damp: -1.0 must be in [0, 1) or 'auto'"),
                                           ("foo", "damp: 'foo' is not a number in [0, 1) or 'auto'")])
def test_cli_bad_damp_is_a_one_line_error(tiny_llama_onnx, calib_ids, tmp_path, value, message) -> None:
    out = tmp_path / "bad.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnx_gptq.cli", str(tiny_llama_onnx), "--calib", str(calib_ids),
                           "-o", str(out), "--damp", value, "-q"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"onnx-gptq: error: {message}"]
    assert not out.exists()


@pytest.mark.parametrize("tiny_llama_onnx", [False], indirect=True, ids=["torchscript"])
def test_cli_auto_with_one_batch_is_a_one_line_error(tiny_llama_onnx, calib_ids, tmp_path) -> None:
    out = tmp_path / "one.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnx_gptq.cli", str(tiny_llama_onnx), "--calib", str(calib_ids),
                           "-o", str(out), "--damp", "auto", "--num-samples", "1", "-q"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "at least 2" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("tiny_gpt2_onnx", [False], indirect=True, ids=["torchscript"])
def test_cli_auto_verbose_logs_the_choice_and_reports_it(tiny_gpt2_onnx, calib_ids, tmp_path) -> None:
    out, report = tmp_path / "v.onnx", tmp_path / "v.json"
    proc = subprocess.run([sys.executable, "-m", "onnx_gptq.cli", str(tiny_gpt2_onnx), "--calib", str(calib_ids),
                           "-o", str(out), "--damp", "auto", "--num-samples", "8", "--seq-len", "32", "-q", "-v",
                           "--report", str(report)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(report.read_text())["layers"]
    logged = [line for line in proc.stderr.splitlines() if "chosen by held-out error" in line]
    assert len(logged) == len(layers) == 9
    assert all(f"damp {r['damp']:g} chosen" in line for r, line in zip(layers, logged))
    assert np.isfinite(run(ir.load(out), FEEDS)).all()


def test_held_out_slice_of_padded_batches_keeps_padding_out(tmp_path_factory) -> None:
    """An encoder's padded batches of 2: the held-out batch (index 3: samples 6 and 7) gives the
    statistics of those two samples run alone, unpadded, and counts only their real tokens."""
    from tests import tiny_models
    from tests.test_calib_samples import SENTENCES

    folder = tmp_path_factory.mktemp("bert_damp")
    model = tiny_models.export_bert(tiny_models.build_bert(), folder / "model.onnx")
    tok = tiny_models.wordpiece_tokenizer(folder / "tokenizer.json")
    sentences = [*SENTENCES, "a dog"]
    proto = onnx.load(model, load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    names = sorted({n.input[0] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights})
    batches = calibrate.make_batches(sentences, proto, CalibConfig(num_samples=8, seq_len=16, batch_size=2),
                                     tokenizer=tok, model_dir=folder)
    assert len(batches) == 4 and not batches[3]["attention_mask"].all()
    alone = calibrate.make_batches(sentences[6:], proto, CalibConfig(num_samples=2, seq_len=16, batch_size=1),
                                   tokenizer=tok)
    stats = calibrate.collect_hessians(proto, names, batches, model_dir=folder, hold_out=True)
    reference = calibrate.collect_hessians(proto, names, alone, model_dir=folder)
    tokens = sum(min(len(s.split()) + 2, 16) for s in sentences[6:])
    for name in names:
        assert stats[name].held_rows == reference[name].rows == tokens
        scale = np.abs(reference[name].xtx).max()
        np.testing.assert_allclose(stats[name].held_xtx, reference[name].xtx, rtol=0, atol=2e-6 * scale)
