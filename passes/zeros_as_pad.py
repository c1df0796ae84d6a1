"""Zeros concatenated along time as the zero padding they are.

A motion stream padded back to the clip length is often written
``torch.cat([x[:, :, 1:] - x[:, :, :-1], torch.zeros_like(x[:, :, :1])], 2)``:
a tensor of k zero frames made like the stream and put before or after it.
That is ``F.pad`` with k frames of zeros at that end, which cofx converts as
padding, where a concatenation of two tensors along time has no continual
meaning. Runs after the shape runs (it reads them: the zeros must have a fixed
number of frames and the stream's other sizes) and asks for them again.

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

import torch
import torch.nn.functional as F
from torch import fx

from .node_kind import zeros_made
from .shape_runs import run_shapes


def _padding(cat: fx.Node):
    """(the stream, its dim, zero frames before, after) where `cat` joins one tensor with zeros made in forward
    along a dim where the zeros have a fixed number of frames and the tensor's sizes elsewhere; else None."""
    if cat.op != "call_function" or cat.target not in (torch.cat, torch.concat):
        return None
    given = dict(zip(("tensors", "dim"), cat.args), **cat.kwargs)
    parts, dim = given.get("tensors"), given.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) not in (2, 3) or not isinstance(dim, int):
        return None
    zeros = [zeros_made(p) for p in parts]
    if sum(not z for z in zeros) != 1 or not all(isinstance(p, fx.Node) for p in parts):
        return None
    at = zeros.index(False)
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
    return x, d, ndim, before, after


def zeros_as_pad(gm: fx.GraphModule) -> int:
    """Rewrite each such concatenation as ``F.pad``; returns how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        found = _padding(node)
        if found is None:
            continue
        x, d, ndim, before, after = found
        pad = [0] * (2 * (ndim - d))
        pad[-2:] = [before, after]
        with gm.graph.inserting_before(node):
            padded = gm.graph.call_function(F.pad, (x, tuple(pad)))
        node.replace_all_uses_with(padded)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
