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
models) are embedded.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_gptq import calibrate
from onnx_gptq.calibrate import HessianStats
from onnx_gptq.errors import CalibrationError, ModelError
from onnx_gptq import custom_ops
from onnx_gptq.report import PhaseTimer
from onnx_gptq.targets import WeightGroup, module_names

logger = logging.getLogger(__name__)

# A cut through more tensors than this is not a cut: the stage would need to
# cache too much, and the graph is probably not a chain of blocks.
DEFAULT_MAX_CROSSING = 32
# Layer index in a torch module path or node name: "model.layers.3.mlp", "/transformer/h.11/attn/..."
_BLOCK_INDEX = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?|decoder_layers?)[./_](\d+)(?=[./_]|$)")
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"

SolveStage = Callable[[list[WeightGroup], dict[str, HessianStats]], None]


@dataclasses.dataclass
class Stage:
    """One contiguous slice of the graph's non-constant nodes.

    Attributes:
        index: position of the stage, 0 first.
        groups: the weight groups quantized in this stage (those whose last
            consumer lies in it).
        crossing_in: number of tensors computed by earlier stages that enter
            this one, when it was planned (graph inputs not counted).
    """

    index: int
    groups: list[WeightGroup]
    crossing_in: int


@dataclasses.dataclass
class Partition:
    """The planned stages of a graph.

    Attributes:
        stages: in graph order.
        stage_of: id(node) -> stage index, for every non-constant node at planning time.
        keepalive: the planned nodes, held so that their ids are not reused by
            nodes created by rewrites.
    """

    stages: list[Stage]
    stage_of: dict[int, int]
    keepalive: list[ir.Node]


# ---------------------------------------------------------------------------
# Graph analysis


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def _outer_reads(node: ir.Node) -> list[ir.Value]:
    """Values of enclosing scopes read by the subgraphs of `node` (If/Loop/Scan bodies)."""
    local: set[int] = set()
    reads: list[ir.Value] = []
    stack = _subgraphs(node)
    bodies: list[ir.Graph] = []
    while stack:
        graph = stack.pop()
        bodies.append(graph)
        local.update(id(v) for v in graph.inputs)
        local.update(id(v) for v in graph.initializers.values())
        for inner in graph:
            local.update(id(v) for v in inner.outputs)
            stack.extend(_subgraphs(inner))
    for graph in bodies:
        for inner in graph:
            reads.extend(v for v in inner.inputs if v is not None and id(v) not in local)
        reads.extend(v for v in graph.outputs if id(v) not in local)
    return reads


def _reads(node: ir.Node) -> list[ir.Value]:
    """Every value `node` reads, its subgraphs' outer-scope reads included."""
    values = [v for v in node.inputs if v is not None]
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        values.extend(_outer_reads(node))
    return values


def _constant_nodes(graph: ir.Graph) -> set[int]:
    """ids of nodes computed from constants alone (initializers, Constant nodes, and their functions)."""
    const: set[int] = set()
    for node in graph:
        if node.op_type.startswith("Random"):
            continue
        if all(_is_constant(v, const) for v in _reads(node)):
            const.add(id(node))
    return const


def _is_constant(value: ir.Value, const_nodes: set[int]) -> bool:
    if value.is_graph_input():
        return False
    if value.is_initializer() or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and id(producer) in const_nodes


def _crossing_counts(nodes: list[ir.Node], const_nodes: set[int]) -> list[int]:
    """Live non-constant tensors at each cut position.

    Position p separates nodes[:p] from nodes[p:]; a tensor crosses it when it
    is produced before p and read at or after p. Graph inputs do not count:
    every stage reads them from the calibration batches (the past key/value
    inputs of a KV-cache export would otherwise make every cut look wide).

    Returns:
        counts, len(nodes) + 1 entries.
    """
    position = {id(n): i for i, n in enumerate(nodes)}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for value in node.outputs:
            first.setdefault(id(value), i)
        for value in _reads(node):
            if _is_constant(value, const_nodes):
                continue
            producer = value.producer()
            if producer is not None and id(producer) not in position and not value.is_graph_input():
                continue  # produced in an enclosing scope (not in the main graph's order)
            last[id(value)] = max(last.get(id(value), -1), i)
    diff = [0] * (len(nodes) + 2)
    for key, end in last.items():
        start = first.get(key)
        if start is None or end <= start:
            continue
        diff[start + 1] += 1  # live for p in (start, end]
        diff[end + 1] -= 1
    counts, running = [], 0
    for p in range(len(nodes) + 1):
        running += diff[p]
        counts.append(running)
    return counts


