"""The pass: targets -> calibrate -> solve -> pack -> rewrite, and the public `quantize`.

`quantize` returns the kind it was given: a path in (with `output`), a path
out; a ModelProto in, a ModelProto out; an onnx_ir Model in, the same Model
out (rewritten in place, as onnx-ir passes do).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnx_gptq import model_io, rewrite, targets
from onnx_gptq.config import Algo, CalibConfig, Format, QuantConfig
from onnx_gptq.errors import ConfigError, ModelError
from onnx_gptq.report import LayerRow, PhaseTimer, Report

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


def _scale_dtype(dtype: ir.DataType) -> np.dtype:
    return np.dtype(dtype.numpy()) if dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else np.dtype(np.float32)


def _group_hessian(group: targets.WeightGroup, stats: dict[str, Any]) -> tuple[np.ndarray | None, int]:
    """Sum the Hessian statistics of every consumer of one weight."""
    if not stats:
        return None, 0
    total = None
    for t in group.targets:
        s = stats[t.activation.name]
        total = s if total is None else total + s
    assert total is not None
    return total.hessian(), total.rows


def hessian_bytes(k: int) -> int:
    """Bytes held per calibrated activation of width k: a float64 accumulator
    plus onnxruntime's float32 per-batch output."""
    return 12 * k * k


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


def default_memory_budget() -> int:
    """A quarter of the machine's RAM."""
    import psutil

    return psutil.virtual_memory().total // 4


def plan_passes(groups: list[targets.WeightGroup], budget: int) -> list[list[targets.WeightGroup]]:
    """Split `groups` (graph order) into calibration passes whose Hessians fit `budget`.

    Consumers of one activation (q/k/v projections) stay in one pass where they
    are adjacent; a single activation larger than the budget gets a pass alone.
    """
    passes: list[list[targets.WeightGroup]] = []
    current: list[targets.WeightGroup] = []
    seen: set[str] = set()
    used = 0
    for group in groups:
        new = {t.activation.name: group.shape[0] for t in group.targets if t.activation.name not in seen}
        cost = sum(hessian_bytes(k) for k in new.values())
        if current and used + cost > budget:
            passes.append(current)
            current, seen, used = [], set(), 0
            new = {t.activation.name: group.shape[0] for t in group.targets}
            cost = sum(hessian_bytes(k) for k in new.values())
        current.append(group)
        seen.update(new)
        used += cost
    if current:
        passes.append(current)
    return passes


