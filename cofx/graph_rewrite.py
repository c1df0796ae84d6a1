"""What every rewrite of a recorded step graph does around its own rule: put the new nodes in, the old one out."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import fx


def rewrite_nodes(gm: fx.GraphModule, nodes: Iterable[fx.Node],
                  replacement: Callable[[fx.Graph, fx.Node], Optional[fx.Node]]) -> int:
    """For each of `nodes`, `replacement(graph, node)` adds nodes computing the same value (inserted before it)
    and returns the one holding it, or None to keep the node; users then read that one and the node goes.
    Returns how many were replaced (the module is recompiled if any was)."""
    graph, count = gm.graph, 0
    for node in list(nodes):
        with graph.inserting_before(node):
            out = replacement(graph, node)
        if out is None:
            continue
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count
