"""Partition a graph into stages for sequential calibration.

In topological order, a *cut* is a point where few tensors cross (the residual
stream plus shared tensors such as the attention mask, rotary cos/sin,
position ids and small shape tensors). Constant sub-computations
(initializers, `Constant` nodes and nodes computed from constants only) never
cross a cut: each stage recomputes the ones it reads. One cut is placed
between consecutive transformer blocks (told apart by the layer index in the
torch module path or node name), at the point of the gap with the fewest
crossing tensors; models without such names get a cut between every pair of
consecutive quantized layers where one exists. :func:`stage_view` then reads a
stage's nodes and boundary tensors off the *current* graph, earlier stages
already rewritten into packed ops.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence

import onnx_ir as ir

from onnx_gptq.errors import ModelError
from onnx_gptq.graph import reads
from onnx_gptq.targets import WeightGroup, module_names

logger = logging.getLogger(__name__)

# A cut through more tensors than this is not a cut: the stage would need to
# cache too much, and the graph is probably not a chain of blocks.
DEFAULT_MAX_CROSSING = 32
# Layer index in a torch module path or node name: "model.layers.3.mlp", "/transformer/h.11/attn/..."
_BLOCK_INDEX = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?|decoder_layers?)[./_](\d+)(?=[./_]|$)")


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


def constant_nodes(graph: ir.Graph) -> set[int]:
    """ids of nodes computed from constants alone (initializers, Constant nodes, and their functions)."""
    const: set[int] = set()
    for node in graph:
        if node.op_type.startswith("Random"):
            continue
        if all(is_constant(v, const) for v in reads(node)):
            const.add(id(node))
    return const


def is_constant(value: ir.Value, const_nodes: set[int]) -> bool:
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
        for value in reads(node):
            if is_constant(value, const_nodes):
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
    const_nodes = constant_nodes(graph)
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
class StageView:
    """The nodes and boundary tensors of one stage in the current graph."""

    nodes: list[ir.Node]  # constant closure first, then the stage's own nodes, in graph order
    inputs: list[ir.Value]  # non-constant tensors read but produced elsewhere
    outputs: list[ir.Value]  # tensors produced here and read by a later stage
    later_reads: set[str]  # names of non-constant tensors read by later stages


def stage_view(graph: ir.Graph, partition: Partition, index: int) -> StageView:
    const_nodes = constant_nodes(graph)
    stage_of = _current_stage_of(graph, partition, const_nodes)
    own = [n for n in graph if stage_of.get(id(n)) == index]
    own_ids = {id(n) for n in own}
    produced = {id(v) for n in own for v in n.outputs}

    inputs: dict[int, ir.Value] = {}
    const_needed: set[int] = set()
    stack: list[ir.Node] = []
    for node in own:
        for value in reads(node):
            producer = value.producer()
            if is_constant(value, const_nodes):
                if producer is not None and id(producer) in const_nodes:
                    stack.append(producer)
            elif id(value) not in produced:
                inputs.setdefault(id(value), value)
    while stack:  # constant sub-computations this stage reads
        node = stack.pop()
        if id(node) in const_needed:
            continue
        const_needed.add(id(node))
        for value in reads(node):
            producer = value.producer()
            if producer is not None and id(producer) in const_nodes:
                stack.append(producer)

    later_reads: set[str] = set()
    outputs: dict[int, ir.Value] = {}
    for node in graph:
        if stage_of.get(id(node), -1) <= index:
            continue
        for value in reads(node):
            if is_constant(value, const_nodes):
                continue
            later_reads.add(value.name or "")
            if id(value) in produced:
                outputs.setdefault(id(value), value)
    nodes = [n for n in graph if id(n) in const_needed or id(n) in own_ids]
    return StageView(nodes=nodes, inputs=list(inputs.values()), outputs=list(outputs.values()),
                      later_reads=later_reads)


__all__ = ["DEFAULT_MAX_CROSSING", "Partition", "Stage", "StageView", "block_key", "constant_nodes", "is_constant",
           "plan_stages", "stage_view"]
