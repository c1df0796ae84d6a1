"""`torch.diff` as the two slices it subtracts, so that frame differences along time stream as crops do.

``torch.diff(x, dim=2)`` is ``x[:, :, 1:] - x[:, :, :-1]``: two constant crops of
the stream and a pointwise difference, which cofx converts exactly (the second
crop waits a frame). Rewritten on the traced graph before any analysis; along
other dims the slices are per-frame ops, as the diff was. ``prepend`` and
``append`` become the concatenation torch.diff makes of them. Differences that
keep the first frame, ``torch.cat([x[:, :1], x[:, 1:] - x[:, :-1]], 1)``, are
``x`` less its shift by a frame (a zero frame first), which streams as a pad.

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


def _dim_of(index) -> "int | None":
    """The dim an index made by `along` slices (full slices elsewhere), or None."""
    if not isinstance(index, tuple) or not index:
        return None
    if index[0] is Ellipsis:
        rest = index[1:]
        return -len(rest) if rest and all(p == slice(None) for p in rest[1:]) else None
    return len(index) - 1 if all(p == slice(None) for p in index[:-1]) else None


def _sliced(node, x=None):
    """(tensor, dim, slice) of ``x[..., a:b]`` along one dim, or None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    source, index = node.args
    dim = _dim_of(index)
    if dim is None or (x is not None and source is not x):
        return None
    return source, dim, index[1] if index[0] is Ellipsis else index[-1]


def _first_frame_kept(graph: fx.Graph, node: fx.Node):
    """``cat([x[:1], x[1:] - x[:-1]])``: frame differences that keep the first frame, which is ``x`` less ``x``
    a frame later with a zero frame before it (a shift cofx streams as the pad it is)."""
    if not (node.op == "call_function" and node.target is torch.cat):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not isinstance(dim, int):
        return None
    head, diff = parts
    first = _sliced(head)
    if first is None or first[1:] != (dim, slice(None, 1)) or not (
            isinstance(diff, fx.Node) and diff.op == "call_function" and diff.target is operator.sub):
        return None
    x = first[0]
    later, earlier = (_sliced(a, x) for a in diff.args)
    if later is None or earlier is None or later[1:] != (dim, slice(1, None)) or \
            earlier[1:] != (dim, slice(None, -1)):
        return None
    before = graph.call_function(operator.getitem, (x, along(dim, slice(None, -1))))
    shifted = graph.call_function(torch.cat, ([graph.call_function(torch.zeros_like, (head,)), before],), {"dim": dim})
    return graph.call_function(operator.sub, (x, shifted))


def diff_as_slices(gm: fx.GraphModule) -> int:
    """Rewrite every `torch.diff` / `Tensor.diff` of `gm` as slices, and frame differences that keep the first
    frame as the frames less their shift; returns how many were rewritten."""
    count = rewrite_nodes(gm, [n for n in gm.graph.nodes if _is_diff(n)], _slices)
    return count + rewrite_nodes(gm, list(gm.graph.nodes), _first_frame_kept)
