"""An output that one node returns as a tuple, list or dict, unpacked into one node per tensor.

``return h.chunk(2, 1)`` (a mean and a log-variance), ``return torch.split(...)``
or a module torch.fx keeps whole that returns ``(pooled, frames)`` give the
graph's output as one node whose value is a container. Each tensor of a
model's output streams on its own (its frames or its windows), so each needs
a node of its own: this pass writes the output as the same container of
``getitem`` nodes, which the model's forward returns unchanged. Runs after
the shape runs (it reads which nodes return containers) and asks for them
again.

Example::

    >>> class MeanAndScale(torch.nn.Module):
    ...     def forward(self, x):                   # (B, 4, T)
    ...         return x.cumsum(1).chunk(2, 1)
    >>> gm = cofx.tracer.trace(MeanAndScale())
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(torch.randn(1, 4, 6), time_dim=2))
    >>> outputs_unpacked(gm)
    1
    >>> [n.name for n in gm.graph.find_nodes(op="output")[0].all_input_nodes]
    ['getitem', 'getitem_1']
"""
from __future__ import annotations

import operator

import torch.fx as fx


def outputs_unpacked(gm: fx.GraphModule) -> int:
    """Unpack every output node whose value is a plain tuple, list or dict; returns how many were."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    unpacked = []

    def unpack(node: fx.Node, value):
        if type(value) in (tuple, list):
            keys = range(len(value))
        elif type(value) is dict:
            keys = value.keys()
        else:
            return node
        unpacked.append(node)
        with gm.graph.inserting_before(output):
            items = {k: unpack(gm.graph.call_function(operator.getitem, (node, k)), value[k]) for k in keys}
        return items if type(value) is dict else type(value)(items.values())

    def each(node: fx.Node):
        return unpack(node, node.meta.get("cofx_runs", {}).get("clip"))

    output.args = (fx.node.map_arg(output.args[0], each),)
    if unpacked:
        gm.graph.lint()
        gm.recompile()
    return len(unpacked)
