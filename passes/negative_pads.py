"""Negative padding as the crop it is, so that it streams as a crop does.

``F.pad(x, (0, 0, 1, -1))`` (RWKV's token shift, ``nn.ZeroPad2d((0, 0, 1, -1))``)
pads one frame before the clip and drops its last one: a zero frame at the
start and a crop at the end. Written as a slice then a non-negative pad (the
same values: both copy), each part is one cofx streams. Rewritten on the traced
graph before any analysis.

>>> import torch, torch.fx as fx, torch.nn.functional as F
>>> gm = fx.symbolic_trace(lambda x: F.pad(x, (0, 0, 1, -1)))
>>> negative_pads_as_crops(gm)
1
>>> x = torch.randn(1, 6, 3)
>>> torch.equal(gm(x), F.pad(x, (0, 0, 1, -1)))
True
"""
from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx, nn

from cofx.graph_rewrite import rewrite_nodes
from cofx.stock_modules import stock

_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)


def _constant_pad(gm: fx.GraphModule, node: fx.Node):
    """(input, pad, value) of a constant pad with a negative entry, or None."""
    if node.op == "call_function" and node.target is F.pad:
        given = dict(zip(("input", "pad", "mode", "value"), node.args), **node.kwargs)
        x, pad, mode, value = given.get("input"), given.get("pad"), given.get("mode", "constant"), given.get("value")
    elif node.op == "call_module" and stock(gm.get_submodule(node.target), _PADS) and len(node.args) == 1:
        module = gm.get_submodule(node.target)
        x, pad, mode, value = node.args[0], module.padding, "constant", module.value
    else:
        return None
    if mode != "constant" or not isinstance(pad, (tuple, list)) or \
            not all(isinstance(p, int) for p in pad) or min(pad, default=0) >= 0:
        return None
    return x, tuple(pad), value


def negative_pads_as_crops(gm: fx.GraphModule) -> int:
    """Rewrite each constant pad with a negative entry as a slice and a pad; returns how many were rewritten."""
    def replacement(graph: fx.Graph, node: fx.Node):
        x, pad, value = _constant_pad(gm, node)
        n = len(pad) // 2
        crops = [slice(None)] * n   # for dims -n .. -1
        for j in range(n):
            left, right = pad[2 * j], pad[2 * j + 1]
            crops[n - 1 - j] = slice(-left if left < 0 else None, right if right < 0 else None)
        cropped = graph.call_function(operator.getitem, (x, (Ellipsis, *crops)))
        kept = tuple(max(p, 0) for p in pad)
        if not any(kept):
            return cropped
        return graph.call_function(F.pad, (cropped, kept), {} if value is None else {"value": value})

    return rewrite_nodes(gm, [n for n in gm.graph.nodes if _constant_pad(gm, n) is not None], replacement)
