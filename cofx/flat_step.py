"""The step graph as a flat program: one plain attribute read per module or weight an op uses.

fx's generated code reaches ``self.blocks.1.res_blocks.0.branch2.conv_a`` through a
chain of ``Module.__getattr__`` calls. A step of a real network runs hundreds of
small ops, and those chains cost more than some of the ops (X3D-S: about 2400
lookups per frame). The flat module binds every module and tensor the graph reads
under one name in its instance dict, so Python finds it without ``__getattr__``.
It shares every object with the continual module (same weights, same kernels,
same state); the graph it runs is the step graph, renamed.

Example::

    >>> flat = flat_step_module(co, co.step_graph)
    >>> print(flat.code)   # self.blocks_1_res_blocks_0_branch2_conv_a(...) instead of a chain
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn


def flat_step_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    holder = nn.Module()
    flat: dict = {}   # dotted target -> flat name
    g = fx.Graph()
    env: dict = {}
    for node in graph.nodes:
        new = g.node_copy(node, lambda a: env[a])
        if node.op in ("call_module", "get_attr"):
            if node.target not in flat:
                name = node.target.replace(".", "_")
                while name in flat.values() or hasattr(holder, name):
                    name += "_"
                flat[node.target] = name
                obj = root.get_submodule(node.target) if node.op == "call_module" else \
                    _attribute(root, node.target)
                holder.__dict__[name] = obj   # not registered: the holder only lends names
            new.target = flat[node.target]
        env[node] = new
    gm = fx.GraphModule(holder, g, class_name="ContinualStep")
    for name in flat.values():
        gm.__dict__[name] = holder.__dict__[name]
    return gm


def _attribute(root: nn.Module, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, attr)
