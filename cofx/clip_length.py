"""Find the input a model implies when the user gives none.

Video classifiers such as X3D end in a pooling layer whose kernel covers the
whole clip (X3D-S: AvgPool3d((13, 5, 5))). Following the temporal and
spatial sizes through the convolutions and pools from the input to the last
such pool tells the clip length and frame size it was built for.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .errors import ConversionError
from .sliding_ops import sliding_spec

_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _size_function(gm: fx.GraphModule, target: fx.Node, dim: int):
    """size(n): the size along `dim` (2 = time) at `target`'s input when the model input has size n there."""
    steps, index = [], {}
    for node in gm.graph.nodes:
        if node is target:
            break
        ins = [index[a] for a in node.all_input_nodes if a in index]
        if node.op == "placeholder":
            index[node] = len(steps)
            steps.append(None)
        elif ins:
            found = sliding_spec(node, gm, dim) if node.op == "call_module" else None
            index[node] = len(steps)
            steps.append((ins[0], found[0] if found else None))
    source = next((index[a] for a in target.all_input_nodes if a in index), None)
    if source is None:
        raise ConversionError("could not follow sizes to the clip-wide pooling layer")

    def size(n: int) -> int:
        sizes = []
        for step in steps:
            if step is None:
                sizes.append(n)
                continue
            i, spec = step
            if spec is None:
                sizes.append(sizes[i])
            else:
                total = sizes[i] + spec.pad_l + spec.pad_r - spec.span
                sizes.append(total // spec.s + 1 if total >= 0 else 0)
        return sizes[source]
    return size


def _largest_input(gm, pool, dim, want) -> int:
    size = _size_function(gm, pool, dim)
    best = None
    for n in range(1, 4096):
        at = size(n)
        if at == want:
            best = n
        elif at > want:
            break
    if best is None:
        raise ConversionError("no input size gives the clip-wide pooling layer its kernel size")
    return best


def implied_input(gm: fx.GraphModule, time_dim: int = 2) -> torch.Tensor:
    """A random clip (1, C, T, ...) of the size the model implies, or ConversionError."""
    modules = dict(gm.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    first_conv = next((modules[n.target] for n in calls if isinstance(modules[n.target], _CONVS)), None)
    pools = [n for n in calls if isinstance(modules[n.target], _POOLS)]
    fix = "pass example_input=torch.randn(1, C, T, ...) with the clip length the model was trained on"
    if first_conv is None or time_dim != 2:
        raise ConversionError("cannot tell the model's input size", fix=fix)
    nd = first_conv.weight.dim() - 2
    clip_pools = []
    for node in pools:
        spec = sliding_spec(node, gm, time_dim)[0]
        if spec.k > 1 and spec.pad_l == 0 and spec.pad_r == 0:
            clip_pools.append((node, spec))
    if not clip_pools:
        raise ConversionError("the clip length is not implied by the model (no pooling layer spans the clip)",
                              fix=fix)
    pool, spec = clip_pools[-1]
    shape = [1, first_conv.in_channels]
    for i in range(nd):
        dim = 2 + i
        k = spec.kernel[i]
        shape.append(_largest_input(gm, pool, dim, k) if k > 1 or dim == time_dim else 32)
    param = next(gm.parameters())
    return torch.randn(shape, dtype=param.dtype, device=param.device)
