"""`call_mode`: which function `co(x)` runs, as in the continual-inference library."""
from __future__ import annotations

import contextlib
import threading

MODES = ("forward", "forward_step", "forward_steps")
_local = threading.local()


def active_mode():
    """The mode set by an enclosing `cofx.call_mode(...)` block, or None."""
    return getattr(_local, "mode", None)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"call_mode must be one of {MODES}, got {mode!r}")
    return mode


@contextlib.contextmanager
def call_mode(mode: str):
    """Within the block, calling any continual model runs `mode` ("forward", "forward_step", "forward_steps").

    >>> co = cofx.convert(torch.nn.Conv1d(2, 4, 3, padding=1).eval(), torch.randn(1, 2, 8))
    >>> with cofx.call_mode("forward_step"):
    ...     ys = [co(frame) for frame in torch.randn(3, 1, 2)]   # each call is one step
    >>> [None if y is None else tuple(y.shape) for y in ys]
    [None, (1, 4), (1, 4)]
    """
    previous = active_mode()
    _local.mode = check_mode(mode)
    try:
        yield
    finally:
        _local.mode = previous
