"""Fold a crop of a convolution's end-padded frames into the convolution.

The causal convolution of the locuslab TCN pads both ends and then drops the
frames computed from the end padding (``Chomp1d``: ``x[:, :, :-p]``). Stepped
as written, each crop waits for the p frames after a frame to know that it is
not among the last p of the clip (however it is written: ``x[:, :, :-p]``,
``x[:, :, :x.size(2) - p]``), so every block adds p frames of delay. Those
last frames are exactly the ones the convolution computes from its end
padding, so the pair is the convolution with p fewer frames of end padding, and
the crop keeps every frame: delay 0, same values.

Example::

    >>> class Chomp(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x[:, :, :-2]
    >>> model = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3, padding=2), Chomp()).eval()
    >>> cofx.convert(model, torch.randn(1, 2, 8)).delay
    0
"""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from cofx.sliding_ops import SlidingSpec

from .length_values import is_value
from .temporal_geometry import CropSpec


def _only_cropped_by(op: fx.Node, crop: fx.Node) -> bool:
    """Whether `crop` is the one op that takes `op`'s frames: its other users are size reads whose values end
    up in `crop` alone (``x[:, :, :x.size(2) - p]``)."""
    todo, seen = [u for u in op.users if u is not crop], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is crop:
            continue
        if not is_value(n):
            return False
        todo.extend(n.users)
    return True


def fold_crops(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        crop = node.meta.get("cofx_spec")
        if not isinstance(crop, CropSpec) or crop.step != 1 or crop.end == 0:
            continue
        op = node.args[0]
        spec = op.meta.get("cofx_spec") if isinstance(op, fx.Node) else None
        if not isinstance(spec, SlidingSpec) or spec.s != 1 or spec.pad_r == 0 or not _only_cropped_by(op, node):
            continue
        dropped = min(crop.end, spec.pad_r)
        pads = tuple((left, right - dropped) if i == spec.t else (left, right)
                     for i, (left, right) in enumerate(spec.pads))
        op.meta["cofx_spec"] = replace(spec, pads=pads)
        node.meta["cofx_spec"] = replace(crop, end=crop.end - dropped, folded=dropped)
