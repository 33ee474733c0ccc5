"""Seeded fuzz of onnx_gptq.GptqMatMul on the CPU execution provider.

Valid nodes: bits {2, 3, 4, 8} x awkward K and N x groups that do not divide
K, blocks longer than K, g_idx, symmetric grids, float16, M in {0, 1, 2, 7,
33}, 3-D inputs, with and without bias, on every CPU instruction set the
machine has. Each output is compared with the float64 reference
``x @ dequant(W).T (+ bias)`` under the rounding bound of
tests.test_custom_ops.assert_within_rounding_bound: per element
|y - ref| <= 4 sqrt(K + 2) * U32 * S per element, S = sum_k |x_k w_k| + |bias|
(a Hoeffding bound on K + 2 independent roundings), and for K >= 64 an RMS
error over the output of at most 0.8 U32 * S, above plain sequential fp32
summation, which a kernel that loses digits systematically fails (float16
outputs: plus their own rounding).

Malformed nodes (wrong shapes and types, out-of-range g_idx, attributes that
disagree with the tensors) run in one child process, so that a crash fails
the case it happened on instead of the test run; each must fail with an
onnxruntime error that names what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_gptq.runtime import custom_ops
from onnx_gptq.pack import pack_custom
from onnx_gptq.qweight import QuantizedWeight
from tests.test_custom_ops import ISAS, assert_within_rounding_bound

SEED = 20261202
BITS = (2, 3, 4, 8)
K_VALUES = (1, 3, 17, 127, 129, 577, 1000)
N_VALUES = (1, 3, 17, 129)
M_VALUES = (0, 1, 2, 7, 33)
CASES_PER_BITS_AND_K = 4


@dataclasses.dataclass(frozen=True)
class Case:
    """One valid GptqMatMul node and input."""

    bits: int
    K: int
    N: int
    block_size: int
    lead_shape: tuple[int, ...]  # A is lead_shape + (K,)
    sym: bool
    g_idx: bool
    n_groups: int
    dtype: str  # "float32" | "float16"
    bias: bool
    seed: int

    @property
    def id(self) -> str:
        return (f"b{self.bits}-K{self.K}-N{self.N}-bs{self.block_size}-A{'x'.join(map(str, self.lead_shape))}"
                f"{'-sym' if self.sym else ''}{f'-gidx{self.n_groups}' if self.g_idx else ''}"
                f"{'-f16' if self.dtype == 'float16' else ''}{'-bias' if self.bias else ''}")


def _block_size(rng: np.random.Generator, k: int) -> int:
    """Per channel, a group that need not divide K, a SIMD-friendly one, or a block longer than K."""
    kind = rng.integers(4)
    if kind == 0:
        return k
    if kind == 1:
        return int(rng.integers(1, k + 1))
    if kind == 2:
        return int(rng.choice([16, 32, 64, 128]))
    return k + int(rng.integers(1, 200))


def _lead_shape(rng: np.random.Generator, m: int) -> tuple[int, ...]:
    """(m,) or a 3-D A whose two leading dimensions multiply to m."""
    if rng.random() < 0.5:
        return (m,)
    if m == 0:
        return (2, 0) if rng.random() < 0.5 else (0, 3)
    divisors = [d for d in range(1, m + 1) if m % d == 0]
    first = int(rng.choice(divisors))
    return (first, m // first)


def generate_cases() -> list[Case]:
    """The fuzz cases: CASES_PER_BITS_AND_K per (bits, K), M cycling through M_VALUES."""
    rng = np.random.default_rng(SEED)
    cases = []
    for bits in BITS:
        for k in K_VALUES:
            for i in range(CASES_PER_BITS_AND_K):
                m = M_VALUES[(len(cases) + i) % len(M_VALUES)]
                block_size = _block_size(rng, k)
                g_idx = bool(rng.random() < 0.3)
                blocks = -(-k // block_size)
                n_groups = int(rng.integers(1, 2 * blocks + 1)) if g_idx else blocks
                cases.append(Case(bits=bits, K=k, N=int(rng.choice(N_VALUES)), block_size=block_size,
                                  lead_shape=_lead_shape(rng, m), sym=bool(rng.random() < 0.4), g_idx=g_idx,
                                  n_groups=n_groups, dtype="float16" if rng.random() < 0.25 else "float32",
                                  bias=bool(rng.random() < 0.5), seed=int(rng.integers(1 << 31))))
    return cases


CASES = generate_cases()


def build(case: Case) -> tuple[QuantizedWeight, np.ndarray, np.ndarray | None]:
    """The random weight, input and bias of a case."""
    rng = np.random.default_rng(case.seed)
    dtype = np.dtype(case.dtype)
    codes = rng.integers(0, 1 << case.bits, size=(case.N, case.K), dtype=np.uint8)
    scales = (rng.random((case.N, case.n_groups)) * 0.05 + 0.005).astype(dtype)
    if case.sym:
        zeros = np.full((case.N, case.n_groups), 1 << (case.bits - 1), dtype=np.uint8)
    else:
        zeros = rng.integers(0, 1 << case.bits, size=(case.N, case.n_groups), dtype=np.uint8)
    g_idx = rng.integers(0, case.n_groups, size=case.K).astype(np.int32) if case.g_idx else None
    qw = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=case.bits, group_size=case.block_size,
                         g_idx=g_idx, sym=case.sym)
    x = rng.standard_normal(case.lead_shape + (case.K,)).astype(dtype)
    bias = rng.standard_normal(case.N).astype(dtype) if case.bias else None
    return qw, x, bias


def test_cases_cover_the_grid() -> None:
    """Every bits, K, N and M value appears, and every feature both on and off."""
    assert {c.bits for c in CASES} == set(BITS) and {c.K for c in CASES} == set(K_VALUES)
    assert {c.N for c in CASES} == set(N_VALUES)
    assert {int(np.prod(c.lead_shape)) for c in CASES} == set(M_VALUES)
    for feature in ("sym", "g_idx", "bias"):
        assert {getattr(c, feature) for c in CASES} == {True, False}, feature
    assert {c.dtype for c in CASES} == {"float32", "float16"}
    assert any(len(c.lead_shape) == 2 for c in CASES)
    assert any(c.block_size > c.K for c in CASES)
    assert any(c.K % c.block_size and c.block_size < c.K for c in CASES)
    assert any(c.g_idx and c.n_groups > -(-c.K // c.block_size) for c in CASES)


@pytest.fixture(scope="module")
def best_isa() -> str:
    """The instruction set the kernel picks with ONNX_GPTQ_CPU_ISA unset."""
    saved = os.environ.pop("ONNX_GPTQ_CPU_ISA", None)
    try:
        return custom_ops.cpu_isa()
    finally:
        if saved is not None:
            os.environ["ONNX_GPTQ_CPU_ISA"] = saved


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("isa", ISAS)
def test_matches_float64_reference(monkeypatch: pytest.MonkeyPatch, best_isa: str, isa: str, case: Case) -> None:
    if ISAS.index(isa) < ISAS.index(best_isa):
        pytest.skip(f"this CPU lacks {isa} (best: {best_isa})")
    # The kernel reads ONNX_GPTQ_CPU_ISA on every run; it can only lower the choice.
    if isa == best_isa:
        monkeypatch.delenv("ONNX_GPTQ_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
    assert custom_ops.cpu_isa() == isa
    qw, x, bias = build(case)
    model = custom_ops.gptq_matmul_model(pack_custom(qw), dtype=x.dtype, bias=bias,
                                         input_shape=[f"d{i}" for i in range(x.ndim - 1)] + [case.K])
    y = custom_ops.make_session(model).run(None, {"A": x})[0]
    assert y.dtype == x.dtype
    assert_within_rounding_bound(qw, x, y, bias)


INT8_ISAS = ("best", "avx2", "scalar")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("isa", INT8_ISAS)
def test_int8_matches_float64_reference(monkeypatch: pytest.MonkeyPatch, isa: str, case: Case) -> None:
    """accuracy_level 4 on the same cases: within the bound of rounding A to int8 per
    block (tests.test_int8_cpu.quantization_bound), plus float16 output rounding."""
    from tests.test_int8_cpu import quantization_bound
    from tests.test_custom_ops import reference

    if isa == "best":
        monkeypatch.delenv("ONNX_GPTQ_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONNX_GPTQ_CPU_ISA", isa)
        assert custom_ops.cpu_int8_isa() in (isa, "scalar")
    qw, x, bias = build(case)
    model = custom_ops.gptq_matmul_model(pack_custom(qw), dtype=x.dtype, bias=bias, accuracy_level=4,
                                         input_shape=[f"d{i}" for i in range(x.ndim - 1)] + [case.K])
    y = custom_ops.make_session(model).run(None, {"A": x})[0]
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (case.N,)
    if y.size == 0:
        return
    x2, y2 = x.reshape(-1, case.K), y.reshape(-1, case.N).astype(np.float64)
    ref = reference(qw, x2, bias)
    bound = quantization_bound(qw, x2) + (2.0 ** -23) * (np.abs(bias.astype(np.float64)) if bias is not None else 0)
    if y.dtype == np.float16:
        bound = bound + 2.0 ** -11 * np.abs(ref) + 2.0 ** -24
    err = np.abs(y2 - ref)
    assert float((err / bound).max()) <= 1.0, f"error {float((err / bound).max()):.3g} x the int8 bound"


# --------------------------------------------------------------------------- malformed nodes


def _valid(bits: int = 4, k: int = 96, n: int = 8, group: int = 32, *, g_idx: bool = False,
           sym: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(7)
    groups = -(-k // group)
    qw = QuantizedWeight(codes=rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8),
                         scales=(rng.random((n, groups)) * 0.05 + 0.005).astype(np.float32),
                         zeros=rng.integers(0, 1 << bits, size=(n, groups), dtype=np.uint8), bits=bits,
                         group_size=group, g_idx=(np.arange(k) // group).astype(np.int32) if g_idx else None,
                         sym=sym)
    model = custom_ops.gptq_matmul_model(pack_custom(qw), bias=np.zeros(n, np.float32), input_shape=["m", "k"])
    return model, rng.standard_normal((3, k)).astype(np.float32)


def _replace(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))
    return model


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _set_attr(model: onnx.ModelProto, name: str, value: int | None) -> onnx.ModelProto:
    attrs = [a for a in model.graph.node[0].attribute if a.name != name]
    if value is not None:
        attrs.append(helper.make_attribute(name, value))
    del model.graph.node[0].attribute[:]
    model.graph.node[0].attribute.extend(attrs)
    return model


def _malformed() -> dict[str, tuple[onnx.ModelProto, np.ndarray, str]]:
    """name -> (model, input A, a fragment the error must contain)."""
    cases: dict[str, tuple[onnx.ModelProto, np.ndarray, str]] = {}

    def add(name: str, fragment: str, edit, **valid) -> None:
        model, x = _valid(**valid)
        cases[name] = (edit(model), x, fragment)

    add("B_too_few_blocks", "input 'B'", lambda m: _replace(m, "B", _initializer(m, "B")[:, :2]))
    add("B_int8", "expected type uint8", lambda m: _replace(m, "B", _initializer(m, "B").astype(np.int8)))
    add("B_rank2", "input 'B'", lambda m: _replace(m, "B", _initializer(m, "B").reshape(8, -1)))
    add("scales_short", "input 'scales'", lambda m: _replace(m, "scales", _initializer(m, "scales")[:, :1]))
    add("scales_float16", "input 'scales'",
        lambda m: _replace(m, "scales", _initializer(m, "scales").astype(np.float16)))
    add("scales_transposed", "input 'scales'", lambda m: _replace(m, "scales", _initializer(m, "scales").T.copy()))
    add("zero_points_short", "input 'zero_points'",
        lambda m: _replace(m, "zero_points", _initializer(m, "zero_points")[:4]))
    add("zero_points_float", "input 'zero_points'",
        lambda m: _replace(m, "zero_points", _initializer(m, "zero_points").astype(np.float32)))
    add("g_idx_past_n_groups", "entry 5 is 3",
        lambda m: _replace(m, "g_idx", np.where(np.arange(96) == 5, 3, _initializer(m, "g_idx")).astype(np.int32)),
        g_idx=True)
    add("g_idx_negative", "entry 0 is -1",
        lambda m: _replace(m, "g_idx", np.concatenate([[-1], _initializer(m, "g_idx")[1:]]).astype(np.int32)),
        g_idx=True)
    add("g_idx_huge", "entry 95 is 2147483647",
        lambda m: _replace(m, "g_idx", np.concatenate([_initializer(m, "g_idx")[:95], [2**31 - 1]]).astype(np.int32)),
        g_idx=True)
    add("g_idx_short", "input 'g_idx'", lambda m: _replace(m, "g_idx", _initializer(m, "g_idx")[:90]), g_idx=True)
    add("g_idx_int64", "input 'g_idx'",
        lambda m: _replace(m, "g_idx", _initializer(m, "g_idx").astype(np.int64)), g_idx=True)
    add("g_idx_no_groups", "input 'scales'",
        lambda m: _replace(_replace(m, "scales", np.zeros((8, 0), np.float32)), "zero_points",
                           np.zeros((8, 0), np.uint8)), g_idx=True)
    add("bias_short", "input 'bias'", lambda m: _replace(m, "bias", np.zeros(7, np.float32)))
    add("K_disagrees_with_A", "input 'A'", lambda m: _set_attr(m, "K", 64))
    add("N_disagrees_with_B", "input 'B'", lambda m: _set_attr(m, "N", 9))
    add("bits_disagree_with_B", "input 'B'", lambda m: _set_attr(m, "bits", 2))
    add("block_size_disagrees_with_B", "input 'B'", lambda m: _set_attr(m, "block_size", 48))
    add("bits_5", "bits=5 must be 2, 3, 4 or 8", lambda m: _set_attr(m, "bits", 5))
    add("block_size_0", "block_size=0 must be >= 1", lambda m: _set_attr(m, "block_size", 0))
    add("block_size_2_to_40", "are too large", lambda m: _set_attr(m, "block_size", 1 << 40))
    add("K_negative", "K=-96 must be >= 1", lambda m: _set_attr(m, "K", -96))
    add("N_missing", "missing int attribute 'N'", lambda m: _set_attr(m, "N", None))
    model, x = _valid()
    cases["A_wrong_K"] = (model, x[:, :95].copy(), "input 'A'")
    return cases


# The child loads each case, runs it, and reports one JSON line; "start" lines
# say which case a crash happened in.
_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from onnx_gptq.runtime import custom_ops
    for name in sys.argv[2:]:
        print(json.dumps({"start": name}), flush=True)
        model = open(f"{sys.argv[1]}/{name}.onnx", "rb").read()
        x = np.load(f"{sys.argv[1]}/{name}.npy")
        try:
            custom_ops.make_session(model).run(None, {"A": x})
            print(json.dumps({"case": name, "error": None}), flush=True)
        except Exception as exc:
            print(json.dumps({"case": name, "module": type(exc).__module__, "error": str(exc)}), flush=True)
""")

MALFORMED = _malformed()


@pytest.fixture(scope="module")
def malformed_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], str | None, str]:
    """Runs every malformed case in one child: (results by name, case it crashed in or None, stderr tail)."""
    directory = tmp_path_factory.mktemp("malformed")
    for name, (model, x, _) in MALFORMED.items():
        (directory / f"{name}.onnx").write_bytes(model.SerializeToString())
        np.save(directory / f"{name}.npy", x)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(directory), *MALFORMED], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    results, started = {}, None
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        else:
            results[record["case"]] = record
    crashed = started if proc.returncode != 0 and started not in results else None
    return results, crashed, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_node_fails_cleanly(malformed_results: tuple[dict[str, dict], str | None, str], name: str) -> None:
    results, crashed, stderr = malformed_results
    assert crashed != name, f"the child process died running {name}: {stderr}"
    assert name in results, f"not reached (the child died in {crashed}): {stderr}"
    record = results[name]
    assert record["error"] is not None, f"{name} ran without an error"
    assert record["module"].startswith("onnxruntime"), record
    assert MALFORMED[name][2] in record["error"], record["error"]
    assert "GptqMatMul node 'gptq_matmul'" in record["error"], record["error"]
