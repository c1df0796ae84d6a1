"""A reshape of a reshape, written as one reshape of the first input.

MS-G3D gathers each frame's neighbours with ``nn.Unfold((w, 1), padding=(w // 2, 0))``
and views the result back: ``unfold(x).view(N, C, w, T, V)``. As im2col (see
`im2col_as_unfold`) the windows come flattened with the joints, ``(N, C * w, T * V)``,
which mixes frames with joints, and the view takes them apart again at once. Reshapes
keep the order of the values, so a chain of them is the last one applied to the
first input: written so, time is never flattened with another dimension. Only chains
whose inner steps feed nothing else are joined (a size read off an inner step keeps
it). Runs on the traced graph before any analysis.

Example::

    >>> gm = torch.fx.symbolic_trace(lambda x: x.flatten(2).view(2, 3, 4, 5))
    >>> views_collapsed(gm)
    1
    >>> [n.target for n in gm.graph.nodes if n.op == "call_method"]
    ['reshape']
"""
from __future__ import annotations

import torch
from torch import fx

from cofx.graph_rewrite import rewrite_nodes

_INNER = {("call_method", "view"), ("call_method", "reshape"), ("call_method", "flatten"),
          ("call_function", torch.reshape), ("call_function", torch.flatten)}
_OUTER = {("call_method", "view"), ("call_method", "reshape")}


def _reshaping(node) -> bool:
    return isinstance(node, fx.Node) and (node.op, node.target) in _INNER and len(node.users) == 1 and \
        isinstance(node.args[0], fx.Node)


def views_collapsed(gm: fx.GraphModule) -> int:
    """Join every view or reshape of a chain of reshapes into one reshape; returns how many were joined."""
    def one_reshape(graph: fx.Graph, node: fx.Node):
        inner = node.args[0]
        while _reshaping(inner.args[0]):
            inner = inner.args[0]
        return graph.call_method("reshape", (inner.args[0], *node.args[1:]))

    outer = [n for n in gm.graph.nodes if (n.op, n.target) in _OUTER and not n.kwargs and _reshaping(n.args[0])]
    count = rewrite_nodes(gm, outer, one_reshape)
    for node in reversed(list(gm.graph.nodes)):   # the inner steps, read by nothing now
        if (node.op, node.target) in _INNER and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return count
