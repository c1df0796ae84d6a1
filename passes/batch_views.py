"""``x.view(-1, features)`` whose -1 is the batch: the batch named, so that the frames it flattens stay features.

C3D ends with ``x.view(-1, 8192)``: on the example clip the -1 is the batch size,
and the frames left after pooling are among the 8192 features. On a longer clip
the same code moves the extra frames into the batch, which is not what the model
means by it; ``x.view(x.size(0), -1)`` computes the same on the clip and keeps
that meaning, which cofx converts as time flattened into a classifier's
features. Runs after the shape runs (it reads them) and asks for them again.

Example::

    >>> class Head(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x.view(-1, 8)
    >>> gm = cofx.tracer.trace(Head())
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(torch.randn(1, 2, 4), time_dim=2))
    >>> name_view_batches(gm)
    1
    >>> print(gm.code.strip().splitlines()[-2].strip())
    view = x.view(size, -1);  x = size = None
"""
from __future__ import annotations

from torch import fx

from .shape_runs import Rec


def _rows(node: fx.Node, run: str):
    rec = node.meta.get("cofx_runs", {}).get(run)
    return rec.shape[0] if isinstance(rec, Rec) and rec.shape else None


def name_view_batches(gm: fx.GraphModule) -> int:
    """Rewrite each ``x.view(-1, k)`` / ``x.reshape(-1, k)`` that gives the batch size on the clip and on two
    streams but not on a longer clip; returns how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_method" or node.target not in ("view", "reshape") or node.kwargs:
            continue
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if len(sizes) != 2 or sizes[0] != -1 or not isinstance(sizes[1], int):
            continue
        x = node.args[0]
        if _rows(node, "clip") != _rows(x, "clip") or _rows(node, "batch") != _rows(x, "batch") or \
                _rows(node, "longer") == _rows(x, "longer"):
            continue
        with gm.graph.inserting_before(node):
            batch = gm.graph.call_method("size", (x, 0))
        node.args = (x, batch, -1)
        count += 1
    if count:
        gm.recompile()
    return count
