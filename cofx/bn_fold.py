"""Convolutions with the eval-mode BatchNorm after them folded into their weights, for steps.

A step runs every op on one frame, where a BatchNorm costs as much dispatch as the
convolution before it and far more than its arithmetic. Folded, it is gone:
``w' = w * g``, ``b' = (b - mean) * g + beta`` with ``g = gamma / sqrt(var + eps)``.
The folded tensors are cached and rebuilt when any of the source tensors
changes (in place, e.g. by an optimizer or ``load_state_dict``, or replaced) or
the epsilon does, so a step pays a version check. A training-mode forward
updates the running statistics without counting a version of them; it counts
``num_batches_tracked`` up, which is among the sources. Results differ from conv-then-BatchNorm by float
rounding only.
"""
from __future__ import annotations

import torch
from torch import nn

from .derived import Derived
from .errors import StreamError
from .kernels import Kernel, forward_pre_hooks


class BatchNormFold(Kernel):
    """``forward(weight, bias) -> (weight', bias')`` of a convolution followed by `bn` (read at call time)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.__dict__["bn"] = bn   # the model's own module, not a child of this one
        self.__dict__["_cached"] = Derived(self._fold)

    def extra_repr(self) -> str:
        return f"{type(self.bn).__name__}({self.bn.num_features})"

    def forward(self, weight: torch.Tensor, bias):
        bn = self.bn
        if bn.training:
            raise StreamError("a BatchNorm is in training mode: it would normalise each chunk by its own "
                              "statistics; call co.eval() before stepping")
        tensors = (weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return self._fold(*tensors, bn.eps)   # differentiable, never cached
        return self._cached((*tensors, bn.eps, bn.num_batches_tracked))

    def _fold(self, weight, bias, gamma, beta, mean, var, eps, batches=None):
        scale = torch.rsqrt(var + eps)
        if gamma is not None:
            scale = scale * gamma
        shift = -mean * scale if bias is None else (bias - mean) * scale
        if beta is not None:
            shift = shift + beta
        return weight * scale.reshape(-1, *[1] * (weight.dim() - 1)), shift


class FoldedConv(Kernel):
    """A convolution module run with a `BatchNormFold` applied to its weights (same padding, stride, groups)."""

    def __init__(self, conv: nn.modules.conv._ConvNd, fold: BatchNormFold):
        super().__init__()
        self.__dict__["conv"] = conv
        self.fold = fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        x = forward_pre_hooks(conv, x)   # before the weights are read: weight_norm computes the weight there
        return conv._conv_forward(x, *self.fold.forward(conv.weight, conv.bias))
