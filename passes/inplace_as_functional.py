"""In-place ops on a tensor made in forward, as the out-of-place op whose result later code reads.

transformers' ``_make_causal_mask`` builds a mask for the clip's length and fills
it in place: ``mask = torch.full((T, T), -inf); mask.masked_fill_(cond, 0)``. fx
records the fill as a node nothing reads (later code reads ``mask``), so a step
that builds the mask again, for a window of the clip, would build it unfilled.
Where the tensor is fresh (made by a factory in forward, or by this rewrite) and
nothing reads its values before the fill (its sizes may be), the fill becomes ``mask = mask.masked_fill(cond,
0)``, and later code reads the filled tensor. In-place ops on anything else (a
stream, a parameter, a view) are left as they are.

>>> import torch, torch.fx as fx
>>> def causal(x):
...     mask = torch.full((x.shape[1], x.shape[1]), float("-inf"))
...     mask.triu_(1)
...     return x @ x.transpose(1, 2) + mask
>>> gm = fx.symbolic_trace(causal)
>>> inplace_as_functional(gm)
1
>>> x = torch.randn(1, 4, 3)
>>> torch.equal(gm(x), causal(x))
True
"""
from __future__ import annotations

import torch
from torch import fx

from cofx.graph_rewrite import rewrite_nodes

_MADE = {torch.full, torch.zeros, torch.ones, torch.empty, torch.eye, torch.arange, torch.full_like,
         torch.zeros_like, torch.ones_like, torch.empty_like}
_MADE_METHODS = {"new_full", "new_zeros", "new_ones", "new_empty", "clone"}


def _fresh(node: fx.Node, made: set) -> bool:
    return node in made or node.op == "call_function" and node.target in _MADE or \
        node.op == "call_method" and node.target in _MADE_METHODS


def _reads_values(user: fx.Node) -> bool:
    """Whether `user` reads a tensor's values, not only its sizes, dtype or device (``mask.size(-1)``)."""
    if user.op == "call_method" and user.target in ("size", "dim"):
        return False
    return not (user.op == "call_function" and user.target is getattr and
                user.args[1:] in (("shape",), ("dtype",), ("device",), ("ndim",)))


def _out_of_place(node: fx.Node):
    """The out-of-place method of an in-place method call (``masked_fill_`` -> ``masked_fill``), or None."""
    name = node.target if node.op == "call_method" else ""
    if not (name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1])):
        return None
    return name[:-1]


def inplace_as_functional(gm: fx.GraphModule) -> int:
    """Rewrite in-place method calls on fresh tensors of `gm` as out-of-place ones; returns how many."""
    made: set = set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def functional(graph: fx.Graph, node: fx.Node):
        name = _out_of_place(node)
        target = node.args[0] if node.args else None
        if name is None or not isinstance(target, fx.Node) or not _fresh(target, made) or \
                any(order.get(user, len(order)) < order[node] and _reads_values(user) for user in target.users):
            return None
        new = graph.call_method(name, node.args, node.kwargs)
        target.replace_all_uses_with(new, delete_user_cb=lambda user: order.get(user, -1) > order[node])
        made.add(new)
        return new

    return rewrite_nodes(gm, list(gm.graph.nodes), functional)
