"""GPTQ solver: integer codes, scales and zero points of one weight matrix.

Implements GPTQ (Frantar et al., 2022) with lazy batch updates and the Cholesky
form of the inverse Hessian, plus round-to-nearest as a baseline. Orientation is
the paper's: W is [N, K], rows are output channels, H = 2 X^T X / rows is [K, K]
over the input channels.

Differences from the reference implementation, all on purpose:

* the grid of a group is found from the *error-updated* weights at the moment
  the group starts (lazy-batch blocks are aligned to group boundaries; the
  reference reads a stale slice when a group starts inside a block);
* damping is raised automatically (x10 steps up to 1.0) with a warning when the
  damped H is not positive definite, and an unusable H falls back to RTN;
* symmetric grids are signed-max (see :mod:`onnx_gptq.grid`);
* scales are rounded to the model's dtype before quantizing, so what `pack`
  writes dequantizes to exactly the Q the solver fed back.

The computation runs in torch: float64 for the Hessian factorizations, float32
for the weight updates, on `device` (CUDA when available). No onnx imports here.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from onnx_gptq import error_traces, grid
from onnx_gptq.config import Algo, QuantConfig
from onnx_gptq.errors import CalibrationError, ConfigError, ModelError
from onnx_gptq.qweight import QuantizedWeight

logger = logging.getLogger(__name__)

# Damping fractions tried after the configured one fails (x10 steps up to 1.0).
_MAX_DAMP = 1.0
# Columns per left-looking sub-block inside a lazy-batch block.
_SUB = 32


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """What the solver chose for one weight.

    Attributes:
        qweight: codes uint8 [N, K], scales [N, G] (scale_dtype), zeros uint8 [N, G].
        damp: damping fraction actually used (after any automatic raise); 0 for RTN.
        error: relative output error tr(dW H dW^T) / tr(W H W^T), dW = W - Q,
            with the undamped H (weight-space ||dW||^2 / ||W||^2 when H is None).
        rtn_error: the same for round-to-nearest with the same grid settings.
        seconds: wall time of the solve.
    """

    qweight: QuantizedWeight
    damp: float
    error: float
    rtn_error: float
    seconds: float


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_dtype(scale_dtype: np.dtype | type, label: str) -> torch.dtype:
    """The torch dtype of the stored scales."""
    dt = np.dtype(scale_dtype)
    if dt == np.float32:
        return torch.float32
    if dt == np.float16:
        return torch.float16
    if dt.name == "bfloat16":
        return torch.bfloat16
    raise ValueError(f"{label}: scale_dtype {dt} is not supported (float32, float16 or bfloat16)")


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Grid settings resolved for one weight."""

    bits: int
    group_size: int  # columns per group, <= K
    sym: bool
    mse: bool
    scale_dtype: torch.dtype

    @property
    def maxq(self) -> int:
        return grid.maxq_of(self.bits)


def _to_qweight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: _Grid,
                scale_dtype: np.dtype, g_idx: np.ndarray | None = None) -> QuantizedWeight:
    """Torch codes [N, K], scale/zero [N, G] (float32) -> QuantizedWeight (numpy)."""
    scales = scale.cpu().numpy().astype(scale_dtype)
    return QuantizedWeight(
        codes=np.ascontiguousarray(codes.to(torch.uint8).cpu().numpy()),
        scales=np.ascontiguousarray(scales),
        zeros=np.ascontiguousarray(zero.to(torch.uint8).cpu().numpy()),
        bits=g.bits,
        group_size=g.group_size,
        g_idx=g_idx,
        sym=g.sym,
    )


