"""Per-frame outputs of causal attention over the clip: a window that answers from the first frame on.

A window over the clip of N frames (`cofx.passes.continualize`) answers once N
frames have come. A model whose per-frame outputs come from causal attention
answers for frame t of a clip from frames 0 … t alone, at positions 0 … t: so
until N frames have come, the step runs the window's part of the model on the
frames so far put first, where the clip has them (the rest of the window is
padding the causal attention never reads), and reads frame t; from then on it
runs it on the last N frames and reads the newest. `forward_steps(clip)` then
equals `forward(clip)` frame for frame.

`ClipStart` puts each early window's frames first (a causal sliding window has
them last, after its start padding); `NewestFrames` reads each window's newest
frame. Both count the windows they have seen (their state), and from the N-th
window on they change nothing but a slice.

Example::

    >>> ctx = cofx.kernels.StreamContext(); ctx.batch = 1
    >>> start = ClipStart(ctx, frames=3, t=1, b=0)
    >>> padded = torch.tensor([[[0., 0., 1.]], [[0., 1., 2.]], [[1., 2., 3.]]])   # windows 0, 1, 2 of frames 1, 2, 3
    >>> start(padded.reshape(3, 1, 3).transpose(1, 2)).squeeze(-1)
    tensor([[1., 0., 0.],
            [1., 2., 0.],
            [1., 2., 3.]])
"""
from __future__ import annotations

from typing import Optional

import torch

from .kernels import Stateful, StreamContext, _describe, _is_int, state_error


class _WindowCounter(Stateful):
    """Counts the windows it has seen (the rows of its input, `ctx.batch` per window)."""

    state_names = ("seen",)

    def __init__(self, ctx: StreamContext, frames: int, t: int, b: int):
        super().__init__(ctx)
        self.frames, self.t, self.b = frames, t, b
        self.seen = None

    def extra_repr(self) -> str:
        return f"frames={self.frames}"

    def state_signature(self, state: dict) -> Optional[tuple]:
        return None if state["seen"] is None else (state["seen"],)

    def steady_key(self) -> Optional[tuple]:
        """Windows seen count until the window is full (N windows)."""
        return None if self.seen is None else (min(self.seen, self.frames),)

    def check_counters(self, name: str, state: dict) -> None:
        seen = state["seen"]
        if seen is not None and (not _is_int(seen) or seen < 0):
            raise state_error(name, self, "seen", "None or a count of windows (an int >= 0)", _describe(seen))

    def full(self) -> bool:
        """Whether every window from now on is full (N windows seen but one)."""
        return self.seen is not None and self.seen >= self.frames - 1

    def _windows(self, x: torch.Tensor) -> tuple:
        """(index of the first window of `x`, number of windows), counted."""
        first = self.seen or 0
        n = x.shape[self.b] // max(self.ctx.batch, 1)
        self.seen = first + n
        return first, n

    def _each(self, x: torch.Tensor, n: int, fn) -> torch.Tensor:
        """`fn(k, rows)` of the rows of each window k, put back together along the batch."""
        batch = self.ctx.batch
        return torch.cat([fn(k, x.narrow(self.b, k * batch, batch)) for k in range(n)], self.b)


class ClipStart(_WindowCounter):
    """Windows of a causal sliding window (start padding first), each early one with its frames put first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, n = self._windows(x)
        if first >= self.frames - 1 or n == 0:   # full windows: as they are
            return x
        return self._each(x, n, lambda k, rows: rows.roll(-max(0, self.frames - 1 - first - k), self.t))


class NewestFrames(_WindowCounter):
    """Each window's newest frame along `t` (kept as an axis of size 1): frame k of the k-th early window. Given
    windows of that frame alone (full windows narrowed to it, `cofx.passes.read_rows.newest_rows`), it counts them
    and passes them on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, n = self._windows(x)
        if x.shape[self.t] == 1:
            return x
        if first >= self.frames - 1 or n == 0:
            return x.narrow(self.t, self.frames - 1, 1)
        return self._each(x, n, lambda k, rows: rows.narrow(self.t, min(first + k, self.frames - 1), 1))
