"""collect_hessians: onnxruntime-computed X^T X against numpy, passes, external data, errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gptq.calibrate import statistics, taps
from onnx_gptq.runtime import custom_ops, sessions
from onnx_gptq.calibrate import HessianStats, collect_hessians
from onnx_gptq.errors import CalibrationError, ConfigError, ModelError

K_IN, K_MID, N_OUT = 8, 12, 5


def _mlp(dtype: np.dtype = np.float32, *, value_info: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[b,t,8] -MatMul W1-> h -Relu-> r[b,t,12] -Gemm-like MatMul W2-> y[b,t,5]."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w1 = rng.standard_normal((K_IN, K_MID)).astype(dtype)
    w2 = rng.standard_normal((K_MID, N_OUT)).astype(dtype)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    infos = [helper.make_tensor_value_info("r", elem, ["b", "t", K_MID])] if value_info else []
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, ["b", "t", K_IN])],
                              [helper.make_tensor_value_info("y", elem, ["b", "t", N_OUT])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
                              value_info=infos)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _activations(model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The named tensors, exposed directly as outputs of a plain session, flattened to float64 [rows, K]."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in names:
        if name not in {o.name for o in exposed.graph.output} | {i.name for i in exposed.graph.input}:
            exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name in names:
            value = feed[name] if name in feed else session.run([name], feed)[0]
            out[name].append(np.asarray(value).astype(np.float64).reshape(-1, value.shape[-1]))
    return {n: np.concatenate(v) for n, v in out.items()}


def _batches(count: int, rows: int = 3, tokens: int = 7, dtype: np.dtype = np.float32, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, tokens, K_IN)).astype(dtype)} for _ in range(count)]


def test_batchwise_equals_one_go_and_numpy() -> None:
    model = _mlp()
    feeds = _batches(4)
    stats = collect_hessians(model, ["x", "r"], feeds)
    whole = collect_hessians(model, ["x", "r"], [{"x": np.concatenate([f["x"] for f in feeds])}])
    acts = _activations(model, ["x", "r"], feeds)
    for name, k in (("x", K_IN), ("r", K_MID)):
        X = acts[name]
        assert stats[name].xtx.dtype == np.float64 and stats[name].xtx.shape == (k, k)
        assert stats[name].rows == 4 * 3 * 7 == X.shape[0]
        np.testing.assert_allclose(stats[name].xtx, X.T @ X, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(stats[name].xtx, whole[name].xtx, rtol=1e-5, atol=1e-4)
        assert whole[name].rows == stats[name].rows
        np.testing.assert_allclose(stats[name].hessian(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(stats[name].xtx, stats[name].xtx.T)


def test_stats_add_sums_rows_and_products() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((10, 4)), rng.standard_normal((6, 4))
    total = HessianStats(a.T @ a, 10) + HessianStats(b.T @ b, 6)
    both = np.concatenate([a, b])
    assert total.rows == 16
    np.testing.assert_allclose(total.hessian(), 2 * both.T @ both / 16, rtol=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        _ = total + HessianStats(np.zeros((3, 3)), 1)
    with pytest.raises(CalibrationError, match="no rows"):
        HessianStats(np.zeros((2, 2)), 0).hessian()


def test_duplicates_and_input_order_do_not_matter() -> None:
    model = _mlp()
    feeds = _batches(2)
    one = collect_hessians(model, ["r", "x", "r"], feeds)
    two = collect_hessians(model, ["x", "r"], feeds)
    assert set(one) == {"x", "r"}
    for name in one:
        np.testing.assert_array_equal(one[name].xtx, two[name].xtx)


def test_fp16_graph_products_accumulate_in_float() -> None:
    model = _mlp(np.float16)
    feeds = _batches(3, dtype=np.float16)
    stats = collect_hessians(model, ["x", "r"], feeds)
    acts = _activations(model, ["x", "r"], feeds)  # fp16 values, exactly representable in float64
    for name in ("x", "r"):
        X = acts[name]
        assert stats[name].rows == X.shape[0]
        np.testing.assert_allclose(stats[name].xtx, X.T @ X, rtol=1e-5, atol=1e-3)


def test_bf16_activation_is_cast_in_graph() -> None:
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    w = np.random.default_rng(0).standard_normal((K_IN, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["xf", "W"], ["y"])],
        "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["b", K_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).standard_normal((9, K_IN)).astype(bf16)
    stats = collect_hessians(model, ["x"], [{"x": x}])
    X = x.astype(np.float64)
    assert stats["x"].rows == 9
    np.testing.assert_allclose(stats["x"].xtx, X.T @ X, rtol=1e-6, atol=1e-5)


def test_k_from_consumer_weight_or_shape_inference() -> None:
    model = _mlp(value_info=False)  # "r" has no declared shape: K comes from W2, "h" from inference
    feeds = _batches(2)
    stats = collect_hessians(model, ["r", "h"], feeds)
    acts = _activations(model, ["r", "h"], feeds)
    for name in ("r", "h"):
        np.testing.assert_allclose(stats[name].xtx, acts[name].T @ acts[name], rtol=1e-5, atol=1e-4)


def test_several_passes_give_the_same_result(caplog: pytest.LogCaptureFixture) -> None:
    model = _mlp()
    feeds = iter(_batches(3))  # a one-shot iterator must be replayed for each pass
    budget = statistics.hessian_bytes(K_MID)  # room for one activation per pass
    with caplog.at_level(logging.INFO, logger="onnx_gptq.calibrate.run"):
        split = collect_hessians(model, ["x", "r"], feeds, memory_budget=budget)
    assert "2 passes" in caplog.text
    single = collect_hessians(model, ["x", "r"], _batches(3), memory_budget=1 << 40)
    for name in ("x", "r"):
        assert split[name].rows == single[name].rows
        np.testing.assert_allclose(split[name].xtx, single[name].xtx, rtol=1e-6, atol=0)


def test_pass_planning_orders_by_graph_and_respects_budget() -> None:
    found = [taps.Tap(name=f"t{i}", k=k, xtx_output="", size_output="", order=order)
             for i, (k, order) in enumerate([(4, 3), (8, 1), (4, 2), (16, 0)])]
    ordered = sorted(found, key=lambda t: t.order)
    passes = statistics.plan_passes(ordered, lambda t: {t.name: t.k}, 12 * (8 * 8 + 4 * 4))
    assert [[t.name for t in p] for p in passes] == [["t3"], ["t1", "t2"], ["t0"]]
    whole = statistics.plan_passes(ordered, lambda t: {t.name: t.k}, 1 << 40)
    assert [[t.name for t in p] for p in whole] == [["t3", "t1", "t2", "t0"]]
    assert 0 < statistics.default_memory_budget()


def test_unneeded_nodes_are_not_run() -> None:
    """A node after the observed tensor that would fail at run time is pruned away."""
    model = _mlp()
    bad_shape = numpy_helper.from_array(np.array([7, 7, 7], np.int64), "bad_shape")
    model.graph.initializer.append(bad_shape)
    model.graph.node.append(helper.make_node("Reshape", ["y", "bad_shape"], ["broken"]))
    model.graph.output.append(helper.make_tensor_value_info("broken", TensorProto.FLOAT, None))
    feeds = _batches(1)
    with pytest.raises(Exception):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds[0])
    stats = collect_hessians(model, ["r"], feeds)
    acts = _activations(_mlp(), ["r"], feeds)
    np.testing.assert_allclose(stats["r"].xtx, acts["r"].T @ acts["r"], rtol=1e-5, atol=1e-4)


def test_outer_scope_reads_of_subgraphs_keep_their_producers() -> None:
    """An If branch reading "h" from the outer graph: pruning must keep h's producer."""
    then_graph = helper.make_graph([helper.make_node("Relu", ["h"], ["branch_out"])], "then", [],
                                   [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Neg", ["h"], ["branch_out2"])], "else", [],
                                   [helper.make_tensor_value_info("branch_out2", TensorProto.FLOAT, None)])
    model = _mlp()
    model.graph.node.insert(1, helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])))
    model.graph.node.insert(2, helper.make_node("If", ["cond"], ["picked"], then_branch=then_graph, else_branch=else_graph))
    model.graph.node.insert(3, helper.make_node("Identity", ["picked"], ["picked_k"]))
    model.graph.value_info.append(helper.make_tensor_value_info("picked_k", TensorProto.FLOAT, ["b", "t", K_MID]))
    feeds = _batches(2)
    stats = collect_hessians(model, ["picked_k"], feeds)
    acts = _activations(_mlp(), ["r"], feeds)  # Relu(h) == r
    np.testing.assert_allclose(stats["picked_k"].xtx, acts["r"].T @ acts["r"], rtol=1e-5, atol=1e-4)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def test_external_data_model_untouched_and_equal(tmp_path: Path) -> None:
    model = _mlp()
    feeds = _batches(2)
    reference = collect_hessians(model, ["x", "r"], feeds)
    model_dir = tmp_path / "model"
    (model_dir / "weights").mkdir(parents=True)
    onnx.save_model(model, model_dir / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights/w.bin", size_threshold=0)
    before = _snapshot(model_dir)
    cwd_before = sorted(os.listdir(os.getcwd()))
    proto = onnx.load(model_dir / "m.onnx", load_external_data=False)
    blob = proto.SerializeToString()
    assert any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)

    stats = collect_hessians(proto, ["x", "r"], feeds, model_dir=model_dir, memory_budget=statistics.hessian_bytes(K_MID))
    for name in ("x", "r"):
        np.testing.assert_allclose(stats[name].xtx, reference[name].xtx, rtol=1e-6)
    assert proto.SerializeToString() == blob
    assert _snapshot(model_dir) == before
    assert sorted(os.listdir(os.getcwd())) == cwd_before
    options = ort.SessionOptions()  # reused by every pass: the folder option is set once
    again = collect_hessians(proto, ["r", "x"], feeds, model_dir=str(model_dir), session_options=options,
                             memory_budget=1)
    for name in ("x", "r"):
        np.testing.assert_allclose(again[name].xtx, reference[name].xtx, rtol=1e-6)
    assert _snapshot(model_dir) == before
    with pytest.raises(ModelError, match="model_dir"):
        collect_hessians(proto, ["x"], feeds)


