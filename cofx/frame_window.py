"""The frames a sliding kernel keeps between steps, in the storage form the step at hand is fastest with.

A `Sliding` kernel keeps the last `keep` frames of its padded stream (the
window but its newest frame). Three forms hold them, each for one kind of step:

- **ordered**: the frames in order (eager chunks, flushes, the fixed-shape step,
  ``get_state``);
- **ring**: `span` slots, the next frame overwriting slot `oldest` (an eager
  single-frame convolution step runs with its taps rolled to match; a compiled
  "rolled ring" does the same in place);
- **double ring**: 2 * span slots, frame n written at slots p and p + span
  (p = n mod span), so the window is always the dense block p + 1 … p + span and a
  compiled step reads it in place (`double_views`).

A step that needs a form converts to it explicitly (`to_ordered`, `ring_push`,
`rolled_ring`, `double_views`); reading the frames in order (`ordered`) leaves the
form as it is.

>>> import torch
>>> w = FrameWindow(t=1, span=3, keep=2, fill=0.0)
>>> w.set_ordered(torch.tensor([[1., 2.]]))
>>> ring, _ = w.ring_push(torch.tensor([[3.]]))      # enters the ring: slots hold 1, 2, 3
>>> ring, oldest = w.ring_push(torch.tensor([[4.]]))  # overwrites the oldest slot
>>> ring.tolist(), oldest, w.ordered().tolist(), w.form
([[4.0, 2.0, 3.0]], 1, [[3.0, 4.0]], 'ring')
"""
from __future__ import annotations

from typing import Optional

import torch


