"""Power-average pooling as the average pooling it computes, so that it streams as a pool over time does.

``F.lp_pool1d(x, p, k, s)`` (and its 2-D and 3-D forms, functions or `nn.LPPool*d`)
is ``(sign(a) * relu(|a|) * K) ** (1 / p)`` with ``a = F.avg_pool1d(x ** p, k, s)``
and K the kernel's size: elementwise ops around an average pool, which cofx
converts exactly. Rewritten so on the traced graph before any analysis, with
the ops torch itself runs (the same numbers); an infinite norm is the max pool
of ``|x|`` torch makes it.

>>> import torch, torch.fx as fx, torch.nn.functional as F
>>> gm = fx.symbolic_trace(lambda x: F.lp_pool1d(x, 2, 3, 2))
>>> lp_pool_as_avg(gm)
1
>>> x = torch.randn(1, 2, 9)
>>> torch.equal(gm(x), F.lp_pool1d(x, 2, 3, 2))
True
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from cofx.graph_rewrite import rewrite_nodes
from cofx.stock_modules import stock

_FUNCTIONS = {F.lp_pool1d: 1, F.lp_pool2d: 2, F.lp_pool3d: 3}
_MODULES = {nn.LPPool1d: 1, nn.LPPool2d: 2, nn.LPPool3d: 3}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _arguments(gm: fx.GraphModule, node: fx.Node):
    """(input, norm_type, kernel_size, stride, ceil_mode, nd) of a power-average pool, or None."""
    if node.op == "call_function" and node.target in _FUNCTIONS:
        given = dict(zip(("input", "norm_type", "kernel_size", "stride", "ceil_mode"), node.args), **node.kwargs)
        return (given["input"], given["norm_type"], given["kernel_size"], given.get("stride"),
                given.get("ceil_mode", False), _FUNCTIONS[node.target])
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        nd = next((v for k, v in _MODULES.items() if stock(module, k)), None)
        if nd is not None and len(node.args) == 1 and not node.kwargs:
            return node.args[0], module.norm_type, module.kernel_size, module.stride, module.ceil_mode, nd
    return None


def lp_pool_as_avg(gm: fx.GraphModule) -> int:
    """Rewrite every power-average pool of `gm` as torch computes it; returns how many were rewritten."""
    def replacement(graph: fx.Graph, node: fx.Node):
        x, p, kernel, stride, ceil_mode, nd = _arguments(gm, node)
        if not isinstance(p, (int, float)) or p == 0 or any(isinstance(v, fx.Node) for v in (kernel, stride)):
            return None   # left as it is: analysed (and refused) as the op it is
        if math.isinf(p):
            pooled = graph.call_function(_MAX[nd], (graph.call_method("abs", (x,)) if p > 0 else
                                                    graph.call_function(operator.neg, (graph.call_method("abs", (x,)),)),
                                                    kernel, stride, 0, 1, ceil_mode))
            return pooled if p > 0 else graph.call_function(operator.neg, (pooled,))
        size = math.prod(kernel) if isinstance(kernel, (tuple, list)) and len(kernel) == nd else kernel ** nd
        avg = graph.call_function(_AVG[nd], (graph.call_method("pow", (x, p)), kernel, stride, 0, ceil_mode)) \
            if stride is not None else \
            graph.call_function(_AVG[nd], (graph.call_method("pow", (x, p)), kernel), {"padding": 0,
                                                                                        "ceil_mode": ceil_mode})
        signed = graph.call_function(operator.mul, (graph.call_function(torch.sign, (avg,)),
                                                    graph.call_function(F.relu, (graph.call_function(torch.abs,
                                                                                                      (avg,)),))))
        return graph.call_method("pow", (graph.call_method("mul", (signed, size)), 1.0 / p))

    return rewrite_nodes(gm, [n for n in gm.graph.nodes if _arguments(gm, n) is not None], replacement)
