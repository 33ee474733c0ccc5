"""GPTQ solver: against a column-by-column numpy reference, against RTN, and packed bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from onnx_gptq import error_traces, grid, pack
from onnx_gptq import solve as solve_mod
from onnx_gptq.config import QuantConfig
from onnx_gptq.errors import CalibrationError, ModelError
from onnx_gptq.error_traces import relative_error
from onnx_gptq.solve import solve


# --------------------------------------------------------------------------- fixtures


def correlated_problem(n: int, k: int, seed: int = 0, rows: int = 512,
                       dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """W [n, k] and H = 2 X^T X / rows with X = Z @ A (a random mixing, so H is far from diagonal)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    X = rng.standard_normal((rows, k)) @ A
    X *= rng.uniform(0.2, 3.0, size=k)  # uneven column scales give act-order something to do
    H = 2.0 * X.T @ X / rows
    W = (rng.standard_normal((n, k)) * 0.05).astype(dtype)
    return W, H


def ref_grid(x: np.ndarray, bits: int, sym: bool, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Grid of each row of x [N, C] straight from the definitions (float32 scales)."""
    maxq = 2 ** bits - 1
    x = x.astype(np.float32)
    if sym:
        m = x[np.arange(x.shape[0]), np.abs(x).argmax(axis=1)]
        m = np.where(m == 0, np.float32(1), m)
        scale = (m / np.float32(-(2 ** (bits - 1)))).astype(scale_dtype).astype(np.float32)
        return scale, np.full_like(scale, 2 ** (bits - 1))
    xmin = np.minimum(x.min(axis=1), 0)
    xmax = np.maximum(x.max(axis=1), 0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(both0, -1, xmin), np.where(both0, 1, xmax)
    scale = ((xmax - xmin) / np.float32(maxq)).astype(scale_dtype).astype(np.float32)
    zero = np.clip(np.round(-xmin / scale), 0, maxq)
    return scale, zero


def ref_gptq(W: np.ndarray, H: np.ndarray, cfg: QuantConfig,
             scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The paper's GPTQ, column by column: no lazy batches, explicit inverse and Cholesky.

    Returns:
        codes uint8 [N, K] and the dequantized Q float64 [N, K], original column order.
    """
    n, k = W.shape
    gs = k if cfg.group_size == -1 else cfg.group_size
    maxq = 2 ** cfg.bits - 1
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = None
    if cfg.act_order and cfg.static_groups:
        static = [ref_grid(W[:, g0:g0 + gs], cfg.bits, cfg.sym, scale_dtype) for g0 in range(0, k, gs)]
    perm = np.argsort(-np.diag(H), kind="stable") if cfg.act_order else np.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += cfg.damp * np.mean(np.diag(H)) * np.eye(k)
    Hinv = np.linalg.inv(H)
    U = np.linalg.cholesky(Hinv).T  # upper, Hinv = U^T U
    Q = np.zeros_like(W)
    C = np.zeros(W.shape, dtype=np.uint8)
    for j in range(k):
        if static is not None:
            scale, zero = static[perm[j] // gs]
        elif j % gs == 0:
            scale, zero = ref_grid(W[:, j:j + gs], cfg.bits, cfg.sym, scale_dtype)
        w = W[:, j].astype(np.float32)
        codes = np.clip(np.round(w / scale) + zero, 0, maxq)
        Q[:, j] = (codes - zero) * scale
        C[:, j] = codes
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
    out, out_codes = np.empty_like(Q), np.empty_like(C)
    out[:, perm], out_codes[:, perm] = Q, C
    return out_codes, out


def ref_rtn(W: np.ndarray, gs: int, bits: int, sym: bool, scale_dtype=np.float32) -> np.ndarray:
    """Round-to-nearest codes over contiguous groups, in numpy. uint8 [N, K]"""
    n, k = W.shape
    codes = np.empty((n, k), dtype=np.uint8)
    for g0 in range(0, k, gs):
        scale, zero = ref_grid(W[:, g0:g0 + gs], bits, sym, scale_dtype)
        codes[:, g0:g0 + gs] = np.clip(np.round(W[:, g0:g0 + gs] / scale[:, None]) + zero[:, None],
                                       0, 2 ** bits - 1)
    return codes


# --------------------------------------------------------------------------- (1) vs reference


REFERENCE_CASES = [
    QuantConfig(bits=4, group_size=32, blocksize=128, act_order=False),
    # groups straddle blocks; ragged last group
    QuantConfig(bits=3, group_size=48, blocksize=32, act_order=False, embedding_bits=None),
    QuantConfig(bits=4, group_size=-1, blocksize=16, act_order=False),
    QuantConfig(bits=4, group_size=-1, sym=True, act_order=False),
    QuantConfig(bits=2, group_size=40, sym=True, blocksize=24, act_order=False, embedding_bits=None),
    QuantConfig(bits=4, group_size=32, act_order=True, static_groups=True),
    QuantConfig(bits=3, group_size=-1, act_order=True),
    QuantConfig(bits=8, group_size=64, blocksize=20, act_order=False),
]


@pytest.mark.parametrize("cfg", REFERENCE_CASES, ids=lambda c: f"b{c.bits}g{c.group_size}"
                         f"{'s' if c.sym else 'a'}{'act' if c.act_order else ''}bs{c.blocksize}")
def test_matches_column_by_column_reference(cfg: QuantConfig) -> None:
    W, H = correlated_problem(48, 200, seed=cfg.bits + cfg.group_size)
    res = solve(W, H, cfg, device="cpu")
    Q = res.qweight.dequantize()
    codes_ref, Q_ref = ref_gptq(W, H, cfg)
    same = np.mean(res.qweight.codes == codes_ref)
    assert same > 0.995, f"only {same:.4f} of the codes agree with the reference"
    err_ref = relative_error(W, Q_ref, H)
    assert res.error == pytest.approx(err_ref, rel=2e-4 if same < 1 else 1e-5)
    assert res.error == pytest.approx(relative_error(W, Q, H), rel=1e-9)
    assert res.damp == cfg.damp


def test_dynamic_act_order_matches_reference() -> None:
    """Dynamic groups: the reference's groups are runs of group_size in solve order."""
    cfg = QuantConfig(bits=4, group_size=32, act_order=True, static_groups=False, format="custom")
    W, H = correlated_problem(40, 150, seed=5)
    res = solve(W, H, cfg, device="cpu")
    k = W.shape[1]
    gs = cfg.group_size
    # Reference: permute, then plain contiguous groups; un-permute.
    perm = np.argsort(-np.diag(H), kind="stable")
    codes_perm, Q_perm = ref_gptq(W[:, perm], H[perm][:, perm], QuantConfig(bits=4, group_size=gs, act_order=False))
    Q_ref = np.empty_like(Q_perm)
    Q_ref[:, perm] = Q_perm
    assert np.mean(res.qweight.codes[:, perm] == codes_perm) > 0.995
    assert res.error == pytest.approx(relative_error(W, Q_ref, H), rel=2e-4)
    g_idx = res.qweight.g_idx
    assert g_idx is not None and g_idx.dtype == np.int32
    np.testing.assert_array_equal(g_idx[perm], np.arange(k) // gs)


# --------------------------------------------------------------------------- (2) better than RTN


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("order", ["none", "static", "dynamic"])
def test_gptq_beats_rtn(bits: int, group_size: int, order: str) -> None:
    cfg = QuantConfig(bits=bits, group_size=group_size, act_order=order != "none",
                      static_groups=order != "dynamic", format="custom")
    W, H = correlated_problem(64, 128, seed=bits)
    res = solve(W, H, cfg, device="cpu")
    rtn = solve(W, H, QuantConfig(bits=bits, group_size=group_size, algo="rtn"), device="cpu")
    assert res.rtn_error == pytest.approx(rtn.error, rel=1e-12)
    assert res.error < 0.9 * res.rtn_error, (res.error, res.rtn_error)


def test_mse_clip_search_lowers_rtn_error() -> None:
    W, H = correlated_problem(64, 128, seed=3)
    W[:, 5] *= 8  # outliers make clipping worthwhile
    plain = solve(W, H, QuantConfig(bits=3, group_size=32, algo="rtn"), device="cpu")
    mse = solve(W, H, QuantConfig(bits=3, group_size=32, algo="rtn", mse=True), device="cpu")
    assert mse.error < plain.error
    gptq_mse = solve(W, H, QuantConfig(bits=3, group_size=32, mse=True), device="cpu")
    assert gptq_mse.error < 0.8 * mse.error


def test_signed_max_symmetric_grid_beats_reference_grid() -> None:
    """The grid module's symmetric choice vs the reference's 2*absmax/maxq, per group of 128."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_t(4, size=(512, 128)), dtype=torch.float32)
    for bits in (2, 3, 4, 8):
        maxq, half = 2 ** bits - 1, 2 ** (bits - 1)
        scale, zero = grid.find_params(x, bits, sym=True)
        ours = (grid.dequantize(grid.quantize(x, scale[:, None], zero[:, None], maxq),
                                scale[:, None], zero[:, None]) - x).pow(2).mean()
        ref_scale = 2 * x.abs().amax(dim=1, keepdim=True) / maxq
        ref_q = (torch.clamp(torch.round(x / ref_scale) + half, 0, maxq) - half) * ref_scale
        assert float(ours) < float((ref_q - x).pow(2).mean())


# --------------------------------------------------------------------------- (3) grid, codes, exactness


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_and_zeros_in_range(bits: int, sym: bool) -> None:
    W, H = correlated_problem(32, 100, seed=bits)
    qw = solve(W, H, QuantConfig(bits=bits, group_size=32, sym=sym), device="cpu").qweight
    assert qw.codes.dtype == np.uint8 and qw.zeros.dtype == np.uint8
    assert qw.codes.shape == (32, 100) and qw.scales.shape == (32, 4) == qw.zeros.shape
    assert qw.codes.max() < 2 ** bits and qw.zeros.max() < 2 ** bits
    assert qw.group_size == 32 and qw.bits == bits and qw.sym == sym and qw.g_idx is None
    if sym:
        assert (qw.zeros == 2 ** (bits - 1)).all()
    assert np.isfinite(qw.scales).all() and (qw.scales != 0).all()


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_numpy_rounding(sym: bool) -> None:
    W, _ = correlated_problem(24, 90, seed=1)
    res = solve(W, None, QuantConfig(bits=4, group_size=32, sym=sym, algo="rtn"), device="cpu")
    np.testing.assert_array_equal(res.qweight.codes, ref_rtn(W, 32, 4, sym))
    Q = res.qweight.dequantize()
    W64, dW = W.astype(np.float64), W.astype(np.float64) - Q
    assert res.error == pytest.approx(float((dW ** 2).sum() / (W64 ** 2).sum()), rel=1e-9)
    assert res.error == res.rtn_error and res.damp == 0.0


def test_solver_feedback_uses_exactly_the_dequantized_q() -> None:
    """The Q inside the column loop is bit for bit QuantizedWeight.dequantize()."""
    W, H = correlated_problem(16, 64, seed=2)
    g = solve_mod._Grid(bits=3, group_size=16, sym=False, mse=False, scale_dtype=torch.float16)
    U, _, _ = solve_mod._factor(torch.tensor(H), 0.01, "w")
    col_group = (torch.arange(64) // 16).tolist()
    codes, scale, zero, _ = solve_mod._gptq(torch.tensor(W), U.float(), g, blocksize=24,
                                            col_group=col_group, static=None, weight=None)
    inner = grid.dequantize(codes, scale[:, col_group], zero[:, col_group]).numpy()
    qw = solve_mod._to_qweight(codes, scale, zero, g, np.float16)
    assert np.array_equal(inner, qw.dequantize())


@pytest.mark.parametrize("act_order,damp", [(False, 0.01), (True, 0.01), (False, 0.9)])
def test_error_without_extra_product_matches_exact(monkeypatch: pytest.MonkeyPatch,
                                                   act_order: bool, damp: float) -> None:
    """Large weights: the ||Err||^2 identity and the triangular-factor traces are exact."""
    W, H = correlated_problem(64, 160, seed=4)
    H[7, :] = H[:, 7] = 0  # a dead input
    cfg = QuantConfig(bits=3, group_size=32, act_order=act_order, damp=damp)
    exact = solve(W, H, cfg, device="cpu")
    monkeypatch.setattr(error_traces, "FLOAT64_TRACE_LIMIT", 0)
    fast = solve(W, H, cfg, device="cpu")
    np.testing.assert_array_equal(fast.qweight.codes, exact.qweight.codes)
    assert fast.error == pytest.approx(exact.error, rel=1e-4)
    assert fast.rtn_error == pytest.approx(exact.rtn_error, rel=1e-4)


# --------------------------------------------------------------------------- (4) fp16 scales


@pytest.mark.parametrize("algo", ["gptq", "rtn"])
def test_fp16_scales_are_used_before_quantizing(algo: str) -> None:
    W, H = correlated_problem(24, 96, seed=6)
    W *= 1e-3  # small weights: float32 scales would not survive fp16 unchanged
    res = solve(W, H, QuantConfig(bits=4, group_size=32, algo=algo, act_order=False), scale_dtype=np.float16,
                device="cpu")
    qw = res.qweight
    assert qw.scales.dtype == np.float16 and np.isfinite(qw.scales).all() and (qw.scales > 0).all()
    if algo == "rtn":
        np.testing.assert_array_equal(qw.codes, ref_rtn(W, 32, 4, False, scale_dtype=np.float16))
    else:
        codes_ref, _ = ref_gptq(W, H, QuantConfig(bits=4, group_size=32, act_order=False), scale_dtype=np.float16)
        assert np.mean(qw.codes == codes_ref) > 0.995
    assert res.error == pytest.approx(relative_error(W, qw.dequantize(), H), rel=1e-9)


# --------------------------------------------------------------------------- (5) damping, dead inputs


def test_indefinite_hessian_raises_damp_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    W, H = correlated_problem(16, 64, seed=7)
    H = H - 0.05 * np.mean(np.diag(H)) * np.eye(64) - np.min(np.linalg.eigvalsh(H)) * np.eye(64)
    assert np.min(np.linalg.eigvalsh(H + 0.01 * np.mean(np.diag(H)) * np.eye(64))) < 0
    with caplog.at_level(logging.WARNING, logger="onnx_gptq.solve"):
        res = solve(W, H, QuantConfig(bits=4, group_size=32), device="cpu", name="layer.7.q_proj")
    assert res.damp > 0.01
    assert any("layer.7.q_proj" in r.message and "damp" in r.message for r in caplog.records)
    assert np.isfinite(res.qweight.dequantize()).all()


def test_singular_hessian_needs_no_raise(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(8)
    X = rng.standard_normal((20, 64))  # rank 20 < 64
    H = 2 * X.T @ X / 20
    W = rng.standard_normal((16, 64)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="onnx_gptq.solve"):
        res = solve(W, H, QuantConfig(bits=4, group_size=32), device="cpu")
    assert res.damp == 0.01 and not caplog.records
    assert res.error < res.rtn_error


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs(act_order: bool) -> None:
    W, H = correlated_problem(16, 64, seed=9)
    dead = [3, 17, 40]
    H[dead, :] = 0
    H[:, dead] = 0
    cfg = QuantConfig(bits=4, group_size=16, act_order=act_order)
    res = solve(W, H, cfg, device="cpu")
    Q = res.qweight.dequantize()
    assert (Q[:, dead] == 0).all()
    assert res.error < res.rtn_error
    codes_ref, _ = ref_gptq(W, H, cfg)
    assert np.mean(res.qweight.codes == codes_ref) > 0.995


def test_all_dead_hessian_falls_back_to_rtn(caplog: pytest.LogCaptureFixture) -> None:
    W, _ = correlated_problem(8, 32, seed=10)
    with caplog.at_level(logging.WARNING, logger="onnx_gptq.solve"):
        res = solve(W, np.zeros((32, 32)), QuantConfig(bits=4, group_size=16), device="cpu",
                    name="dead.layer")
    assert any("dead.layer" in r.message for r in caplog.records)
    np.testing.assert_array_equal(res.qweight.codes, ref_rtn(W, 16, 4, False))


def test_bad_inputs_name_the_weight() -> None:
    W, H = correlated_problem(8, 32)
    W[0, 0] = np.nan
    with pytest.raises(ModelError, match="blk.0.w"):
        solve(W, H, QuantConfig(), name="blk.0.w")
    with pytest.raises(CalibrationError, match="blk.1.w"):
        solve(np.ones((8, 32), np.float32), np.eye(16), QuantConfig(), name="blk.1.w")


# --------------------------------------------------------------------------- (6) dynamic g_idx


def test_dynamic_g_idx_is_a_valid_grouping() -> None:
    W, H = correlated_problem(8, 100, seed=11)
    cfg = QuantConfig(bits=4, group_size=32, act_order=True, static_groups=False, format="custom")
    qw = solve(W, H, cfg, device="cpu").qweight
    assert qw.g_idx is not None and qw.g_idx.shape == (100,) and qw.group_size == 32
    counts = np.bincount(qw.g_idx, minlength=4)
    np.testing.assert_array_equal(counts, [32, 32, 32, 4])
    assert qw.scales.shape == (8, 4)
    # Columns of one group share its grid: every code dequantizes onto that group's grid.
    for grp in range(4):
        cols = np.flatnonzero(qw.g_idx == grp)
        assert np.allclose(qw.dequantize()[:, cols] / qw.scales[:, grp:grp + 1].astype(np.float32)
                           + qw.zeros[:, grp:grp + 1], qw.codes[:, cols], atol=1e-3)
    static = solve(W, H, QuantConfig(bits=4, group_size=32, act_order=True), device="cpu")
    assert static.qweight.g_idx is None


# --------------------------------------------------------------------------- (7) pack round trips


@pytest.mark.parametrize("bits,group_size,sym,act", [
    (4, 32, False, False), (4, 32, True, False), (2, 16, False, True), (8, -1, True, True),
    (4, -1, False, False), (3, 32, False, False), (4, 32, False, "dynamic"),
])
def test_packed_tensors_dequantize_to_solver_q(bits, group_size, sym, act) -> None:
    W, H = correlated_problem(24, 96, seed=bits)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, act_order=bool(act),
                      static_groups=act != "dynamic", format="custom")
    res = solve(W, H, cfg, scale_dtype=np.float16, device="cpu")
    qw = res.qweight
    Q = qw.dequantize()
    assert res.error == pytest.approx(relative_error(W, Q, H), rel=1e-9)
    assert np.array_equal(pack.unpack_custom(pack.pack_custom(qw)).dequantize(), Q)
    if pack.can_pack_matmulnbits(qw) is None:
        back = pack.unpack_matmulnbits(pack.pack_matmulnbits(qw), qw.group_size)
        assert np.array_equal(back.dequantize(), Q)
    if bits in (4, 8) and qw.g_idx is None:
        back = pack.unpack_qdq(pack.pack_qdq(qw), bits)
        assert np.array_equal(back.dequantize(), Q)
    if bits == 4 and qw.g_idx is None and group_size == 32:
        assert pack.can_pack_matmulnbits(qw) is None  # the MatMulNBits path was exercised


def test_relative_error_formula() -> None:
    rng = np.random.default_rng(12)
    W = rng.standard_normal((5, 7))
    Q = W + 0.1 * rng.standard_normal((5, 7))
    X = rng.standard_normal((30, 7))
    H = 2 * X.T @ X / 30
    Y, Yq = X @ W.T, X @ Q.T
    expected = ((Y - Yq) ** 2).sum() / (Y ** 2).sum()
    assert relative_error(W, Q, H) == pytest.approx(expected, rel=1e-12)
    assert relative_error(W, Q, None) == pytest.approx(((W - Q) ** 2).sum() / (W ** 2).sum())


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=128, mse=True),
                                 QuantConfig(bits=3, group_size=64, act_order=True),
                                 QuantConfig(bits=4, group_size=128, act_order=True,
                                             static_groups=False, format="custom")],
                         ids=["g128mse", "act-static", "act-dynamic"])
def test_cuda_matches_cpu(cfg: QuantConfig) -> None:
    """The GPU solve gives the CPU's codes (up to rare float32 tie flips), exactly packed."""
    W, H = correlated_problem(256, 512, seed=13)
    cpu = solve(W, H, cfg, scale_dtype=np.float16, device="cpu")
    gpu = solve(W, H, cfg, scale_dtype=np.float16, device="cuda")
    assert np.mean(gpu.qweight.codes == cpu.qweight.codes) > 0.995
    assert gpu.error == pytest.approx(relative_error(W, gpu.qweight.dequantize(), H), rel=1e-9)
    assert gpu.error == pytest.approx(cpu.error, rel=1e-2)
    assert gpu.error < gpu.rtn_error
