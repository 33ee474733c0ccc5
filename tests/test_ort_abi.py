"""The library's C interfaces against what they claim: the hand-written onnxruntime ABI
(custom_ops/ort/ort_abi.h) against the installed onnxruntime, and the kernels' status
codes (custom_ops/kernels/gptq_status.h) against the built library and its Python readers."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnx_gptq.runtime import custom_ops

ROOT = Path(__file__).resolve().parents[1]
ABI_HEADER = ROOT / "custom_ops" / "ort" / "ort_abi.h"
STATUS_HEADER = ROOT / "custom_ops" / "kernels" / "gptq_status.h"

# What the probe's model (see _run_probe) makes each slot observe; every other slot
# judges its own result and reports "ok".
PROBE_EXPECTED = {
    "GetApi": "API 17",  # ONNX_GPTQ_ORT_API_SHAPE_INFER: every onnxruntime pyproject accepts has it
    "GetVersionString": ort.__version__,
    "KernelInfoGetAttribute_float": "1.500000",
    "KernelInfoGetAttribute_int64": "7",
    "KernelInfoGetAttribute_string": "probe text",
    "KernelInfo_GetInputCount": "1",
    "KernelInfo_GetOutputCount": "1",
    "KernelInfo_GetInputName": "probe_x",
    "KernelInfo_GetOutputName": "probe_y",
    "KernelInfo_GetNodeName": "probe_node",
    "Logger_GetLoggingSeverityLevel": "3",  # the session's log_severity_level (ERROR), not the default 2
    "KernelContext_GetInputCount": "1",
    "KernelContext_GetOutputCount": "1",
    "GetTensorTypeAndShape": "[2, 3]",
    "KernelContext_GetGPUComputeStream": "null",  # the CPU provider has none
    "ShapeInferContext_GetInputCount": "1",
    "ShapeInferContext_GetInputTypeShape": "[-1, 3] 'batch' ''",
    "ReadOpAttr": "7 (8 bytes)",
}


def _named_slots() -> dict[str, int]:
    """Every OrtApi slot ort_abi.h names, with the index its comment gives."""
    body = re.search(r"struct OrtApi \{(.*?)\n\};", ABI_HEADER.read_text(), re.S).group(1)
    found = re.findall(r"/\*\s*(\d+) \*/ (?:ORT_ABI_FN\((\w+)|[^;]*?\(\*(\w+)\))", body)
    return {fn or ptr: int(index) for index, fn, ptr in found}


def _probe_child() -> None:
    """Runs in a child process: arms the probe, runs its model, prints what it saw as JSON."""
    from onnx import TensorProto, helper

    lib = ctypes.CDLL(str(custom_ops.library_path()))  # the handle onnxruntime's dlopen will share
    lib.onnx_gptq_abi_probe_report.restype = ctypes.c_size_t
    lib.onnx_gptq_abi_probe_arm(1)
    node = helper.make_node("AbiProbe", ["probe_x"], ["probe_y"], name="probe_node",
                            domain="onnx_gptq.abi_probe", f=1.5, i=7, s="probe text")
    graph = helper.make_graph([node], "abi_probe",
                              [helper.make_tensor_value_info("probe_x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("probe_y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("onnx_gptq.abi_probe", 1)])
    model.ir_version = 8  # loadable by the oldest onnxruntime pyproject accepts
    options = ort.SessionOptions()
    options.log_severity_level = 3
    custom_ops.register(options)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = session.run(None, {"probe_x": x})[0]
    size = lib.onnx_gptq_abi_probe_report(None, 0)
    buffer = ctypes.create_string_buffer(size + 1)
    lib.onnx_gptq_abi_probe_report(buffer, size + 1)
    report = dict(line.split("\t", 1) for line in buffer.value.decode().splitlines())
    print(json.dumps({"report": report, "y": y.tolist(), "y_shape": session.get_outputs()[0].shape}))


def _run_probe() -> dict:
    # A child process: a slot counted wrong may crash, which must fail this test, not end the run.
    code = "from tests.test_ort_abi import _probe_child; _probe_child()"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, f"the ABI probe exited with {child.returncode}:\n{child.stderr[-3000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_every_declared_slot_behaves_as_named_in_the_installed_onnxruntime() -> None:
    slots = _named_slots()
    # The comments' indices are the static_asserts' (a miscounted comment fails the build).
    assert len(slots) == len(set(slots.values())) > 40
    result = _run_probe()
    report = result["report"]
    assert set(report) == set(slots) | {"GetApi", "GetVersionString"}, "the probe must call every named slot"
    wrong = {slot: seen for slot, seen in report.items() if seen != PROBE_EXPECTED.get(slot, "ok")}
    assert not wrong, f"onnxruntime {ort.__version__} disagrees with ort_abi.h: {wrong}"
    # The op ran on the data: attributes, input, output and the thread pool did their part.
    np.testing.assert_array_equal(np.array(result["y"], np.float32),
                                  np.arange(6, dtype=np.float32).reshape(2, 3) * 1.5 + 7)
    assert result["y_shape"] == ["probe_rows", 3]  # the shape inference function's output was taken


def test_the_probe_stays_off_unless_armed() -> None:
    """Without onnx_gptq_abi_probe_arm, a registered library adds no probe domain."""
    from onnx import TensorProto, helper

    node = helper.make_node("AbiProbe", ["x"], ["y"], domain="onnx_gptq.abi_probe", f=1.0, i=0, s="")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("onnx_gptq.abi_probe", 1)])
    model.ir_version = 8
    options = custom_ops.register(ort.SessionOptions())
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph) here
        assert "AbiProbe" in str(exc) or "abi_probe" in str(exc)
    else:
        pytest.fail("the probe op was registered without being armed")


def _header_status_list() -> list[tuple[str, int, str]]:
    text = STATUS_HEADER.read_text()
    return [(name, int(value), desc) for name, value, desc in re.findall(r'X\((\w+), (\d+), "([^"]*)"\)', text)]


def test_status_codes_come_from_the_one_header() -> None:
    listed = _header_status_list()
    assert [value for _, value, _ in listed] == list(range(len(listed)))  # contiguous, as the reader assumes
    assert custom_ops.status_codes() == {name: value for name, value, _ in listed}
    assert [custom_ops.status_string(value) for _, value, _ in listed] == [desc for _, _, desc in listed]
    assert custom_ops.status_string(len(listed)) == "unknown onnx_gptq status"
    assert custom_ops.status_codes()["ERR_G_IDX"] == 7  # CUDA's numbers kept their values


def test_no_kernel_defines_status_numbers_of_its_own() -> None:
    """The CPU kernel's typed Status names the shared codes; no other numbered status list exists."""
    cpu = (ROOT / "custom_ops" / "kernels" / "cpu" / "gptq_matmul_cpu.h").read_text()
    enum = re.search(r"enum class Status : int \{(.*?)\};", cpu, re.S).group(1)
    values = re.findall(r"k\w+ = (\w+)", enum)
    assert values and all(v.startswith("ONNX_GPTQ_") for v in values), values
    names = {name for name, _, _ in _header_status_list()}
    assert {v.removeprefix("ONNX_GPTQ_") for v in values} <= names
    for path in (ROOT / "custom_ops").rglob("*"):
        if path.suffix in {".h", ".cc", ".cu", ".cuh"} and path != STATUS_HEADER:
            assert "ONNX_GPTQ_CUDA_ERR" not in path.read_text(), f"{path} uses the old CUDA status names"
    for path in [ROOT / "devtools" / "cuda_kernels.py", ROOT / "tests" / "test_cuda_kernels.py"]:
        assert not re.search(r"STATUS_\w+ = \d", path.read_text()), f"{path} copies a status number"


