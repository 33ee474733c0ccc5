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
