"""A resize that keeps the number of frames, as each frame resized alone.

``F.interpolate(h, size=(h.shape[2], 16, 16))`` and the FPN skip
``a + F.interpolate(b, size=a.shape[2:])`` resize space only: along time the
output has the input's frames, and every interpolation mode maps frame t to
frame t exactly (scale 1). But their size is read off the clip, which as a value
has no continual meaning. Rewritten as `interpolate_frames` (the frames folded
into the batch, each resized as a clip of one frame: the same kernel, the same
numbers) the size left is spatial, the same on every clip. Runs after the shape runs (it reads them: the
time axis is the one whose size follows the clip's and stays) and asks for them
again.

Example::

    >>> class Up(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.nn.functional.interpolate(x, size=(x.shape[2], 8, 8), mode="trilinear")
    >>> gm = cofx.tracer.trace(Up())
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(torch.randn(1, 2, 5, 4, 4), time_dim=2))
    >>> frames_resized_alone(gm)
    1
    >>> x = torch.randn(2, 2, 7, 4, 4)
    >>> torch.allclose(gm(x), Up()(x))
    True
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from cofx.graph_rewrite import rewrite_nodes

from .shape_runs import run_shapes

_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def interpolate_frames(x: torch.Tensor, axis: int, size: tuple, mode: str, align_corners) -> torch.Tensor:
    """`F.interpolate` of `x` to `size` along its dims after `axis` (time), each frame alone: the frames folded
    into the batch, each a clip of one frame, so that the mode's own kernel runs (the same numbers)."""
    frames = x.movedim(axis, 1)
    one = frames.flatten(0, 1).unsqueeze(axis)
    out = F.interpolate(one, size=(1, *size), mode=mode, align_corners=align_corners)
    return out.squeeze(axis).unflatten(0, frames.shape[:2]).movedim(1, axis)


def _kept_time_axis(node: fx.Node, x: fx.Node) -> Optional[int]:
    """The first resized dim (the one after channels) when it is time: its size follows the clip's in every run
    and the output keeps it; None otherwise."""
    ins, outs = run_shapes(x), run_shapes(node)
    if not ins or set(ins) != set(outs) or "clip" not in ins or "longer" not in ins:
        return None
    if any(len(s) < 3 or len(outs[r]) != len(s) or outs[r][2] != s[2] for r, s in ins.items()):
        return None
    if ins["clip"][2] == ins["longer"][2] or any(outs[r][3:] != outs["clip"][3:] for r in outs):
        return None   # not time, or a spatial size that follows the clip
    return 2


def frames_resized_alone(gm: fx.GraphModule) -> int:
    """Rewrite each `F.interpolate` given a `size` that keeps the frames as `interpolate_frames`; returns how
    many were rewritten."""
    def replacement(graph: fx.Graph, node: fx.Node):
        given = dict(zip(_ARGS, node.args), **node.kwargs)
        x = given.get("input")
        if not isinstance(x, fx.Node) or given.get("size") is None or given.get("antialias") or \
                given.get("recompute_scale_factor") is not None:
            return None
        axis = _kept_time_axis(node, x)
        if axis is None:
            return None
        size = tuple(run_shapes(node)["clip"][axis + 1:])
        return graph.call_function(interpolate_frames, (x, axis, size, given.get("mode", "nearest"),
                                                        given.get("align_corners")))

    return rewrite_nodes(gm, gm.graph.find_nodes(op="call_function", target=F.interpolate), replacement)