def _dequantize_torch(qw: QuantizedWeight, device: torch.device) -> torch.Tensor:
    """QuantizedWeight.dequantize() on `device`, same float32 arithmetic. [N, K]"""
    n, k = qw.shape
    scales = torch.as_tensor(qw.scales.astype(np.float32), device=device)  # [N, G]
    zeros = torch.as_tensor(qw.zeros, device=device).to(torch.float32)  # [N, G]
    codes = torch.as_tensor(qw.codes, device=device).to(torch.float32)  # [N, K]
    if qw.g_idx is not None:
        gcol = torch.as_tensor(qw.g_idx.astype(np.int64), device=device)
        return (codes - zeros[:, gcol]) * scales[:, gcol]
    # Contiguous groups: broadcast over [N, G, group_size] instead of gathering.
    Cg = grid.group_view(codes, qw.group_size)  # [N, G, gs]
    return ((Cg - zeros[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]


def _rtn(W: torch.Tensor, g: _Grid, weight: torch.Tensor | None,
         scale_dtype: np.dtype) -> QuantizedWeight:
    codes, scale, zero = grid.rtn(W, g.group_size, g.bits, g.sym, mse=g.mse, weight=weight,
                                  scale_dtype=g.scale_dtype)
    return _to_qweight(codes, scale, zero, g, scale_dtype)


def _factor(H: torch.Tensor, damp: float,
            name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, raising damp on failure.

    With J the order-reversing permutation and J H J = L L^T, the upper factor
    of H^-1 is U = J L^-1 J (then U^T U = H^-1): one Cholesky and one triangular
    inverse instead of the reference's Cholesky, inverse and second Cholesky.

    Args:
        H: float64 [K, K] (dead inputs already set to 1 on the diagonal).
        damp: initial damping fraction.
        name: layer name for the warning.
    Returns:
        (U float64 [K, K] with Hinv = U^T U, L float64 [K, K] with J Hd J = L L^T,
        damp used), or None if even damp=1 fails.
    """
    k = H.shape[0]
    mean_diag = float(H.diagonal().mean())
    tries = [damp]
    d = damp if damp > 0 else 1e-4
    while d < _MAX_DAMP:
        d = min(d * 10, _MAX_DAMP)
        tries.append(d)
    # Memory matters at K = 11008 (0.97 GB per float64 K x K): at most H, one
    # damped flip, L and one inverse are alive at once.
    for d in tries:
        Hd = H.flip(0, 1)  # J H J, a fresh copy per try
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)  # J H J = L L^T
        del Hd
        if int(info) != 0:
            continue
        Linv = torch.eye(k, dtype=H.dtype, device=H.device)
        torch.linalg.solve_triangular(L, Linv, upper=False, out=Linv)  # L^-1, in place
        U = Linv.flip(0, 1)  # J L^-1 J
        del Linv
        if not bool(torch.isfinite(U.diagonal()).all()):
            continue
        if d != damp:
            logger.warning("%s: Hessian is not positive definite with damp=%g; "
                           "raised damp to %g", name or "weight", damp, d)
        return U, L, d
    return None


def _block_starts(k: int, blocksize: int, group_size: int, aligned: bool) -> list[int]:
    """Lazy-batch block boundaries; with `aligned`, every group starts a block or lies in one."""
    if not aligned or group_size >= k:
        return list(range(0, k, blocksize))
    if group_size <= blocksize:
        step = (blocksize // group_size) * group_size
        return list(range(0, k, step))
    starts: list[int] = []
    for g0 in range(0, k, group_size):
        starts.extend(range(g0, min(g0 + group_size, k), blocksize))
    return starts


def _gptq(W: torch.Tensor, U: torch.Tensor, g: _Grid, *, blocksize: int,
          col_group: list[int], static: tuple[torch.Tensor, torch.Tensor] | None,
          weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """GPTQ over columns in their given (possibly permuted) order.

    Args:
        W: float32 [N, K] weights in solve order (dead columns zeroed).
        U: float32 [K, K] upper Cholesky factor of the damped inverse Hessian, solve order.
        g: grid settings.
        blocksize: lazy-batch block width.
        col_group: group of each solve-order column (len K).
        static: (scale, zero) float32 [N, G] fixed before solving, or None to find
            each group's grid when its first column (in solve order) comes up;
            dynamic groups are then consecutive runs of `g.group_size` columns.
        weight: float32 [K] MSE-criterion column weights in solve order, or None.
    Returns:
        codes float32 [N, K] (solve order), scale and zero float32 [N, G], and
        ||Err||_F^2, which equals tr(dW Hd dW^T) for the damped Hd (U^T U = Hd^-1).
    """
    n, k = W.shape
    gs = g.group_size
    maxq = g.maxq
    n_groups = -(-k // gs)
    WT = W.t().contiguous()  # [K, N]: a column of W is a contiguous row here
    codesT = torch.empty_like(WT)  # [K, N]
    if static is not None:
        scaleT, zeroT = static[0].t().contiguous(), static[1].t().contiguous()  # [G, N]
    else:
        scaleT = torch.empty((n_groups, n), dtype=torch.float32, device=W.device)
        zeroT = torch.empty_like(scaleT)
    starts = _block_starts(k, blocksize, gs, aligned=static is None)
    err_sq = torch.zeros((), dtype=torch.float64, device=W.device)
    for b, i1 in enumerate(starts):
        i2 = starts[b + 1] if b + 1 < len(starts) else k
        count = i2 - i1
        W1 = WT[i1:i2]  # [count, N], updated in place
        Err1 = torch.empty_like(W1)  # [count, N]
        U1 = U[i1:i2, i1:i2]  # [count, count]
        d = U1.diagonal().tolist()
        # Inside the block, a column gets the updates of the earlier columns of its
        # sub-block (_SUB columns) as one small product when it comes up (left-looking),
        # and the rest of the block gets a sub-block's updates as one product at its
        # end: the same math as rank-1 updates after every column, with far fewer
        # memory passes and parallel ops (those stall on a busy CPU).
        # Dynamic groups start sub-blocks, so a group's rows are current when it starts.
        cuts = set(range(0, count, _SUB))
        if static is None:
            cuts.update(c - i1 for c in range(-(-i1 // gs) * gs, i2, gs))
        cuts_sorted = sorted(cuts) + [count]
        for j1, j2 in zip(cuts_sorted[:-1], cuts_sorted[1:]):
            for i in range(j1, j2):
                col = i1 + i
                grp = col_group[col]
                if static is None and col % gs == 0:
                    gend = min(col + gs, k)
                    wgt = None if weight is None else weight[col:gend]
                    s, z = grid.find_params(WT[col:gend].t(), g.bits, g.sym, mse=g.mse,
                                            weight=wgt, scale_dtype=g.scale_dtype)
                    scaleT[grp], zeroT[grp] = s, z
                s, z = scaleT[grp], zeroT[grp]
                w = W1[i]  # [N], current except for this sub-block's earlier columns
                if i > j1:
                    w = torch.addmv(w, Err1[j1:i].t(), U1[j1:i, i], alpha=-1.0)
                c = grid.quantize(w, s, z, maxq)
                codesT[col] = c
                err = (w - grid.dequantize(c, s, z)).div_(d[i])  # [N]
                Err1[i] = err
            if j2 < count:
                W1[j2:].addmm_(U1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1.0)
        err_sq += Err1.double().pow(2).sum()
        if i2 < k:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)  # lazy batch update
    return codesT.t(), scaleT.t(), zeroT.t(), float(err_sq)


def solve(W: np.ndarray, H: np.ndarray | None, config: QuantConfig, *,
          scale_dtype: np.dtype = np.float32, device: str | None = None,
          name: str = "") -> SolveResult:
    """Quantize one weight matrix with GPTQ (or RTN).

    Args:
        W: float [N, K] weight, rows = output channels.
        H: float64 [K, K] = 2 X^T X / rows, or None for round-to-nearest (then
            error and rtn_error are weight-space relative errors).
        config: bits, group_size (-1: per channel), sym, act_order, static_groups,
            damp, blocksize, mse, algo.
        scale_dtype: dtype of the stored scales (float16 for fp16 models); scales
            are rounded to it before quantizing.
        device: torch device; default CUDA when available, else CPU.
        name: weight name used in warnings and errors.
    Returns:
        SolveResult whose qweight.dequantize() is exactly the Q the solver used.
        With act_order and dynamic groups (config.needs_g_idx), qweight.g_idx
        gives each original column's group.
    Raises:
        ModelError: W is not 2-D or not finite.
        CalibrationError: H has the wrong shape or is not finite.
        ConfigError: damp "auto", which needs held-out statistics (`damp_search.solve_auto`).
    """
    t0 = time.perf_counter()
    label = name or "weight"
    if config.damp_auto and config.algo is Algo.GPTQ and H is not None:
        raise ConfigError(f"{label}: damp 'auto' is chosen by damp_search.solve_auto, not solve")
    dev = torch.device(device) if device is not None else default_device()
    W_np = np.asarray(W)
    if W_np.ndim != 2 or W_np.size == 0:
        raise ModelError(f"{label}: weight must be a non-empty 2-D matrix, got shape {W_np.shape}")
    W_np = W_np.astype(np.float32, copy=False)  # also from float16 / ml_dtypes.bfloat16
    n, k = W_np.shape
    if not np.isfinite(W_np).all():
        raise ModelError(f"{label}: weight contains NaN or Inf")
    if H is not None:
        H_np = np.asarray(H, dtype=np.float64)
        if H_np.shape != (k, k):
            raise CalibrationError(f"{label}: Hessian has shape {H_np.shape}, expected ({k}, {k})")
        if not np.isfinite(H_np).all():
            raise CalibrationError(f"{label}: Hessian contains NaN or Inf "
                                   "(non-finite activations during calibration)")
    g = _Grid(bits=config.bits, group_size=k if config.group_size == -1 else min(config.group_size, k),
              sym=config.sym, mse=config.mse, scale_dtype=_torch_dtype(scale_dtype, label))
    W0 = torch.as_tensor(W_np, dtype=torch.float32, device=dev)  # [N, K]
    H0 = None if H is None else torch.as_tensor(H_np, dtype=torch.float64, device=dev)  # [K, K]
    diagH = None if H0 is None else H0.diagonal().clone()  # [K]
    mse_weight = None if diagH is None else diagH.to(torch.float32)

    rtn_qw = _rtn(W0, g, mse_weight, scale_dtype)
    qw, damp, gptq_trace, traces = rtn_qw, 0.0, None, None
    if config.algo is Algo.GPTQ and H0 is not None:
        solved = _solve_gptq(W0, H0, g, config, scale_dtype, label)
        if solved is not None:
            qw, damp, gptq_trace, traces = solved
    elif config.algo is Algo.GPTQ:
        logger.warning("%s: no Hessian given; using round-to-nearest", label)

    Qr = _dequantize_torch(rtn_qw, dev)
    if traces is not None:  # large GPTQ problem: no full [N,K]x[K,K] products
        den, rtn_num = traces.trace(W0), traces.trace(W0 - Qr)
        num = gptq_trace if gptq_trace is not None else traces.trace(W0 - _dequantize_torch(qw, dev))
    elif qw is rtn_qw:
        den, num = error_traces.trace_quadratic(W0, [Qr], H0)
        rtn_num = num
    else:
        den, num, rtn_num = error_traces.trace_quadratic(W0, [_dequantize_torch(qw, dev), Qr], H0)
    rel = lambda x: (0.0 if x == 0.0 else float("inf")) if den == 0.0 else x / den  # noqa: E731
    seconds = time.perf_counter() - t0
    logger.debug("%s: %s %d-bit g%d error %.4g (rtn %.4g) in %.2fs", label, config.algo.value,
                 g.bits, g.group_size, rel(num), rel(rtn_num), seconds)
    return SolveResult(qweight=qw, damp=damp, error=rel(num), rtn_error=rel(rtn_num),
                       seconds=seconds)


def _solve_gptq(W0: torch.Tensor, H0: torch.Tensor, g: _Grid, config: QuantConfig,
                scale_dtype: np.dtype, label: str
                ) -> tuple[QuantizedWeight, float, float | None, error_traces.FactorTraces | None] | None:
    """GPTQ proper; None (after a warning) when H is unusable and RTN must do.

    Returns:
        (qweight, damp used, tr(dW H dW^T) or None, trace helper or None); both last
        are None for small problems, whose traces are computed exactly in float64.
    """
    n, k = W0.shape
    dead = H0.diagonal() <= 0  # inputs that never fired
    if bool(dead.all()):
        logger.warning("%s: Hessian is zero (all inputs dead); using round-to-nearest", label)
        return None
    W = W0.clone()  # [N, K]
    if bool(dead.any()):
        W[:, dead] = 0.0
    W_dead0 = W  # [N, K] original order, dead columns zeroed
    diag = H0.diagonal().clone()
    diag[dead] = 1.0  # the reference sets H[d, d] = 1 for dead inputs
    mean_diag = float(diag.mean())
    mse_weight = diag.to(torch.float32)

    static = None
    if config.act_order and config.static_groups:
        # Static groups: contiguous in the original order, grids fixed now from W
        # (without act-order, grids come from the updated weights as each group starts).
        static = grid.group_params(W, g.group_size, g.bits, g.sym, mse=g.mse,
                                   weight=mse_weight, scale_dtype=g.scale_dtype)
    perm = None
    if config.act_order:
        perm = torch.argsort(diag, descending=True, stable=True)  # [K]
        W = W[:, perm]
        mse_weight = mse_weight[perm]
        # Rows, then columns: one K x K temporary at a time (K = 11008 is 0.97 GB).
        H = H0.index_select(0, perm)
        H = H.index_select(1, perm)  # [K, K] float64, solve order
    else:
        H = H0.clone()  # [K, K] float64
    if bool(dead.any()):
        H.diagonal()[dead if perm is None else dead[perm]] = 1.0

    factored = _factor(H, config.damp, label)
    del H  # the solve-order copy is not needed past the factorisation
    if factored is None:
        logger.warning("%s: Hessian is not positive definite even with damp=%g; "
                       "using round-to-nearest", label, _MAX_DAMP)
        return None
    U, L, damp = factored
    Hinv = U.to(torch.float32)  # [K, K] upper Cholesky of H^-1, solve order
    del U, factored
    L = L.to(torch.float32)  # only the large-problem traces use it, in float32

    if perm is not None and static is not None:
        col_group = (perm // g.group_size).tolist()
    else:
        col_group = (torch.arange(k) // g.group_size).tolist()
    codes, scale, zero, err_sq = _gptq(W, Hinv, g, blocksize=config.blocksize,
                                       col_group=col_group, static=static, weight=mse_weight)
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if static is None and g.group_size < k:
            # Dynamic groups were formed in solve order: original column perm[j] is in group j // gs.
            g_idx_t = torch.empty(k, dtype=torch.int64, device=perm.device)
            g_idx_t[perm] = torch.arange(k, device=perm.device) // g.group_size
            g_idx = g_idx_t.cpu().numpy().astype(np.int32)
    qw = _to_qweight(codes, scale, zero, g, scale_dtype, g_idx=g_idx)

    if n * k * k <= error_traces.FLOAT64_TRACE_LIMIT:
        return qw, damp, None, None
    # tr(dW H dW^T) for the undamped H needs no product at all: ||Err||^2 is the
    # trace for the damped H (dead columns stay 0 in W and Q and add nothing), so
    # subtract damp*mean(diag)*||dW||^2, unless that would cancel badly.
    lam = damp * mean_diag
    dW_sq = float((W_dead0 - _dequantize_torch(qw, W0.device)).double().pow(2).sum())
    trace = err_sq - lam * dW_sq if lam * dW_sq < 0.5 * err_sq else None
    order = torch.arange(k, device=W0.device) if perm is None else perm
    helper = error_traces.FactorTraces(L=L, order=order.flip(0), lam=lam, dead=dead)
    return qw, damp, trace, helper
