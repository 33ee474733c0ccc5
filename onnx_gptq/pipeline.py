"""The pass: targets -> calibrate -> solve -> pack -> rewrite -> save, and the public `quantize`.

:class:`GptqPass` is an onnx-ir in-place pass (``requires`` / ``call`` /
``ensures``) over an `onnx_ir.Model`; :func:`quantize_with_report` loads the
model, runs the pass and saves the result, returning the kind it was given: a
path in (with `output`), a path out; a ModelProto in, a ModelProto out; an
onnx_ir Model in, the same Model out (rewritten in place, as onnx-ir passes do).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes

from onnx_gptq import embedding, model_folder, model_io, rewrite, targets
from onnx_gptq.calibrate import statistics
from onnx_gptq.config import Algo, CalibConfig, Format, LayerFilter, QuantConfig
from onnx_gptq.errors import ConfigError, ModelError, UserError
from onnx_gptq.layer_quantizer import LayerQuantizer
from onnx_gptq.report import PhaseTimer, Report

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


@dataclasses.dataclass
class GptqResult(ir.passes.PassResult):
    """The pass's result: the model, whether it changed, and what the run did."""

    report: Report | None = None


class GptqPass(ir.passes.InPlacePass):
    """GPTQ weight-only quantization of an onnx_ir Model, in place.

    Args:
        config: how weights are quantized.
        calibration: calibration data (see `calibrate.make_batches`); None for rtn.
        calib: calibration settings.
        layers: which layers (default: `config.layers`).
        model_dir: directory external data is relative to (None: in memory).
        tokenizer: for text calibration data.
        jobs: weights solved concurrently.
        device: torch device for the solver (None: CUDA if available, else CPU).
        progress: show progress bars.
        store: makes the packed tensors (default: in memory; see `model_io.PackedWeightFile`).
    """

    def __init__(self, config: QuantConfig, calibration: Any = None, *, calib: CalibConfig | None = None,
                 layers: LayerFilter | None = None, model_dir: Path | None = None,
                 tokenizer: str | os.PathLike | None = None, jobs: int = 1, device: str | None = None,
                 progress: bool = False, store: rewrite.TensorStore | None = None) -> None:
        super().__init__()
        self.config, self.calibration = config, calibration
        self.calib = calib or CalibConfig()
        self.layers = layers or config.layers
        self.model_dir, self.tokenizer = model_dir, tokenizer
        self.jobs, self.device, self.progress, self.store = jobs, device, progress, store
        self._written: set[str] = set()

    def requires(self, model: ir.Model) -> None:
        """The model can take this configuration; gptq has calibration data.

        Raises:
            ConfigError: gptq without calibration data; qdq below opset 21
                (`model_io.with_opset` converts first).
        """
        if self.config.algo is Algo.GPTQ and self.calibration is None:
            raise ConfigError("calibration data is required for gptq (give --calib, or use --algo rtn)")
        if self.config.format is Format.QDQ and model_io.default_opset(model) < rewrite.QDQ_MIN_OPSET:
            raise ConfigError(f"format 'qdq' needs opset >= {rewrite.QDQ_MIN_OPSET}; convert the model with "
                              "model_io.with_opset first")

    def call(self, model: ir.Model) -> GptqResult:
        calib, calib_dict = self.calib, None
        if self.config.algo is Algo.GPTQ:
            from onnx_gptq.calibrate.model_kind import choose_split

            # Resolved once, so the report says which split ran and why.
            split, reason = choose_split(calib.split, model, self.model_dir)
            calib = dataclasses.replace(calib, split=split)
            calib_dict = calib.to_dict() | {"split_reason": reason}
        report = Report(config=self.config.to_dict(), selection=self.layers.to_dict(), calib=calib_dict,
                        run={"jobs": self.jobs, "device": self.device})
        phase = PhaseTimer(report.phases)
        with phase("targets"):
            groups = self._targets(model, report)
        quantizer = LayerQuantizer(model, self.config, report, phase, self.jobs, self.device, self.progress,
                                   total=len(groups), store=self.store)
        try:
            if self.config.algo is Algo.GPTQ and groups:
                self._calibrate_and_solve(model, groups, quantizer, phase, calib)
            else:
                quantizer(groups, {})  # round to nearest: no statistics
        finally:
            quantizer.close()
        if self.config.embedding_bits is not None:
            with phase("embedding"):  # after the head: a tied table may read its packed codes
                embedding.quantize_embeddings(model, self.config, quantizer.heads, report, taken=quantizer.taken,
                                              store=self.store, device=self.device)
        with phase("pack+rewrite"):
            rewrite.remove_unused(model)
        self._written = quantizer.taken
        for note in report.format_notes:
            logger.debug("%s", note)
        return GptqResult(model, modified=bool(report.layers or report.embeddings),
                           report=report)

    def ensures(self, model: ir.Model) -> None:
        """Nothing to be written holds NaN or Inf (NonFiniteError naming the tensor)."""
        rewrite.check_finite(model, self._written)

    def _targets(self, model: ir.Model, report: Report) -> list[targets.WeightGroup]:
        """Stage 1: the weight groups to quantize; every other MatMul/Gemm goes to the report."""
        groups, skips = targets.find_targets(model, self.layers)
        report.skipped = [{"node": s.node, "reason": s.reason} for s in skips]
        if groups:
            _check_rules_match(self.config, groups)
            return groups
        unmatched = [s.node for s in skips if s.reason == targets.NOT_INCLUDED]
        # Only when no weight matched an include pattern (then excluded, or the head, ...).
        others = [s for s in skips if s.reason.startswith(targets.SELECTION_REASONS)]
        if self.layers.include and unmatched and not others:
            patterns = ", ".join(repr(p) for p in self.layers.include)
            raise ConfigError(f"include: {patterns} matched no layer (layers are named like "
                              f"{', '.join(repr(n) for n in unmatched[:3])}; -v lists them all)")
        if self.config.embedding_bits is not None and embedding.find_embeddings(model):
            return []  # only the embedding table to quantize (e.g. a model whose MatMuls already are)
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in skips[:5]) or "it has no MatMul or Gemm"
        raise ModelError(f"nothing to quantize in the model ({reasons})")

    def _calibrate_and_solve(self, model: ir.Model, groups: list[targets.WeightGroup],
                             quantizer: LayerQuantizer, phase: PhaseTimer, calib: CalibConfig) -> None:
        """Stage 2, then 3-5 per calibration pass (or per sequential stage); `calib` has its split resolved."""
        from onnx_gptq import calibrate
        from onnx_gptq.runtime import sessions

        providers = calib.providers or sessions.default_providers()
        budget = calib.memory_budget or statistics.default_memory_budget()
        with phase("calibrate"):
            batches = calibrate.make_batches(self.calibration, model, calib, tokenizer=self.tokenizer,
                                             model_dir=self.model_dir)
        # onnxruntime cannot run a model whose float weights exceed the memory at
        # hand; then run it stage by stage in float (same one-pass Hessians).
        import psutil

        from onnx_gptq.calibrate.sequential import choose_mode, run_sequential

        with phase("calibrate"):
            partition, reason = choose_mode(calib.sequential, model, groups)
        sequential = partition is not None
        logger.info("calibration: %s", reason)
        if quantizer.report.calib is not None:  # the report says which ran and why
            quantizer.report.calib.update(sequential=sequential, sequential_reason=reason)
        too_big = statistics.runtime_weight_bytes(model) > psutil.virtual_memory().available // 2
        if sequential or too_big:
            if too_big and not sequential:
                logger.warning("the model's float weights exceed half the free memory: calibrating block by "
                               "block in float (same Hessians as one pass, bounded memory)")
            run_sequential(model, groups, batches, solve_stage=quantizer, model_dir=self.model_dir,
                           providers=providers, progress=self.progress, timings=quantizer.report.phases,
                           partition=partition, float_forward=not sequential, hold_out=self.config.damp_auto)
            return
        with phase("calibrate"):
            proto = model_io.to_proto(model)  # the float model: one-pass Hessians all come from it
        passes = statistics.plan_passes(groups, activation_widths, budget, held_out=self.config.damp_auto)
        if len(passes) > 1:
            logger.info("Hessians exceed the memory budget: calibrating in %d passes", len(passes))
        for chunk in passes:
            activations = sorted({t.activation.name for g in chunk for t in g.targets})
            with phase("calibrate"):
                # Each planned pass fits the budget, so onnxruntime runs it in one go.
                stats = calibrate.collect_hessians(proto, activations, batches, model_dir=self.model_dir,
                                                   providers=providers, memory_budget=budget,
                                                   progress=self.progress, hold_out=self.config.damp_auto)
            quantizer(chunk, stats)
            del stats


