"""`F.unfold` (im2col) as the `Tensor.unfold` windows it gathers, so that windows along time stream.

TDNN layers (x-vector implementations) gather their context frames with
``F.unfold(x.unsqueeze(1), (k, C), stride=(1, C))``: for a (B, 1, T, C) input, the
k-frame windows along time with every feature, laid out as (B, k * C, windows).
That is ``x.unfold(2, k, s)`` along time and ``unfold(3, kw, sw)`` along the
other dim, permuted and flattened as im2col lays them out; the first becomes
strided crops of the stream (`unfold_as_slices`). Where the patches also slide
along the other dim, their flattened positions mix frames with it, which cofx
then refuses. Rewritten on the traced graph before any analysis (the same
values: both copy).

>>> import torch, torch.fx as fx, torch.nn.functional as F
>>> gm = fx.symbolic_trace(lambda x: F.unfold(x, (3, 4), dilation=(2, 1), padding=(1, 0), stride=(2, 4)))
>>> im2col_as_unfold(gm)
1
>>> x = torch.randn(2, 1, 9, 4)
>>> torch.equal(gm(x), F.unfold(x, (3, 4), dilation=(2, 1), padding=(1, 0), stride=(2, 4)))
True
"""
from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx, nn

from cofx.graph_rewrite import rewrite_nodes
from cofx.stock_modules import stock


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _arguments(gm: fx.GraphModule, node: fx.Node):
    """(input, kernel, dilation, padding, stride) of an im2col, each a pair of ints, or None."""
    if node.op == "call_function" and node.target is F.unfold:
        given = dict(zip(("input", "kernel_size", "dilation", "padding", "stride"), node.args), **node.kwargs)
        found = (given.get("input"), given.get("kernel_size"), given.get("dilation", 1), given.get("padding", 0),
                 given.get("stride", 1))
    elif node.op == "call_module" and stock(gm.get_submodule(node.target), nn.Unfold) and len(node.args) == 1:
        m = gm.get_submodule(node.target)
        found = (node.args[0], m.kernel_size, m.dilation, m.padding, m.stride)
    else:
        return None
    x, *sizes = found
    sizes = [_pair(v) for v in sizes]
    if not isinstance(x, fx.Node) or not all(len(v) == 2 and all(isinstance(i, int) for i in v) for v in sizes):
        return None
    return (x, *sizes)


def _windows(graph: fx.Graph, x: fx.Node, dim: int, k: int, d: int, s: int) -> fx.Node:
    """`x`'s windows of k taps d apart, s apart along `dim`, taps on a new last dim."""
    out = graph.call_method("unfold", (x, dim, d * (k - 1) + 1, s))
    return graph.call_function(operator.getitem, (out, (Ellipsis, slice(None, None, d)))) if d > 1 else out


def im2col_as_unfold(gm: fx.GraphModule) -> int:
    """Rewrite each `F.unfold` / `nn.Unfold` of `gm` as `Tensor.unfold` windows; returns how many."""
    def replacement(graph: fx.Graph, node: fx.Node):
        x, kernel, dilation, padding, stride = _arguments(gm, node)
        if any(padding):
            x = graph.call_function(F.pad, (x, (padding[1], padding[1], padding[0], padding[0])))
        rows = _windows(graph, x, 2, kernel[0], dilation[0], stride[0])            # (B, C, Lh, W, kh)
        patches = _windows(graph, rows, 3, kernel[1], dilation[1], stride[1])      # (B, C, Lh, Lw, kh, kw)
        laid_out = graph.call_method("permute", (patches, 0, 1, 4, 5, 2, 3))       # (B, C, kh, kw, Lh, Lw)
        return graph.call_method("flatten", (graph.call_method("flatten", (laid_out, 1, 3)), 2, 3))

    return rewrite_nodes(gm, [n for n in gm.graph.nodes if _arguments(gm, n) is not None], replacement)