class _Solver:
    """Solves weight groups (several at once with `jobs` > 1) and rewrites them in graph order."""

    def __init__(self, model: ir.Model, config: QuantConfig, report: Report, phase: PhaseTimer,
                 jobs: int, device: str | None, progress: bool, total: int,
                 store: rewrite.TensorStore | None = None) -> None:
        self.model, self.config, self.report, self.phase = model, config, report, phase
        self.store = store
        self.jobs, self.device = max(1, jobs), device
        self.taken: set[str] = set()
        self.progress, self.total = progress, total
        self.bar: Any = None

    def _solve_one(self, group: targets.WeightGroup, stats: dict[str, Any]) -> tuple[Any, int]:
        from onnx_gptq.solve import solve

        hessian, rows = _group_hessian(group, stats)
        w = group.load()  # [K, N]; read from disk only now
        result = solve(w.T, hessian, self.config, scale_dtype=_scale_dtype(group.dtype),
                       device=self.device, name=group.name)
        return result, rows

    def __call__(self, groups: list[targets.WeightGroup], stats: dict[str, Any]) -> None:
        """Solve and rewrite `groups` using Hessian `stats` (activation name -> HessianStats)."""
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

    def _rewrite_all(self, groups: list[targets.WeightGroup], results: Any) -> None:
        for group, (result, rows) in zip(groups, results):
            with self.phase("pack+rewrite"):
                fmt, why = rewrite.choose_format(self.config.format, result.qweight, group.dtype, group.name,
                                                 self.config.accuracy_level)
                if why:
                    self.report.format_notes.append(f"{group.name}: written as {fmt.value} ({why})")
                rewrite.rewrite_group(self.model, group, result.qweight, fmt,
                                      accuracy_level=self.config.accuracy_level, taken_names=self.taken,
                                      store=self.store)
            k, n = group.shape
            self.report.layers.append(LayerRow(
                name=group.name, module=group.targets[0].module, nodes=[t.name for t in group.targets],
                shape=(k, n), bits=self.config.bits, group_size=result.qweight.group_size, format=fmt.value,
                damp=result.damp, error=result.error, rtn_error=result.rtn_error, seconds=result.seconds,
                calibration_rows=rows))
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def quantize_model(model: ir.Model, calibration: Any, config: QuantConfig, *, calib: CalibConfig,
                   model_dir: Path | None = None, tokenizer: str | os.PathLike | None = None,
                   jobs: int = 1, device: str | None = None, progress: bool = False,
                   store: rewrite.TensorStore | None = None) -> tuple[ir.Model, Report]:
    """Quantize `model` (in place, unless it must first be converted to a newer opset).

    Args:
        model: the model; its quantizable MatMul/Gemm nodes are rewritten.
        calibration: calibration data (see `calib_data.make_batches`); may be
            None with algo "rtn".
        config: how and which weights are quantized.
        calib: calibration settings (incl. sequential mode and memory budget).
        model_dir: directory external data is relative to (None: in memory).
        tokenizer: tokenizer for text calibration data.
        jobs: weights solved concurrently.
        device: torch device for the solver (None: CUDA if available, else CPU).
        progress: show progress bars.
        store: makes the packed tensors (default: in memory; see
            `model_io.PackedWeightFile`).
    Returns:
        The quantized model (the same object unless the qdq format needed an
        opset conversion) and the run's report.
    """
    report = Report(config=config.to_dict())
    phase = PhaseTimer(report.phases)
    if config.format is Format.QDQ:
        model = model_io.with_opset(model, rewrite.QDQ_MIN_OPSET)
    with phase("targets"):
        groups, skips = targets.find_targets(model, config)
    report.skipped = [{"node": s.node, "reason": s.reason} for s in skips]
    if not groups:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in skips[:5]) or "it has no MatMul or Gemm"
        raise ModelError(f"nothing to quantize in the model ({reasons})")

    solver = _Solver(model, config, report, phase, jobs, device, progress, total=len(groups), store=store)
    try:
        if config.algo is not Algo.GPTQ:
            solver(groups, {})
        else:
            if calibration is None:
                raise ConfigError("calibration data is required for gptq (give --calib, or use --algo rtn)")
            _calibrate_and_solve(model, groups, calibration, calib, model_dir, tokenizer, solver, phase,
                                 progress)
    finally:
        solver.close()
    with phase("pack+rewrite"):
        rewrite.remove_unused(model)
    for note in report.format_notes:
        logger.info("%s", note)
    return model, report


def _calibrate_and_solve(model: ir.Model, groups: list[targets.WeightGroup], calibration: Any,
                         calib: CalibConfig, model_dir: Path | None, tokenizer: str | os.PathLike | None,
                         solver: _Solver, phase: PhaseTimer, progress: bool) -> None:
    from onnx_gptq import calib_data, calibrate

    providers = calib.providers or calibrate.default_providers()
    budget = calib.memory_budget or default_memory_budget()
    with phase("calibrate"):
        proto = model_io.to_proto(model)  # the float model: one-pass Hessians all come from it
        batches = calib_data.make_batches(calibration, proto, calib, tokenizer=tokenizer)
    # onnxruntime cannot run a model whose float weights exceed the memory at
    # hand; then run it stage by stage in float (same one-pass Hessians).
    import psutil

    too_big = runtime_weight_bytes(model) > psutil.virtual_memory().available // 2
    if calib.sequential or too_big:
        from onnx_gptq.sequential import run_sequential

        if too_big and not calib.sequential:
            logger.warning("the model's float weights exceed half the free memory: calibrating block by "
                           "block in float (same Hessians as one pass, bounded memory)")
        run_sequential(model, groups, batches, solve_stage=solver, model_dir=model_dir, providers=providers,
                       progress=progress, timings=solver.report.phases, float_forward=not calib.sequential)
        return
    passes = plan_passes(groups, budget)
    if len(passes) > 1:
        logger.info("Hessians exceed the memory budget: calibrating in %d passes", len(passes))
    for chunk in passes:
        activations = sorted({t.activation.name for g in chunk for t in g.targets})
        with phase("calibrate"):
            # Each planned pass fits the budget, so onnxruntime runs it in one go.
            stats = calibrate.collect_hessians(proto, activations, batches, model_dir=model_dir,
                                               providers=providers, max_output_bytes=budget,
                                               progress=progress)
        solver(chunk, stats)
        del stats