def _check_rules_match(config: QuantConfig, groups: list[targets.WeightGroup]) -> None:
    """A layer rule that matches no quantized layer is a typo, not a no-op: say so."""
    import re

    for rule in config.layer_rules:
        if not any(re.search(rule.pattern, n) for g in groups for n in g.names):
            examples = ", ".join(repr(g.targets[0].module or g.name) for g in groups[:3])
            raise ConfigError(f"layer_config {rule.pattern!r} matched no quantized layer (layers are named "
                              f"like {examples}; -v lists the skipped ones)")


def activation_widths(group: targets.WeightGroup) -> dict[str, int]:
    """The activations one weight's consumers read, each of width K."""
    return {t.activation.name: group.shape[0] for t in group.targets}


def run_pass(gptq_pass: GptqPass, model: ir.Model) -> GptqResult:
    """Run `gptq_pass`; a precondition or postcondition that is the user's error stays one.

    onnx-ir wraps what `requires` and `ensures` raise into its Pre/PostconditionError;
    ours are UserErrors with a one-line message for the user (exit code 2).
    """
    try:
        result = gptq_pass(model)
    except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
        if isinstance(exc.__cause__, UserError):
            raise exc.__cause__ from None
        raise
    assert isinstance(result, GptqResult)
    return result


def quantize_model(model: ir.Model, calibration: Any, config: QuantConfig, *, calib: CalibConfig,
                   layers: LayerFilter | None = None, model_dir: Path | None = None,
                   tokenizer: str | os.PathLike | None = None, jobs: int = 1, device: str | None = None,
                   progress: bool = False, store: rewrite.TensorStore | None = None) -> tuple[ir.Model, Report]:
    """Quantize `model` with :class:`GptqPass` (in place, unless qdq needs a newer opset first).

    Args are those of :class:`GptqPass`.

    Returns:
        The quantized model (the same object unless the qdq format needed an
        opset conversion) and the run's report.
    """
    if config.format is Format.QDQ:
        model = model_io.with_opset(model, rewrite.QDQ_MIN_OPSET)
    gptq_pass = GptqPass(config, calibration, calib=calib, layers=layers, model_dir=model_dir, tokenizer=tokenizer,
                         jobs=jobs, device=device, progress=progress, store=store)
    result = run_pass(gptq_pass, model)
    assert result.report is not None
    return result.model, result.report


