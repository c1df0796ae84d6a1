"""The frame sizes read off the input (``B, T, C = x.shape``) as the numbers they are.

A continual model takes frames of the example's size, so every size of the
input but its batch and its time extent is a constant. Written as the
number, it is an argument later passes can read: the kernel and stride of
a TDNN's context window, ``F.unfold(x.unsqueeze(1), (5, C), stride=(1, C))``,
or a reshape's sizes. Sizes read off the input itself only (its layout is
known before any analysis); batch and time sizes stay as they are, followed
through the graph by the length analysis.

>>> import torch, torch.fx as fx
>>> def context(x):
...     b, t, c = x.shape
...     return x.reshape(b, t * c // c, c)
>>> gm = fx.symbolic_trace(context)
>>> frame_sizes_as_numbers(gm, torch.zeros(1, 8, 4), time_dim=1)
1
>>> [n.args for n in gm.graph.nodes if n.target == "reshape"]
[(x, getitem, floordiv, 4)]
"""
from __future__ import annotations

import operator

import torch
from torch import fx


def _size_read(node: fx.Node, x: fx.Node):
    """The dim of `x` whose size `node` reads (``x.shape[i]``, ``x.size(i)``, ``x.size()[i]``), or None."""
    if node.op == "call_method" and node.target == "size" and node.args[:1] == (x,) and len(node.args) == 2 \
            and not node.kwargs:
        return node.args[1] if isinstance(node.args[1], int) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        whole = node.args[0]
        if isinstance(whole, fx.Node) and whole.args[:1] == (x,) and (
                whole.op == "call_function" and whole.target is getattr and whole.args[1:] == ("shape",) or
                whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1 and not whole.kwargs):
            return node.args[1]
    return None


def frame_sizes_as_numbers(gm: fx.GraphModule, example: torch.Tensor, time_dim: int) -> int:
    """Write each size of a frame that `gm` reads off its input as the example's number; returns how many."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    count = 0
    for node in list(gm.graph.nodes):
        dim = _size_read(node, x)
        if dim is None or not -example.dim() <= dim < example.dim() or dim % example.dim() in (0, time_dim):
            continue
        size = example.shape[dim]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: size if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: size if a is node else a)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
