"""Per-layer damping chosen by held-out error (`QuantConfig(damp="auto")`, `--damp auto`).

One damping fraction does not suit every layer, nor every calibration set: on
SmolLM2 1 % was best in three settings of four and 10 % in the fourth (W3
calibrated out of domain), and a sentence encoder preferred 10 % at g128
(docs/BENCHMARKS.md, "Calibration domain and damping"). Damping is a guard
against a Hessian over-fitted to few samples, so the held-out error of a
solve is the measure that can tell: calibration keeps the sum over every
`statistics.HOLD_OUT_EVERY`-th batch apart (`HessianStats.held_xtx`, padded
positions excluded like everywhere else), and per layer

1. each candidate damping solves on the *fit* statistics (all batches but the held-out ones);
2. each result is scored by its relative held-out error tr(dW H_hold dW^T) / tr(W H_hold W^T),
   dW = W - dequantized Q;
3. the lowest wins (ties: the smaller damping), and one last solve on *all* the
   batches' H with it gives the codes that are written (and, in sequential
   mode, propagated to later blocks).

So a layer costs len(CANDIDATES) + 1 solves instead of one. Like `solve`, no
onnx import here.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from onnx_gptq import error_traces
from onnx_gptq.calibrate.statistics import HessianStats
from onnx_gptq.config import QuantConfig
from onnx_gptq.solve import SolveResult, default_device, solve

logger = logging.getLogger(__name__)

#: The damping fractions tried per layer: the values measured in docs/BENCHMARKS.md.
CANDIDATES = (0.01, 0.02, 0.05, 0.1)


@dataclasses.dataclass(frozen=True)
class DampChoice:
    """The damping one layer got and why.

    Attributes:
        damp: the candidate with the lowest held-out error.
        held_errors: candidate -> relative held-out error of its solve on the fit slice.
    """

    damp: float
    held_errors: dict[float, float]


def held_out_errors(W: np.ndarray, Qs: list[np.ndarray], H_hold: np.ndarray,
                    device: torch.device) -> list[float]:
    """tr(dW H_hold dW^T) / tr(W H_hold W^T) for each dequantized Q (dW = W - Q).

    Args:
        W: float [N, K] original weight.
        Qs: float [N, K] dequantized weights.
        H_hold: float64 [K, K] Hessian of the held-out slice.
        device: where the products run (float64 for small problems, see `error_traces`).
    Returns:
        One relative error per Q (0 where tr(W H_hold W^T) is 0 and dW is 0).
    """
    as_t = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=device)  # noqa: E731
    den, *nums = error_traces.trace_quadratic(as_t(W), [as_t(Q) for Q in Qs],
                                              torch.as_tensor(H_hold, dtype=torch.float64, device=device))
    if den == 0.0:
        return [0.0 if num == 0.0 else float("inf") for num in nums]
    return [num / den for num in nums]


def choose_damp(W: np.ndarray, fit: HessianStats, held: HessianStats, config: QuantConfig, *,
                scale_dtype: np.dtype = np.float32, device: str | None = None, name: str = "",
                candidates: tuple[float, ...] = CANDIDATES) -> DampChoice:
    """The candidate damping whose solve on `fit` has the lowest error on `held`.

    Args:
        W: float [N, K] weight, rows = output channels.
        fit: statistics of the batches the candidates solve on.
        held: statistics of the held-out batches that score them.
        config: every other setting of the solve (its `damp` is ignored).
        scale_dtype, device, name: as for `solve.solve`.
        candidates: damping fractions to try, in order (ties go to the earlier one).
    Returns:
        The choice and every candidate's held-out error.
    """
    H_fit = fit.hessian()  # [K, K]
    Qs = [solve(W, H_fit, dataclasses.replace(config, damp=d), scale_dtype=scale_dtype, device=device,
                name=name).qweight.dequantize() for d in candidates]
    dev = torch.device(device) if device is not None else default_device()
    errors = dict(zip(candidates, held_out_errors(W, Qs, held.hessian(), dev)))
    best = min(candidates, key=lambda d: errors[d])  # min keeps the first of equal errors
    logger.info("%s: damp %g chosen by held-out error (%s)", name or "weight", best,
                ", ".join(f"{d:g}: {e:.4g}" for d, e in errors.items()))
    return DampChoice(damp=best, held_errors=errors)


def solve_auto(W: np.ndarray, stats: HessianStats, config: QuantConfig, *,
               scale_dtype: np.dtype = np.float32, device: str | None = None,
               name: str = "") -> tuple[SolveResult, DampChoice]:
    """`solve.solve` with the damping chosen by :func:`choose_damp`, on all the batches' H.

    Args:
        W: float [N, K] weight.
        stats: the weight's statistics with their held-out slice (`HessianStats.held_xtx`).
        config: the settings (`damp` "auto").
        scale_dtype, device, name: as for `solve.solve`.
    Returns:
        (the final solve on the full H, the choice); its `damp` is the chosen one
        (or higher, where the full H needed an automatic raise).
    Raises:
        CalibrationError: the statistics have no held-out slice, or a slice has no rows.
    """
    fit, held = stats.split()
    choice = choose_damp(W, fit, held, config, scale_dtype=scale_dtype, device=device, name=name)
    result = solve(W, stats.hessian(), dataclasses.replace(config, damp=choice.damp), scale_dtype=scale_dtype,
                   device=device, name=name)
    return result, choice


__all__ = ["CANDIDATES", "DampChoice", "choose_damp", "held_out_errors", "solve_auto"]
