"""`torch.diff` as the two slices it subtracts, so that frame differences along time stream as crops do.

``torch.diff(x, dim=2)`` is ``x[:, :, 1:] - x[:, :, :-1]``: two constant crops of
the stream and a pointwise difference, which cofx converts exactly (the second
crop waits a frame). Rewritten on the traced graph before any analysis; along
other dims the slices are per-frame ops, as the diff was. ``prepend`` and
``append`` become the concatenation torch.diff makes of them.

>>> import torch, torch.fx as fx
>>> gm = fx.symbolic_trace(lambda x: torch.diff(x, dim=2))
>>> diff_as_slices(gm)
1
>>> x = torch.randn(1, 2, 6)
>>> torch.equal(gm(x), torch.diff(x, dim=2))
True
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from cofx.graph_rewrite import rewrite_nodes


def _is_diff(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.diff) or \
        (node.op == "call_method" and node.target == "diff")


def along(dim: int, part: slice) -> tuple:
    """An index taking `part` along `dim` (negative dims counted from the end, with an Ellipsis)."""
    if dim >= 0:
        return (*[slice(None)] * dim, part)
    return (Ellipsis, part, *[slice(None)] * (-dim - 1))


def _slices(graph: fx.Graph, node: fx.Node):
    x, *rest = node.args
    kw = dict(zip(("n", "dim", "prepend", "append"), rest))
    kw.update(node.kwargs)
    n, dim = kw.get("n", 1), kw.get("dim", -1)
    if not isinstance(n, int) or not isinstance(dim, int) or n < 0:
        return None   # left as it is: analysed (and refused) as the op it is
    parts = [p for p in (kw.get("prepend"), x, kw.get("append")) if p is not None]
    if len(parts) > 1:
        x = graph.call_function(torch.cat, (parts,), {"dim": dim})
    for _ in range(n):
        later = graph.call_function(operator.getitem, (x, along(dim, slice(1, None))))
        earlier = graph.call_function(operator.getitem, (x, along(dim, slice(None, -1))))
        x = graph.call_function(operator.sub, (later, earlier))
    return x


def diff_as_slices(gm: fx.GraphModule) -> int:
    """Rewrite every `torch.diff` / `Tensor.diff` of `gm` as slices; returns how many were rewritten."""
    return rewrite_nodes(gm, [n for n in gm.graph.nodes if _is_diff(n)], _slices)
