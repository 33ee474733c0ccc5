"""Mixed precision per layer: `--layer-config` rules and `QuantConfig.layer_rules`.

The written file must hold what each rule asked for (bits and group size read
back from the packed nodes), the rest at the global settings; bad rules are
one-line errors with exit code 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_gptq import model_io
from onnx_gptq.config import CalibConfig, QuantConfig
from onnx_gptq.pipeline import quantize_with_report
from onnx_gptq.cli import main
from onnx_gptq.config import LayerRule
from onnx_gptq.errors import ConfigError
from onnx_gptq.rewrite import read_packed


def _grids_by_module(path: Path, report) -> dict[str, set[tuple[int, int]]]:
    """Module kind (q_proj, down_proj, ...) -> {(bits, block_size)} of its packed nodes in the file on disk."""
    model = onnx.load(str(path))
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node
             if n.op_type in ("MatMulNBits", "GptqMatMul")}
    out: dict[str, set[tuple[int, int]]] = {}
    for row in report.layers:
        kind = row.module.rsplit(".", 1)[-1]
        for node in row.nodes:
            packed = next(a for name, a in attrs.items() if name.startswith(node))
            out.setdefault(kind, set()).add((int(packed["bits"]), int(packed["block_size"])))
    return out


def test_rule_parsing_and_merging():
    rule = LayerRule.parse("mlp\\.down_proj=bits:8,group:32")
    assert (rule.pattern, rule.bits, rule.group_size, rule.sym) == ("mlp\\.down_proj", 8, 32, None)
    assert LayerRule.parse("a=b=sym:false").pattern == "a=b"  # the last '=' splits
    config = QuantConfig(bits=4, group_size=128, layer_rules=(
        LayerRule("proj", bits=8), LayerRule("down", group_size=32), {"pattern": "k_proj", "bits": 3}))
    down = config.for_layer(["model.layers.0.mlp.down_proj"])
    assert (down.bits, down.group_size, down.layer_rules) == (8, 32, ())
    assert config.for_layer(["model.layers.0.self_attn.k_proj"]).bits == 3  # the later rule wins
    assert config.for_layer(["model.layers.0.mlp.gate"]).bits == 4
    assert QuantConfig.from_dict(config.to_dict()) == config
    mapped = LayerRule.from_mapping({"down": {"bits": 8}}, "rules.json")
    assert mapped == (LayerRule("down", bits=8),)


@pytest.mark.parametrize("text, message", [
    ("down_proj", "is not REGEX=SETTING:VALUE"),
    ("down_proj=bits", "is not one of bits:VALUE"),
    ("down_proj=bits:eight", "bits:eight"),
    ("down_proj=bits:5", "5 is not supported"),
    ("(=bits:8", "not a valid regular expression"),
])
def test_bad_rules_name_the_rule(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        QuantConfig(layer_rules=(LayerRule.parse(text),))


def test_rule_that_breaks_the_format_names_its_pattern():
    with pytest.raises(ConfigError, match="layer_config 'down'.*3-bit weights cannot be written as com.microsoft"):
        QuantConfig(format="ort", layer_rules=(LayerRule("down", bits=3),))


CALIB = CalibConfig(num_samples=4, seq_len=16)


def _quantize(model: Path, calib_ids: Path, config: QuantConfig, out: Path):
    return quantize_with_report(model, calib_ids, config, calib=CALIB, output=out)[1]


def test_file_holds_each_layers_grid(tiny_llama_onnx, calib_ids, tmp_path):
    out = tmp_path / "mixed.onnx"
    rules = (LayerRule("down_proj", bits=8), LayerRule("q_proj", bits=3, group_size=32))
    report = _quantize(tiny_llama_onnx, calib_ids, QuantConfig(bits=4, group_size=16, layer_rules=rules), out)
    by_kind = _grids_by_module(out, report)
    assert by_kind["down_proj"] == {(8, 16)}
    assert by_kind["q_proj"] == {(3, 32)}
    assert by_kind["up_proj"] == {(4, 16)}
    assert {r.bits for r in report.layers if r.module.endswith("down_proj")} == {8}
    assert "mixed precision: 3-bit g32 x2, 4-bit g16 x" in report.summary()
    # The codes on disk: 8-bit codes use more than 16 levels, 3-bit ones at most 8.
    weights = read_packed(model_io.load(out)[0])
    modules = {r.name: r.module for r in report.layers}
    assert all(int(w.codes.max()) > 15 for name, w in weights.items() if modules[name].endswith("down_proj"))
    assert sum(int(w.codes.max()) <= 7 for name, w in weights.items() if modules[name].endswith("q_proj")) == 2


def test_cli_json_rules_and_errors(tiny_llama_onnx, calib_ids, tmp_path, capsys):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"down_proj": {"bits": 8}}))
    out = tmp_path / "m.onnx"
    report = tmp_path / "report.json"
    code = main([str(tiny_llama_onnx), "--calib", str(calib_ids), "--group-size", "16", "--layer-config",
                 str(rules), "--layer-config", "layers\\.1\\.mlp\\.down_proj=bits:2", "-o", str(out), "-q",
                 "--num-samples", "4", "--seq-len", "16", "--report", str(report)])
    assert code == 0
    rows = {re.sub(r"^(model\.)+", "", r["module"]): r["bits"] for r in json.loads(report.read_text())["layers"]}
    assert rows["lm_head"] == 4  # --head's default, no rule names it
    assert rows["layers.0.mlp.down_proj"] == 8 and rows["layers.1.mlp.down_proj"] == 2
    assert rows["layers.0.mlp.up_proj"] == 4
    packed_bits = sorted(onnx.helper.get_attribute_value(a) for n in onnx.load(str(out)).graph.node
                         for a in n.attribute if a.name == "bits")
    assert packed_bits.count(8) == 1 and packed_bits.count(2) == 1

    for args, message in [
        (["--layer-config", "nothing_like_this=bits:8"], "matched no quantized layer"),
        (["--layer-config", str(tmp_path / "missing.json")], "cannot read"),
        (["--layer-config", "down=sym:maybe"], "sym:maybe"),
    ]:
        bad = tmp_path / "bad.onnx"
        code = main([str(tiny_llama_onnx), "--calib", str(calib_ids), "-o", str(bad), "-q",
                     "--num-samples", "2", "--seq-len", "8", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and not bad.exists(), err
        assert len(err.splitlines()) == 1 and message in err, err
    rules.write_text("[1, 2]")
    assert main([str(tiny_llama_onnx), "--algo", "rtn", "--layer-config", str(rules), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "must map REGEX" in capsys.readouterr().err


def test_eight_bit_layers_lower_the_error(tiny_llama_onnx, calib_ids, tmp_path):
    base = _quantize(tiny_llama_onnx, calib_ids, QuantConfig(bits=3, group_size=16), tmp_path / "a.onnx")
    mixed = _quantize(tiny_llama_onnx, calib_ids,
                      QuantConfig(bits=3, group_size=16, layer_rules=(LayerRule("mlp", bits=8),)), tmp_path / "b.onnx")
    err = lambda rep, key: np.mean([r.error for r in rep.layers if key in r.module])  # noqa: E731
    assert err(mixed, "mlp") < 0.1 * err(base, "mlp")
    assert err(mixed, "self_attn") == pytest.approx(err(base, "self_attn"), rel=0.05)
