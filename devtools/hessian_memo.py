"""Benchmarks only: one-pass Hessians computed once for rows that differ only after calibration.

A damping sweep quantizes one model on one calibration set several times;
its one-pass Hessians are the same every time, and on a busy machine
collecting them costs more than the solve. Inside :func:`reuse_hessians`,
`onnx_gptq.calibrate.collect_hessians` (what the one-pass pipeline calls)
answers a repeated call, same activations and same feeds, from memory.
Sequential calibration imports `collect_hessians` from `calibrate.run` and is
never affected. The statistics are never mutated downstream
(`HessianStats.hessian` returns a new array), so sharing them is safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from onnx_gptq import calibrate
from onnx_gptq.calibrate.statistics import HessianStats

logger = logging.getLogger(__name__)


def _feeds_digest(batches: list[dict[str, np.ndarray]]) -> str:
    digest = hashlib.sha1()
    for feeds in batches:
        for name in sorted(feeds):
            array = np.ascontiguousarray(feeds[name])
            digest.update(f"{name}{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def reuse_hessians() -> Iterator[dict[tuple[str, ...], Any]]:
    """Within the block, repeated one-pass calibrations on the same data reuse their statistics.

    Yields:
        The memo: (activations..., feeds digest) -> (held-out sums kept, {activation: HessianStats}).
    """
    original = calibrate.collect_hessians
    memo: dict[tuple[str, ...], Any] = {}

    def memoized(model: Any, activations: Any, batches: Any, **kwargs: Any) -> Any:
        batches = list(batches)
        key = (*activations, _feeds_digest(batches))
        hold_out = bool(kwargs.get("hold_out"))
        if key not in memo or (hold_out and not memo[key][0]):  # damp "auto" needs the held-out sums too
            memo[key] = (hold_out, original(model, activations, batches, **kwargs))
        else:
            logger.info("reusing the Hessians of %d activations from an earlier row", len(activations))
        stats = memo[key][1]
        if hold_out:
            return dict(stats)
        # Held-out sums do not change the totals (the same sums either way): drop them for a fixed damp.
        return {name: HessianStats(s.xtx, s.rows) for name, s in stats.items()}

    calibrate.collect_hessians = memoized
    try:
        yield memo
    finally:
        calibrate.collect_hessians = original


__all__ = ["reuse_hessians"]