def quantize_with_report(model: ModelLike, calibration: Any = None, config: QuantConfig | None = None, *,
                         calib: CalibConfig | None = None, output: str | os.PathLike | None = None,
                         tokenizer: str | os.PathLike | None = None, report: str | os.PathLike | None = None,
                         jobs: int = 1, device: str | None = None,
                         progress: bool = False) -> tuple[ModelLike, Report]:
    """Like :func:`quantize`, also returning the run's :class:`Report`."""
    config = config or QuantConfig()
    calib = calib or CalibConfig()
    if isinstance(model, (str, os.PathLike)):
        if output is None:
            raise ConfigError("output: a path is needed when the model is given as a path")
        source = Path(model)
        destination = model_io.check_output_path(source, Path(output))
        loaded, size_before = model_io.load(source)
        with model_io.staging_dir(destination) as staging:
            # Packed weights go to disk as they are produced (bounded memory).
            packed = model_io.PackedWeightFile(staging)
            try:
                loaded, run = quantize_model(loaded, _resolve_calibration(calibration, source, calib), config,
                                             calib=calib, model_dir=source.parent, tokenizer=tokenizer,
                                             jobs=jobs, device=device, progress=progress, store=packed)
            finally:
                packed.close()
            run.size_before = size_before
            with PhaseTimer(run.phases)("save"):
                run.size_after = model_io.save_atomic(loaded, destination, staging)
        result: ModelLike = destination
    elif isinstance(model, onnx.ModelProto):
        loaded = ir.serde.deserialize_model(model)
        loaded, run = quantize_model(loaded, calibration, config, calib=calib, tokenizer=tokenizer,
                                     jobs=jobs, device=device, progress=progress)
        result = ir.serde.serialize_model(loaded)
    elif isinstance(model, ir.Model):
        result, run = quantize_model(model, calibration, config, calib=calib,
                                     model_dir=model_io.base_dir(model), tokenizer=tokenizer,
                                     jobs=jobs, device=device, progress=progress)
    else:
        raise ConfigError(f"model: expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")
    if report is not None:
        run.write(report)
    return result, run


def quantize(model: ModelLike, calibration: Any = None, config: QuantConfig | None = None, *,
             calib: CalibConfig | None = None, output: str | os.PathLike | None = None,
             tokenizer: str | os.PathLike | None = None, report: str | os.PathLike | None = None,
             jobs: int = 1, device: str | None = None, progress: bool = False) -> ModelLike:
    """GPTQ-quantize an ONNX model.

    Args:
        model: a path to an .onnx file, an onnx.ModelProto, or an onnx_ir.Model.
        calibration: a text file (with `tokenizer`), a .npy/.jsonl file of token
            ids, a datasets.Dataset, an iterable of strings or of input dicts,
            or "self" (sequences sampled from the model). Not needed for rtn.
        config: quantization settings (default: 4-bit, group 128, asymmetric).
        calib: calibration settings (default: 128 samples x 512 tokens).
        output: where to write the result; required when `model` is a path.
        tokenizer: tokenizer.json, a tokenizer directory, or a .gguf file.
        report: optional path of a JSON report.
        jobs: weights solved concurrently (threads).
        device: torch device for the solver (default: CUDA if available, else CPU).
        progress: show progress bars.
    Returns:
        The quantized model, of the same kind as `model` (the output path for a path).
    """
    return quantize_with_report(model, calibration, config, calib=calib, output=output, tokenizer=tokenizer,
                                report=report, jobs=jobs, device=device, progress=progress)[0]


def _resolve_calibration(calibration: Any, model_path: Path, calib: CalibConfig) -> Any:
    """`"self"` means: sample calibration sequences from the float model itself."""
    if isinstance(calibration, str) and calibration == "self":
        from onnx_gptq.calibrate import default_providers
        from onnx_gptq.self_calib import generate_calibration

        return generate_calibration(model_path, num_samples=calib.num_samples, seq_len=calib.seq_len,
                                    seed=calib.seed, providers=calib.providers or default_providers())
    return calibration
