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


def _item(graph: fx.Graph, sequence, key):
    """Item `key` of `sequence`: read straight out of a tuple written in the code or joined by ``+``
    (``h.chunk(2, 1) + (h,)``), else a ``getitem`` node."""
    if isinstance(sequence, (tuple, list)):
        return sequence[key]
    if sequence.op == "call_function" and sequence.target is operator.add and len(sequence.args) == 2 \
            and isinstance(key, int):
        first, second = sequence.args
        n = len(first) if isinstance(first, (tuple, list)) else len(first.meta.get("cofx_runs", {}).get("clip", ()))
        return _item(graph, first, key) if key < n else _item(graph, second, key - n)
    return graph.call_function(operator.getitem, (sequence, key))


def outputs_unpacked(gm: fx.GraphModule) -> int:
    """Unpack every output node whose value is a plain tuple, list or dict; returns how many were."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    unpacked = []

    def unpack(node, value):
        if type(value) in (tuple, list):
            keys = range(len(value))
        elif type(value) is dict:
            keys = value.keys()
        else:
            return node
        unpacked.append(node)
        with gm.graph.inserting_before(output):
            items = {k: unpack(_item(gm.graph, node, k), value[k]) for k in keys}
        return items if type(value) is dict else type(value)(items.values())

    def each(node: fx.Node):
        return unpack(node, node.meta.get("cofx_runs", {}).get("clip"))

    output.args = (fx.node.map_arg(output.args[0], each),)
    for node in reversed(unpacked):   # tuples joined by + whose items are now read directly
        if isinstance(node, fx.Node) and not node.users:
            gm.graph.erase_node(node)
    if unpacked:
        gm.graph.lint()
        gm.recompile()
    return len(unpacked)
