"""Receptive field, delay and temporal stride of every node, over the whole DAG.

Counts in frames of the model's input. For output frame j of a node:

- it depends on input frames ``j*stride + lo ... j*stride + hi`` (negative
  indices are start padding), so its receptive field is ``hi - lo + 1``;
- it becomes available when input frame ``ready`` (for j = 0) has arrived:
  a continual model returns None for its first ``ready`` steps (its delay).
  Readiness is followed exactly, frame by frame: an op whose window lies
  wholly in its start padding emits it at once, which affine rules miss.

Along a chain this is the continual-inference rule (d = f - p - 1 for one op,
f_acc(i) = f(i) + (f_acc(i-1) - 1) * s_acc(i-1)); where branches merge, the
merge waits for the slowest branch and the others get delay buffers.

Writes ``node.meta["cofx_timing"]`` (a `Timing`, None for time-free nodes).

Example::

    >>> annotate_timing(gm)
    >>> gm.graph.find_nodes(op="output")[0].args[0].meta["cofx_timing"]
    Timing(lo=-1, hi=3, ready=3, stride=1)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.fx as fx

from cofx.errors import ConversionError

from .node_kind import node_inputs
from .temporal_geometry import Geometry, sliding_geometry


@dataclass(frozen=True)
class Timing:
    lo: int
    hi: int
    ready: int
    stride: int

    @property
    def receptive_field(self) -> int:
        return self.hi - self.lo + 1

    def through(self, g: Geometry, ready: int) -> "Timing":
        """Timing after an op with geometry `g` whose input has this timing."""
        return Timing(lo=self.lo + (g.dep_lo - g.pad_l) * self.stride,
                      hi=self.hi + (g.dep_hi - g.pad_l) * self.stride,
                      ready=ready, stride=self.stride * g.stride)


def geometry_of(node: fx.Node):
    spec = node.meta.get("cofx_spec")
    if spec is None:
        return None
    return spec.geometry if hasattr(spec, "geometry") else sliding_geometry(spec)


def _time_inputs(node: fx.Node) -> list:
    return [a for a in node_inputs(node) if a.meta.get("cofx_role") in ("stream", "folded")
            and a.meta.get("cofx_timing")]


class _Readiness:
    """ready(node, j): the input frame after which output frame j of `node` is available."""

    def __init__(self, replicate: bool):
        self.replicate, self.memo = replicate, {}

    def __call__(self, node: fx.Node, j: int) -> int:
        key = (node, j)
        if key not in self.memo:
            self.memo[key] = self._compute(node, j)
        return self.memo[key]

    def _compute(self, node, j):
        if node.op == "placeholder":
            return j
        g = geometry_of(node)
        ins = _time_inputs(node)
        if g is None:
            return max(self(a, j) for a in ins)
        last = j * g.stride + g.span - 1 - g.pad_l   # the last input frame the window needs
        if last < 0:   # a window of start padding only: emitted on the first call
            return max(self(a, 0) for a in ins) if self.replicate and g.pad_l > 0 else 0
        return max(self(a, last) for a in ins)


def merge_timings(node: fx.Node, timings: list) -> Timing:
    strides = {t.stride for t in timings}
    if len(strides) > 1:
        raise ConversionError(f"merges branches with different temporal strides {sorted(strides)}", node=node,
                              fix="branches that are added or concatenated must subsample time equally")
    return Timing(lo=min(t.lo for t in timings), hi=max(t.hi for t in timings),
                  ready=max(t.ready for t in timings), stride=timings[0].stride)


def annotate_timing(gm: fx.GraphModule, replicate: bool = False) -> None:
    ready = _Readiness(replicate)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * len(gm.graph.nodes) + 1000))
    try:
        for node in gm.graph.nodes:
            role = node.meta.get("cofx_role")
            if node.op == "placeholder" and role == "stream":
                node.meta["cofx_timing"] = Timing(0, 0, 0, 1)
                continue
            ins = [a.meta["cofx_timing"] for a in _time_inputs(node)]
            if not ins or role not in ("stream", "folded", "output"):
                node.meta["cofx_timing"] = None
                continue
            merged = merge_timings(node, ins)
            g = geometry_of(node)
            node.meta["cofx_timing"] = merged.through(g, ready(node, 0)) if g is not None else merged
    finally:
        sys.setrecursionlimit(limit)
