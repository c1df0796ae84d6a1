"""Streams of one batch that start at different times: ``co.clean_state(streams=...)``.

The stream kernels keep one phase for the whole batch (every row has seen the
same number of frames), which is what makes chunks fast. Restarting some rows
of a running batch breaks that, so the continual module then steps the batch
with `cofx.masked_step.MaskedStep` (the same step `cofx.export_onnx` writes to
ONNX): each row has its own counters, and a row's output exists only where its
own stream has one.

While streams are out of phase:

- ``co.forward_step(frame)`` returns the output for every row, each output NaN
  in the rows where it has no frame this step (their stream is starting up, or
  the temporal stride skips this frame), or None when no row has one;
  ``co.ready`` (B,) bool says which rows hold every output (after every step, in
  phase too; not set when the model itself has something called ``ready``);
- ``co.forward_steps`` takes chunks of one frame only, without ``pad_end``;
- ``co.clean_state()`` (all streams) returns to the fast in-phase kernels;
- ``get_state``/``set_state``/``update_state=False`` work as usual.

The state lives in a kernel of its own (`OutOfPhase`, child ``cofx_streams`` of
the module), so the module's state functions handle it like any other kernel.
"""
from __future__ import annotations

import functools

import numbers
from typing import Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .containers import containers_copied
from .errors import StreamError
from .kernels import STATE_FIX, Stateful, state_error
from .masked_step import MaskedStep, NotSteppable, _SlidingPlan, nan_where_not

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

    def check_state(self, name: str, state, batch: Optional[int], dtype, device, ref) -> None:
        """Raise a `StreamError` unless `state` is a state of this model's streams out of phase, for `batch`
        streams in `dtype` on `device` (None: those of the state): the tensors `MaskedStep.initial_state` makes,
        per-row counters that agree with each other, and every row at a point of its own stream (`ref`: the
        module's `_StateReference`)."""
        if not isinstance(state, dict) or set(state) != {"state"}:
            raise state_error(name, None, None, "a dict with the entry 'state'", repr(state)[:80])
        value = state["state"]
        if value is None:
            return
        if batch is None:
            raise state_error(name, None, "state", "None while '_stream_batch' is None", "a state")
        if not isinstance(value, (list, tuple)) or not value or not isinstance(value[0], torch.Tensor):
            raise state_error(name, None, "state", "a list: an empty tensor of the stream's dtype, then the "
                              "tensors of the out-of-phase step", repr(value)[:80])
        probe = value[0]
        dtype = probe.dtype if dtype is None else dtype
        device = probe.device if device is None else device
        if not probe.is_floating_point() or probe.dtype != dtype or probe.device != device or probe.numel():
            raise state_error(name, None, "state[0]", f"an empty {dtype} tensor on {device}",
                              f"a {probe.dtype} tensor of shape {tuple(probe.shape)} on {probe.device}",
                              fix=f"move the state's tensors to {dtype} on {device} (or the model to the state's "
                                  f"dtype and device) before set_state; or call co.clean_state()")
        try:
            step = self.masked(dtype, device)
        except NotSteppable as e:
            raise state_error(name, None, "state", "None (this model cannot run streams out of phase: "
                              f"{e})", "a state") from None
        init, names = step.init, step.state_names
        if len(value) != 1 + len(init):
            raise state_error(name, None, "state", f"a list of {1 + len(init)} tensors", f"{len(value)}")
        for i, (v, ref_t, entry) in enumerate(zip(value[1:], init, names), 1):
            label = f"state[{i}] ({entry})"
            want = (batch, *ref_t.shape[1:])
            if not isinstance(v, torch.Tensor):
                raise state_error(name, None, label, "a tensor", type(v).__name__)
            if v.dtype != ref_t.dtype or v.device != ref_t.device:
                raise state_error(name, None, label, f"{ref_t.dtype} on {ref_t.device}", f"{v.dtype} on {v.device}",
                                  fix=f"move the state's tensors to {dtype} on {device} (or the model to the "
                                      "state's dtype and device) before set_state; or call co.clean_state()")
            if tuple(v.shape) != want:
                raise state_error(name, None, label, f"shape {want} for a batch of {batch}", f"{tuple(v.shape)}")
        rows = [{} for _ in range(batch)]
        primed = dict(zip((n for n, _ in ref.kernels), ref.table[0]))   # the counters a fresh row starts from
        for node in step.order:
            plan = step.plans[node]
            lo, hi = step._slices[node]
            counters = value[hi]   # the last tensor of each kernel: pos (Sliding) or count (Align)
            label = f"state[{hi}] ({names[hi - 1]})"
            if isinstance(plan, _SlidingPlan):
                k = plan.k
                for r, (m, nj) in enumerate(counters.tolist()):
                    if plan.replicate_start and m == -1:
                        ok, want = nj == 0, "[-1, 0] (not started)"
                        rows[r][plan.name] = None
                    else:
                        want_nj = k.geometry.next_window(m)
                        ok = m >= k.pad_l and nj == want_nj
                        want = (f"[m, next_j] with m >= {k.pad_l} and next_j = {want_nj}" if m >= k.pad_l else
                                f"[m, next_j] with m (padded frames consumed) >= {k.pad_l}")
                        rows[r][plan.name] = (m, nj)
                    if not ok:
                        raise state_error(name, None, label, f"{want} for stream {r}", f"[{m}, {nj}]")
            elif plan.fields[-1] == "seen":   # a count per row: frames (a recurrent layer) or windows
                for r, (seen,) in enumerate(counters.tolist()):
                    if seen < 0:
                        raise state_error(name, None, label, f"a count >= 0 for stream {r}", f"[{seen}]")
                    rows[r][plan.name] = (seen,) if seen else primed.get(plan.name)
            else:
                for r, counts in enumerate(counters.tolist()):
                    if any(c < 0 or c > s for c, s in zip(counts, plan.slots)) or min(counts) != 0:
                        raise state_error(name, None, label, f"frames held per input between 0 and {plan.slots}, "
                                          f"none held by at least one input, for stream {r}", f"{counts}")
                    rows[r][plan.name] = tuple(counts)
        for r, row in enumerate(rows):
            ref.check_counters(tuple(row.get(n) for n, _ in ref.kernels), None, what=f"the state of stream {r}")

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
        out, own, new = step.step(x, None, state, per_output=True)
        if update_state:
            self.state = [probe] + [s.detach() for s in new]
        every = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        own = [every if r is None else r for r in own]
        ready = functools.reduce(torch.logical_and, own, every)
        set_ready(co, ready)
        if not any(bool(r.any()) for r in own):
            return None
        leaves, spec = tree_flatten(containers_copied(out))   # each output NaN where its own frame is not
        return tree_unflatten([nan_where_not(v, r, b) for v, r, b in zip(leaves, own, step.out_batch_axes)], spec)


