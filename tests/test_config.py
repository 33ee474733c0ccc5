"""Configs: which layers (LayerFilter) apart from how (QuantConfig), both validated on construction."""

from __future__ import annotations

import json

import pytest

from onnx_gptq.config import CalibConfig, LayerFilter, QuantConfig
from onnx_gptq.errors import ConfigError


def test_quant_config_shorthand_is_a_layer_filter() -> None:
    config = QuantConfig(bits=3, include=[r"mlp"], exclude=(r"layers\.0\.",), quantize_head=True)
    assert config.layers == LayerFilter(include=("mlp",), exclude=(r"layers\.0\.",), quantize_head=True)
    assert QuantConfig().layers == LayerFilter(quantize_head=True)  # --head 4 by default
    assert QuantConfig(head_bits=None).layers == LayerFilter()
    assert LayerFilter(include=["a"]).to_dict() == {"include": ["a"], "exclude": [], "quantize_head": False}


@pytest.mark.parametrize("option", ["include", "exclude"])
@pytest.mark.parametrize("pattern", ["[", "(?P<"])
def test_bad_patterns_are_refused_on_construction(option: str, pattern: str) -> None:
    for make in (LayerFilter, QuantConfig):
        with pytest.raises(ConfigError, match=f"^{option}: .* is not a valid regular expression"):
            make(**{option: (pattern,)})


def test_calib_config_round_trips_through_json() -> None:
    calib = CalibConfig(num_samples=4, providers=("CPUExecutionProvider", ("CUDAExecutionProvider", {"x": "1"})),
                        memory_budget=1 << 30)
    data = json.loads(json.dumps(calib.to_dict()))
    assert data["providers"] == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert CalibConfig(**{**data, "providers": data["providers"][:1]}).num_samples == 4
    assert QuantConfig.from_dict(QuantConfig(bits=2, exclude=("x",)).to_dict()) == QuantConfig(bits=2, exclude=("x",))


@pytest.mark.parametrize(("settings", "head", "table"), [
    ({}, 4, 4),
    ({"bits": 8}, 8, 8),
    ({"bits": 3}, 4, 4),  # a 4-bit head and table, stored once
    ({"bits": 2, "quantize_head": True}, 2, 4),  # quantize_head: the head at --bits; the table at least 4
    ({"head_bits": None}, None, None),  # a float head keeps the table float too
    ({"format": "qdq"}, 4, None),  # standard operators only: no GatherBlockQuantized
    ({"group_size": 48, "format": "custom"}, 4, None),  # no GatherBlockQuantized block of 48
    ({"group_size": -1}, 4, 4),
    ({"head_bits": 8, "embedding_bits": None}, 8, None),
])
def test_head_and_embedding_auto_defaults(settings: dict, head: int | None, table: int | None) -> None:
    config = QuantConfig(**settings)
    assert (config.head_bits, config.embedding_bits) == (head, table)
    assert QuantConfig.from_dict(config.to_dict()) == config  # the report holds the resolved widths


def test_head_and_embedding_auto_from_the_cli_and_bad_words() -> None:
    from onnx_gptq.cli import build_parser

    args = build_parser().parse_args(["m.onnx", "--head", "auto", "--embedding", "float"])
    assert (args.head, args.embedding) == ("auto", None)
    with pytest.raises(ConfigError, match="head_bits: 'four' is not a bit width"):
        QuantConfig(head_bits="four")
