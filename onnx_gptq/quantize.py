"""The pass: targets -> calibrate -> solve -> pack -> rewrite, and the public `quantize`.

`quantize` returns the kind it was given: a path in (with `output`), a path
out; a ModelProto in, a ModelProto out; an onnx_ir Model in, the same Model
out (rewritten in place, as onnx-ir passes do).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnx_gptq import model_io, rewrite, targets
from onnx_gptq.config import Algo, CalibConfig, Format, QuantConfig
from onnx_gptq.errors import ConfigError, ModelError
from onnx_gptq.report import LayerRow, Report

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


class _Phases:
    """Wall time per pipeline phase."""

    def __init__(self, report: Report) -> None:
        self.report = report

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.report.phases[name] = self.report.phases.get(name, 0.0) + time.perf_counter() - start


def _scale_dtype(dtype: ir.DataType) -> np.dtype:
    return np.dtype(dtype.numpy()) if dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else np.dtype(np.float32)


def _hessians(model: ir.Model, model_dir: Path | None, groups: list[targets.WeightGroup], calibration: Any,
              calib: CalibConfig, tokenizer: str | os.PathLike | None, progress: bool) -> dict[str, Any]:
    """Run calibration through onnxruntime: activation name -> HessianStats."""
    from onnx_gptq import calib_data, calibrate

    proto = model_io.to_proto(model)
    batches = calib_data.make_batches(calibration, proto, calib, tokenizer=tokenizer)
    activations = sorted({t.activation.name for g in groups for t in g.targets})
    return calibrate.collect_hessians(proto, activations, batches, model_dir=model_dir,
                                      providers=calib.providers, progress=progress)


def quantize_model(model: ir.Model, calibration: Any, config: QuantConfig, *, calib: CalibConfig,
                   model_dir: Path | None = None, tokenizer: str | os.PathLike | None = None,
                   progress: bool = False) -> tuple[ir.Model, Report]:
    """Quantize `model` (in place, unless it must first be converted to a newer opset).

    Args:
        model: the model; its quantizable MatMul/Gemm nodes are rewritten.
        calibration: calibration data (see `calib_data.make_batches`); may be
            None with algo "rtn".
        config: how and which weights are quantized.
        calib: calibration settings.
        model_dir: directory external data is relative to (None: in memory).
        tokenizer: tokenizer for text calibration data.
        progress: show progress bars.
    Returns:
        The quantized model (the same object unless the qdq format needed an
        opset conversion) and the run's report.
    """
    from onnx_gptq.solve import solve

    report = Report(config=config.to_dict())
    phase = _Phases(report)
    if config.format is Format.QDQ:
        model = model_io.with_opset(model, rewrite.QDQ_MIN_OPSET)
    with phase("targets"):
        groups, skips = targets.find_targets(model, config)
    report.skipped = [{"node": s.node, "reason": s.reason} for s in skips]
    if not groups:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in skips[:5]) or "it has no MatMul or Gemm"
        raise ModelError(f"nothing to quantize in the model ({reasons})")

    stats: dict[str, Any] = {}
    if config.algo is Algo.GPTQ:
        if calibration is None:
            raise ConfigError("calibration data is required for gptq (give --calib, or use --algo rtn)")
        with phase("calibrate"):
            stats = _hessians(model, model_dir, groups, calibration, calib, tokenizer, progress)

    taken: set[str] = set()
    iterator = groups
    if progress:
        from tqdm import tqdm

        iterator = tqdm(groups, desc="solving", unit="layer")
    for group in iterator:
        with phase("solve"):
            hessian, rows = _group_hessian(group, stats)
            w = group.load()  # [K, N]
            result = solve(w.T, hessian, config, scale_dtype=_scale_dtype(group.dtype), name=group.name)
            del w
        with phase("pack+rewrite"):
            fmt, why = rewrite.choose_format(config.format, result.qweight, group.dtype, group.name)
            if why:
                report.format_notes.append(f"{group.name}: written as {fmt.value} ({why})")
            rewrite.rewrite_group(model, group, result.qweight, fmt, accuracy_level=config.accuracy_level,
                                  taken_names=taken)
        k, n = group.shape
        report.layers.append(LayerRow(
            name=group.name, module=group.targets[0].module, nodes=[t.name for t in group.targets],
            shape=(k, n), bits=config.bits, group_size=result.qweight.group_size, format=fmt.value,
            damp=result.damp, error=result.error, rtn_error=result.rtn_error, seconds=result.seconds,
            calibration_rows=rows))
    with phase("pack+rewrite"):
        rewrite.remove_unused(model)
    for note in report.format_notes:
        logger.info("%s", note)
    return model, report


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


def quantize_with_report(model: ModelLike, calibration: Any = None, config: QuantConfig | None = None, *,
                         calib: CalibConfig | None = None, output: str | os.PathLike | None = None,
                         tokenizer: str | os.PathLike | None = None, report: str | os.PathLike | None = None,
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
        loaded, run = quantize_model(loaded, _resolve_calibration(calibration, source, calib), config,
                                     calib=calib, model_dir=source.parent, tokenizer=tokenizer,
                                     progress=progress)
        run.size_before = size_before
        with _Phases(run)("save"):
            run.size_after = model_io.save_atomic(loaded, destination)
        result: ModelLike = destination
    elif isinstance(model, onnx.ModelProto):
        loaded = ir.serde.deserialize_model(model)
        loaded, run = quantize_model(loaded, calibration, config, calib=calib, tokenizer=tokenizer,
                                     progress=progress)
        result = ir.serde.serialize_model(loaded)
    elif isinstance(model, ir.Model):
        result, run = quantize_model(model, calibration, config, calib=calib,
                                     model_dir=model_io.base_dir(model), tokenizer=tokenizer, progress=progress)
    else:
        raise ConfigError(f"model: expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")
    if report is not None:
        run.write(report)
    return result, run


def quantize(model: ModelLike, calibration: Any = None, config: QuantConfig | None = None, *,
             calib: CalibConfig | None = None, output: str | os.PathLike | None = None,
             tokenizer: str | os.PathLike | None = None, report: str | os.PathLike | None = None,
             progress: bool = False) -> ModelLike:
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
        progress: show progress bars.
    Returns:
        The quantized model, of the same kind as `model` (the output path for a path).
    """
    return quantize_with_report(model, calibration, config, calib=calib, output=output, tokenizer=tokenizer,
                                report=report, progress=progress)[0]


def _resolve_calibration(calibration: Any, model_path: Path, calib: CalibConfig) -> Any:
    """`"self"` means: sample calibration sequences from the float model itself."""
    if isinstance(calibration, str) and calibration == "self":
        from onnx_gptq.self_calib import generate_calibration

        return generate_calibration(model_path, num_samples=calib.num_samples, seq_len=calib.seq_len,
                                    seed=calib.seed, providers=calib.providers)
    return calibration