def check_run_options(config: QuantConfig, calib: CalibConfig, *, jobs: int, device: str | None) -> None:
    """Refuse option values that would fail only after calibration has begun.

    (Include/exclude regexes are checked when the configs are built.)

    Args:
        config: the quantization settings.
        calib: its seed must be one numpy accepts (non-negative).
        jobs: weights solved at once, at least 1.
        device: a torch device this machine has (None: chosen automatically).
    Raises:
        ConfigError: naming the option.
    """
    if calib.seed < 0:
        raise ConfigError(f"seed: {calib.seed} must be zero or positive")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs: {jobs!r} must be a positive integer (weights solved at once)")
    if device is not None:
        _check_device(device)


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device: {device!r} is not a torch device (use cpu or cuda)") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ConfigError(f"device: {device!r} is not supported by the solver (use cpu or cuda)")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for, but torch sees no CUDA GPU (use cpu)")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r}: torch sees {torch.cuda.device_count()} GPU(s)")


def quantize_with_report(model: ModelLike, calibration: Any = None, config: QuantConfig | None = None, *,
                         calib: CalibConfig | None = None, output: str | os.PathLike | None = None,
                         tokenizer: str | os.PathLike | None = None, report: str | os.PathLike | None = None,
                         jobs: int = 1, device: str | None = None, progress: bool = False,
                         layers: LayerFilter | None = None) -> tuple[ModelLike, Report]:
    """Like :func:`quantize`, also returning the run's :class:`Report`."""
    config = config or QuantConfig()
    calib = calib or CalibConfig()
    check_run_options(config, calib, jobs=jobs, device=device)
    if isinstance(model, (str, os.PathLike)):
        if output is None:
            raise ConfigError("output: a path is needed when the model is given as a path")
        folder = model_folder.resolve(model)
        result: ModelLike
        result, run = _quantize_path(folder, Path(output), calibration, config, calib=calib, layers=layers,
                                     tokenizer=tokenizer if tokenizer is not None else folder.tokenizer,
                                     report=None if report is None else Path(report), jobs=jobs, device=device,
                                     progress=progress)
    elif isinstance(model, onnx.ModelProto):
        if report is not None:
            model_io.check_report_path(Path(report))
        loaded = ir.serde.deserialize_model(model)
        loaded, run = quantize_model(loaded, calibration, config, calib=calib, layers=layers, tokenizer=tokenizer,
                                     jobs=jobs, device=device, progress=progress)
        result = ir.serde.serialize_model(loaded)
    elif isinstance(model, ir.Model):
        if report is not None:
            model_io.check_report_path(Path(report))
        result, run = quantize_model(model, calibration, config, calib=calib, layers=layers,
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
             jobs: int = 1, device: str | None = None, progress: bool = False,
             layers: LayerFilter | None = None) -> ModelLike:
    """GPTQ-quantize an ONNX model.

    Args:
        model: a path to an .onnx file, an onnx.ModelProto, or an onnx_ir.Model.
        calibration: a text file (with `tokenizer`), a .npy/.jsonl file of token
            ids, a datasets.Dataset, an iterable of strings or of input dicts,
            or "self" (sequences sampled from the model). Not needed for rtn.
        config: how weights are quantized (default: 4-bit, group 128, asymmetric);
            its include/exclude/quantize_head choose the layers unless `layers` is given.
        calib: calibration settings (default: 128 samples x 512 tokens).
        output: where to write the result; required when `model` is a path.
        tokenizer: tokenizer.json, a tokenizer directory, or a .gguf file.
        report: optional path of a JSON report.
        jobs: weights solved concurrently (threads).
        device: torch device for the solver (default: CUDA if available, else CPU).
        progress: show progress bars.
        layers: which layers are quantized (default: `config.layers`).
    Returns:
        The quantized model, of the same kind as `model` (the output path for a path).
    """
    return quantize_with_report(model, calibration, config, calib=calib, output=output, tokenizer=tokenizer,
                                report=report, jobs=jobs, device=device, progress=progress, layers=layers)[0]


