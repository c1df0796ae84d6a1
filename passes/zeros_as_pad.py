"""Zeros or edge frames concatenated along time as the padding they are.

A motion stream padded back to the clip length is often written
``torch.cat([x[:, :, 1:] - x[:, :, :-1], torch.zeros_like(x[:, :, :1])], 2)``:
a tensor of k zero frames made like the stream and put before or after it.
That is ``F.pad`` with k frames of zeros at that end. Time-series models pad
with the edge frames the same way (DLinear's moving average:
``torch.cat([x[:, :1].repeat(1, k, 1), x, x[:, -1:].repeat(1, k, 1)], 1)``),
which is replicate padding. cofx converts both as padding, where a
concatenation of tensors along time has no continual meaning. Runs after the
shape runs (it reads them: the added frames must be a fixed number, with the
stream's other sizes) and asks for them again.

Example::

    >>> class Motion(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.cat([x[:, :, 1:] - x[:, :, :-1], torch.zeros_like(x[:, :, :1])], 2)
    >>> gm = cofx.tracer.trace(Motion())
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(torch.randn(1, 2, 6), time_dim=2))
    >>> zeros_as_pad(gm)
    1
    >>> x = torch.randn(1, 2, 6)
    >>> torch.equal(gm(x), Motion()(x))
    True
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .node_kind import zeros_made
from .shape_runs import run_shapes


def _edge_of(part: fx.Node, dim: int, ndim: int):
    """The tensor and end ("first" or "last") `part` repeats the edge frame of along `dim` (``x[:, :1]``,
    ``x[:, -1:].repeat(1, k, 1)``, ``.expand``), or None."""
    if part.op == "call_method" and part.target in ("repeat", "expand") and part.args and \
            isinstance(part.args[0], fx.Node):
        part = part.args[0]   # its sizes are checked against the stream's by the caller
    if part.op != "call_function" or part.target is not operator.getitem or not isinstance(part.args[0], fx.Node):
        return None
    index = part.args[1] if isinstance(part.args[1], tuple) else (part.args[1],)
    while index and index[-1] == slice(None):   # x[:, :1, :] is x[:, :1]
        index = index[:-1]
    if len(index) == 2 and index[0] is Ellipsis and dim == ndim - 1:   # x[..., :1] with time last
        index = (slice(None),) * dim + index[1:]
    if len(index) != dim + 1 or any(e != slice(None) for e in index[:dim]):
        return None
    entry = index[dim]
    end = "first" if entry in (slice(0, 1), slice(None, 1)) else "last" if entry == slice(-1, None) else None
    return (part.args[0], end) if end is not None and len(run_shapes(part.args[0]).get("clip", ())) == ndim \
        else None


def _padding(cat: fx.Node):
    """(the stream, its dim, frames before, after, mode) where `cat` joins one tensor with zeros made in forward
    ("constant") or with its own edge frames repeated ("replicate") along a dim where what is added has a fixed
    number of frames and the tensor's sizes elsewhere; else None."""
    if cat.op != "call_function" or cat.target not in (torch.cat, torch.concat):
        return None
    given = dict(zip(("tensors", "dim"), cat.args), **cat.kwargs)
    parts, dim = given.get("tensors"), given.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) not in (2, 3) or not isinstance(dim, int) or \
            not all(isinstance(p, fx.Node) for p in parts):
        return None
    ndim = len(run_shapes(cat).get("clip", ()))
    if not ndim:
        return None
    zeros = [zeros_made(p) for p in parts]
    if sum(not z for z in zeros) == 1:
        mode, at = "constant", zeros.index(False)
    else:   # the stream and its edges: the first frame before it, the last after it
        edges = [_edge_of(p, dim % ndim, ndim) for p in parts]
        streams = {e[0] for e in edges if e is not None}
        middle = [p for p, e in zip(parts, edges) if e is None]
        if len(middle) != 1 or streams != {middle[0]}:
            return None
        at = parts.index(middle[0])
        if any(e[1] != ("first" if i < at else "last") for i, e in enumerate(edges) if e is not None):
            return None
        mode = "replicate"
    x = parts[at]
    x_shapes = run_shapes(x)
    if set(x_shapes) != set(run_shapes(cat)) or not x_shapes:
        return None
    ndim = len(x_shapes["clip"])
    d = dim % ndim
    frames = []
    for z in parts:
        if z is x:
            continue
        z_shapes = run_shapes(z)
        if set(z_shapes) != set(x_shapes) or len({s[d] for s in z_shapes.values()}) != 1 or any(
                z_shapes[run][:d] + z_shapes[run][d + 1:] != x_shapes[run][:d] + x_shapes[run][d + 1:]
                for run in x_shapes):
            return None
        frames.append(z_shapes["clip"][d])
    before = frames[0] if at > 0 else 0
    after = frames[-1] if at < len(parts) - 1 else 0
    if mode == "replicate" and not (d in (1, 2) and ndim - d <= 3):
        return None   # F.pad replicates the last one to three dims, the batch (and, but for 3-D inputs, one more) kept
    return x, d, ndim, before, after, mode


def zeros_as_pad(gm: fx.GraphModule) -> int:
    """Rewrite each such concatenation as ``F.pad`` (zeros, or the edge frames replicated); returns how many were
    rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        found = _padding(node)
        if found is None:
            continue
        x, d, ndim, before, after, mode = found
        pad = [0] * (2 * (ndim - d))
        pad[-2:] = [before, after]
        with gm.graph.inserting_before(node):
            padded = gm.graph.call_function(F.pad, (x, tuple(pad)), {"mode": mode} if mode != "constant" else {})
        node.replace_all_uses_with(padded)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
