"""Ops that return values and indices, when only the values are read, as the op that returns the values.

``torch.max(x, 2)[0]`` (``.values``) is ``torch.amax(x, 2)``, a reduction cofx
streams with its other causal and sliding forms; ``F.max_pool1d(x, k,
return_indices=True)[0]`` is the pool without indices. Rewritten so on the
traced graph before any analysis, where no use of the indices is left (the
values are the same numbers).

>>> import torch, torch.fx as fx
>>> gm = fx.symbolic_trace(lambda x: x * torch.max(x, 2, keepdim=True)[0])
>>> values_only(gm)
1
>>> x = torch.randn(1, 2, 6)
>>> torch.equal(gm(x), x * torch.max(x, 2, keepdim=True)[0])
True
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

_EXTREMES = {torch.max: torch.amax, torch.min: torch.amin, "max": torch.amax, "min": torch.amin}
_POOLS = {F.max_pool1d_with_indices: F.max_pool1d, F.max_pool2d_with_indices: F.max_pool2d,
          F.max_pool3d_with_indices: F.max_pool3d, F.max_pool1d: F.max_pool1d, F.max_pool2d: F.max_pool2d,
          F.max_pool3d: F.max_pool3d, F.adaptive_max_pool1d: F.adaptive_max_pool1d,
          F.adaptive_max_pool2d: F.adaptive_max_pool2d, F.adaptive_max_pool3d: F.adaptive_max_pool3d}


def _values_reads(node: fx.Node):
    """The nodes that read `node`'s values (``[0]``, ``.values``) and those that take its indices for nothing
    (``h, idx = ...`` with `idx` unused), or None when anything else reads it."""
    reads, unread = [], []
    for user in node.users:
        picks = user.op == "call_function" and len(user.args) == 2 and user.args[0] is node
        if picks and (user.target is operator.getitem and user.args[1] == 0 or
                      user.target is getattr and user.args[1] == "values"):
            reads.append(user)
        elif picks and not user.users and (user.target is operator.getitem and user.args[1] == 1 or
                                           user.target is getattr and user.args[1] == "indices"):
            unread.append(user)
        else:
            return None
    return (reads, unread) if reads else None


def _values_op(graph: fx.Graph, node: fx.Node):
    """The node computing `node`'s values alone, inserted before it, or None where `node` is not such an op."""
    key = node.target if node.op == "call_function" else node.target if node.op == "call_method" else None
    if key in _EXTREMES and (node.op == "call_function") == (not isinstance(key, str)):
        given = dict(zip(("input", "dim", "keepdim"), node.args), **node.kwargs)
        if set(given) - {"input", "dim", "keepdim"} or not isinstance(given.get("dim"), int):
            return None   # the whole tensor's max (no indices), or out= given
        return graph.call_function(_EXTREMES[key], (given["input"], given["dim"], given.get("keepdim", False)))
    if node.op == "call_function" and node.target in _POOLS:
        kwargs = {k: v for k, v in node.kwargs.items() if k != "return_indices"}
        if node.target not in (F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices) \
                and not node.kwargs.get("return_indices", False):
            return None   # indices given positionally, or none returned
        return graph.call_function(_POOLS[node.target], node.args, kwargs)
    return None


def values_only(gm: fx.GraphModule) -> int:
    """Rewrite each op of `gm` whose indices nothing reads as the op of its values; returns how many."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        found = _values_reads(node) if node.op in ("call_function", "call_method") else None
        if found is None:
            continue
        reads, unread = found
        with graph.inserting_before(node):
            values = _values_op(graph, node)
        if values is None:
            continue
        values.meta.update(node.meta)
        for read in reads:
            read.replace_all_uses_with(values)
            graph.erase_node(read)
        for user in unread:
            graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