def test_every_provider_takes_the_op_description_and_checks_from_gptq_op() -> None:
    """The op's input names, attributes and checks are written once (gptq_op.cc): the CUDA glue,
    which cannot run here, must describe and check its op with the CPU op's functions."""
    ort_dir = ROOT / "custom_ops" / "ort"
    contract_literals = re.compile(r'"(zero_points|g_idx|scales|block_size|bits)"')
    for path in sorted(ort_dir.glob("*.cc")):
        if path.name != "gptq_op.cc":
            assert not contract_literals.search(path.read_text()), f"{path.name} spells out the op's contract"
    for path in (ort_dir / "cpu_op.cc", ort_dir / "cuda_gptq_matmul.cc"):
        source = path.read_text()
        for shared in ("InitGptqOpDef(", "ReadGptqAttrs(", "PrepareGptqCall(", "KernelStatusError("):
            assert shared in source, f"{path.name} does not call {shared[:-1]}"
        assert "enum" not in source, f"{path.name} declares an enum of its own"


def test_a_library_older_than_the_status_codes_is_named_with_a_rebuild_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(custom_ops, "_load", lambda path: types.SimpleNamespace())  # no status symbols
    with pytest.raises(custom_ops.CustomOpsLibraryError, match=r"predates the kernels' shared status codes.*pip inst"):
        custom_ops.status_codes()