def block_key(group: WeightGroup) -> int | None:
    """The transformer block (layer index) a weight belongs to, from module paths or names; None if unknown."""
    names: list[str] = []
    for target in group.targets:
        names.extend([target.module, *module_names(target.node), target.name])
    names.append(group.source.name or "")
    for name in names:
        if not name:
            continue
        found = _BLOCK_INDEX.findall(name)
        if found:
            return int(found[-1])
    return None


def plan_stages(model: ir.Model, groups: Sequence[WeightGroup], *,
                max_crossing: int = DEFAULT_MAX_CROSSING, name: str = "model") -> Partition:
    """Cut the main graph into stages, one per transformer block where the names tell blocks apart.

    Args:
        model: the model (main graph; node order must be topological).
        groups: the weights to quantize.
        max_crossing: most non-constant tensors a cut may cross.
        name: the model's name for messages.

    Returns:
        The partition; every group is in exactly one stage.

    Raises:
        ModelError: no group, a group whose consumer is not in the main graph,
            or more than one block and no cut with at most `max_crossing` tensors.
    """
    graph = model.graph
    if not groups:
        raise ModelError(f"{name}: sequential calibration needs at least one layer to quantize")
    const_nodes = _constant_nodes(graph)
    nodes = [n for n in graph if id(n) not in const_nodes]
    position = {id(n): i for i, n in enumerate(nodes)}
    for group in groups:
        for target in group.targets:
            if id(target.node) not in position:
                raise ModelError(f"{name}: layer '{target.name}' is not a node of the main graph; "
                                 "sequential calibration needs every quantized layer there")
    counts = _crossing_counts(nodes, const_nodes)

    # Quantized nodes in graph order, with the block each belongs to.
    keyed = sorted(((position[id(t.node)], block_key(g)) for g in groups for t in g.targets), key=lambda x: x[0])
    keys = [k for _, k in keyed]
    by_block = any(k is not None for k in keys) and len(set(keys)) > 1
    cuts: list[int] = []
    best_anywhere: tuple[int, int] | None = None
    for (pos_a, key_a), (pos_b, key_b) in zip(keyed, keyed[1:]):
        if pos_b == pos_a or (by_block and key_a == key_b):
            continue
        gap = range(pos_a + 1, pos_b + 1)  # nodes[:p] holds node a, nodes[p:] node b
        p = min(gap, key=lambda q: (counts[q], q))
        if best_anywhere is None or counts[p] < best_anywhere[0]:
            best_anywhere = (counts[p], p)
        if counts[p] <= max_crossing:
            cuts.append(p)
        elif by_block:
            logger.warning("%s: no cut with at most %d crossing tensors between block %s and block %s "
                           "(fewest: %d at node '%s'); they are calibrated together", name, max_crossing,
                           key_a, key_b, counts[p], nodes[p].name)
    if not cuts and len(keyed) > 1 and keyed[0][0] != keyed[-1][0]:
        fewest = f"; the fewest is {best_anywhere[0]}" if best_anywhere else ""
        raise ModelError(f"{name}: cannot calibrate sequentially: no point in the graph where <= {max_crossing} "
                         f"tensors cross between the first quantized layer ('{groups[0].targets[0].name}') and "
                         f"the last{fewest} (is it a chain of transformer blocks?)")

    bounds = [0, *cuts, len(nodes)]
    stage_of: dict[int, int] = {}
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        for node in nodes[start:end]:
            stage_of[id(node)] = index
    stages = [Stage(index=i, groups=[], crossing_in=counts[start]) for i, start in enumerate(bounds[:-1])]
    for group in groups:
        # A weight read in several stages (a tied head) is solved where its last consumer runs.
        stages[max(stage_of[id(t.node)] for t in group.targets)].groups.append(group)
    logger.info("%s: %d stages for sequential calibration (crossing tensors at the cuts: %s)", name,
                len(stages), ", ".join(str(counts[c]) for c in cuts) or "none")
    return Partition(stages=stages, stage_of=stage_of, keepalive=nodes)


# ---------------------------------------------------------------------------
# Stage submodels


