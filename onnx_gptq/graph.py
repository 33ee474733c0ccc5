"""Reading onnx_ir graphs: what a node reads, its subgraphs' outer-scope reads included."""

from __future__ import annotations

import onnx_ir as ir


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def outer_reads(node: ir.Node) -> list[ir.Value]:
    """Values of enclosing scopes read by the subgraphs of `node` (If/Loop/Scan bodies)."""
    local: set[int] = set()
    reads: list[ir.Value] = []
    stack = subgraphs(node)
    bodies: list[ir.Graph] = []
    while stack:
        graph = stack.pop()
        bodies.append(graph)
        local.update(id(v) for v in graph.inputs)
        local.update(id(v) for v in graph.initializers.values())
        for inner in graph:
            local.update(id(v) for v in inner.outputs)
            stack.extend(subgraphs(inner))
    for graph in bodies:
        for inner in graph:
            reads.extend(v for v in inner.inputs if v is not None and id(v) not in local)
        reads.extend(v for v in graph.outputs if id(v) not in local)
    return reads


def reads(node: ir.Node) -> list[ir.Value]:
    """Every value `node` reads, its subgraphs' outer-scope reads included."""
    values = [v for v in node.inputs if v is not None]
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        values.extend(outer_reads(node))
    return values


__all__ = ["outer_reads", "reads", "subgraphs"]
