"""A mean (sum, max, min) over a dimension a view made by flattening trailing dimensions, taken before the view.

Skeleton models end with ``x.view(N, M, c, -1).mean(3).mean(1)`` (CTR-GCN, InfoGCN):
the view folds the persons out of the batch and flattens (frames, joints) into
one dimension, and the mean pools it. Time flattened into a dimension has no
continual meaning, but the same numbers are ``x.mean((2, 3)).view(N, M, c)``:
a global pool over time, which cofx converts. Runs after the shape runs (it
reads them) and asks for them again.

Example::

    >>> class Head(torch.nn.Module):
    ...     def forward(self, x):                      # (N * M, c, T, V)
    ...         return x.view(x.size(0) // 2, 2, x.size(1), -1).mean(3).mean(1)
    >>> gm = cofx.tracer.trace(Head())
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(torch.randn(2, 3, 6, 5), time_dim=2))
    >>> reduce_before_view(gm)
    1
    >>> x = torch.randn(2, 3, 6, 5)
    >>> torch.allclose(gm(x), Head()(x))
    True
"""
from __future__ import annotations

import math

from torch import fx

from .shape_runs import run_shapes

_REDUCTIONS = ("mean", "sum", "amax", "amin")


def _flattened_from(view: fx.Node):
    """The first dimension of the view's input that its last dimension flattens (with every one after it), where
    the dimensions before reshape the input's before it, in every run; else None."""
    x = view.args[0]
    x_shapes, shapes = run_shapes(x), run_shapes(view)
    if not x_shapes or set(x_shapes) != set(shapes):
        return None
    ndim = len(x_shapes["clip"])
    for first in range(1, ndim - 1):
        if all(math.prod(shapes[r][:-1]) == math.prod(x_shapes[r][:first]) and
               shapes[r][-1] == math.prod(x_shapes[r][first:]) for r in x_shapes):
            return first
    return None


def reduce_before_view(gm: fx.GraphModule) -> int:
    """Rewrite ``x.view(..., -1).mean(-1)`` (its last dimension flattening trailing dimensions of x) as
    ``x.mean(those).view(...)``; returns how many were rewritten."""
    count = 0
    for view in list(gm.graph.nodes):
        if view.op != "call_method" or view.target not in ("view", "reshape") or view.kwargs or \
                len(view.args) < 3 or view.args[-1] != -1 or len(view.users) != 1:
            continue
        reduce = next(iter(view.users))
        ndim = len(view.args) - 1
        dims = reduce.args[1] if len(reduce.args) > 1 else reduce.kwargs.get("dim")
        if reduce.op != "call_method" or reduce.target not in _REDUCTIONS or dims not in (ndim - 1, -1) or \
                reduce.kwargs.get("keepdim") or len(reduce.args) > 2:
            continue
        first = _flattened_from(view)
        if first is None:
            continue
        x_ndim = len(run_shapes(view.args[0])["clip"])
        with gm.graph.inserting_before(view):
            pooled = gm.graph.call_method(reduce.target, (view.args[0], tuple(range(first, x_ndim))))
            reshaped = gm.graph.call_method(view.target, (pooled, *view.args[1:-1]))
        reduce.replace_all_uses_with(reshaped)
        gm.graph.erase_node(reduce)
        gm.graph.erase_node(view)
        count += 1
    if count:
        gm.recompile()
    return count
