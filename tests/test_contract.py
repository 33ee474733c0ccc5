"""The packed ops' contract (onnx_gptq.contract) against its users: the C++ op, the
rewriter, the reader, the config's limits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx_gptq import contract, pack, rewrite
from onnx_gptq.config import QuantConfig
from onnx_gptq.errors import ConfigError
from onnx_gptq.qweight import QuantizedWeight
from onnx_gptq.runtime import custom_ops

ORT_DIR = Path(__file__).resolve().parents[1] / "custom_ops" / "ort"


def test_cpp_op_declares_the_same_domain_type_inputs_and_attributes() -> None:
    header = (ORT_DIR / "gptq_op.h").read_text()
    source = (ORT_DIR / "gptq_op.cc").read_text()
    assert re.search(r'kDomain = "([^"]+)"', header).group(1) == contract.GPTQ_DOMAIN
    assert re.search(r'kOpType = "([^"]+)"', header).group(1) == contract.GPTQ_OP_TYPE
    enum = re.search(r"enum GptqInput[^{]*\{(.*?)\};", header, re.S).group(1)
    indices = {name: int(value) for name, value in re.findall(r"kInput(\w+) = (\d+)", enum)}
    assert int(re.search(r"kNumInputs = (\d+)", enum).group(1)) == len(contract.GPTQ_INPUTS)
    # "zero_points" is kInputZeroPoints, "g_idx" kInputGIdx: the enum holds the contract's order.
    camel = {"".join(part.capitalize() for part in name.split("_")): i for i, name in enumerate(contract.GPTQ_INPUTS)}
    assert indices == camel
    names = re.search(r"kNames\[kNumInputs\] = \{([^}]*)\}", source).group(1)
    assert tuple(re.findall(r'"([^"]+)"', names)) == contract.GPTQ_INPUTS
    attributes = re.search(r"attrs\[\] = \{(.*?)\};", source, re.S).group(1)
    assert tuple(re.findall(r'\{"(\w+)"', attributes)) == contract.GPTQ_ATTRIBUTES
    for name in contract.GPTQ_OPTIONAL_ATTRIBUTES:  # read with a default of 0
        assert f'KernelInfoGetAttribute_int64(info, "{name}"' in source
    levels = re.search(r"accuracy_level < (\d+) \|\| out->accuracy_level > (\d+)", source).groups()
    assert (int(levels[0]), int(levels[1])) == (min(contract.GPTQ_ACCURACY_LEVELS), max(contract.GPTQ_ACCURACY_LEVELS))


def _weight(bits: int, group_size: int, k: int = 64, n: int = 8, sym: bool = False) -> QuantizedWeight:
    rng = np.random.default_rng(0)
    groups = -(-k // group_size)
    return QuantizedWeight(codes=rng.integers(0, 2**bits, (n, k), dtype=np.uint8),
                           scales=rng.uniform(0.01, 0.1, (n, groups)).astype(np.float32),
                           zeros=np.full((n, groups), 2 ** (bits - 1), np.uint8), bits=bits,
                           group_size=group_size, sym=sym)


def test_one_node_models_follow_the_contract_input_order() -> None:
    qw = _weight(4, 16)
    model = custom_ops.gptq_matmul_model(pack.pack_custom(qw), bias=np.zeros(8, np.float32))
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == (contract.GPTQ_DOMAIN, contract.GPTQ_OP_TYPE)
    assert list(node.input) == ["A", "B", "scales", "zero_points", "", "bias"]
    assert [n for n in node.input if n] == [n for n in contract.GPTQ_INPUTS if n != "g_idx"]
    assert sorted(a.name for a in node.attribute) == sorted(contract.GPTQ_ATTRIBUTES)
    back = rewrite.read_packed(ir.serde.deserialize_model(model), suffix="")
    np.testing.assert_array_equal(back["B"].codes, qw.codes)


@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, 24), (4, 8), (2, 512), (8, 64), (2, 256)])
def test_config_and_packer_share_the_matmulnbits_limits(bits: int, group_size: int) -> None:
    """An 'ort' config is refused exactly when the packer could not write its weights."""
    problem = contract.matmulnbits_group_problem(bits, group_size)
    qw = _weight(bits, group_size, k=1024)
    assert (pack.can_pack_matmulnbits(qw) is None) == (problem is None)
    if problem is None:
        QuantConfig(bits=bits, group_size=group_size, format="ort")
    else:
        with pytest.raises(ConfigError):
            QuantConfig(bits=bits, group_size=group_size, format="ort")


def test_rewriter_writes_the_contract_domains() -> None:
    assert (rewrite.CUSTOM_DOMAIN, rewrite.CUSTOM_OP_TYPE) == (contract.GPTQ_DOMAIN, contract.GPTQ_OP_TYPE)
    assert rewrite.ORT_DOMAIN == contract.ORT_DOMAIN
    assert rewrite.QDQ_MIN_OPSET == contract.QDQ_MIN_OPSET
