"""True-sequential calibration on the tiny exported models: stages, Hessians, spilling, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_gptq import calibrate, cli, model_io, pipeline, rewrite, targets
from onnx_gptq.calibrate import partition as planner, sequential
from onnx_gptq.calibrate import HessianStats
from onnx_gptq.config import CalibConfig, QuantConfig
from onnx_gptq.errors import ConfigError, ModelError
from onnx_gptq.solve import solve

CPU = ("CPUExecutionProvider",)
CONFIG = QuantConfig(bits=4, group_size=32, quantize_head=True)


def _batches(calib_ids: Path, count: int = 2, size: int = 4) -> list[dict[str, np.ndarray]]:
    ids = np.load(calib_ids)
    return [{"input_ids": ids[i * size:(i + 1) * size], "attention_mask": np.ones_like(ids[i * size:(i + 1) * size])}
            for i in range(count)]


def _load(path: Path) -> tuple[ir.Model, list[targets.WeightGroup]]:
    model = ir.load(path)
    groups, _ = targets.find_targets(model, CONFIG)
    return model, groups


def _activations(groups: list[targets.WeightGroup]) -> list[str]:
    return sorted({t.activation.name for g in groups for t in g.targets})


def _one_pass(model: ir.Model, groups: list[targets.WeightGroup], batches: list[dict[str, np.ndarray]],
              model_dir: Path) -> dict[str, HessianStats]:
    return calibrate.collect_hessians(model_io.to_proto(model), _activations(groups), batches,
                                      model_dir=model_dir, providers=CPU)


def _gptq_solver(model: ir.Model, taken: set[str]) -> sequential.SolveStage:
    """A solve_stage that quantizes with GPTQ and rewrites to MatMulNBits, as the pipeline does."""

    def solve_stage(stage_groups: list[targets.WeightGroup], stats: dict[str, HessianStats]) -> None:
        for group in stage_groups:
            total = stats[group.targets[0].activation.name]
            for t in group.targets[1:]:
                total = total + stats[t.activation.name]
            result = solve(group.load().T, total.hessian(), CONFIG, name=group.name)
            fmt, _ = rewrite.choose_format(CONFIG.format, result.qweight, group.dtype, group.name)
            rewrite.rewrite_group(model, group, result.qweight, fmt, taken_names=taken)

    return solve_stage


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_one_stage_per_block_plus_head(tiny_lm_onnx: tuple[str, Path]) -> None:
    _, path = tiny_lm_onnx
    model, groups = _load(path)
    partition = planner.plan_stages(model, groups)
    assert len(partition.stages) == 3  # layers.0 / h.0, layers.1 / h.1, the head
    per_layer = 7 if "llama" in str(path) else 4
    assert [len(s.groups) for s in partition.stages] == [per_layer, per_layer, 1]
    assert [planner.block_key(g) for g in partition.stages[0].groups] == [0] * per_layer
    assert [planner.block_key(g) for g in partition.stages[1].groups] == [1] * per_layer
    assert partition.stages[2].groups[0].is_head
    # The residual stream (plus mask, rotary tables, shape tensors) enters block 1; only hidden states the head.
    assert partition.stages[0].crossing_in == 0
    assert 1 <= partition.stages[1].crossing_in <= 10
    assert partition.stages[2].crossing_in == 1


def test_identity_solve_gives_one_pass_hessians(tiny_lm_onnx: tuple[str, Path], calib_ids: Path) -> None:
    _, path = tiny_lm_onnx
    model, groups = _load(path)
    batches = _batches(calib_ids)
    reference = _one_pass(model, groups, batches, path.parent)
    seen: list[list[str]] = []
    got: dict[str, HessianStats] = {}

    def identity(stage_groups: list[targets.WeightGroup], stats: dict[str, HessianStats]) -> None:
        seen.append([g.name for g in stage_groups])
        got.update(stats)

    sequential.run_sequential(model, groups, batches, solve_stage=identity, model_dir=path.parent, providers=CPU)
    assert len(seen) == 3 and sum(len(s) for s in seen) == len(groups)
    assert sorted(got) == _activations(groups)
    for name, ref in reference.items():
        assert got[name].rows == ref.rows == 8 * 32
        assert _rel(got[name].xtx, ref.xtx) < 1e-6, name


def test_later_stages_see_quantized_inputs(tiny_lm_onnx: tuple[str, Path], calib_ids: Path) -> None:
    arch, path = tiny_lm_onnx
    model, groups = _load(path)
    batches = _batches(calib_ids)
    float_logits = ort.InferenceSession(str(path), providers=list(CPU)).run(["logits"], batches[0])[0]
    reference = _one_pass(model, groups, batches, path.parent)
    partition = planner.plan_stages(model, groups)
    stage1 = _activations(partition.stages[1].groups)
    taken: set[str] = set()
    solver = _gptq_solver(model, taken)
    received: list[dict[str, HessianStats]] = []
    after_stage0: dict[str, HessianStats] = {}

    def solve_stage(stage_groups: list[targets.WeightGroup], stats: dict[str, HessianStats]) -> None:
        received.append(stats)
        solver(stage_groups, stats)
        if len(received) == 1:
            # Reference for stage 1: the whole model, block 0 quantized, calibrated in one pass.
            after_stage0.update(calibrate.collect_hessians(model_io.to_proto(model), stage1, batches,
                                                           model_dir=path.parent, providers=CPU))

    sequential.run_sequential(model, groups, batches, solve_stage=solve_stage, model_dir=path.parent,
                              providers=CPU, partition=partition)
    assert len(received) == 3
    for name, stats in received[0].items():  # the first block sees the float embedding output
        assert _rel(stats.xtx, reference[name].xtx) < 1e-6
    for name in stage1:
        assert _rel(received[1][name].xtx, after_stage0[name].xtx) < 1e-5, name
        assert _rel(received[1][name].xtx, reference[name].xtx) > 1e-4, name  # quantized block 0 upstream
    for name in received[2]:
        assert _rel(received[2][name].xtx, reference[name].xtx) > 1e-4

    rewrite.remove_unused(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == sum(len(g.targets) for g in groups)
    proto = model_io.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=list(CPU)) if not any(
        t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer) else None
    if session is None:
        out = path.parent / "sequential_quantized.onnx"
        model_io.save_atomic(model, out)
        session = ort.InferenceSession(str(out), providers=list(CPU))
    logits = session.run(["logits"], batches[0])[0]
    assert logits.shape == float_logits.shape and np.isfinite(logits).all()
    # 4-bit weights move the logits, but they stay close to the float model's.
    assert 0 < np.abs(logits - float_logits).mean() < 0.5 * np.abs(float_logits).mean(), arch


def test_spilling_to_disk_gives_identical_hessians(tiny_llama_onnx: Path, calib_ids: Path, tmp_path: Path) -> None:
    batches = _batches(calib_ids)
    results = []
    for spill in (2 << 30, 0):
        model, groups = _load(tiny_llama_onnx)
        got: dict[str, HessianStats] = {}
        sequential.run_sequential(model, groups, batches, solve_stage=_collecting(model, got),
                                  model_dir=tiny_llama_onnx.parent, providers=CPU,
                                  cache_dir=tmp_path / f"spill_{spill}", spill_bytes=spill)
        results.append(got)
    assert sorted(results[0]) == sorted(results[1])
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name].xtx, results[1][name].xtx)
    assert not list((tmp_path / "spill_0").glob("*.npy"))  # spilled activations are removed after use


def _collecting(model: ir.Model, into: dict[str, HessianStats]) -> sequential.SolveStage:
    solver = _gptq_solver(model, set())

    def solve_stage(stage_groups: list[targets.WeightGroup], stats: dict[str, HessianStats]) -> None:
        into.update(stats)
        solver(stage_groups, stats)

    return solve_stage


def test_activation_cache_spills_past_budget(tmp_path: Path) -> None:
    cache = sequential.ActivationCache(num_batches=2, spill_bytes=100, directory=tmp_path)
    small, big = np.arange(10, dtype=np.float32), np.arange(100, dtype=np.float32).reshape(4, 25)
    cache.add("a", 0, small)
    cache.add("a", 1, big)
    assert cache.memory_bytes == 40 and cache.spilled_bytes == 400
    assert isinstance(cache.get("a", 1), np.memmap)
    np.testing.assert_array_equal(cache.get("a", 1), big)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    cache.drop("a")
    assert cache.memory_bytes == 0 and not list(tmp_path.glob("*.npy"))


def _fan_model(branches: int, *, split: bool, k: int = 8) -> ir.Model:
    """Parallel MatMuls, all summed at the end.

    With `split`, the input x [n, branches * k] is first cut into `branches`
    slices, one per MatMul: every gap between two MatMuls is then crossed by
    `branches` tensors (slices not yet used, products already made). Without,
    every MatMul reads x itself and the gaps widen by one product per branch.
    """
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    width = branches * k if split else k
    if split:
        nodes.append(helper.make_node("Split", ["x"], [f"x{i}" for i in range(branches)], axis=1,
                                      num_outputs=branches, name="split"))
    for i in range(branches):
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal((k, k)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}" if split else "x", f"w{i}"], [f"y{i}"], name=f"mm{i}"))
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(branches)], ["out"], name="sum"))
    graph = helper.make_graph(nodes, "fan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", k])], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_no_cut_is_a_model_error() -> None:
    model = _fan_model(40, split=True)
    groups, _ = targets.find_targets(model, QuantConfig(group_size=8, embedding_bits=None))
    assert len(groups) == 40
    with pytest.raises(ModelError, match=r"fan: cannot calibrate sequentially: no point in the graph where "
                                         r"<= 32 tensors cross .*'mm0'.* the fewest is 40"):
        planner.plan_stages(model, groups, name="fan")
    # A shared graph input does not count: the gap after the first MatMul is crossed by y0, the next by y0, y1...
    shared = _fan_model(4, split=False)
    groups, _ = targets.find_targets(shared, QuantConfig(group_size=8, embedding_bits=None))
    stages = planner.plan_stages(shared, groups, max_crossing=2).stages
    assert [len(s.groups) for s in stages] == [1, 1, 2]
    assert [s.crossing_in for s in stages] == [0, 1, 2]


def test_fan_model_runs_sequentially(tmp_path: Path) -> None:
    """Without module names every narrow gap is a cut; the tensors crossing several cuts are kept until used."""
    model = _fan_model(4, split=False)
    groups, _ = targets.find_targets(model, QuantConfig(group_size=8, embedding_bits=None))
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((5, 8)).astype(np.float32)} for _ in range(3)]
    got: dict[str, HessianStats] = {}
    calls: list[int] = []

    def identity(stage_groups: list[targets.WeightGroup], stats: dict[str, HessianStats]) -> None:
        calls.append(len(stage_groups))
        got.update(stats)

    timings: dict[str, float] = {}
    sequential.run_sequential(model, groups, batches, solve_stage=identity, model_dir=None, providers=CPU,
                              max_crossing=2, timings=timings)
    assert calls == [1, 1, 2]
    assert sorted(timings) == ["sequential:calibrate", "sequential:forward", "sequential:plan", "sequential:solve"]
    assert all(t >= 0 for t in timings.values())
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    assert got["x"].rows == 15
    np.testing.assert_allclose(got["x"].xtx, x.T @ x, rtol=1e-5)


def test_custom_op_stages_run(tiny_llama_onnx: Path, calib_ids: Path) -> None:
    """3-bit weights become onnx_gptq.GptqMatMul; later stages run them through the custom-op library."""
    from onnx_gptq.runtime import custom_ops

    try:
        custom_ops.library_path()
    except custom_ops.CustomOpsLibraryError:
        pytest.fail("the custom-op library is not built (pip install -e . or set ONNX_GPTQ_CUSTOM_OPS_LIB)")
    config = QuantConfig(bits=3, group_size=32)
    model = ir.load(tiny_llama_onnx)
    groups, _ = targets.find_targets(model, config)
    batches = _batches(calib_ids)
    reference = _one_pass(model, groups, batches, tiny_llama_onnx.parent)
    received: dict[str, HessianStats] = {}
    taken: set[str] = set()

    def solve_stage(stage_groups: list[targets.WeightGroup], stats: dict[str, HessianStats]) -> None:
        received.update(stats)
        for group in stage_groups:
            result = solve(group.load().T, stats[group.targets[0].activation.name].hessian(), config)
            fmt, _ = rewrite.choose_format(config.format, result.qweight, group.dtype, group.name)
            rewrite.rewrite_group(model, group, result.qweight, fmt, taken_names=taken)

    sequential.run_sequential(model, groups, batches, solve_stage=solve_stage, model_dir=tiny_llama_onnx.parent,
                              providers=CPU)
    assert [n.op_type for n in model.graph].count("GptqMatMul") == len(groups) == 15  # with the head
    layer1 = [g.targets[0].activation.name for g in groups if planner.block_key(g) == 1]
    assert all(_rel(received[a].xtx, reference[a].xtx) > 1e-3 for a in layer1)  # 3-bit block 0 upstream


def test_float_forward_gives_one_pass_hessians_with_real_solve(tiny_lm_onnx: tuple[str, Path],
                                                               calib_ids: Path) -> None:
    """Staged one-pass: stages run float before being quantized, so every Hessian is the one-pass one."""
    _, path = tiny_lm_onnx
    model, groups = _load(path)
    batches = _batches(calib_ids)
    reference = _one_pass(model, groups, batches, path.parent)
    got: dict[str, HessianStats] = {}
    sequential.run_sequential(model, groups, batches, solve_stage=_collecting(model, got), model_dir=path.parent,
                              providers=CPU, float_forward=True)
    assert sorted(got) == sorted(reference)
    for name, ref in reference.items():
        assert _rel(got[name].xtx, ref.xtx) < 1e-6, name
    assert [n.op_type for n in model.graph].count("MatMulNBits") == sum(len(g.targets) for g in groups)


# ---------------------------------------------------------------------------
# Sequential or one pass: the auto choice, and what the report says


def _quantize(model: ir.Model | onnx.ModelProto, calibration: object, sequential_mode: bool | None,
              **calib: int) -> pipeline.Report:
    config = QuantConfig(bits=4, group_size=8, head_bits=None, embedding_bits=None)
    _, report = pipeline.quantize_with_report(model, calibration, config,
                                              calib=CalibConfig(sequential=sequential_mode, **calib))
    return report


def test_auto_calibrates_a_cut_graph_sequentially(tiny_llama_onnx: Path, calib_ids: Path) -> None:
    """The tiny Llama has a cut between its two blocks: auto runs sequentially, and gives sequential's weights."""
    calib = {"num_samples": 8, "seq_len": 32}
    auto = _quantize(ir.load(tiny_llama_onnx), str(calib_ids), None, **calib)
    assert auto.calib["sequential"] is True
    assert auto.calib["sequential_reason"] == "auto: the graph cuts into 2 stages"
    assert "sequential:calibrate" in auto.phases
    assert "calibration: sequential (auto: the graph cuts into 2 stages)" in auto.summary().splitlines()
    on = _quantize(ir.load(tiny_llama_onnx), str(calib_ids), True, **calib)
    assert (on.calib["sequential"], on.calib["sequential_reason"]) == (True, "as asked")
    assert [r.error for r in auto.layers] == [r.error for r in on.layers]
    off = _quantize(ir.load(tiny_llama_onnx), str(calib_ids), False, **calib)
    assert (off.calib["sequential"], off.calib["sequential_reason"]) == (False, "as asked")
    assert "calibration: one pass (as asked)" in off.summary().splitlines()
    assert not any(p.startswith("sequential:") for p in off.phases)
    # Block 1's Hessians differ once block 0 is quantized, so the second block's errors do.
    assert [r.error for r in auto.layers] != [r.error for r in off.layers]


