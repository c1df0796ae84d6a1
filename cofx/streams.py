"""Streams of one batch that start at different times: ``co.clean_state(streams=...)``.

The stream kernels keep one phase for the whole batch (every row has seen the
same number of frames), which is what makes chunks fast. Restarting some rows
of a running batch breaks that, so the continual module then steps the batch
with `cofx.masked_step.MaskedStep` (the same step `cofx.export_onnx` writes to
ONNX): each row has its own counters, and a row's output exists only where its
own stream has one.

While streams are out of phase:

- ``co.forward_step(frame)`` returns the output for every row, with NaN in the
  rows that have no output this step (their stream is starting up, or the
  temporal stride skips this frame), or None when no row has one;
  ``co.ready`` (B,) bool says which rows are real (after every step, in phase
  too; not set when the model itself has something called ``ready``);
- ``co.forward_steps`` takes chunks of one frame only, without ``pad_end``;
- ``co.clean_state()`` (all streams) returns to the fast in-phase kernels;
- ``get_state``/``set_state``/``update_state=False`` work as usual.

The state lives in a kernel of its own (`OutOfPhase`, child ``cofx_streams`` of
the module), so the module's state functions handle it like any other kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import StreamError
from .kernels import Stateful
from .masked_step import MaskedStep

CHILD = "cofx_streams"


class OutOfPhase(Stateful):
    """The per-row state of a batch whose streams are out of phase (None while they are in phase).

    ``state`` is a list: an empty tensor of the stream's dtype (so that the module's
    dtype and device checks see the stream's), then `MaskedStep`'s state tensors.
    """

    state_names = ("state",)

    def __init__(self, co):
        super().__init__(co._ctx)
        self.__dict__["co"] = co             # the owner, not a submodule
        self.__dict__["_steps"] = {}         # (dtype, device) -> MaskedStep
        self.state = None

    def extra_repr(self) -> str:
        return "active" if self.state is not None else "inactive (streams in phase)"

    @property
    def active(self) -> bool:
        return self.state is not None

    def masked(self, dtype, device) -> MaskedStep:
        key = (dtype, torch.device(device))
        if key not in self._steps:
            self._steps[key] = MaskedStep(self.co, dtype, device)
        return self._steps[key]

    def run(self, x: torch.Tensor, pad_end: bool, update_state: bool):
        """One step of the out-of-phase batch (`x` has a time axis of one frame)."""
        co = self.co
        t = co._info["time_dim"]
        if pad_end or x.shape[t] != 1:
            if x.shape[t] == 0 and not pad_end:
                return None
            raise StreamError("the streams of this batch are out of phase (co.clean_state(streams=...) restarted "
                              "some of them): step them one frame at a time with forward_step; chunks of several "
                              "frames and pad_end need streams in phase (co.clean_state() restarts them all)")
        probe, state = self.state[0], self.state[1:]
        step = self.masked(probe.dtype, probe.device)
        out, ready, new = step.step(x, None, state)
        if update_state:
            self.state = [probe] + [s.detach() for s in new]
        if ready is None:
            ready = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        set_ready(co, ready)
        if not bool(ready.any()):
            return None
        leaves, spec = tree_flatten(out)
        filled = []
        for v, b in zip(leaves, step.out_batch_axes):
            if isinstance(v, torch.Tensor) and b is not None and v.is_floating_point():
                shape = [1] * v.dim()
                shape[b] = -1
                v = torch.where(ready.reshape(shape), v, torch.full_like(v, float("nan")))
            filled.append(v)
        return tree_unflatten(filled, spec)


def set_ready(co, ready: torch.Tensor) -> None:
    """``co.ready = ready`` (which rows the last step's output holds), unless the model has its own `ready`."""
    taken = "ready" in co._modules or "ready" in co._parameters or "ready" in co._buffers
    if not taken and isinstance(co.__dict__.get("ready", ready), torch.Tensor):
        co.__dict__["ready"] = ready


def _rows(streams, batch: int, device) -> torch.Tensor:
    """`streams` (row indices, or a bool mask of the batch) as a (B,) bool mask."""
    if isinstance(streams, int):
        streams = [streams]
    t = torch.as_tensor(streams)
    if t.dtype == torch.bool:
        if t.shape != (batch,):
            raise StreamError(f"streams= as a mask must have one entry per stream ({batch}), got shape "
                              f"{tuple(t.shape)}")
        return t.to(device)
    t = t.reshape(-1).long()
    if t.numel() and (int(t.min()) < -batch or int(t.max()) >= batch):
        raise StreamError(f"streams= {streams} names rows outside the batch of {batch} streams")
    mask = torch.zeros(batch, dtype=torch.bool)
    mask[t] = True
    return mask.to(device)


def restart_streams(co, streams) -> bool:
    """Restart the rows `streams` of the running batch; False when the whole batch restarts instead."""
    batch = co._stream_batch
    if batch is None:          # nothing running: every stream starts with its first frame anyway
        return True
    child: Optional[OutOfPhase] = co._modules.get(CHILD)
    probe = _stream_tensor(co, child)
    rows = _rows(streams, batch, probe.device)
    if not bool(rows.any()):
        return True
    if bool(rows.all()):
        return False
    if child is None:
        child = OutOfPhase(co)
    step = child.masked(probe.dtype, probe.device)   # builds on first use (runs co; restores its state)
    if CHILD not in co._modules:
        co.add_module(CHILD, child)
    if child.state is None:    # in phase until now: the same state, per row
        state = step.from_eager(batch)
        for k in co._kernels():
            if k is not child:
                k.clean()
        probe = probe.new_empty(0)
    else:
        probe, state = child.state[0], child.state[1:]
    child.state = [probe] + step.reset_rows(state, rows)
    return True


def _stream_tensor(co, child) -> torch.Tensor:
    """An empty tensor with the dtype and device of the running stream."""
    if child is not None and child.state is not None:
        return child.state[0]
    s = next((s for k in co._kernels() for s in k.state_tensors() if s.is_floating_point()), None)
    if s is None:
        s = next((p for p in co.parameters() if p.is_floating_point()), torch.empty(0))
    return s.new_empty(0)
