"""Convolutions of a single pixel, rewritten as products summed over channels in a recorded step graph.

A squeeze-and-excitation gate convolves one pooled pixel per frame ([B, C, 1, 1, 1]
with a 1x1x1 kernel): a matrix-vector product of a few hundred multiply-adds. A
library call for it costs more than the work (compiled X3D-S steps, per gate
layer: oneDNN's convolution ~55 us, its linear ~24 us); written as a product
summed over the input channels, inductor generates one small fused reduction
instead (~0.5 ms of a ~6.5 ms X3D-S step, which has 26 such layers). The
rewrite is exact up to float rounding and applies to what the recording saw
(`node.meta["val"]`).

Example::

    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> conv, x = torch.nn.Conv3d(8, 4, 1), torch.randn(2, 8, 1, 1, 1)
    >>> gm = make_fx(conv)(x)
    >>> pixel_convs_as_sums(gm)
    1
    >>> torch.allclose(gm(x), conv(x), atol=1e-6)
    True
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import fx

from .graph_rewrite import rewrite_nodes

aten = torch.ops.aten


def pixel_convs_as_sums(gm: fx.GraphModule) -> int:
    """Rewrite every convolution of a single pixel by a full kernel-1 weight as a product summed over input
    channels; returns how many."""
    return rewrite_nodes(gm, gm.graph.find_nodes(op="call_function", target=aten.convolution.default), _as_sum)


def _as_sum(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = node.args
    x_val, w_val = x.meta.get("val"), weight.meta.get("val")
    if x_val is None or w_val is None or transposed or groups != 1 or any(padding) \
            or math.prod(x_val.shape[2:]) != 1 or math.prod(w_val.shape[2:]) != 1:
        return None
    batch, channels = x_val.shape[:2]
    rows = graph.call_function(aten.view.default, (x, [batch, 1, channels]))
    matrix = graph.call_function(aten.view.default, (weight, [w_val.shape[0], channels]))
    terms = graph.call_function(aten.mul.Tensor, (rows, matrix))    # [batch, out, in]
    out = graph.call_function(aten.sum.dim_IntList, (terms, [2]))
    if bias is not None:
        out = graph.call_function(aten.add.Tensor, (out, bias))
    return graph.call_function(aten.view.default, (out, list(node.meta["val"].shape)))
