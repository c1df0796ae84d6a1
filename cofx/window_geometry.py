"""When a sliding window over a stream completes, what a flush appends, and what an average counts.

One definition of these rules for every path that steps a `Sliding` kernel: its
eager chunks and ring steps, the steps a compiled program records, the
fixed-shape step of ONNX and of streams out of phase, and the checks of a state
given to ``set_state``. Counters are ints where the whole batch is in phase and
int64 tensors of one value per row where it is not; the arithmetic serves both.

>>> g = WindowGeometry(span=3, stride=2, pad_l=1, pad_r=1)
>>> [g.completes(m, 0) for m in (2, 3)], g.last_window(7), g.next_window(7)
([False, True], 2, 3)
>>> import torch
>>> g.completes(torch.tensor([2, 3, 5]), torch.tensor([0, 0, 1]))
tensor([False,  True,  True])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def _at_least_0(v):
    return v.clamp(min=0) if isinstance(v, torch.Tensor) else max(v, 0)


@dataclass(frozen=True)
class WindowGeometry:
    """Output window j reads padded frames ``j*stride ... j*stride + span - 1``; the padded stream starts with
    `pad_l` frames of start padding, and a flush ends it with `pad_r` (more in ceil mode). `avg_count` =
    (kernel, count_include_pad) for averages, which PyTorch divides by the frames it counts. `replicate_end`:
    the end padding repeats the last frame, which the stream then keeps."""

    span: int
    stride: int
    pad_l: int
    pad_r: int
    ceil_mode: bool = False
    avg_count: Optional[tuple] = None
    replicate_end: bool = False

    @property
    def keep(self) -> int:
        """Padded frames a stream keeps between steps: the window but its newest frame, or the start padding
        (or the last frame, that end padding repeats)."""
        return max(self.span - 1, self.pad_l, 1 if self.replicate_end else 0)

    def completes(self, m, next_j):
        """Whether window `next_j` is complete once `m` padded frames have come."""
        return m >= next_j * self.stride + self.span

    def last_window(self, m: int) -> int:
        """The newest window complete once `m` padded frames have come (negative while none is)."""
        return (m - self.span) // self.stride

    def next_window(self, m: int) -> int:
        """The first window not complete once `m` padded frames have come: a stream's `next_j` counter."""
        return max(0, self.last_window(m) + 1)

    def first_frame_windows(self) -> int:
        """Windows the first frame completes when it also fills the start padding (replicate padding)."""
        return max(0, self.last_window(self.pad_l + 1) + 1)

    def end_frames(self, real_end: int) -> int:
        """Frames of end padding a flush appends after `real_end` padded frames: the right padding, plus the
        ceil-mode overhang (a last window that starts before the end of the real frames)."""
        total = real_end + self.pad_r
        if not self.ceil_mode:   # (in ceil mode a clip shorter than the window still gives it: torch's rule)
            return self.pad_r
        n_floor = (total - self.span) // self.stride + 1
        n_ceil = -(-(total - self.span) // self.stride) + 1
        if (n_ceil - 1) * self.stride >= real_end:
            n_ceil -= 1
        return self.pad_r + max(0, (n_ceil - 1) * self.stride + self.span - total) * (n_ceil > n_floor)

    @property
    def uncounted_start(self) -> bool:
        """Whether averages near the start of a stream divide by fewer frames than the kernel's (the start
        padding is not counted)."""
        return self.avg_count is not None and not self.avg_count[1] and self.pad_l > 0

    def first_full_window(self) -> int:
        """The first window from which none counts fewer frames than its kernel before a stream ends (at least
        1: the first window completes after a start of its own)."""
        if self.avg_count is None or self.avg_count[1]:
            return 1
        return max(1, -(-self.pad_l // self.stride))

    def frames_counted(self, j, real_end: Optional[int] = None):
        """The frames PyTorch divides the average of window `j` (an int, or a tensor of them) by: its real
        frames (and, with count_include_pad, the padding PyTorch adds), never the end padding of a stream that
        has not ended (`real_end` None); at least 1."""
        k, include_pad = self.avg_count
        start = j * self.stride
        count = k - _at_least_0((0 if include_pad else self.pad_l) - start)
        if real_end is not None:
            count = count - _at_least_0(start + k - real_end - (self.pad_r if include_pad else 0))
        return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)
