"""How each kind of stream op maps input frames to output frames.

One small record per stateful node, shared by the analysis (receptive field,
delay, stride) and the rewrite (kernel construction): output frame j reads
input frames ``j*stride - pad_l + dep_lo ... j*stride - pad_l + dep_hi`` and
is emitted once input frame ``j*stride - pad_l + span - 1`` has arrived.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cofx.sliding_ops import PadSpec


@dataclass(frozen=True)
class Geometry:
    span: int
    stride: int
    pad_l: int
    pad_r: int
    dep_lo: int
    dep_hi: int


@dataclass(frozen=True)
class CropSpec:
    """`x[:, :, start : T - end : step]` along time; `folded`: frames more that it drops at the end, the ones
    the op before computes from its end padding, folded into that op (`cofx.passes.fold_crops`)."""
    start: int
    end: int
    step: int
    folded: int = 0

    @property
    def geometry(self) -> Geometry:
        return Geometry(span=self.end + 1, stride=self.step, pad_l=-self.start, pad_r=0, dep_lo=0, dep_hi=0)


@dataclass(frozen=True)
class ReductionSpec:
    """A reduction over the whole clip, run as a sliding window of `window` frames.

    `mode` is mean/sum/amax/amin when the reduction splits into a per-frame part
    and a window part, "raw" when the window's frames go to the original op
    whole. `causal` windows end at the current frame (mid-network use) and
    average over the frames seen so far at the start of a stream.
    """
    mode: str
    window: int
    clip_window: int
    causal: bool = False
    partial: Optional[tuple] = None   # (target, dims or output_size) of the per-frame part

    @property
    def exact(self) -> bool:
        return self.window == self.clip_window and (not self.causal or self.window == 1)

    @property
    def geometry(self) -> Geometry:
        pad_l = self.window - 1 if self.causal else 0
        return Geometry(span=self.window, stride=1, pad_l=pad_l, pad_r=0, dep_lo=0, dep_hi=self.window - 1)


@dataclass(frozen=True)
class WindowSpec:
    """An op that needs the clip as a whole (attention across time, a per-position table, a class token
    along time): its stream inputs are kept as a sliding window of `window` frames, the clip length there, and
    from it on the model runs on each window as on a clip (one result per step).

    `what` says why, for the report; `start` is False for an op inside a window (attention after the window
    began at a table of positions, say): it runs on each window and takes no frames itself. A `growing`
    window (per-frame outputs of causal attention) answers from the first frame on: until N frames have come,
    its window holds the frames so far, in the places a clip gives them.
    """
    window: int
    what: str
    start: bool = True
    growing: bool = False

    @property
    def geometry(self) -> Optional[Geometry]:
        if not self.start:
            return None
        return Geometry(span=self.window, stride=1, pad_l=self.window - 1 if self.growing else 0, pad_r=0,
                        dep_lo=0, dep_hi=self.window - 1)


def sliding_geometry(spec) -> Geometry:
    if isinstance(spec, PadSpec):
        return Geometry(span=1, stride=1, pad_l=spec.pad_l, pad_r=spec.pad_r, dep_lo=0, dep_hi=0)
    return Geometry(span=spec.span, stride=spec.s, pad_l=spec.pad_l, pad_r=spec.pad_r,
                    dep_lo=0, dep_hi=spec.span - 1)


@dataclass(frozen=True)
class RecurrentStateSpec:
    """The state of a recurrent layer after each frame, from the end of the first clip on.

    The clip model reads the final state once per clip; the continual model
    emits the state at the end of every clip position (one per step), so its
    j-th value pairs with the j-th window of every other clip-wide value.
    """
    window: int

    @property
    def geometry(self) -> Geometry:
        return Geometry(span=self.window, stride=1, pad_l=0, pad_r=0, dep_lo=0, dep_hi=self.window - 1)
