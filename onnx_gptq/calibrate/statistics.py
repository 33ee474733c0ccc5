"""Hessian statistics: the running X^T X sums, their per-weight totals, and the memory planner.

Calibration (`calibrate.run`, `calibrate.sequential`) fills one :class:`HessianStats`
per activation; :func:`weight_hessian` sums those of every consumer of one weight
into the H the solver takes. :func:`plan_passes` is the one memory planner: it
splits activations, in graph order, into calibration passes whose statistics
fit a byte budget, at :func:`hessian_bytes` per activation. For `damp="auto"`
(`damp_search`) every statistic also keeps the sum over a held-out slice of the
batches (:func:`is_held_out`). No onnxruntime here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import onnx_ir as ir

from onnx_gptq.errors import CalibrationError

logger = logging.getLogger(__name__)

#: Share of the machine's RAM the statistics of one run may take by default.
MEMORY_SHARE = 0.25
#: With a held-out slice (damp "auto"), every this-many-th calibration batch is in it.
HOLD_OUT_EVERY = 4

Item = TypeVar("Item")


@dataclasses.dataclass
class HessianStats:
    """Running sum of ``x^T x`` over the rows ``x`` seen by one MatMul input.

    Attributes:
        xtx: float64 [K, K], sum over rows of the outer products x^T x (all batches).
        rows: number of rows (tokens, or leading-dim positions) summed.
        held_xtx: float64 [K, K], the part of `xtx` from the held-out batches
            (:func:`is_held_out`), or None when no slice was held out.
        held_rows: the rows of those batches.
    """

    xtx: np.ndarray
    rows: int
    held_xtx: np.ndarray | None = None
    held_rows: int = 0

    @property
    def k(self) -> int:
        """Input features K."""
        return int(self.xtx.shape[0])

    def hessian(self) -> np.ndarray:
        """float64 [K, K]: ``H = 2 X^T X / rows``, the paper's Hessian as a mean over rows.

        Raises:
            CalibrationError: no row was seen (the activation never got computed).
        """
        if self.rows <= 0:
            raise CalibrationError("calibration saw no rows for this activation (empty calibration data?)")
        return 2.0 * self.xtx / self.rows

    def split(self) -> tuple["HessianStats", "HessianStats"]:
        """(fit, held-out): the statistics without the held-out batches, and of those alone.

        Raises:
            CalibrationError: no slice was held out, or one side saw no rows.
        """
        if self.held_xtx is None:
            raise CalibrationError("these statistics hold no held-out slice (calibrated without damp 'auto')")
        fit = HessianStats(self.xtx - self.held_xtx, self.rows - self.held_rows)
        held = HessianStats(self.held_xtx, self.held_rows)
        if fit.rows <= 0 or held.rows <= 0:
            raise CalibrationError(f"the {'fit' if fit.rows <= 0 else 'held-out'} slice of the calibration "
                                   "batches has no rows (all padding?)")
        return fit, held

    def __add__(self, other: "HessianStats") -> "HessianStats":
        """Stats of several consumers of one weight (or of two data sets) summed."""
        if not isinstance(other, HessianStats):
            return NotImplemented
        if other.xtx.shape != self.xtx.shape:
            raise ValueError(f"cannot add HessianStats of shapes {self.xtx.shape} and {other.xtx.shape}")
        held = None
        if self.held_xtx is not None and other.held_xtx is not None:
            held = self.held_xtx + other.held_xtx
        return HessianStats(self.xtx + other.xtx, self.rows + other.rows, held,
                            self.held_rows + other.held_rows if held is not None else 0)


def is_held_out(index: int, count: int) -> bool:
    """Whether calibration batch `index` of `count` is in the held-out slice: every
    HOLD_OUT_EVERY-th batch (the 4th, 8th, ...), or the last one of 2 or 3 batches.

    Raises:
        CalibrationError: fewer than 2 batches, so nothing can be held out.
    """
    if count < 2:
        raise CalibrationError(f"damp 'auto' holds out a slice of the calibration batches and needs at least 2, "
                               f"got {count} (give more --num-samples or a smaller --batch-size)")
    if count < HOLD_OUT_EVERY:
        return index == count - 1
    return index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1


def total_stats(activations: Sequence[str], stats: Mapping[str, HessianStats]) -> HessianStats:
    """The statistics of every node that multiplies by one weight, summed (see `weight_hessian`)."""
    total: HessianStats | None = None
    for name in activations:
        total = stats[name] if total is None else total + stats[name]
    assert total is not None, "a weight has at least one consumer"
    return total


def weight_hessian(activations: Sequence[str], stats: Mapping[str, HessianStats]) -> tuple[np.ndarray | None, int]:
    """H of one weight: the statistics of every node that multiplies by it, summed.

    Args:
        activations: the input tensor of each consumer (duplicates count twice,
            as two consumers reading one tensor see its rows twice).
        stats: activation name -> its statistics; empty when calibration was skipped (rtn).
    Returns:
        (H float64 [K, K] or None without statistics, rows summed).
    """
    if not stats:
        return None, 0
    total = total_stats(activations, stats)
    return total.hessian(), total.rows


def hessian_bytes(k: int, held_out: bool = False) -> int:
    """Bytes one calibrated activation of width `k` holds during a pass: the float64
    accumulator (8 K^2) plus onnxruntime's float32 per-batch output (4 K^2), and with
    `held_out` (damp "auto") the held-out slice's float64 accumulator (8 K^2 more)."""
    return (20 if held_out else 12) * k * k


