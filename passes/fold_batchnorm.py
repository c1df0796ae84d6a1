"""Mark the BatchNorms a step can fold into the convolution before them.

A BatchNorm folds when it normalises with running statistics, reads a
convolution module's output and nothing else reads that output. The continual
graph then runs the convolution with folded weights (`cofx.bn_fold`) and drops
the BatchNorm; the clip graph (``co.forward``) is untouched.

Writes ``conv.meta["cofx_bn"]`` (the BatchNorm's module path) and
``bn.meta["cofx_folded_into"]`` (the convolution node).

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.BatchNorm1d(4)).eval()
    >>> gm, clip = cofx.tracer.trace(model), torch.randn(1, 2, 8)
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(clip, time_dim=2))
    >>> cofx.passes.label_layouts(gm); cofx.passes.mark_length_values(gm); cofx.passes.classify_nodes(gm)
    >>> cofx.passes.check_framewise(gm, clip); cofx.passes.annotate_timing(gm)
    >>> mark_batchnorm_folds(gm)
    >>> [(n.name, n.meta["cofx_bn"]) for n in gm.graph.nodes if "cofx_bn" in n.meta]
    [('_0', '1')]
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from cofx.stock_modules import stock


def mark_batchnorm_folds(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = gm.get_submodule(node.target)
        conv = node.args[0]
        if not _folds(bn) or not isinstance(conv, fx.Node) or conv.op != "call_module" or len(conv.users) != 1:
            continue
        mod = gm.get_submodule(conv.target)
        if not stock(mod, nn.modules.conv._ConvNd) or mod.transposed or mod.out_channels != bn.num_features:
            continue
        if mod._forward_hooks or bn._forward_hooks or bn._forward_pre_hooks:   # each runs where its module runs
            continue
        if conv.meta.get("cofx_role") not in ("stream", "folded") or node.meta.get("cofx_role") != conv.meta["cofx_role"]:
            continue
        conv.meta["cofx_bn"] = node.target
        node.meta["cofx_folded_into"] = conv


def _folds(bn) -> bool:
    return stock(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and \
        bn.running_mean is not None and bn.running_var is not None
