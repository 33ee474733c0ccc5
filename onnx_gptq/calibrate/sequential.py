"""True-sequential calibration: each block's Hessians see every earlier block already quantized.

The reference GPTQ quantizes a transformer block by block, feeding block i the
outputs of the *quantized* blocks 0..i-1. On an ONNX graph the same is done
without re-running the whole model per block:

1. **Partition.** In topological order, a *cut* is a point where few tensors
   cross (the residual stream plus shared tensors such as the attention mask,
   rotary cos/sin, position ids and small shape tensors). Constant
   sub-computations (initializers, `Constant` nodes and nodes computed from
   constants only) never cross a cut: each stage recomputes the ones it reads.
   One cut is placed between consecutive transformer blocks (told apart by
   the layer index in the torch module path or node name), at the point of
   the gap with the fewest crossing tensors; models without such names get
   a cut between every pair of consecutive quantized layers where one exists.
2. **Run stage by stage.** The crossing tensors of the calibration set are
   cached (numpy; spilled to `.npy` memory-mapped files above a byte budget)
   and each is dropped after its last reader. For stage i, a submodel of the
   *current* graph (earlier stages already rewritten into packed ops) is built
   with the crossing tensors as inputs; onnxruntime collects its Hessians
   (`calibrate.collect_hessians`), the caller's `solve_stage` quantizes and
   rewrites its layers, and the now-quantized stage runs once more to produce
   the next stages' inputs. Each stage thus runs twice, as in the reference.

Stage submodels never copy the float weights: external tensors stay
references to the user's data files (`model_dir`), and only tensors that live
elsewhere (packed weights, in memory or in the run's staging file; small
models) are embedded. The stages come from `calibrate.partition`, the cache
from `calibrate.activation_cache`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_gptq.calibrate.activation_cache import ActivationCache
from onnx_gptq.calibrate.batching import token_mask
from onnx_gptq.calibrate.partition import (DEFAULT_MAX_CROSSING, Partition, Stage, StageView, plan_stages,
                                           stage_view)
from onnx_gptq.calibrate.run import collect_hessians
from onnx_gptq.calibrate.statistics import HessianStats
from onnx_gptq.errors import CalibrationError, ModelError
from onnx_gptq.graph import reads
from onnx_gptq.report import PhaseTimer
from onnx_gptq.runtime import sessions
from onnx_gptq.targets import WeightGroup

logger = logging.getLogger(__name__)

SolveStage = Callable[[list[WeightGroup], dict[str, HessianStats]], None]


def _value_info(value: ir.Value, arrays: Sequence[np.ndarray] | None = None) -> onnx.ValueInfoProto:
    """A ValueInfoProto of `value`.

    With `arrays` (the cached tensors of every batch), dtype and rank come from
    them; dims equal in every batch are fixed (so calibration can read K off
    an input), the others are symbolic.
    """
    if arrays:
        dtype = ir.DataType.from_numpy(arrays[0].dtype)
        shapes = {a.shape for a in arrays}
        dims: list[int | str] = []
        for i in range(arrays[0].ndim):
            sizes = {shape[i] for shape in shapes}
            dims.append(int(next(iter(sizes))) if len(sizes) == 1 else f"{value.name}_d{i}")
        return onnx.helper.make_tensor_value_info(value.name, int(dtype), dims)
    if value.type is None:
        return onnx.helper.make_empty_tensor_value_info(value.name)
    return ir.serde.serialize_value(value)


def _stage_tensor(tensor: ir.TensorProtocol, model_dir: Path | None) -> onnx.TensorProto:
    """`tensor` as the stage session can read it: a reference if it lives in `model_dir`'s
    data files, else its bytes (packed weights this run wrote to its staging directory)."""
    if isinstance(tensor, ir.ExternalTensor) and (
            model_dir is None or Path(tensor.base_dir).resolve() != Path(model_dir).resolve()):
        embedded = ir.serde.serialize_tensor(ir.Tensor(tensor.numpy().copy(), name=tensor.name))
        tensor.release()
        return embedded
    return ir.serde.serialize_tensor(tensor)


def _stage_proto(model: ir.Model, view: StageView, examples: dict[str, list[np.ndarray]],
                 outputs: Sequence[ir.Value], model_dir: Path | None) -> onnx.ModelProto:
    """A ModelProto of one stage: inputs are its crossing tensors, weights stay external references.

    Args:
        model: the current model.
        view: the stage's nodes and boundary tensors.
        examples: input name -> its cached arrays, one per batch (for dtype and shape).
        outputs: the graph outputs to declare.
        model_dir: the directory the session reads external data from.
    """
    graph = onnx.GraphProto(name="onnx_gptq_stage")
    read: dict[str, ir.Value] = {}
    for node in view.nodes:
        graph.node.append(ir.serde.serialize_node(node))
        for value in reads(node):
            read.setdefault(value.name or "", value)
    for value in view.inputs:
        graph.input.append(_value_info(value, examples[value.name or ""]))
    for value in outputs:
        graph.output.append(_value_info(value))
    seen: set[str] = set()
    for value_name, value in read.items():
        if value.is_graph_input() or value_name in seen:
            continue
        if value.const_value is not None and (value.is_initializer() or value.producer() is None):
            seen.add(value_name)
            tensor = _stage_tensor(value.const_value, model_dir)
            tensor.name = value_name
            graph.initializer.append(tensor)
    declared = {v.name for v in [*view.inputs, *outputs]}
    for node in view.nodes:
        for value in node.outputs:
            if value.name and value.name not in declared and value.type is not None:
                graph.value_info.append(ir.serde.serialize_value(value))

    proto = onnx.ModelProto(ir_version=model.ir_version, producer_name="onnx_gptq.sequential", graph=graph)
    for domain, version in model.opset_imports.items():
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
    for function in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(function))
    return proto


def _forward_session(proto: onnx.ModelProto, model_dir: Path | None,
                     providers: Sequence[str]) -> sessions.Session:
    """An onnxruntime session over a stage submodel (custom-op library registered when needed)."""
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    folder = Path(model_dir).resolve() if model_dir is not None and external else None
    return sessions.make_session(proto, providers=providers, what="a sequential calibration stage submodel",
                                 external_folder=folder, optimize=True)


# ---------------------------------------------------------------------------
# Sequential or one pass


def choose_mode(requested: bool | None, model: ir.Model, groups: list[WeightGroup], *,
                max_crossing: int = DEFAULT_MAX_CROSSING) -> tuple[Partition | None, str]:
    """Whether calibration runs sequentially, on which plan, and why.

    Sequential calibration measured better than one pass at every bit width on
    SmolLM2 (docs/BENCHMARKS.md, "Sequential or one pass"), so `None` (auto)
    takes it wherever the graph can be cut into at least two stages.

    Args:
        requested: True (sequential), False (one pass) or None (auto).
        model: the model, before any layer is rewritten.
        groups: the weights to quantize.
        max_crossing: most non-constant tensors a cut may cross.

    Returns:
        (the stages to calibrate sequentially, None for one pass; the reason, in words).

    Raises:
        ModelError: sequential asked for (True) on a graph with no usable cut.
    """
    name = model.graph.name or "model"
    if requested is False:
        return None, "as asked"
    if requested:
        return plan_stages(model, groups, max_crossing=max_crossing, name=name), "as asked"
    try:
        partition = plan_stages(model, groups, max_crossing=max_crossing, name=name)
    except ModelError as exc:
        return None, f"auto: the graph has no cut between its layers: {exc}"
    if len(partition.stages) < 2:
        return None, "auto: the quantized layers form one stage"
    return partition, f"auto: the graph cuts into {len(partition.stages)} stages"


# ---------------------------------------------------------------------------
# The runner


def run_sequential(model: ir.Model, groups: list[WeightGroup], batches: list[dict[str, np.ndarray]], *,
                   solve_stage: SolveStage, model_dir: Path | None, providers: Sequence[str],
                   cache_dir: Path | None = None, spill_bytes: int = 2 << 30, progress: bool = False,
                   max_crossing: int = DEFAULT_MAX_CROSSING, partition: Partition | None = None,
                   timings: dict[str, float] | None = None, float_forward: bool = False,
                   hold_out: bool = False) -> None:
    """Calibrate and quantize `model` stage by stage, each stage seeing earlier ones quantized.

    Args:
        model: the model; `solve_stage` rewrites its layers in place.
        groups: the weights to quantize (from `targets.find_targets`).
        batches: calibration feeds, graph input name -> array, one dict per run.
        solve_stage: called once per stage, in graph order, with the stage's
            groups and activation name -> HessianStats for their consumers'
            inputs; it must rewrite those groups' nodes in `model`.
        model_dir: directory external data locations are relative to (None: in memory).
        providers: onnxruntime execution providers.
        cache_dir: where cached activations spill (default: a temporary directory, removed after).
        spill_bytes: in-memory budget for cached crossing tensors; beyond it they go to disk.
        progress: show a progress bar over stages.
        max_crossing: most non-constant tensors a cut may cross.
        partition: a plan from `plan_stages` (planned here when None).
        timings: when given, seconds are added under "sequential:plan",
            "sequential:calibrate" (Hessian runs), "sequential:solve" (the
            `solve_stage` calls) and "sequential:forward" (runs producing the
            next stages' inputs).
        float_forward: run each stage forward *before* quantizing it, so
            every stage is calibrated on the float model's activations: the
            one-pass Hessians, with onnxruntime holding one stage's weights at
            a time instead of the whole model's (a staged one-pass). A
            quantized layer whose output itself crosses a cut is then
            reported as a ModelError by the next stage.
        hold_out: the statistics also keep a held-out slice of the batches (damp "auto").

    Raises:
        ModelError: no usable cut (see `plan_stages`); a stage submodel onnxruntime cannot load.
        CalibrationError: no batches, a batch missing a graph input, or onnxruntime failing on a stage.
    """
    if not batches:
        raise CalibrationError("calibration data is empty: no batch was given")
    name = model.graph.name or "model"
    clock = PhaseTimer(timings)
    with clock("sequential:plan"):
        partition = partition or plan_stages(model, groups, max_crossing=max_crossing, name=name)
    input_names = [v.name or "" for v in model.graph.inputs]
    cache = ActivationCache(len(batches), spill_bytes, cache_dir)
    try:
        for b, feeds in enumerate(batches):
            for input_name in input_names:
                if input_name not in feeds:
                    raise CalibrationError(f"calibration batch {b}: model input '{input_name}' is not fed")
                cache.add(input_name, b, np.asarray(feeds[input_name]))
        stages: Iterable[Stage] = partition.stages
        if progress:
            from tqdm.auto import tqdm

            stages = tqdm(stages, desc="sequential stages", unit="stage")
        # A stage's own inputs rarely include the mask: take the padding from the model's batches.
        masks = [token_mask(feeds) for feeds in batches]
        for stage in stages:
            _run_stage(model, partition, stage, cache, solve_stage=solve_stage, model_dir=model_dir,
                       providers=providers, progress=progress, clock=clock, float_forward=float_forward,
                       masks=masks, hold_out=hold_out)
        logger.info("sequential calibration: %d stages; activation cache peak %.1f MB in memory, %.1f MB spilled",
                    len(partition.stages), cache.peak_memory_bytes / 1e6, cache.spilled_bytes / 1e6)
    finally:
        cache.close()


def _run_stage(model: ir.Model, partition: Partition, stage: Stage, cache: ActivationCache, *,
               solve_stage: SolveStage, model_dir: Path | None, providers: Sequence[str], progress: bool,
               clock: PhaseTimer, float_forward: bool, masks: list[np.ndarray | None], hold_out: bool) -> None:
    graph = model.graph
    last = stage.index == len(partition.stages) - 1
    view = stage_view(graph, partition, stage.index)
    missing = [v.name for v in view.inputs if v.name not in cache]
    if missing:
        raise ModelError(f"sequential calibration: stage {stage.index} reads '{missing[0]}', which no earlier "
                         "stage produced (is the node order topological?)")
    feeds = [{v.name: cache.get(v.name, b) for v in view.inputs} for b in range(cache.num_batches)]
    examples = {v.name: [cache.get(v.name, b) for b in range(cache.num_batches)] for v in view.inputs}

    if float_forward and not last and view.outputs:
        with clock("sequential:forward"):
            _forward(model, view, examples, feeds, cache, stage.index, model_dir, providers)
    if stage.groups:
        activations = sorted({t.activation.name for g in stage.groups for t in g.targets})
        with clock("sequential:calibrate"):
            proto = _stage_proto(model, view, examples, outputs=[], model_dir=model_dir)
            stats = collect_hessians(proto, activations, feeds, model_dir=model_dir,
                                     providers=providers, progress=progress, token_masks=masks,
                                     hold_out=hold_out)
            del proto
        with clock("sequential:solve"):
            solve_stage(stage.groups, stats)
        del stats
        view = stage_view(graph, partition, stage.index)  # the stage as rewritten

    if not float_forward and not last and view.outputs:
        with clock("sequential:forward"):
            _forward(model, view, examples, feeds, cache, stage.index, model_dir, providers)
    del feeds, examples
    for cached in cache.names():
        if cached not in view.later_reads:
            cache.drop(cached)


def _forward(model: ir.Model, view: StageView, examples: dict[str, list[np.ndarray]],
             feeds: list[dict[str, np.ndarray]], cache: ActivationCache, index: int, model_dir: Path | None,
             providers: Sequence[str]) -> None:
    """Run the (quantized) stage on every batch and cache the outputs later stages read."""
    proto = _stage_proto(model, view, examples, outputs=view.outputs, model_dir=model_dir)
    session = _forward_session(proto, model_dir, providers)
    del proto
    output_names = [v.name for v in view.outputs]
    for b, batch in enumerate(feeds):
        results = session.run(output_names, batch, context=f"sequential calibration: stage {index}, batch {b}")
        for output_name, array in zip(output_names, results):
            cache.add(output_name, b, array)
    del session


__all__ = ["ActivationCache", "DEFAULT_MAX_CROSSING", "Partition", "Stage", "choose_mode", "run_sequential"]
