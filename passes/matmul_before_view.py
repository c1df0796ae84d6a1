"""A product with a fixed matrix taken before the view that flattens the axes in front of it.

Skeleton models (2s-AGCN, as many graph convolutions are written) mix the joints
with a learned adjacency as ``torch.matmul(x.view(N, C * T, V), A).view(N, C, T, V)``:
the view flattens time together with the channels, which has no continual
meaning, though the product acts on the joints alone. A product with a matrix
(2-D, the same in every run) acts on the last axis only, so it commutes with any
view that keeps that axis: ``x.view(s) @ A`` is ``(x @ A).view(s[:-1], -1)``,
and a view of that view is one view. Rewritten so, the frames are never
flattened. Runs after the shape runs (it reads them) and asks for them again.

Example::

    >>> class GraphConv(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.A = torch.nn.Parameter(torch.rand(5, 5))
    ...     def forward(self, x):                      # (N, C, T, V)
    ...         N, C, T, V = x.size()
    ...         return torch.matmul(x.view(N, C * T, V), self.A).view(N, C, T, V)
    >>> model = GraphConv()
    >>> gm = cofx.tracer.trace(model)
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(torch.randn(1, 3, 6, 5), time_dim=2))
    >>> matmul_before_view(gm)
    1
    >>> x = torch.randn(2, 3, 6, 5)
    >>> torch.allclose(gm(x), model(x))
    True
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .shape_runs import run_shapes

_MATMULS = {("call_function", torch.matmul), ("call_function", operator.matmul), ("call_method", "matmul")}
_VIEWS = ("view", "reshape")


def _view_sizes(node: fx.Node):
    """The sizes of ``x.view(*sizes)`` / ``x.reshape(sizes)`` as a list, or None for anything else."""
    if node.op != "call_method" or node.target not in _VIEWS or node.kwargs or len(node.args) < 2:
        return None
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return list(sizes)


def _keeps_last_axis(view: fx.Node) -> bool:
    x, shapes = view.args[0], run_shapes(view)
    x_shapes = run_shapes(x) if isinstance(x, fx.Node) else {}
    return bool(shapes) and set(shapes) == set(x_shapes) and \
        all(len(x_shapes[r]) >= 2 and len(s) >= 2 and s[-1] == x_shapes[r][-1] for r, s in shapes.items())


def _fixed_matrix(a) -> bool:
    shapes = run_shapes(a) if isinstance(a, fx.Node) else {}
    return bool(shapes) and len(set(shapes.values())) == 1 and len(next(iter(shapes.values()))) == 2


def matmul_before_view(gm: fx.GraphModule) -> int:
    """Rewrite each ``x.view(s) @ A`` (a fixed matrix A, the view keeping x's last axis) as
    ``(x @ A).view(s[:-1], -1)``, and a view of that as one view; returns how many products moved."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if (node.op, node.target) not in _MATMULS or len(node.args) != 2 or node.kwargs:
            continue
        view, matrix = node.args
        sizes = _view_sizes(view) if isinstance(view, fx.Node) else None
        if sizes is None or not _keeps_last_axis(view) or not _fixed_matrix(matrix):
            continue
        with graph.inserting_before(node):
            product = graph.call_function(torch.matmul, (view.args[0], matrix))
            flat = graph.call_method(view.target, (product, *sizes[:-1], -1))
        node.replace_all_uses_with(flat)
        graph.erase_node(node)
        if not view.users:
            graph.erase_node(view)
        for user in list(flat.users):   # a view of the view: one view of the product
            if _view_sizes(user) is not None and user.args[0] is flat:
                user.args = (product, *user.args[1:])
        if not flat.users:
            graph.erase_node(flat)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
