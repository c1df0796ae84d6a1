"""Whether a module is a torch layer as torch defines it, so that cofx may read its meaning off its attributes.

A subclass of `nn.Conv3d` or `nn.MaxPool3d` that overrides `forward` (a "same"
padding computed from the input, a weight standardised at call time) and that
torch.fx could not trace into is kept whole: its attributes no longer say what
it computes, so it is treated as any module cofx does not know (run as it is,
checked frame by frame), never as the layer its class derives from.

Example::

    >>> class SamePool(torch.nn.MaxPool3d):
    ...     def forward(self, x):
    ...         return super().forward(torch.nn.functional.pad(x, (1, 1, 1, 1, 1, 1)))
    >>> stock(torch.nn.MaxPool3d(3), torch.nn.MaxPool3d), stock(SamePool(3), torch.nn.MaxPool3d)
    (True, False)
"""
from __future__ import annotations

from torch import nn


def stock(module: nn.Module, classes) -> bool:
    """`isinstance(module, classes)`, with the forward torch defines for it (none overridden outside torch)."""
    return isinstance(module, classes) and getattr(type(module).forward, "__module__", "").startswith("torch.")