class FrameWindow:
    """The last `keep` frames of a padded stream at dim `t` (see the module docstring); `fill` is the padding
    value new slots start with, `layout` the memory format the frames are kept in (None: as they come)."""

    def __init__(self, t: int, span: int, keep: int, fill: float, layout: Optional[torch.memory_format] = None):
        self.t, self.span, self.keep, self.fill, self.layout = t, span, keep, fill, layout
        self.clear()

    def clear(self) -> None:
        self.frames: Optional[torch.Tensor] = None   # ordered form
        self.ring: Optional[torch.Tensor] = None     # ring form, and the slot the next frame overwrites
        self.oldest = 0
        self.double: Optional[torch.Tensor] = None   # double ring, the count of frames written to it, the views
        self.pos = 0
        self.views: Optional[list] = None

    @property
    def form(self) -> Optional[str]:
        """"ordered", "ring", "double" or None (nothing held: a clean kernel)."""
        if self.double is not None:
            return "double"
        if self.ring is not None:
            return "ring"
        return None if self.frames is None else "ordered"

    def tensors(self) -> list:
        """The tensors holding the frames now (their memory, for state sizes and identity checks)."""
        return [v for v in (self.ring, self.double, self.frames) if v is not None]

    def padding(self, like: torch.Tensor, n: int, value: Optional[torch.Tensor] = None,
                layout: Optional[torch.memory_format] = None) -> torch.Tensor:
        """`n` frames shaped like `like` (along `t`): `fill`, or `value` (one frame) repeated, in `layout`."""
        shape = list(like.shape)
        shape[self.t] = n
        layout = layout or self.layout
        if value is None:
            if layout is not None:
                return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout).fill_(self.fill)
            return like.new_full(shape, self.fill)
        return value.expand(shape).clone() if n else like.new_empty(shape)

    # -- reading -----------------------------------------------------------------------------------------
    def ordered(self) -> Optional[torch.Tensor]:
        """The frames in order, the form unchanged: the ordered frames themselves, or a copy out of a ring."""
        t, span = self.t, self.span
        if self.double is not None:
            return self.double.narrow(t, self.pos % span + 1, self.keep).clone()
        if self.ring is not None:
            return self._unrolled().narrow(t, 1, self.keep)
        return self.frames

    def _unrolled(self) -> torch.Tensor:
        """The ring's `span` slots in order, oldest first (a new tensor unless already in order)."""
        t, span, ring, oldest = self.t, self.span, self.ring, self.oldest % self.span
        return ring if oldest == 0 else torch.cat([ring.narrow(t, oldest, span - oldest), ring.narrow(t, 0, oldest)], t)

    # -- converting --------------------------------------------------------------------------------------
    def set_ordered(self, frames: Optional[torch.Tensor]) -> None:
        """Hold `frames` (in order; None: nothing) and leave any ring."""
        self.clear()
        self.frames = frames

    def to_ordered(self) -> Optional[torch.Tensor]:
        """Convert to the ordered form (leaving a ring, whose memory then takes no more frames) and return it."""
        if self.double is not None:
            frames = self.double.narrow(self.t, self.pos % self.span + 1, self.keep)
        elif self.ring is not None:
            frames = self._unrolled().narrow(self.t, 1, self.keep)
        else:
            return self.frames
        self.set_ordered(frames)
        return frames

    def ring_push(self, x: torch.Tensor) -> tuple:
        """Add the single frame `x` in the ring form, entering it from the ordered frames (one concatenation,
        in `layout`); returns (ring, oldest): slot i of the ring holds tap (i - oldest) mod span."""
        t = self.t
        if self.ring is None:
            ring = torch.cat([self.to_ordered(), x], t)
            if self.layout is not None:   # (a concatenation with an empty chunk loses the layout)
                ring = ring.contiguous(memory_format=self.layout)
            self.clear()
            self.ring = ring
            return ring, 0
        oldest = self.oldest % self.span
        self.ring.select(t, oldest).copy_(x.select(t, 0))
        self.oldest = (oldest + 1) % self.span
        return self.ring, self.oldest

    def rolled_ring(self) -> tuple:
        """(ring, slot) for a compiled step that writes the next frame into slot `slot` in place (entering the
        ring from the ordered frames: they follow that slot)."""
        if self.ring is None:
            frames = self.to_ordered()
            ring = self.padding(frames, self.span)
            ring.narrow(self.t, 1, self.keep).copy_(frames)
            self.clear()
            self.ring = ring
        self.oldest %= self.span
        return self.ring, self.oldest

    def double_views(self, layout: Optional[torch.memory_format]) -> tuple:
        """(window, mirror) where a compiled single-frame step writes its frame and reads the window: entering
        the double ring (in `layout`) from the ordered frames, which go where the last window put them."""
        if self.double is None:
            frames, t, span = self.to_ordered(), self.t, self.span
            double = self.padding(frames, 2 * span, layout=layout)
            double.narrow(t, 1, self.keep).copy_(frames)
            self.clear()
            self.double = double
            self.views = [(double.narrow(t, p + 1, span), double.narrow(t, p, 1)) for p in range(span)]
        return self.views[self.pos % self.span]

    # -- writing (what a compiled program records) -------------------------------------------------------
    def write_double(self, views: tuple, x: torch.Tensor) -> torch.Tensor:
        """Write the single frame `x` through (window, mirror) views of the double ring (`double_views`, or a
        recorded program's inputs standing for them) and return the window it completes."""
        window, mirror = views
        window.narrow(self.t, self.keep, 1).copy_(x)
        mirror.copy_(x)
        self.pos += 1
        return window

    def write_rolled(self, ring: torch.Tensor, slot: torch.Tensor, x: torch.Tensor) -> None:
        """Write the single frame `x` into slot `slot` (a one-element index tensor) of the ring (`rolled_ring`,
        or a recorded program's input standing for it)."""
        ring.index_copy_(self.t, slot, x)
        self.oldest += 1

    def detach(self) -> None:
        """Cut the frames from the autograd graph of the call that made them, ordered: a ring written in place
        would change what that call's graph saved for its backward pass."""
        if self.form is not None:
            self.frames = self.to_ordered().detach()