def _current_stage_of(graph: ir.Graph, partition: Partition, const_nodes: set[int]) -> dict[int, int]:
    """Stage of every non-constant node of the current graph.

    Nodes added by rewrites since planning are inserted before the node they
    replace, so they take the stage of the next planned node after them.
    """
    current: dict[int, int] = {}
    pending: list[ir.Node] = []
    last_stage = len(partition.stages) - 1
    for node in graph:
        if id(node) in const_nodes:
            continue
        stage = partition.stage_of.get(id(node))
        if stage is None:
            pending.append(node)
            continue
        for new in pending:
            current[id(new)] = stage
        pending.clear()
        current[id(node)] = stage
    for new in pending:
        current[id(new)] = last_stage
    return current


@dataclasses.dataclass
class _StageView:
    """The nodes and boundary tensors of one stage in the current graph."""

    nodes: list[ir.Node]  # constant closure first, then the stage's own nodes, in graph order
    inputs: list[ir.Value]  # non-constant tensors read but produced elsewhere
    outputs: list[ir.Value]  # tensors produced here and read by a later stage
    later_reads: set[str]  # names of non-constant tensors read by later stages


def _stage_view(graph: ir.Graph, partition: Partition, index: int) -> _StageView:
    const_nodes = _constant_nodes(graph)
    stage_of = _current_stage_of(graph, partition, const_nodes)
    own = [n for n in graph if stage_of.get(id(n)) == index]
    own_ids = {id(n) for n in own}
    produced = {id(v) for n in own for v in n.outputs}

    inputs: dict[int, ir.Value] = {}
    const_needed: set[int] = set()
    stack: list[ir.Node] = []
    for node in own:
        for value in _reads(node):
            producer = value.producer()
            if _is_constant(value, const_nodes):
                if producer is not None and id(producer) in const_nodes:
                    stack.append(producer)
            elif id(value) not in produced:
                inputs.setdefault(id(value), value)
    while stack:  # constant sub-computations this stage reads
        node = stack.pop()
        if id(node) in const_needed:
            continue
        const_needed.add(id(node))
        for value in _reads(node):
            producer = value.producer()
            if producer is not None and id(producer) in const_nodes:
                stack.append(producer)

    later_reads: set[str] = set()
    outputs: dict[int, ir.Value] = {}
    for node in graph:
        if stage_of.get(id(node), -1) <= index:
            continue
        for value in _reads(node):
            if _is_constant(value, const_nodes):
                continue
            later_reads.add(value.name or "")
            if id(value) in produced:
                outputs.setdefault(id(value), value)
    nodes = [n for n in graph if id(n) in const_needed or id(n) in own_ids]
    return _StageView(nodes=nodes, inputs=list(inputs.values()), outputs=list(outputs.values()),
                      later_reads=later_reads)


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