def set_ready(co, ready: Optional[torch.Tensor]) -> None:
    """``co.ready = ready`` (which rows the last step's output holds; None before a stream's first step), unless
    the model has its own `ready`."""
    taken = "ready" in co._modules or "ready" in co._parameters or "ready" in co._buffers
    if not taken and isinstance(co.__dict__.get("ready"), (torch.Tensor, type(None))):
        co.__dict__["ready"] = ready


_STREAMS_FIX = ("pass row indices (ints, e.g. streams=[0, 2], or an integer tensor) or a bool mask with one "
                "entry per stream of the running batch (streams=torch.tensor([True, False, ...])); "
                "co.clean_state() restarts every stream")


def _indices(streams) -> torch.Tensor:
    """`streams` as a flat integer or bool tensor; a `StreamError` for anything else (floats, strings, nested)."""
    if isinstance(streams, bool):
        raise StreamError(f"clean_state(streams={streams!r}): a single bool is neither a row nor a mask\n"
                          f"  fix: {_STREAMS_FIX}")
    if isinstance(streams, int):
        streams = [streams]
    if isinstance(streams, (list, tuple)):
        kinds = {type(s) for s in streams}
        bad = next((s for s in streams if not (isinstance(s, numbers.Integral) or
                                               (isinstance(s, torch.Tensor) and s.dim() == 0 and
                                                not s.is_floating_point() and not s.is_complex()))), None)
        if bad is not None:
            raise StreamError(f"clean_state(streams={streams!r}): {bad!r} ({type(bad).__name__}) is not a row "
                              f"index\n  fix: {_STREAMS_FIX}")
        if bool in kinds and kinds - {bool}:
            raise StreamError(f"clean_state(streams={streams!r}) mixes bools and row indices\n  fix: {_STREAMS_FIX}")
        if not streams:
            return torch.zeros(0, dtype=torch.long)
    try:
        t = torch.as_tensor(streams)
    except (TypeError, ValueError, RuntimeError):
        raise StreamError(f"clean_state(streams={streams!r}): not row indices nor a mask\n  fix: {_STREAMS_FIX}") \
            from None
    if t.is_floating_point() or t.is_complex():
        raise StreamError(f"clean_state(streams={streams!r}): rows are ints, got {t.dtype} values\n"
                          f"  fix: {_STREAMS_FIX}")
    if t.dim() > 1:
        raise StreamError(f"clean_state(streams=...) takes a flat list of rows or a (B,) mask, got shape "
                          f"{tuple(t.shape)}\n  fix: {_STREAMS_FIX}")
    return t.reshape(-1)