def test_auto_calibrates_in_one_pass_without_a_cut() -> None:
    """40 parallel MatMuls with 40 tensors across every gap: no cut, so auto runs one pass (where True fails)."""
    model = ir.serde.serialize_model(_fan_model(40, split=True))
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((6, 320)).astype(np.float32)} for _ in range(2)]
    report = _quantize(model, feeds, None, num_samples=2)
    assert report.calib["sequential"] is False
    assert report.calib["sequential_reason"].startswith("auto: the graph has no cut between its layers: fan: cannot "
                                                        "calibrate sequentially")
    assert not any(p.startswith("sequential:") for p in report.phases)
    assert len(report.layers) == 40
    with pytest.raises(ModelError, match="cannot calibrate sequentially"):
        _quantize(model, feeds, True, num_samples=2)


def test_one_quantized_layer_is_one_pass(tiny_llama_onnx: Path, calib_ids: Path) -> None:
    model = ir.load(tiny_llama_onnx)
    groups, _ = targets.find_targets(model, CONFIG)
    partition, reason = sequential.choose_mode(None, model, groups[:1])
    assert partition is None and reason == "auto: the quantized layers form one stage"
    partition, reason = sequential.choose_mode(None, model, groups)
    assert partition is not None and len(partition.stages) == 3 and reason == "auto: the graph cuts into 3 stages"


@pytest.mark.parametrize(("argv", "mode"), [([], None), (["--sequential"], True), (["--sequential", "on"], True),
                                            (["--sequential", "off"], False), (["--one-pass"], False),
                                            (["--sequential", "auto"], None)])
def test_cli_sequential_words(argv: list[str], mode: bool | None) -> None:
    args = cli.build_parser().parse_args(["m.onnx", *argv, "--providers", "CPUExecutionProvider"])
    assert cli._configs(args)[1].sequential is mode


def test_sequential_words_are_checked() -> None:
    assert [CalibConfig(sequential=w).sequential for w in ("on", "off", "auto")] == [True, False, None]
    with pytest.raises(ConfigError, match="sequential: 'yes' is not one of on, off, auto"):
        CalibConfig(sequential="yes")
    with pytest.raises(ConfigError, match="sequential: 1 must be True, False or None"):
        CalibConfig(sequential=1)
    with pytest.raises(SystemExit):  # argparse: exit code 2, the choices named
        cli.build_parser().parse_args(["m.onnx", "--one-pass", "--sequential"])