def _stage_proto(model: ir.Model, view: _StageView, examples: dict[str, list[np.ndarray]],
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
        for value in _reads(node):
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
                     providers: Sequence[str]) -> ort.InferenceSession:
    """An onnxruntime session over a stage submodel (custom-op library registered when needed)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    if custom_ops.uses_custom_ops(proto):
        custom_ops.session_options(options)  # raises CustomOpsLibraryError (a UserError) naming the missing library
    if model_dir is not None and any(t.data_location == onnx.TensorProto.EXTERNAL
                                     for t in proto.graph.initializer):
        options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(Path(model_dir).resolve()))
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unrelated types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"sequential calibration: onnxruntime cannot load stage submodel: {message}") from exc


# ---------------------------------------------------------------------------
# The activation cache


class ActivationCache:
    """Crossing tensors of every calibration batch: name -> one array per batch.

    Arrays stay in memory until their total passes `spill_bytes`; later ones
    are written to `directory` and read back memory-mapped.
    """

    def __init__(self, num_batches: int, spill_bytes: int, directory: Path | None) -> None:
        self.num_batches = num_batches
        self.spill_bytes = spill_bytes
        self._directory = directory
        self._owns_directory = False
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._files: dict[str, list[Path]] = {}
        self.memory_bytes = 0
        self.peak_memory_bytes = 0
        self.spilled_bytes = 0
        self._counter = 0

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def names(self) -> list[str]:
        return list(self._arrays)

    def add(self, name: str, batch: int, array: np.ndarray) -> None:
        """Store tensor `name` of batch `batch` (batches are added in order)."""
        arrays = self._arrays.setdefault(name, [])
        if len(arrays) != batch:
            raise ValueError(f"activation cache: batch {batch} of '{name}' added out of order")
        if self.memory_bytes + array.nbytes > self.spill_bytes and array.nbytes > 0:
            path = self._next_path()
            np.save(path, np.ascontiguousarray(array))
            self._files.setdefault(name, []).append(path)
            self.spilled_bytes += array.nbytes
            arrays.append(np.load(path, mmap_mode="r"))
        else:
            self.memory_bytes += array.nbytes
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
            arrays.append(array)

    def get(self, name: str, batch: int) -> np.ndarray:
        return self._arrays[name][batch]

    def drop(self, name: str) -> None:
        """Forget `name` (its last reader has run); spilled files are deleted."""
        for array in self._arrays.pop(name, []):
            if not isinstance(array, np.memmap):
                self.memory_bytes -= array.nbytes
        for path in self._files.pop(name, []):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for name in list(self._arrays):
            self.drop(name)
        if self._owns_directory and self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    def _next_path(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="onnx-gptq-seq-"))
            self._owns_directory = True
        self._directory.mkdir(parents=True, exist_ok=True)
        self._counter += 1
        return self._directory / f"act_{self._counter:06d}.npy"


# ---------------------------------------------------------------------------
# The runner


def run_sequential(model: ir.Model, groups: list[WeightGroup], batches: list[dict[str, np.ndarray]], *,
                   solve_stage: SolveStage, model_dir: Path | None, providers: Sequence[str],
                   cache_dir: Path | None = None, spill_bytes: int = 2 << 30, progress: bool = False,
                   max_crossing: int = DEFAULT_MAX_CROSSING, partition: Partition | None = None,
                   timings: dict[str, float] | None = None, float_forward: bool = False) -> None:
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
        for stage in stages:
            _run_stage(model, partition, stage, cache, solve_stage=solve_stage, model_dir=model_dir,
                       providers=providers, progress=progress, clock=clock, float_forward=float_forward)
        logger.info("sequential calibration: %d stages; activation cache peak %.1f MB in memory, %.1f MB spilled",
                    len(partition.stages), cache.peak_memory_bytes / 1e6, cache.spilled_bytes / 1e6)
    finally:
        cache.close()


def _run_stage(model: ir.Model, partition: Partition, stage: Stage, cache: ActivationCache, *,
               solve_stage: SolveStage, model_dir: Path | None, providers: Sequence[str], progress: bool,
               clock: PhaseTimer, float_forward: bool) -> None:
    graph = model.graph
    last = stage.index == len(partition.stages) - 1
    view = _stage_view(graph, partition, stage.index)
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
            stats = calibrate.collect_hessians(proto, activations, feeds, model_dir=model_dir,
                                               providers=providers, progress=progress)
            del proto
        with clock("sequential:solve"):
            solve_stage(stage.groups, stats)
        del stats
        view = _stage_view(graph, partition, stage.index)  # the stage as rewritten

    if not float_forward and not last and view.outputs:
        with clock("sequential:forward"):
            _forward(model, view, examples, feeds, cache, stage.index, model_dir, providers)
    del feeds, examples
    for cached in cache.names():
        if cached not in view.later_reads:
            cache.drop(cached)


def _forward(model: ir.Model, view: _StageView, examples: dict[str, list[np.ndarray]],
             feeds: list[dict[str, np.ndarray]], cache: ActivationCache, index: int, model_dir: Path | None,
             providers: Sequence[str]) -> None:
    """Run the (quantized) stage on every batch and cache the outputs later stages read."""
    proto = _stage_proto(model, view, examples, outputs=view.outputs, model_dir=model_dir)
    session = _forward_session(proto, model_dir, providers)
    del proto
    output_names = [v.name for v in view.outputs]
    for b, batch in enumerate(feeds):
        try:
            results = session.run(output_names, calibrate._ort_feeds(batch))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's error types are not exported stably
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CalibrationError(f"sequential calibration: stage {index}, batch {b}: "
                                   f"onnxruntime failed: {message}") from exc
        for output_name, array in zip(output_names, results):
            cache.add(output_name, b, array)
    del session


__all__ = ["ActivationCache", "DEFAULT_MAX_CROSSING", "Partition", "Stage", "block_key", "plan_stages",
           "run_sequential"]
