"""Mark every Python value that derives from the clip length.

A step reads sizes off its chunk, not off the clip: there, ``x.shape[2]`` is
the chunk's length. A size that restates a shape (a view or reshape, a crop a
fixed number of frames from each end, a pool whose kernel is the whole clip)
means the same on every chunk; one used as a number (``h / T``,
``h * T ** -0.5``, ``torch.arange(T)``, ``pos[:, :, :T]``, a length returned
as an output) does not. So this pass follows reads of the time extent
(``size``, ``shape``, ``numel``, any value that follows the clip length
between the recorded runs) through all the arithmetic on them, and the node
classifier lets such a value reach only the ops with an exact meaning.

Writes ``node.meta["cofx_length"]``: for a non-tensor value derived from the
clip length, the node that read the length; None otherwise. And
``node.meta["cofx_length_shift"]``: whether such a value is size reads added
or subtracted, plus or minus numbers that do not derive from them (``T - 2``,
``-(T - 3)``, ``x.shape[2] - h.shape[2]``): bounds whose distance from an end
of the clip two runs tell, as a constant crop's; a remainder, a product or a
``min`` of the length is not.

Example::

    >>> class Scaled(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x * x.shape[2] ** -0.5       # the clip length used as a number
    >>> gm = cofx.tracer.trace(Scaled())
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(torch.randn(1, 2, 8), time_dim=2))
    >>> cofx.passes.label_layouts(gm)
    >>> mark_length_values(gm)      # after record_runs and label_layouts
    >>> [n.name for n in gm.graph.nodes if n.meta["cofx_length"] is not None]
    ['getattr_1', 'getitem', 'pow_1']
"""
from __future__ import annotations

import operator

import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .shape_runs import FAILED, Rec, other_length


def is_value(node: fx.Node) -> bool:
    """Whether the node computes a Python value (a size, a number), not tensors."""
    clip = node.meta.get("cofx_runs", {}).get("clip")
    leaves = tree_flatten(clip)[0] if clip is not None else []
    return bool(leaves) and not any(isinstance(v, Rec) for v in leaves)


def _follows_length(node: fx.Node) -> bool:
    other = other_length(node)
    return other is not FAILED and tree_flatten(other)[0] != tree_flatten(node.meta["cofx_runs"].get("clip"))[0]


def _entry_of_sizes(node: fx.Node) -> bool:
    """Whether `node` picks entries of a shape (a tuple of sizes), each of which follows the length or not."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)):
        return False
    sizes = node.args[0].meta.get("cofx_runs", {}).get("clip")
    return isinstance(sizes, tuple) and all(isinstance(v, int) for v in sizes)


def _size_read(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "size" or _entry_of_sizes(node) or \
        node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)


def _shift(node: fx.Node) -> bool:
    """Whether a value derived from the clip length is size reads added or subtracted, plus or minus other
    numbers (``T - 2``, ``x.shape[2] - h.shape[2]``): affine in the sizes it reads, so two runs tell its
    distance from the ends of the clip (a remainder or a product of a size is not)."""
    if _size_read(node):
        return True
    if node.op == "call_function" and node.target in (operator.add, operator.sub, operator.neg):
        return all(a.meta["cofx_length_shift"] for a in node.args
                   if isinstance(a, fx.Node) and a.meta.get("cofx_length") is not None)
    return False


def mark_length_values(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta["cofx_length"], node.meta["cofx_length_shift"] = None, False
        if node.op in ("placeholder", "get_attr", "output") or not is_value(node):
            continue
        sources = [a.meta["cofx_length"] for a in node.all_input_nodes if a.meta.get("cofx_length") is not None]
        if _entry_of_sizes(node):   # x.shape[0] is the batch, x.shape[2] the length
            node.meta["cofx_length"] = sources[0] if sources and _follows_length(node) else None
        elif sources:
            node.meta["cofx_length"] = sources[0]
        elif _follows_length(node):
            node.meta["cofx_length"] = node
        node.meta["cofx_length_shift"] = node.meta["cofx_length"] is not None and _shift(node)
