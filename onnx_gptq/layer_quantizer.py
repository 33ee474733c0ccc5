"""Stages 3 to 5 for each weight: solve it, pack the result, rewrite its consumers.

The pass hands :class:`LayerQuantizer` the weight groups whose Hessian
statistics are ready (one calibration pass, or one sequential stage at a
time); it solves them (`solve.solve`, threads with `jobs` > 1), chooses each
one's output format (`rewrite.choose_format`), rewrites the graph
(`rewrite.rewrite_group`, which packs through `pack`) and appends one
:class:`report.LayerRow` per weight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnx_gptq import rewrite
from onnx_gptq.calibrate.statistics import HessianStats, total_stats, weight_hessian
from onnx_gptq.config import QuantConfig
from onnx_gptq.report import LayerRow, PhaseTimer, Report
from onnx_gptq.targets import WeightGroup

if TYPE_CHECKING:  # solve imports torch: only when a weight is solved
    from onnx_gptq.solve import SolveResult

logger = logging.getLogger(__name__)


def scale_dtype(dtype: ir.DataType) -> np.dtype:
    """Scales are stored in the dtype the layer computes in (fp16/bf16), else float32."""
    return np.dtype(dtype.numpy()) if dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else np.dtype(np.float32)


class LayerQuantizer:
    """Stages 3-5 for a batch of weights: solve (several at once with `jobs` > 1), then
    pack and rewrite them in graph order, one report row each.

    Called by the pass once per calibration pass (or sequential stage) with the
    groups whose statistics are ready; `taken` collects the names of every
    initializer it added (the final finiteness check reads them).
    """

    def __init__(self, model: ir.Model, config: QuantConfig, report: Report, phase: PhaseTimer,
                 jobs: int, device: str | None, progress: bool, total: int,
                 store: rewrite.TensorStore | None = None) -> None:
        self.model, self.config, self.report, self.phase = model, config, report, phase
        self.store = store
        self.jobs, self.device = max(1, jobs), device
        self.taken: set[str] = set()
        #: id of each output head's source -> (its group, what was written): a tied embedding may share it.
        self.heads: dict[int, tuple[WeightGroup, rewrite.WrittenWeight]] = {}
        self.progress, self.total = progress, total
        self.bar: Any = None

    def _solve_one(self, group: WeightGroup,
                   stats: Mapping[str, HessianStats]) -> tuple[SolveResult, int, dict[str, float] | None]:
        """(the solve, calibration rows, held-out error per candidate damping or None)."""
        from onnx_gptq.solve import solve

        activations = [t.activation.name for t in group.targets]
        w = group.load()  # [K, N]; read from disk only now
        config = self.config.for_layer(group.names, is_head=group.is_head)
        if config.damp_auto and stats:
            from onnx_gptq.damp_search import solve_auto

            total = total_stats(activations, stats)
            result, choice = solve_auto(w.T, total, config, scale_dtype=scale_dtype(group.dtype),
                                        device=self.device, name=group.name)
            return result, total.rows, {f"{d:g}": e for d, e in choice.held_errors.items()}
        hessian, rows = weight_hessian(activations, stats)
        result = solve(w.T, hessian, config, scale_dtype=scale_dtype(group.dtype),
                       device=self.device, name=group.name)
        return result, rows, None

    def __call__(self, groups: list[WeightGroup], stats: Mapping[str, HessianStats]) -> None:
        """Solve, pack and rewrite `groups`.

        Args:
            groups: weight groups in graph order.
            stats: activation name -> statistics of every consumer's input;
                empty for round-to-nearest (no calibration).
        """
        if self.progress and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="solving", unit="layer")
        with self.phase("solve"):
            if self.jobs == 1 or len(groups) == 1:
                results = (self._solve_one(g, stats) for g in groups)
                self._rewrite_all(groups, results)
            else:
                from concurrent.futures import ThreadPoolExecutor

                # torch releases the GIL in its kernels; share the cores between workers.
                import torch

                threads = torch.get_num_threads()
                torch.set_num_threads(max(1, threads // self.jobs))
                try:
                    with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                        futures = [pool.submit(self._solve_one, g, stats) for g in groups]
                        self._rewrite_all(groups, (f.result() for f in futures))
                finally:
                    torch.set_num_threads(threads)

    def _rewrite_all(self, groups: list[WeightGroup],
                     results: Iterable[tuple[SolveResult, int, dict[str, float] | None]]) -> None:
        for group, (result, rows, held_errors) in zip(groups, results):
            config = self.config.for_layer(group.names, is_head=group.is_head)
            with self.phase("pack+rewrite"):
                fmt, why = rewrite.choose_format(config.format, result.qweight, group.dtype, group.name,
                                                 config.accuracy_level)
                if why:
                    self.report.format_notes.append(f"{group.name}: written as {fmt.value} ({why})")
                written = rewrite.rewrite_group(self.model, group, result.qweight, fmt,
                                                accuracy_level=config.accuracy_level, taken_names=self.taken,
                                                store=self.store)
                rewrite.check_written_finite(written)
            if group.is_head:
                self.heads[id(group.source)] = (group, written)
            k, n = group.shape
            self.report.layers.append(LayerRow(
                name=group.name, module=group.targets[0].module, nodes=[t.name for t in group.targets],
                shape=(k, n), bits=config.bits, group_size=result.qweight.group_size, format=fmt.value,
                damp=result.damp, error=result.error, rtn_error=result.rtn_error, seconds=result.seconds,
                calibration_rows=rows, damp_held_errors=held_errors))
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()


__all__ = ["LayerQuantizer", "scale_dtype"]
