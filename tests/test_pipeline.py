"""The pass object, the report's settings, skip reasons (once, subgraphs included), CLI defaults."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_gptq
from onnx_gptq import cli, targets
from onnx_gptq.config import CalibConfig, LayerFilter, QuantConfig
from onnx_gptq.errors import ConfigError, NonFiniteError
from onnx_gptq.pipeline import GptqPass, GptqResult, run_pass

CALIB = CalibConfig(num_samples=4, seq_len=16, providers=("CPUExecutionProvider",))
K, N = 32, 16


def _mlp_with_if() -> onnx.ModelProto:
    """x @ W in the main graph, and another x @ W2 inside an If's then-branch."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "W")
    w2 = numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "W2")
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W2"], ["t"], name="inner_matmul")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    orelse = helper.make_graph([helper.make_node("Identity", ["y"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="outer_matmul"),
             helper.make_node("If", ["flag"], ["z"], name="branch", then_branch=then, else_branch=orelse)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              initializer=[w, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraph_matmuls_are_skipped_with_a_reason() -> None:
    model = ir.serde.deserialize_model(_mlp_with_if())
    groups, skips = targets.find_targets(model, LayerFilter(quantize_head=True))
    assert [g.name for g in groups] == ["W"]
    assert [(s.node, s.reason) for s in skips] == [("inner_matmul", targets.IN_SUBGRAPH)]
    assert "subgraph" in targets.IN_SUBGRAPH


def test_pass_is_an_in_place_onnx_ir_pass_with_pre_and_postconditions() -> None:
    model = ir.serde.deserialize_model(_mlp_with_if())
    config = QuantConfig(algo="rtn", group_size=16, quantize_head=True)
    result = GptqPass(config)(model)
    assert isinstance(result, GptqResult) and result.model is model and result.modified
    assert [r.name for r in result.report.layers] == ["W"]
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) == 1
    # A precondition the user broke stays a one-line ConfigError (onnx-ir would wrap it otherwise).
    with pytest.raises(ConfigError, match="calibration data is required"):
        run_pass(GptqPass(QuantConfig(quantize_head=True)), ir.serde.deserialize_model(_mlp_with_if()))
    with pytest.raises(ir.passes.PreconditionError):
        GptqPass(QuantConfig(quantize_head=True))(ir.serde.deserialize_model(_mlp_with_if()))


def test_postcondition_refuses_non_finite_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """ensures() runs the NaN/Inf check over what the pass wrote."""
    from onnx_gptq import rewrite

    real = rewrite.rewrite_group

    def poisoned(model, group, qw, fmt, **kwargs):
        qw.scales[...] = np.nan
        return real(model, group, qw, fmt, **kwargs)

    monkeypatch.setattr(rewrite, "rewrite_group", poisoned)
    with pytest.raises(NonFiniteError, match="NaN"):
        run_pass(GptqPass(QuantConfig(algo="rtn", group_size=16, quantize_head=True)),
                 ir.serde.deserialize_model(_mlp_with_if()))


def test_layers_given_apart_from_the_config(tiny_llama_onnx: Path, calib_ids: Path) -> None:
    only_mlp = LayerFilter(include=(r"mlp",))
    _, report = onnx_gptq.quantize_with_report(onnx.load(tiny_llama_onnx), calib_ids, QuantConfig(group_size=32),
                                               calib=CALIB, layers=only_mlp)
    assert report.layers and all("mlp" in (r.module + r.name + "".join(r.nodes)) for r in report.layers)
    assert report.selection == only_mlp.to_dict()


def test_report_records_every_setting(tiny_llama_onnx: Path, calib_ids: Path, tmp_path: Path) -> None:
    config = QuantConfig(bits=3, group_size=32, exclude=(r"layers\.0\.",))
    onnx_gptq.quantize(tiny_llama_onnx, calib_ids, config, calib=CALIB, output=tmp_path / "q.onnx",
                       report=tmp_path / "r.json", jobs=1, device="cpu")
    written = json.loads((tmp_path / "r.json").read_text())
    assert QuantConfig.from_dict(written["config"]) == config
    # The text split and the mode are resolved before calibration, so the report says which ran and why
    # (layer 1 and the 4-bit head: two blocks, two stages).
    assert written["calib"] == CALIB.to_dict() | {"split": "windows", "split_reason": "model kind causal-lm (from graph)",
                                                  "sequential": True, "sequential_reason": "auto: the graph cuts into 2 stages"}
    assert written["selection"] == config.layers.to_dict()
    assert written["run"] == {"jobs": 1, "device": "cpu"}


def test_verbose_prints_each_skip_reason_once(tiny_llama_onnx: Path, calib_ids: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    """-v shows log records at INFO and prints the report's skips: each skip appears once."""
    with caplog.at_level(logging.INFO, logger="onnx_gptq"):
        code = cli.main([str(tiny_llama_onnx), "--calib", str(calib_ids), "--num-samples", "4", "--seq-len", "16",
                         "--group-size", "32", "--exclude", r"layers\.1\.", "-v", "-q",
                         "-o", str(tmp_path / "q.onnx")])
    assert code == 0
    lines = capsys.readouterr().out.splitlines() + [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    excluded = [line for line in lines if "excluded by pattern" in line]
    assert len(excluded) == 7, "\n".join(lines)  # layer 1's seven projections, each said once
    assert all(line.startswith("skipped ") for line in excluded)


def test_cli_defaults_are_the_configs_defaults(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args([str(tmp_path / "m.onnx")])
    args.providers = "CPUExecutionProvider"
    quant, calib = cli._configs(args)
    assert quant == QuantConfig()
    assert calib == CalibConfig(providers=("CPUExecutionProvider",))


def test_architecture_page_and_readme_layout_match_the_tree() -> None:
    root = Path(__file__).resolve().parents[1]
    package = root / "onnx_gptq"
    modules = sorted(p.relative_to(package).with_suffix("").as_posix()
                     for p in package.rglob("*.py") if p.name != "__init__.py")
    page = (root / "docs" / "ARCHITECTURE.md").read_text()
    missing = [m for m in modules if f"{m.rsplit('/', 1)[-1]}" not in page]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"
    readme = (root / "README.md").read_text()
    layout = readme[readme.index("Layout ("):].split("\n\n", 1)[0]
    for folder in ("onnx_gptq/", "onnx_gptq/runtime/", "onnx_gptq/tools/", "devtools/", "custom_ops/"):
        assert f"`{folder}`" in layout and (root / folder).is_dir(), folder
    named = set(re.findall(r"`([a-z_]+)`", layout))
    existing = {m.rsplit("/", 1)[-1] for m in modules} | {"calibrate", "runtime", "tools"}
    assert named - existing <= {"kernels", "ort", "cpu", "cuda"}, named - existing
