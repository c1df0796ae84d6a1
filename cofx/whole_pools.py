"""Average pools whose window covers their whole input, rewritten as means in a recorded step graph.

A classification head pools the last clip's features in one window (X3D:
AvgPool3d over 13x5x5); in a step it pools a ring's window, a strided view,
which PyTorch's CPU `avg_pool3d` first copies to contiguous memory (inductor
has no lowering of its own for it on CPU). The same mean as `mean` over the
pooled dimensions is a reduction inductor generates, reading the window where
it lies. Exact up to float rounding; applies to what the recording saw
(`node.meta["val"]`).

Example::

    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> pool, x = torch.nn.AvgPool3d((4, 3, 3)), torch.randn(2, 8, 4, 3, 3)
    >>> gm = make_fx(pool)(x)
    >>> whole_pools_as_means(gm)
    1
    >>> torch.allclose(gm(x), pool(x), atol=1e-6)
    True
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from .graph_rewrite import rewrite_nodes

aten = torch.ops.aten
POOLS = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}


def whole_pools_as_means(gm: fx.GraphModule) -> int:
    """Rewrite every average pool with no padding whose window is its whole input as a mean; returns how
    many."""
    return rewrite_nodes(gm, [n for n in gm.graph.nodes if n.op == "call_function" and n.target in POOLS],
                         _as_mean)


def _as_mean(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    dims = POOLS[node.target]
    args = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
    x, x_val = args["input"], args["input"].meta.get("val")
    kernel, padding = (_per_dim(args[name], dims) for name in ("kernel_size", "padding"))
    if x_val is None or args["divisor_override"] is not None or any(padding) or list(x_val.shape[-dims:]) != kernel:
        return None
    return graph.call_function(aten.mean.dim, (x, list(range(-dims, 0)), True))


def _per_dim(value, dims: int) -> list:
    """A pool's int-or-list argument as one value per pooled dimension (PyTorch repeats a single one)."""
    value = [value] if isinstance(value, int) else list(value)
    return value * dims if len(value) == 1 else value
