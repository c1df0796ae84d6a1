"""Label every dimension of every node: batch, time, both, or a fixed size.

Reads the runs recorded by `shape_runs.record_runs`. A dimension whose size
follows the clip length is time (``"T"``), one that follows the batch size is
batch (``"B"``), one that follows both is batch and time folded together
(``"BT"``, as in 2D-CNN-per-frame models that reshape (B, T, C, H, W) to
(B*T, C, H, W)); any other dimension keeps its size. Integers get the same
labels, so `x.shape[2]` is known to be the clip length.

Writes ``node.meta["cofx_layout"]``: a pytree like the node's value whose
leaves are label tuples (tensors), a label (ints) or None.

Example::

    >>> gm = cofx.tracer.trace(torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1)).eval())
    >>> clip = torch.randn(1, 3, 4, 16, 16)
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(clip, time_dim=2))   # the runs `cofx.convert` records
    >>> label_layouts(gm)
    >>> [n.meta["cofx_layout"] for n in gm.graph.nodes][:2]
    [('B', 3, 'T', 16, 16), ('B', 8, 'T', 16, 16)]
"""
from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from cofx.errors import ConversionError

from .shape_runs import FAILED, Rec, other_length


class Labels(tuple):
    """Per-dimension labels of one tensor (a pytree leaf, unlike a plain tuple)."""


class BatchRows(str):
    """The label "B" of a dimension that holds `rows` rows per stream (persons folded into the batch,
    ``x.view(N * M, C, T, V)``): equal to "B" everywhere, and sized ``rows`` times the batch."""

    def __new__(cls, rows: int):
        label = super().__new__(cls, "B")
        label.rows = rows
        return label

    def __reduce__(self):
        return BatchRows, (self.rows,)


def rows_per_stream(label) -> int:
    """How many rows per stream a dimension labelled `label` holds (1 unless `BatchRows` says more)."""
    return getattr(label, "rows", 1)


def _label(clip, longer, batch):
    t = longer is not None and longer != clip
    b = batch != clip
    if t and b:
        return "BT"
    if t:
        return "T"
    if b:
        return "B" if clip == 1 else BatchRows(clip)
    return clip


def _leaf_layout(node, clip, longer, batch):
    if isinstance(clip, Rec):
        if not (isinstance(batch, Rec) and len(batch.shape) == len(clip.shape)):
            raise ConversionError("the number of dimensions changes with the batch size", node=node)
        if longer is not None and not (isinstance(longer, Rec) and len(longer.shape) == len(clip.shape)):
            gm = node.graph.owning_module
            opaque = gm.meta.get("cofx_untraceable", {}).get(node.target) if node.op == "call_module" else None
            raise ConversionError("the number of dimensions changes with the clip length" + (
                f" (a module torch.fx could not trace into: {opaque}; a branch on a size, such as squeezing time "
                "when one frame is left, is fixed by the clip length)" if opaque else ""), node=node,
                fix="keep the time axis as its own dimension (x[:, :, :, 0] or x.flatten(1) rather than a "
                    "squeeze that depends on the length)")
        return Labels(_label(c, None if longer is None else longer.shape[i], batch.shape[i])
                      for i, c in enumerate(clip.shape))
    if isinstance(clip, int) and not isinstance(clip, bool):
        return _label(clip, longer, batch)
    return None


def label_layouts(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        runs = node.meta.get("cofx_runs", {})
        if "clip" not in runs:
            node.meta["cofx_layout"] = None
            continue
        clip_leaves, spec = tree_flatten(runs["clip"])
        batch_leaves, _ = tree_flatten(runs["batch"])
        longer = other_length(node)
        longer_leaves = [None] * len(clip_leaves) if longer is FAILED else tree_flatten(longer)[0]
        if len(batch_leaves) != len(clip_leaves) or len(longer_leaves) != len(clip_leaves):
            raise ConversionError("the structure of this node's output changes with batch size or clip length",
                                  node=node)
        node.meta["cofx_layout"] = tree_unflatten(
            [_leaf_layout(node, c, l, b) for c, l, b in zip(clip_leaves, longer_leaves, batch_leaves)], spec)
        node.meta["cofx_longer_failed"] = runs.get("longer", FAILED) is FAILED


def time_axes(labels) -> list:
    """Indices of the dimensions that carry time ("T" or "BT") in a tensor's labels."""
    if not isinstance(labels, Labels):
        return []
    return [i for i, lab in enumerate(labels) if lab in ("T", "BT")]


def time_axis(node: fx.Node) -> Optional[int]:
    """The single time axis of a tensor node, None when it has none; raises when it has two."""
    labels = node.meta.get("cofx_layout")
    axes = time_axes(labels)
    if len(axes) > 1:
        raise ConversionError(
            f"the output has {len(axes)} dimensions that grow with the clip length (dims {axes}); "
            "this is what attention across time, outer products over time or repeats do",
            node=node, fix="keep time in one dimension (attention over frames converts: it takes the frames "
            "as its tokens)")
    return axes[0] if axes else None


def has_time(value_layout: Any) -> bool:
    leaves, _ = tree_flatten(value_layout)
    return any(time_axes(l) or l in ("T", "BT") for l in leaves if isinstance(l, (Labels, str)))