def test_in_memory_model_untouched(tmp_path: Path) -> None:
    model = _mlp()
    blob = model.SerializeToString()
    collect_hessians(model, ["x", "r"], _batches(1))
    assert model.SerializeToString() == blob


def test_oversized_embedded_tensors_go_through_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Past the protobuf limit, embedded weights are handed over as in-memory files, next to external ones."""
    model = _mlp()
    feeds = _batches(2)
    reference = collect_hessians(model, ["x", "r"], feeds)
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    mixed = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    w1 = next(i for i, t in enumerate(mixed.graph.initializer) if t.name == "W1")
    mixed.graph.initializer[w1].CopyFrom(model.graph.initializer[0])  # W1 embedded, W2 external
    monkeypatch.setattr(taps, "INLINE_BYTES_LIMIT", 0)
    monkeypatch.setattr(taps, "_INLINE_MIN_TENSOR_BYTES", 0)
    stats = collect_hessians(mixed, ["x", "r"], feeds, model_dir=tmp_path)
    for name in ("x", "r"):
        np.testing.assert_allclose(stats[name].xtx, reference[name].xtx, rtol=1e-6)


def test_bad_batches_and_names_raise() -> None:
    model = _mlp()
    with pytest.raises(ModelError, match="'nope'"):
        collect_hessians(model, ["nope"], _batches(1))
    with pytest.raises(CalibrationError, match="empty"):
        collect_hessians(model, ["x"], [])
    with pytest.raises(CalibrationError, match="'extra' is not an input"):
        collect_hessians(model, ["x"], [{"x": np.zeros((1, 2, K_IN), np.float32), "extra": np.zeros(1)}])
    with pytest.raises(CalibrationError, match="'x' is not fed"):
        collect_hessians(model, ["r"], [{}])
    with pytest.raises(CalibrationError, match="batch 0: onnxruntime failed"):
        collect_hessians(model, ["r"], [{"x": np.zeros((1, 2, K_IN + 1), np.float32)}])
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider"):
        collect_hessians(model, ["x"], _batches(1), providers=["NoSuchExecutionProvider"])
    assert collect_hessians(model, [], _batches(1)) == {}


def test_progress_bar_and_session_options() -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = _mlp()
    stats = collect_hessians(model, ["r"], _batches(2), progress=True, session_options=options)
    reference = collect_hessians(model, ["r"], _batches(2))
    np.testing.assert_allclose(stats["r"].xtx, reference["r"].xtx, rtol=1e-5)


def test_custom_domain_nodes_are_detected_in_subgraphs_and_functions() -> None:
    custom = helper.make_node("GptqMatMul", ["a", "b"], ["c"], domain="onnx_gptq")
    body = helper.make_graph([custom], "body", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    model = _mlp()
    assert not sessions.uses_custom_ops(model)
    model.graph.node.append(helper.make_node("If", ["cond"], ["o"], then_branch=body, else_branch=body))
    assert sessions.uses_custom_ops(model)
    with_function = _mlp()
    with_function.functions.append(helper.make_function("local", "F", ["a", "b"], ["c"], [custom],
                                                        [helper.make_opsetid("onnx_gptq", 1)]))
    assert sessions.uses_custom_ops(with_function)


def test_providers_are_checked_and_cuda_gets_full_float32() -> None:
    providers = sessions.default_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert sessions.check_providers(providers) == providers
    with_options = (("CPUExecutionProvider", {"intra_op_num_threads": "1"}),)
    assert sessions.check_providers(with_options) == with_options
    with pytest.raises(ConfigError, match="providers: MadeUpExecutionProvider is not available"):
        sessions.check_providers([("MadeUpExecutionProvider", {})])
    assert sessions._cuda_full_float32(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    custom = ("CUDAExecutionProvider", {"device_id": "1"})
    assert sessions._cuda_full_float32([custom]) == [custom]


def test_tiny_llama_export_end_to_end(tiny_llama_onnx: Path, calib_ids: Path) -> None:
    """Real exports: batches from ids, every constant-weight MatMul/Gemm input against numpy."""
    from onnx_gptq.calibrate import make_batches
    from onnx_gptq.config import CalibConfig

    before = _snapshot(tiny_llama_onnx.parent)
    proto = onnx.load(tiny_llama_onnx, load_external_data=False)
    batches = make_batches(calib_ids, proto, CalibConfig(num_samples=6, seq_len=24, batch_size=4))
    assert [b["input_ids"].shape for b in batches] == [(4, 24), (2, 24)]
    weights = {t.name for t in proto.graph.initializer}
    names = sorted({n.input[0] for n in proto.graph.node
                    if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights})
    assert len(names) >= 6  # per layer: attention input, o_proj input, MLP input, down_proj input
    stats = collect_hessians(proto, names, batches, model_dir=tiny_llama_onnx.parent,
                             memory_budget=statistics.hessian_bytes(96) * 3)
    full = onnx.load(tiny_llama_onnx)
    acts = _activations(full, names, batches)
    for name in names:
        X = acts[name]
        assert stats[name].rows == 6 * 24 == X.shape[0]
        np.testing.assert_allclose(stats[name].xtx, X.T @ X, rtol=1e-4, atol=1e-3 * np.abs(X.T @ X).max())
    assert _snapshot(tiny_llama_onnx.parent) == before
