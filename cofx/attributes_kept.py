"""The plain attributes of a model's modules, given back as they were after code that may write them.

Tracing runs forward on proxies, so ``self.A = self.A.to(x.device)`` (as MS-G3D
and 2s-AGCN write it) leaves a torch.fx Proxy in the module and every later call
of the model fails; running forward on examples changes a call counter or a
cache. `trace` and `convert` run inside `attributes_kept`, so the user's model
comes back as it was, whether conversion succeeds or is refused.

Example::

    >>> class Moves(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.A = torch.eye(2)
    ...     def forward(self, x):
    ...         self.A = self.A.to(x.device)
    ...         return x @ self.A
    >>> m = Moves()
    >>> A = m.A
    >>> with attributes_kept(m):
    ...     m.A = "anything"
    >>> m.A is A
    True
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

_MISSING = object()


@contextmanager
def attributes_kept(model: nn.Module):
    """Every module's own attributes (``vars(module)``: numbers, flags, plain tensors, anything) put back on exit,
    and attributes added meanwhile removed. Parameters and buffers live in their own slots: `convert` restores
    those by value."""
    saved = [(m, dict(vars(m))) for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes in saved:
            now = vars(module)
            for name in [name for name in now if name not in attributes]:
                del now[name]
            for name, value in attributes.items():
                if now.get(name, _MISSING) is not value:
                    now[name] = value
