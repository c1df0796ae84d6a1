"""`Tensor.unfold` as the strided slices it stacks, so that frames stacked into windows stream as crops do.

``x.unfold(2, k, s)`` puts window j of ``x[:, :, j*s : j*s + k]`` at frame j with
its k frames along a new last dim: window tap i is the strided crop
``x[:, :, i : T - (k - 1 - i) : s]``. Rewritten on the traced graph as those k
crops stacked along a new last dim, which cofx converts exactly (tap i waits
k - 1 - i frames); along other dims the slices are per-frame ops, as the
unfold was.

>>> import torch, torch.fx as fx
>>> gm = fx.symbolic_trace(lambda x: x.unfold(2, 3, 2))
>>> unfold_as_slices(gm)
1
>>> x = torch.randn(1, 2, 9)
>>> torch.equal(gm(x), x.unfold(2, 3, 2))
True
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from cofx.graph_rewrite import rewrite_nodes

from .diff_as_slices import along


def _slices(graph: fx.Graph, node: fx.Node):
    x, *rest = node.args
    kw = dict(zip(("dimension", "size", "step"), rest))
    kw.update(node.kwargs)
    dim, size, step = kw.get("dimension"), kw.get("size"), kw.get("step")
    if not all(isinstance(v, int) for v in (dim, size, step)) or size < 1 or step < 1:
        return None   # left as it is: analysed (and refused) as the op it is
    taps = [graph.call_function(operator.getitem, (x, along(dim, slice(i, -(size - 1 - i) or None, step))))
            for i in range(size)]
    return graph.call_function(torch.stack, (taps,), {"dim": -1})


def unfold_as_slices(gm: fx.GraphModule) -> int:
    """Rewrite every `Tensor.unfold` of `gm` as stacked slices; returns how many were rewritten."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "unfold"]
    return rewrite_nodes(gm, nodes, _slices)
