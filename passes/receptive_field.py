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

    >>> model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.Conv1d(4, 4, 3)).eval()
    >>> gm, clip = cofx.tracer.trace(model), torch.randn(1, 2, 8)
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(clip, time_dim=2))
    >>> cofx.passes.label_layouts(gm); cofx.passes.mark_length_values(gm); cofx.passes.classify_nodes(gm)
    >>> cofx.passes.check_framewise(gm, clip)
    >>> annotate_timing(gm)
    >>> gm.graph.find_nodes(op="output")[0].args[0].meta["cofx_timing"]
    Timing(lo=-1, hi=3, ready=3, stride=1)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from cofx.errors import ConversionError

from .node_kind import node_inputs
from .temporal_geometry import Geometry, sliding_geometry


@dataclass(frozen=True)
class Timing:
    lo: float    # -inf after a recurrent layer
    hi: int
    ready: int
    stride: int

    @property
    def receptive_field(self):
        """Frames one output depends on (math.inf after a recurrent layer)."""
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
    return [a for a in node_inputs(node) if a.meta.get("cofx_role") in ("stream", "folded")]


def _through_geometry(node: fx.Node, a: fx.Node) -> bool:
    """Whether input `a` reaches `node` through the node's temporal op (a window over the clip takes its stream
    inputs through it; what already comes per window passes as it is)."""
    windowed = node.meta.get("cofx_window_inputs")
    return windowed is None or a in windowed


class _Readiness:
    """ready(node, j): the input frame after which output frame j of `node` is available; early(node, j): whether
    it is emitted already by a first call without frames (a window of start padding only, and what is computed
    from such frames alone).

    Tables are filled in topological order, each as long as its consumers need,
    so deep graphs need no recursion.
    """

    def __init__(self, gm: fx.GraphModule, horizon: int, replicate: bool):
        nodes = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("cofx_role") == "stream"
                 or n.meta.get("cofx_role") in ("stream", "folded") and _time_inputs(n)]
        length = {n: horizon for n in nodes}
        for node in reversed(nodes):
            g = geometry_of(node)
            need = length[node] if g is None else \
                max(0, (length[node] - 1) * g.stride + g.span - g.pad_l)
            for a in _time_inputs(node):
                length[a] = max(length.get(a, horizon), need if _through_geometry(node, a) else length[node], 1)
        self.tables, self.early = {}, {}
        for node in nodes:
            n = length[node]
            if node.op == "placeholder":
                self.tables[node], self.early[node] = list(range(n)), [False] * n
                continue
            g = geometry_of(node)
            ins = [a for a in _time_inputs(node) if g is None or _through_geometry(node, a)]
            passed = [a for a in _time_inputs(node) if g is not None and not _through_geometry(node, a)]
            if g is None:
                self.tables[node] = [max(self.tables[a][j] for a in ins) for j in range(n)]
                self.early[node] = [all(self.early[a][j] for a in ins) for j in range(n)]
                continue
            table, early = [], []
            for j in range(n):
                last = j * g.stride + g.span - 1 - g.pad_l   # the last input frame the window needs
                if last < 0:   # a window of start padding only: emitted on the first call
                    waits = replicate and g.pad_l > 0   # (replicate padding waits for the first frame)
                    table.append(max(self.tables[a][0] for a in ins) if waits else 0)
                    early.append(not waits)
                else:
                    table.append(max(self.tables[a][last] for a in ins))
                    early.append(all(self.early[a][last] for a in ins))
            self.tables[node] = [max([r, *(self.tables[a][j] for a in passed)]) for j, r in enumerate(table)]
            self.early[node] = [e and all(self.early[a][j] for a in passed) for j, e in enumerate(early)]

    def __call__(self, node: fx.Node, j: int) -> int:
        return self.tables[node][j]

    def emitted_early(self, node: fx.Node, j: int) -> bool:
        return self.early[node][j]


def merge_timings(node: fx.Node, timings: list) -> Timing:
    strides = {t.stride for t in timings}
    if len(strides) > 1 and node.op == "output":
        raise ConversionError(f"the model's outputs have different temporal strides {sorted(strides)}: a continual "
                              "model steps its outputs at one rate", node=node,
                              fix="return outputs of one temporal stride (pool the faster ones to the slowest "
                              "rate), or convert a model per rate")
    if len(strides) > 1:
        raise ConversionError(f"merges branches with different temporal strides {sorted(strides)}", node=node,
                              fix="branches that are added or concatenated must subsample time equally "
                              "(two pathways at different frame rates, as SlowFast's: pool the faster one to the "
                              "slower rate, avg_pool3d(fast, (alpha, 1, 1), (alpha, 1, 1)), before joining them)")
    return Timing(lo=min(t.lo for t in timings), hi=max(t.hi for t in timings),
                  ready=max(t.ready for t in timings), stride=timings[0].stride)


def same_readiness(gm: fx.GraphModule, nodes: list) -> bool:
    """True when every node emits frame j at the same step, for every j (their merge needs no delay buffer).

    Readiness is affine in j once no window lies in start padding, which happens
    within `horizon` frames; equal values up to there mean equal for ever.
    """
    ready = gm.meta["cofx_readiness"]
    timings = [n.meta.get("cofx_timing") for n in nodes]
    if any(t is None for t in timings) or len({t.stride for t in timings}) > 1:
        return False
    horizon = gm.meta["cofx_horizon"]
    return all(len({(ready(n, j), ready.emitted_early(n, j)) for n in nodes}) == 1 for j in range(horizon))


def annotate_timing(gm: fx.GraphModule, replicate: bool = False) -> None:
    geometries = [g for g in map(geometry_of, gm.graph.nodes) if g]
    gm.meta["cofx_horizon"] = horizon = 2 + sum(g.span + abs(g.pad_l) for g in geometries)
    ready = _Readiness(gm, horizon, replicate)
    gm.meta["cofx_readiness"] = ready
    for node in gm.graph.nodes:
        role = node.meta.get("cofx_role")
        if node.op == "placeholder" and role == "stream":
            node.meta["cofx_timing"] = Timing(0, 0, 0, 1)
            continue
        timed = [a for a in _time_inputs(node) if a.meta.get("cofx_timing")]
        if not timed or role not in ("stream", "folded", "output"):
            node.meta["cofx_timing"] = None
            continue
        g = geometry_of(node)
        through = [a.meta["cofx_timing"] for a in timed if g is None or _through_geometry(node, a)]
        passed = [a.meta["cofx_timing"] for a in timed if g is not None and not _through_geometry(node, a)]
        merged = merge_timings(node, through)
        if node.meta.get("cofx_kind") == "recurrent":   # depends on every frame since the stream started
            merged = Timing(lo=float("-inf"), hi=merged.hi, ready=merged.ready, stride=merged.stride)
        if g is not None:
            merged = merged.through(g, ready(node, 0))
        node.meta["cofx_timing"] = merge_timings(node, [merged, *passed]) if passed else merged
