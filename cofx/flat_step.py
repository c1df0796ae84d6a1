"""The step graph as a flat program: one plain attribute read per module or weight an op uses.

fx's generated code reaches ``self.blocks.1.res_blocks.0.branch2.conv_a`` through a
chain of ``Module.__getattr__`` calls. A step of a real network runs hundreds of
small ops, and those chains cost more than some of the ops (X3D-S: about 2400
lookups per frame). The flat module binds every module the graph uses under one
name in its instance dict, so Python finds it without ``__getattr__``; weights
are read from their module at every call (one lookup), so parametrized weights
(weight_norm) and replaced parameters are always current.
It shares every object with the continual module (same weights, same kernels,
same state); the graph it runs is the step graph, renamed. cofx's own kernels
are bound by their `forward` (no hook machinery on every call); the model's
modules stay modules, so their hooks (weight_norm, user hooks) still run.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1))).eval()
    >>> co = cofx.convert(model, torch.randn(1, 2, 8))
    >>> print(co.step_code)   # fx's code: a chain of __getattr__ calls per module
    def forward(self, input_1):
        ...
        _0_0_weight = getattr(getattr(self, "0"), "0").weight
        ...
    >>> flat = flat_step_module(co, co.step_graph)
    >>> print(flat.code)      # one plain attribute read instead of a chain
    def forward(self, input_1):
        ...
        _0_0 = getattr(self, "0_0")
        _0_0_weight = _0_0.weight;  _0_0 = None
        ...
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from .kernels import Kernel


def flat_step_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    holder = nn.Module()
    flat: dict = {}   # dotted target -> flat name
    g = fx.Graph()
    env: dict = {}

    def flat_name(target: str, obj) -> str:
        if target not in flat:
            name = target.replace(".", "_") or "root"
            while name in flat.values() or hasattr(holder, name):
                name += "_"
            flat[target] = name
            holder.__dict__[name] = obj   # not registered: the holder only lends names
        return flat[target]

    for node in graph.nodes:
        if node.op == "get_attr":   # read from its module at every call: parametrized and replaced weights
            owner, _, attr = node.target.rpartition(".")
            module = g.get_attr(flat_name(owner, root.get_submodule(owner)))
            env[node] = g.create_node("call_function", getattr, (module, attr), {}, name=node.name)
            continue
        new = g.node_copy(node, lambda a: env[a])
        if node.op == "call_module":
            new.target = flat_name(node.target, root.get_submodule(node.target))
        env[node] = new
    gm = fx.GraphModule(holder, g, class_name="ContinualStep")
    for name in flat.values():
        obj = holder.__dict__[name]
        gm.__dict__[name] = obj.forward if isinstance(obj, Kernel) else obj
    return gm