def default_memory_budget() -> int:
    """Bytes of statistics one pass may hold by default: a quarter of the machine's RAM."""
    import psutil

    return int(psutil.virtual_memory().total * MEMORY_SHARE)


def plan_passes(items: Iterable[Item], widths: Callable[[Item], Mapping[str, int]],
                budget: int, held_out: bool = False) -> list[list[Item]]:
    """Split `items` (in graph order) into calibration passes whose statistics fit `budget`.

    Args:
        items: what is calibrated together or not (weight groups, taps), in order.
        widths: the activations an item needs, name -> K; an activation shared
            by items of one pass (q/k/v projections) is counted once.
        budget: bytes per pass, at :func:`hessian_bytes` per activation.
        held_out: the statistics keep a held-out slice too (damp "auto").
    Returns:
        The passes, each a list of items in their order; an item larger than
        the budget gets a pass alone (with a warning).
    """
    passes: list[list[Item]] = []
    current: list[Item] = []
    seen: set[str] = set()
    used = 0
    for item in items:
        needs = widths(item)
        new = {name: k for name, k in needs.items() if name not in seen}
        cost = sum(hessian_bytes(k, held_out) for k in new.values())
        if current and used + cost > budget:
            passes.append(current)
            current, seen, used = [], set(), 0
            new = dict(needs)
            cost = sum(hessian_bytes(k, held_out) for k in new.values())
        if cost > budget:
            logger.warning("calibration: %s alone need %.2f GB of statistics, over the %.2f GB budget; "
                           "they get a pass of their own", ", ".join(f"'{n}' (K={k})" for n, k in new.items()),
                           cost / 1e9, budget / 1e9)
        current.append(item)
        seen.update(new)
        used += cost
    if current:
        passes.append(current)
    return passes


def runtime_weight_bytes(model: ir.Model) -> int:
    """Bytes onnxruntime's CPU provider holds for the model's weights: it keeps an
    fp32 copy of every fp16/bf16 initializer, so count all floats at 4 bytes."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            itemsize = 4 if tensor.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else tensor.dtype.itemsize
            total += int(np.prod(tensor.shape.numpy(), dtype=np.int64)) * itemsize
    return total


__all__ = ["HOLD_OUT_EVERY", "HessianStats", "default_memory_budget", "hessian_bytes", "is_held_out", "plan_passes",
           "runtime_weight_bytes", "total_stats", "weight_hessian"]