def _rows(streams, batch: int, device) -> torch.Tensor:
    """`streams` (row indices, or a bool mask of the batch) as a (B,) bool mask."""
    t = _indices(streams)
    if t.dtype == torch.bool:
        if t.shape != (batch,):
            raise StreamError(f"streams= as a mask must have one entry per stream ({batch}), got shape "
                              f"{tuple(t.shape)}\n  fix: a mask of the running batch has {batch} bools, one per "
                              f"stream (True: restart it); or pass row indices 0 ... {batch - 1}")
        return t.to(device)
    t = t.long()
    if t.numel() and (int(t.min()) < -batch or int(t.max()) >= batch):
        shown = t.tolist() if not isinstance(streams, (list, tuple, int)) else streams
        raise StreamError(f"streams= {shown} names rows outside the batch of {batch} streams\n  fix: rows are "
                          f"0 ... {batch - 1} (or -{batch} ... -1 from the end) while this batch of {batch} runs")
    mask = torch.zeros(batch, dtype=torch.bool)
    mask[t.cpu()] = True
    return mask.to(device)


def restart_streams(co, streams) -> bool:
    """Restart the rows `streams` of the running batch; False when the whole batch restarts instead."""
    batch = co._position.batch
    if batch is None:          # nothing running: every stream starts with its first frame anyway
        _indices(streams)      # (but a malformed argument is refused all the same)
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
    try:
        step = child.masked(probe.dtype, probe.device)   # builds on first use (runs co; restores its state)
    except NotSteppable as e:
        raise NotSteppable(f"cannot restart some streams of the batch apart from the others: {e}; restart them "
                           "all with co.clean_state(), or run each stream in a batch of its own") from None
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
    ready = co.__dict__.get("ready")
    if isinstance(ready, torch.Tensor) and ready.shape == rows.shape:   # the restarted rows hold nothing yet
        set_ready(co, ready.masked_fill(rows.to(ready.device), False))
    return True


def _stream_tensor(co, child) -> torch.Tensor:
    """An empty tensor with the dtype and device of the running stream."""
    if child is not None and child.state is not None:
        return child.state[0]
    s = next((s for k in co._kernels() for s in k.state_tensors() if s.is_floating_point()), None)
    like = co._position.like
    if s is None and like is not None and like.is_floating_point():   # a model with no state of its own
        s = like
    if s is None:
        s = next((p for p in co.parameters() if p.is_floating_point()), torch.empty(0))
    return s.new_empty(0)