def _quantize_path(folder: model_folder.ModelFolder, output: Path, calibration: Any, config: QuantConfig, *,
                   calib: CalibConfig, layers: LayerFilter | None, tokenizer: str | os.PathLike | None,
                   report: Path | None, jobs: int, device: str | None, progress: bool) -> tuple[Path, Report]:
    """Quantize the model file of `folder` into `output`: a file, or a complete folder (`model_folder.writes_folder`).

    Returns:
        The output path and the run's report.
    """
    source = folder.model
    loaded, size_before = model_io.load(source)
    inputs = model_io.input_files(source, loaded)
    as_folder = model_folder.writes_folder(folder, output)
    if as_folder:
        model_folder.check_output_folder(folder, output, report=report)
        if report is not None:
            model_io.refuse_inputs("report", model_io.check_report_path(report), source, inputs)
    else:
        model_io.check_output_path(source, output, inputs=inputs, report=report)
    with model_io.staging_dir(output) as staging:
        destination = output
        if as_folder:
            (staging / "folder").mkdir()
            destination = staging / "folder" / source.name
        # Packed weights go to disk as they are produced (bounded memory).
        packed = model_io.PackedWeightFile(staging)
        try:
            loaded, run = quantize_model(loaded, _resolve_calibration(calibration, source, calib), config,
                                         calib=calib, layers=layers, model_dir=source.parent,
                                         tokenizer=tokenizer, jobs=jobs, device=device, progress=progress,
                                         store=packed)
        finally:
            packed.close()
        run.size_before = size_before
        with PhaseTimer(run.phases)("save"):
            # Read the written file back before it appears: it must hold exactly the
            # packed bytes the solver's results were staged as (so the report's errors
            # describe the file).
            run.size_after = model_io.save_atomic(loaded, destination, staging, avoid=inputs,
                                                  check=lambda written: _verify(packed, written, run))
            if as_folder:
                custom = any(node.domain == rewrite.CUSTOM_DOMAIN for node in loaded.graph)
                model_folder.write_folder(folder, destination.parent, output, inputs=inputs, custom_ops=custom)
    return output, run


def _verify(packed: model_io.PackedWeightFile, written: Path, run: Report) -> None:
    """Check the written model against the staged packed tensors and record the count."""
    run.verified_tensors = packed.verify(written)
    logger.info("verified %d packed tensors in '%s' bit for bit", run.verified_tensors, written)


def _resolve_calibration(calibration: Any, model_path: Path, calib: CalibConfig) -> Any:
    """A generated source (`"self"`: sequences sampled from the float model) made into token rows."""
    from onnx_gptq.calibrate.sources import resolve_generated

    return resolve_generated(calibration, model_path, calib)


__all__ = ["GptqPass", "GptqResult", "quantize", "quantize_model", "quantize_with_report"]
