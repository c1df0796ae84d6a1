"""Where a continual module's stream is, besides the state its kernels hold.

One record, so that a snapshot, a restore and a scratch stream each copy it
whole instead of field by field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class StreamPosition:
    """`batch`: the streams in the batch (None before the first call of a stream); `frames`: the frames since
    the stream started (None when unknown: streams restarted apart); `compiled`: whether the last call ran a
    compiled program (``co.last_step_compiled``); `like`: an empty tensor of the stream's dtype and device
    (None before the first eager call), for what cofx builds for a running stream (a restart of some rows);
    `inference`: whether the last call ran under ``torch.inference_mode()`` (its state tensors are then
    inference tensors, which a step outside that mode cannot update in place)."""
    batch: Optional[int] = None
    frames: Optional[int] = 0
    compiled: bool = False
    like: Optional[torch.Tensor] = None
    inference: bool = False

    def copy(self) -> "StreamPosition":
        return StreamPosition(self.batch, self.frames, self.compiled, self.like, self.inference)
