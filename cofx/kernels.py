"""Stream kernels: the stateful pieces of a continual graph.

Every kernel takes a chunk of n >= 0 frames and returns the frames that became
available (possibly none: a tensor with 0 frames). Delay and temporal stride
are therefore just tensor lengths; no flags or step counters travel through
the graph. All kernels of one continual model share a `StreamContext` that
says the stream's batch size and whether the end of the stream is being
flushed.
"""
from __future__ import annotations

import operator
from itertools import chain, repeat
from typing import Callable, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from .derived import Derived
from .errors import StreamError
from .frame_window import FrameWindow
from .window_geometry import WindowGeometry


class StreamContext:
    """Per-call facts every kernel may need (set by the continual module before each call)."""

    def __init__(self, init: str = "zeros"):
        self.batch = 0
        self.flushing = False
        self.init = init


def empty_like_labels(labels: Sequence, batch: int, ref: torch.Tensor) -> torch.Tensor:
    """A tensor with 0 frames shaped after `labels` ("B" -> batch, times its rows per stream where it holds
    several; "T"/"BT" -> 0, ints stay)."""
    shape = [batch * getattr(lab, "rows", 1) if lab == "B" else 0 if lab in ("T", "BT") else lab for lab in labels]
    return ref.new_empty(shape)


def _empty_like_tree(labels, batch: int, ref: torch.Tensor, dtypes=None):
    """`empty_like_labels` of each label tuple of a pytree of them (lists and tuples; None stays None), each in
    its dtype of `dtypes` (a parallel pytree; None: the dtype of `ref`)."""
    if labels is None:
        return None
    if isinstance(labels, (list, tuple)) and any(isinstance(v, (list, tuple)) or v is None for v in labels):
        dtypes = [None] * len(labels) if dtypes is None else dtypes
        return type(labels)(_empty_like_tree(v, batch, ref, d) for v, d in zip(labels, dtypes))
    out = empty_like_labels(labels, batch, ref)
    return out if dtypes is None else out.to(dtypes)


class Kernel(nn.Module):
    """A module cofx adds to the continual graph. The step program calls its `forward` directly: no hooks
    are run on it (the model's own modules are called as modules, hooks and all)."""


class Stateful(Kernel):
    """Base of kernels with state: lists its state, clears it, saves and restores it."""

    state_names: tuple = ()

    def __init__(self, ctx: StreamContext):
        super().__init__()
        self.__dict__["ctx"] = ctx  # shared, not a submodule

    def __setattr__(self, name, value):
        # state lives in the instance dict (or a property of the kernel): plain attribute speed on every
        # step, and never in state_dict()
        if name in self.state_names:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def clean(self) -> None:
        for name in self.state_names:
            setattr(self, name, None)

    def get_state(self) -> dict:
        return {name: _map_tensors(getattr(self, name), torch.Tensor.clone) for name in self.state_names}

    def set_state(self, state: dict) -> None:
        """Restore a `get_state` dict (the continual module checks it first: `check_state`)."""
        for name in self.state_names:
            setattr(self, name, _map_tensors(state[name], torch.Tensor.clone))

    # -- checking a state before set_state takes it ------------------------------------------------------
    def state_signature(self, state: dict) -> Optional[tuple]:
        """The counters of `state` (a `get_state` dict of this kernel) that say how far into its stream it is,
        as a tuple of ints, or None for a clean kernel. Two states of one stream at the same frame have the
        same signature, whatever form (ordered, ring, double ring) their frames were kept in."""
        return None

    def steady_key(self) -> Optional[tuple]:
        """What decides the ops of this kernel's next steps, given the frames that reach it: counters that only
        grow are taken out (as far into a stream as a rule still reads them). Two points of a stream with
        equal keys in every kernel step alike from there on, so a step recorded at one serves the other
        (`compiled_step.steady_keys`). By default the counters themselves: they never repeat if they grow."""
        return self.state_signature({name: getattr(self, name) for name in self.state_names})

    def check_state(self, name: str, state, ref1: dict, ref2: dict, batch: Optional[int], dtype, device) -> None:
        """Raise a `StreamError` unless `state` is a state this kernel can hold for `batch` streams in `dtype` on
        `device`. `ref1`/`ref2`: `state_spec` of this kernel's own state after a warm-up of 1 and of 2
        streams (the expected entries, shapes and dtypes derive from them)."""
        if not isinstance(state, dict):
            raise state_error(name, self, None, f"a dict with the entries {list(self.state_names)}",
                              type(state).__name__)
        if set(state) != set(self.state_names):
            raise state_error(name, self, None, f"the entries {sorted(self.state_names)}",
                              f"{sorted(map(str, state))}")
        for entry in self.state_names:
            check_state_value(self, name, entry, state[entry], ref1[entry], ref2[entry], batch, dtype, device)
        self.check_counters(name, state)

    def check_counters(self, name: str, state: dict) -> None:
        """Raise a `StreamError` unless the counters of `state` agree with each other and with its tensors."""

    def free_axis(self, entry: str, index: Optional[int]) -> Optional[int]:
        """The axis of tensor `index` of `entry` whose size follows the stream (not fixed by the model)."""
        return None

    def entry_hint(self, entry: str) -> str:
        """What an entry holds, for messages."""
        return ""

    def detach_state(self) -> None:
        """Cut the state from the autograd graph of the call that made it (gradients flow within a call)."""
        for name in self.state_names:
            setattr(self, name, _map_tensors(getattr(self, name), torch.Tensor.detach))

    def state_tensors(self):
        for name in self.state_names:
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, (list, tuple)):
                yield from (t for t in v if isinstance(t, torch.Tensor))


STATE_FIX = ("pass a state that co.get_state() returned on this model (or on a model converted from the same "
             "architecture with the same options and frame size: other kernel sizes, strides, dilations, padding "
             "or frame sizes make a state of another form), unchanged; or call co.clean_state() to start new "
             "streams")


def state_error(name: str, kernel, entry, expected: str, got: str, fix: str = STATE_FIX) -> StreamError:
    """The `StreamError` of a state `set_state` refuses: names the kernel, the entry, what was expected and
    what was given, and the fix."""
    what = f"kernel '{name}'"
    if kernel is not None:
        extra = kernel.extra_repr()
        what += f" ({type(kernel).__name__}{': ' + extra if extra else ''})"
    if entry is not None:
        what += f", entry '{entry}'"
    return StreamError(f"set_state refused the state: {what}: expected {expected}, got {got}\n  fix: {fix}")


def state_spec(v):
    """The form of a state value, without its data: ("tensor", shape, dtype), ("seq", type, [specs]) or
    ("plain", value)."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype)
    if isinstance(v, (list, tuple)):
        return ("seq", type(v), [state_spec(x) for x in v])
    return ("plain", v)


def _batch_exponent(s1: int, s2: int) -> Optional[int]:
    """e with s2 = s1 * 2**e (a size that holds the batch e times over), or None."""
    if s1 == s2:
        return 0
    if s1 > 0 and s2 % s1 == 0 and (s2 // s1) & (s2 // s1 - 1) == 0:
        return (s2 // s1).bit_length() - 1
    return None


def expected_shape(shape1: tuple, shape2: tuple, batch: int) -> Optional[tuple]:
    """The shape of a state tensor for `batch` streams, from its shapes for 1 and 2 streams."""
    out = []
    for s1, s2 in zip(shape1, shape2):
        e = _batch_exponent(s1, s2)
        out.append(s1 * batch ** e if e is not None else s1 + (batch - 1) * (s2 - s1))
    return tuple(out)


def _batch_of(shape: tuple, shape1: tuple, shape2: tuple, free: Optional[int]) -> Optional[int]:
    """The number of streams a tensor of `shape` holds, if it fits the model's form for some batch."""
    for d, (s, s1, s2) in enumerate(zip(shape, shape1, shape2)):
        if d == free or s1 == s2:
            continue
        e = _batch_exponent(s1, s2)
        if e is None or s1 == 0 or s % s1:
            return None
        b = round((s // s1) ** (1 / e))
        for cand in (b - 1, b, b + 1):
            if cand >= 1 and all(d2 == free or x == y for d2, (x, y) in
                                 enumerate(zip(shape, expected_shape(shape1, shape2, cand)))):
                return cand
        return None
    return None


def _dims(shape: tuple, free: Optional[int]) -> str:
    return "(" + ", ".join("any" if d == free else str(s) for d, s in enumerate(shape)) + \
        ("," if len(shape) == 1 else "") + ")"


def check_state_value(kernel, name: str, entry: str, v, spec1, spec2, batch: Optional[int], dtype, device,
                      index: Optional[int] = None) -> None:
    """`v` (a state value) has the form of `spec1`/`spec2` (see `state_spec`) for `batch` streams, its floating
    tensors `dtype` and its tensors on `device` (None: not checked); None (a clean entry) always passes here
    (`check_counters` decides whether the kernel may be clean)."""
    label = entry if index is None else f"{entry}[{index}]"
    if v is None:
        return
    kind = spec1[0]
    if kind == "plain" and spec1[1] is None:
        kind = spec2[0]
        spec1 = spec2
    if kind == "plain" and spec1[1] is None:   # never set in the warm-up: must stay None
        raise state_error(name, kernel, label, "None (this kernel never holds a value there)", _describe(v))
    if kind == "tensor":
        if not isinstance(v, torch.Tensor):
            raise state_error(name, kernel, label, "a tensor", _describe(v))
        free = kernel.free_axis(entry, index)
        shape1, shape2 = spec1[1], spec2[1] if spec2[0] == "tensor" else spec1[1]
        want_dtype = (dtype if dtype is not None else v.dtype) if spec1[2].is_floating_point else spec1[2]
        if v.dtype != want_dtype:
            raise state_error(name, kernel, label, f"{want_dtype} (the model's dtype)" if spec1[2].is_floating_point
                              else f"{want_dtype}", f"{v.dtype}",
                              fix=f"convert the state's tensors to {want_dtype} (or the model to the state's dtype, "
                                  f"co.to({v.dtype})) before set_state; or call co.clean_state() to start new streams")
        if device is not None and v.device != device:
            raise state_error(name, kernel, label, f"a tensor on {device} (the model's device)", f"one on {v.device}",
                              fix=f"move the state's tensors to {device} (or the model to {v.device}) before "
                                  "set_state; or call co.clean_state() to start new streams")
        want = expected_shape(shape1, shape2, batch if batch is not None else 1)
        if v.dim() != len(want) or any(d != free and s != w for d, (s, w) in enumerate(zip(v.shape, want))):
            hint = kernel.entry_hint(entry)
            expected = f"shape {_dims(want, free)}" + (f" ({hint})" if hint else "") + \
                (f" for a batch of {batch}" if batch is not None else "")
            got = f"shape {tuple(v.shape)}"
            other = _batch_of(tuple(v.shape), shape1, shape2, free) if v.dim() == len(want) else None
            if other is not None and batch is not None and other != batch:
                raise state_error(name, kernel, label, expected, got + f", the state of {other} stream{'s' if other != 1 else ''}",
                                  fix=f"a state holds one batch: '_stream_batch' says {batch} streams; take every "
                                      "kernel's state from one co.get_state() of this model")
            raise state_error(name, kernel, label, expected, got)
        return
    if kind == "seq":
        if not isinstance(v, (list, tuple)) or len(v) != len(spec1[2]):
            raise state_error(name, kernel, label, f"a {spec1[1].__name__} of {len(spec1[2])} tensors", _describe(v))
        specs2 = spec2[2] if spec2[0] == "seq" else spec1[2]
        for i, (x, s1, s2) in enumerate(zip(v, spec1[2], specs2)):
            if x is None:
                raise state_error(name, kernel, f"{label}[{i}]", "a tensor", "None")
            check_state_value(kernel, name, entry, x, s1, s2, batch, dtype, device, i)
        return
    if isinstance(spec1[1], int) and not isinstance(spec1[1], bool):
        if not isinstance(v, int) or isinstance(v, bool):
            raise state_error(name, kernel, label, "an int (a counter)", _describe(v))
        return
    if type(v) is not type(spec1[1]):
        raise state_error(name, kernel, label, f"a {type(spec1[1]).__name__}", _describe(v))


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)} ({v.dtype})"
    if isinstance(v, (list, tuple)):
        return f"a {type(v).__name__} of {len(v)}"
    return f"{v!r} ({type(v).__name__})"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _map_tensors(v, fn):
    """`fn` applied to the tensors of a state value (a tensor, a list or tuple of them, or a plain value)."""
    if isinstance(v, torch.Tensor):
        return fn(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_map_tensors(x, fn) for x in v)
    return v


class Sliding(Stateful):
    """Any op whose output frame j reads input frames j*stride - pad_l ... j*stride - pad_l + span - 1.

    Convolutions and pools (through `SlidingSpec.compute`), sliding windows of
    global reductions and constant crops are all this one kernel with a
    different `compute`. The state is the last `keep` frames of the padded
    input stream, the count of padded frames consumed (`m`) and the index of the
    next output window (`next_j`); its size never depends on the stream length.

    `avg_count` = (kernel, count_include_pad) makes averages divide by the number
    of frames that count near the start and end of a stream, as PyTorch does.
    `layout` (a memory format) keeps the frames in the layout `compute` is fastest
    in, so that only each new frame is converted, never the whole window; outputs
    leave in the default layout (code downstream may `.view` them).

    `ring=True` (a convolution without temporal dilation, weight first among its
    tensors) makes single-frame steps copy nothing but the new frame: the window
    lives in a ring of `span` frames, the new frame overwrites the oldest, and the
    convolution runs with its temporal taps rolled to match (one rolled copy of
    the weight per ring position, cached until the weight changes). Reading `buf`
    gives the frames in order, as every other path expects.

    Compiled steps keep the window in a double ring (`program_views`), or, for a
    convolution whose double-ring window would not be one dense block, in this
    ring with the rolled weight given to the program as an input (`rolled_ring`).
    """

    state_names = ("buf", "m", "next_j")

    def __init__(self, ctx: StreamContext, compute: Callable, t: int, span: int, stride: int,
                 pad_l: int, pad_r: int, pad_value: float, out_labels: Sequence, *,
                 replicate: bool = False, ceil_mode: bool = False, avg_count: Optional[tuple] = None,
                 window: Optional[Callable] = None, layout: Optional[torch.memory_format] = None,
                 ring: bool = False):
        super().__init__(ctx)
        # the rules of its window (completion, end padding, averages), shared by every path that steps it
        replicate_end = (replicate or ctx.init == "replicate") and (pad_r > 0 or ceil_mode)
        self.__dict__["geometry"] = g = WindowGeometry(span, stride, pad_l, pad_r, ceil_mode, avg_count, replicate_end)
        # the kept frames, in the storage form the last step wanted (`FrameWindow`)
        self.__dict__.update(layout=layout, _rolled={}, _program=None, _weight=None,
                             store=FrameWindow(t, span, g.keep, pad_value, layout))
        self.__dict__["compute"] = compute
        self.__dict__["window"] = window   # a faster compute for exactly one output window, if any
        self.t, self.pad_value, self.keep = t, pad_value, g.keep
        self.span, self.stride, self.pad_l, self.pad_r = span, stride, pad_l, pad_r
        self.out_labels = tuple(out_labels)
        self.replicate, self.avg_count = replicate, avg_count
        self.ring = ring and self.keep == span - 1 and span > 1
        self.buf = self.m = self.next_j = None

    @property
    def buf(self) -> Optional[torch.Tensor]:
        """The last `keep` frames of the padded stream, in order (read without changing how they are kept)."""
        return self.store.ordered()

    @buf.setter
    def buf(self, value: Optional[torch.Tensor]) -> None:
        self.store.set_ordered(value)

    def state_tensors(self):
        yield from self.store.tensors()

    def detach_state(self) -> None:
        self.store.detach()

    def get_state(self) -> dict:
        """The state, its frames in order; the kernel goes on from them too (leaving a ring), so that the
        stream it continues and one resumed from this state compute the same bits."""
        self.store.to_ordered()
        return super().get_state()

    def state_signature(self, state: dict) -> Optional[tuple]:
        return None if state["m"] is None else (state["m"], state["next_j"])

    def steady_key(self) -> Optional[tuple]:
        """A window completes when m reaches next_j * stride + span; an average divides window j by its own
        count until j reaches the first window without start padding (`first_full_window`)."""
        if self.m is None:
            return None
        return self.m - self.next_j * self.stride, min(self.next_j, self.geometry.first_full_window())

    def free_axis(self, entry: str, index: Optional[int]) -> Optional[int]:
        return None

    def entry_hint(self, entry: str) -> str:
        if entry == "buf":
            return f"the last {self.keep} padded frames at dim {self.t}"
        return ""

    def check_counters(self, name: str, state: dict) -> None:
        buf, m, nj = state["buf"], state["m"], state["next_j"]
        if not (buf is None) == (m is None) == (nj is None):
            given = ", ".join(f"{e}={'None' if state[e] is None else 'set'}" for e in self.state_names)
            raise state_error(name, self, None, "'buf', 'm' and 'next_j' all None (a clean kernel) or all set",
                              given)
        if m is None:
            return
        for entry in ("m", "next_j"):
            if not _is_int(state[entry]):
                raise state_error(name, self, entry, "an int (a counter)", _describe(state[entry]))
        if m < self.pad_l:
            raise state_error(name, self, "m", f"a count of padded frames consumed of at least {self.pad_l} (the "
                                               "start padding)", f"{m}")
        want = self.geometry.next_window(m)
        if nj != want:
            raise state_error(name, self, "next_j", f"{want}, the next window after m={m} padded frames "
                                                    f"(span {self.span}, stride {self.stride})", f"{nj}")

    @property
    def program_ring(self) -> Optional[str]:
        """How compiled steps keep this kernel's frames: "double" (`program_views`: its window is one dense
        block), "rolled" (`rolled_ring`: a convolution whose double-ring window would not be), or None."""
        held = self.store.tensors()
        if self.keep != self.span - 1 or self.span < 2 or not held:
            return None
        outer = held[0].shape[:1] if self.program_layout is not None else held[0].shape[:self.t]
        return "rolled" if self.ring and any(size > 1 for size in outer) else "double"

    @property
    def program_layout(self) -> Optional[torch.memory_format]:
        """The layout of a compiled step's double ring: `layout`, or channels-last for a convolution with one
        input channel per group (depthwise) over time at dim 2 of 4-D or 5-D frames, whichever way eager
        steps compute it: oneDNN runs those channels-last natively, and inductor computes the feature maps
        around them channels-last (a contiguous ring was transposed in and out at every step: X3D-S's
        depthwise temporal stem convolution, ~0.2 ms of a ~6 ms step)."""
        weight = self._weight
        if self.layout is not None or not self.ring or weight is None or weight.shape[1] != 1 or self.t != 2:
            return self.layout
        return {4: torch.channels_last, 5: torch.channels_last_3d}.get(weight.dim())

    def rolled_ring(self) -> tuple:
        """(ring, slot): the ring of `span` frames (`FrameWindow.rolled_ring`), and the slot the next frame
        overwrites. A compiled step writes the frame there (`index_copy_`) and convolves the whole ring with the
        weight rolled by slot + 1: one frame copied, and the window is the ring itself, dense for any batch."""
        return self.store.rolled_ring()

    def program_views(self) -> tuple:
        """(window, mirror): where the next single-frame step of a compiled program writes and reads
        (`FrameWindow.double_views`), in `program_layout`: no frame is concatenated or shifted, and with
        channels-last frames the window of a single stream is one dense block."""
        return self.store.double_views(self.program_layout)

    def _program_step(self, x: torch.Tensor, tensors: tuple) -> torch.Tensor:
        """The step (of one frame or none) a compiled program records; its inputs are the ring views (a double
        ring's window and mirror, or a rolled ring, the slot index and the rolled weight)."""
        if x.shape[self.t] == 0:
            return empty_like_labels(self.out_labels, self.ctx.batch, x)
        compute = self.window or self.compute
        if len(self._program) == 3:   # rolled: (ring, slot index, rolled weight)
            window, slot, weight = self._program
            self.store.write_rolled(window, slot, x)
            tensors = (weight, *tensors[1:])
        else:
            window = self.store.write_double(self._program, x)
            if self.program_layout is not self.layout:   # a convolution the program runs channels-last
                compute = self.compute
        self.m += 1
        if not self.geometry.completes(self.m, self.next_j):
            return empty_like_labels(self.out_labels, self.ctx.batch, x)
        j1 = self.next_j
        # read through an alias: inductor (2.14) cannot reinplace the frame's write when it feeds a
        # convolution fused with its activation directly
        out = compute(window.as_strided(window.shape, window.stride()), *tensors)
        if self.avg_count is not None:
            out = self._fix_average(out, self.next_j, j1, None)
        self.next_j = j1 + 1
        if out.untyped_storage().data_ptr() == window.untyped_storage().data_ptr():
            out = out.clone()   # a view of the window (a crop): the next step overwrites it
        return out.contiguous()

    def extra_repr(self) -> str:
        return (f"span={self.span}, stride={self.stride}, pad=({self.pad_l}, {self.pad_r}), "
                f"keep={self.keep}")

    def _start(self, x: torch.Tensor) -> bool:
        """Fill the start padding; False when it must wait for a first frame (replicate)."""
        replicate = self.replicate or self.ctx.init == "replicate"
        if replicate and self.pad_l > 0:
            if x.shape[self.t] == 0:
                return False
            self.buf = self.store.padding(x, self.keep, x.narrow(self.t, 0, 1))
        else:
            self.buf = self.store.padding(x, self.keep)
        self.m, self.next_j = self.pad_l, 0
        return True

    def forward(self, x: torch.Tensor, *tensors) -> torch.Tensor:
        t = self.t
        if self.ring:   # the weight a compiled step's rolled ring bakes, rolled (see `rolled_ring`)
            self.__dict__["_weight"] = tensors[0]
        if self._program is not None:   # a compiled step is being recorded
            return self._program_step(x, tensors)
        form = self.store.form
        if self.ring and x.shape[t] == 1 and form in ("ordered", "ring") and not self.ctx.flushing:
            return self._ring_step(x, tensors)
        if self.layout is not None:
            x = x.contiguous(memory_format=self.layout)
        if form is None:
            if not self._start(x):
                return empty_like_labels(self.out_labels, self.ctx.batch, x)
        elif x.shape[t] == 0 and not self.ctx.flushing:   # nothing new: no window can complete
            return empty_like_labels(self.out_labels, self.ctx.batch, x)
        buf = self.store.to_ordered()
        parts = [buf, x]
        real_end = None
        if self.ctx.flushing:
            real_end = self.m + x.shape[t]
            extra = self.geometry.end_frames(real_end)
            if extra:
                replicate = self.replicate or self.ctx.init == "replicate"
                last = torch.cat(parts, t).narrow(t, -1, 1) if replicate else None
                parts.append(self.store.padding(x, extra, last))
        cat = torch.cat(parts, t)
        length = cat.shape[t]
        total = self.m + length - buf.shape[t]
        base = total - length
        j1 = self.geometry.last_window(total)
        if j1 >= self.next_j:
            start = self.next_j * self.stride - base
            count = j1 - self.next_j + 1
            used = (count - 1) * self.stride + self.span
            frames = cat if start == 0 and used == length else cat.narrow(t, start, used)
            out = self.window(frames, *tensors) if count == 1 and self.window is not None \
                else self.compute(frames, *tensors)
            if self.layout is not None:
                out = out.contiguous()
            if self.avg_count is not None:
                out = self._fix_average(out, self.next_j, j1, real_end)
            self.next_j = j1 + 1
            if out.untyped_storage().data_ptr() == cat.untyped_storage().data_ptr():
                out = out.clone()   # a view of the frames (a crop): later in-place ops must not reach the state
        else:
            out = empty_like_labels(self.out_labels, self.ctx.batch, x)
        kept = cat.narrow(t, length - self.keep, self.keep)
        # a step keeps a view of its fresh concatenation (no copy); a long chunk is copied so that its
        # frames are not held in memory
        self.buf = kept if length <= 2 * self.keep + 1 else kept.clone()
        self.m = total
        return out

    def _ring_step(self, x: torch.Tensor, tensors: tuple) -> torch.Tensor:
        """One frame in, the window's output (if a window completes) out; copies the new frame only."""
        ring, oldest = self.store.ring_push(x)
        self.m += 1
        if not self.geometry.completes(self.m, self.next_j):
            return empty_like_labels(self.out_labels, self.ctx.batch, x)
        self.next_j += 1
        weight, rest = tensors[0], tensors[1:]
        compute = self.window or self.compute
        out = compute(ring, self._rolled_weight(weight, oldest), *rest)
        return out if self.layout is None else out.contiguous()

    def _rolled_weight(self, weight: torch.Tensor, shift: int) -> torch.Tensor:
        """The weight with its temporal taps rolled by `shift` (cached per shift until the weight changes)."""
        if shift == 0:
            return weight
        if weight.requires_grad and torch.is_grad_enabled():
            return weight.roll(shift, self.t)
        rolled = self._rolled.get(shift)
        if rolled is None:
            rolled = self._rolled[shift] = Derived(lambda w, shift=shift: w.roll(shift, self.t))
        return rolled((weight,))

    def _fix_average(self, out: torch.Tensor, j0: int, j1: int, real_end: Optional[int]) -> torch.Tensor:
        """Rescale averages whose window covers frames PyTorch would not count."""
        k = self.avg_count[0]
        counts = [self.geometry.frames_counted(j, real_end) for j in range(j0, j1 + 1)]
        if all(c == k for c in counts):
            return out
        shape = [1] * out.dim()
        shape[self.t] = len(counts)
        factor = torch.tensor([k / c for c in counts], dtype=out.dtype, device=out.device)
        return out * factor.view(shape)


class DoubleRings:
    """`Sliding.program_views` of many kernels, flat (window, mirror, window, ...), read in C loops: a compiled
    step reads them all (X3D-S: 43 kernels) while their attributes are out of cache (~0.1 ms in a Python
    loop)."""

    def __init__(self, kernels: Sequence[Sliding]):
        self.kernels = list(kernels)
        self.dicts = [k.store.__dict__ for k in self.kernels]
        self.spans = [k.span for k in self.kernels]

    def __call__(self) -> list:
        dicts = self.dicts
        if None in map(dict.get, dicts, repeat("views")):   # one is not in its double ring: enter
            return [v for k in self.kernels for v in k.program_views()]
        at = map(operator.mod, map(dict.get, dicts, repeat("pos")), self.spans)
        return list(chain.from_iterable(map(operator.getitem, map(dict.get, dicts, repeat("views")), at)))


class Align(Stateful):
    """Delay buffers for the inputs of a merge: emits frame j of every input together.

    Each input keeps the frames it has that the slowest input has not matched
    yet; in steady state that is the input's delay difference, a fixed number.
    """

    state_names = ("pending",)

    def __init__(self, ctx: StreamContext, axes: Sequence[int]):
        super().__init__(ctx)
        self.axes = tuple(axes)
        self.pending = None

    def extra_repr(self) -> str:
        return f"axes={self.axes}"

    def state_signature(self, state: dict) -> Optional[tuple]:
        pending = state["pending"]
        return None if pending is None else tuple(p.shape[a] for p, a in zip(pending, self.axes))

    def free_axis(self, entry: str, index: Optional[int]) -> Optional[int]:
        return self.axes[index] if entry == "pending" and index is not None else None

    def entry_hint(self, entry: str) -> str:
        return f"frames of each input not yet matched, at dims {self.axes}" if entry == "pending" else ""

    def check_counters(self, name: str, state: dict) -> None:
        pending = state["pending"]
        if pending is None:
            return
        counts = [p.shape[a] for p, a in zip(pending, self.axes)]
        if min(counts) != 0:
            raise state_error(name, self, "pending", "no frame held by at least one input (a merge emits every "
                                                     "frame all of its inputs have)", f"{counts} frames held")

    def forward(self, *xs):
        if self.pending is None:
            self.pending = [x.narrow(a, 0, 0) for x, a in zip(xs, self.axes)]
        k = min(p.shape[a] + x.shape[a] for p, x, a in zip(self.pending, xs, self.axes))
        out, pending = [], []
        for p, x, a in zip(self.pending, xs, self.axes):
            out_i, rest = _split_after(p, x, a, k)
            out.append(out_i)
            pending.append(rest)
        self.pending = pending
        return tuple(out)


def _split_after(p: torch.Tensor, x: torch.Tensor, a: int, k: int):
    """(first k frames of p ++ x, a copy of the frames after them): no copy of what is returned, and copies
    only the frames kept (a step that keeps its new frame copies that frame alone)."""
    held, n = p.shape[a], x.shape[a]
    if held == 0:
        first = x if k == n else x.narrow(a, 0, k)
        return first, (p if k == n else x.narrow(a, k, n - k).clone())
    if held == k:
        return p, x.clone()
    if held > k:
        return p.narrow(a, 0, k), torch.cat([p.narrow(a, k, held - k), x], a)
    full = torch.cat([p, x], a)
    return full.narrow(a, 0, k), full.narrow(a, k, held + n - k).clone()


class Framewise(Kernel):
    """Runs an op that acts frame by frame, skipping it when the chunk holds no frames.

    Many PyTorch kernels reject tensors with an empty time dimension; the output
    with 0 frames has a known shape, so it is made directly.
    """

    def __init__(self, ctx: StreamContext, op, method: Optional[str], out_labels: Sequence, out_dtypes=None):
        super().__init__()
        self.__dict__["ctx"] = ctx
        self.__dict__["op"] = op
        self.__dict__["call"] = op.forward if isinstance(op, Kernel) else op
        self.method = method
        self.out_labels = out_labels   # a pytree of label tuples for ops that return several tensors
        self.out_dtypes = out_dtypes   # the same pytree: the dtype of an output that is not in the stream's (a mask)

    def extra_repr(self) -> str:
        return f"{self.method or getattr(self.op, '__name__', type(self.op).__name__)}"

    def forward(self, *args, **kwargs):
        for frames in args:
            if isinstance(frames, torch.Tensor):
                if frames.numel() == 0:
                    return _empty_like_tree(self.out_labels, self.ctx.batch, self._like(args, frames), self.out_dtypes)
                break
        if self.method is not None:
            return getattr(args[0], self.method)(*args[1:], **kwargs)
        try:
            return self.call(*args, **kwargs)
        except ValueError:
            if not (isinstance(self.op, nn.GroupNorm) or self.op is F.group_norm) or args[0].shape[0] != 1:
                raise
            # torch refuses a group norm of one value per group on a single row (one frame of one stream,
            # frames folded into the batch); each row is normalised alone, so two copies give the row's answer
            return self.call(torch.cat([args[0], args[0]]), *args[1:], **kwargs)[:1]

    def _like(self, args, frames: torch.Tensor) -> torch.Tensor:
        """What an empty output is made like: a floating input (the real part of a complex one: the magnitude
        of a spectrum), else the op's weights (an embedding of codes gives floats, not the codes' integers)."""
        floating = next((a if a.is_floating_point() else a.real for a in args if isinstance(a, torch.Tensor)
                         and (a.is_floating_point() or a.is_complex())), None)
        if floating is not None or not isinstance(self.op, nn.Module):
            return floating if floating is not None else frames
        weight = next((p for p in self.op.parameters() if p.is_floating_point()), None)
        return frames if weight is None else frames.new_empty(0, dtype=weight.dtype)


class Recurrent(Stateful):
    """An LSTM/GRU/RNN that carries its hidden state from chunk to chunk.

    Returns what the module returns: the output frames, and in place of the
    final state the state after every frame, frames folded into the batch
    (t-major), so that what the model computes from its final state is computed
    once per step.
    """

    state_names = ("hx", "seen")

    def __init__(self, ctx: StreamContext, module: nn.RNNBase, window: int, per_frame_state: bool):
        super().__init__(ctx)
        self.__dict__["module"] = module
        self.window, self.per_frame_state = window, per_frame_state
        self.hx, self.seen = None, None

    def state_signature(self, state: dict) -> Optional[tuple]:
        return None if state["seen"] is None else (state["seen"],)

    def steady_key(self) -> Optional[tuple]:
        """Frames seen count until the first clip position's state (`window`) and the first hidden state."""
        return None if self.seen is None else (min(self.seen, max(self.window, 1)),)

    def check_counters(self, name: str, state: dict) -> None:
        hx, seen = state["hx"], state["seen"]
        if seen is not None and (not _is_int(seen) or seen < 0):
            raise state_error(name, self, "seen", "None or a count of frames seen (an int >= 0)", _describe(seen))
        if (hx is None) != (not seen):
            raise state_error(name, self, "hx", "None before the first frame and a hidden state after it",
                              f"hx {'None' if hx is None else 'set'} with seen={seen!r}")

    def forward(self, x):
        module, t = self.module, 1 if self.module.batch_first else 0
        n, seen = x.shape[t], self.seen or 0
        self.seen = seen + n
        if self.hx is not None and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            self.hx = tree_map(lambda h: h.clone() if h.is_inference() else h, self.hx)   # (made in inference_mode)
        if n == 0:   # no frame: empty output (PyTorch's recurrent layers reject empty sequences)
            out, hx = module(x.new_zeros(*x.shape[:t], 1, *x.shape[t + 1:]), self.hx)
            empty = (lambda h: h.narrow(1, 0, 0))
            return out.narrow(t, 0, 0), tuple(map(empty, hx)) if isinstance(hx, tuple) else empty(hx)
        if not self.per_frame_state:
            out, hx = module(x, self.hx)
            self.hx = hx
            return out, hx
        outs, states = [], []
        for i in range(n):
            out, hx = module(x.narrow(t, i, 1), self.hx)
            self.hx = hx
            outs.append(out)
            if seen + i >= self.window - 1:   # the state at the end of a clip position
                states.append(hx)
        if not states:
            _, hx = module(x.narrow(t, 0, 1), self.hx)
            empty = (lambda h: h.narrow(1, 0, 0))
            return torch.cat(outs, t), tuple(map(empty, hx)) if isinstance(hx, tuple) else empty(hx)
        if isinstance(states[0], tuple):
            return torch.cat(outs, t), tuple(torch.cat([s[k] for s in states], 1) for k in range(len(states[0])))
        return torch.cat(outs, t), torch.cat(states, 1)


class FrameConv(Kernel):
    """A convolution with temporal kernel 1: one frame takes `single` (chosen by timing), chunks `compute`."""

    def __init__(self, ctx: StreamContext, compute: Callable, single: Callable, t: int, out_labels: Sequence):
        super().__init__()
        self.__dict__.update(ctx=ctx, compute=compute, single=single)
        self.t, self.out_labels = t, tuple(out_labels)

    def forward(self, x, *tensors):
        n = x.shape[self.t]
        if n == 1:
            return self.single(x, *tensors)
        if n == 0:
            return empty_like_labels(self.out_labels, self.ctx.batch, x)
        return self.compute(x, *tensors)


# ---- layout helpers used by the continual graph -------------------------------------------------

def window_reduce(mode: str, t: int, window: int) -> Callable:
    """compute() for a sliding window over time: one reduced frame per window position."""
    def compute(frames: torch.Tensor) -> torch.Tensor:
        w = frames.unfold(t, window, 1)
        if mode == "raw":
            return w
        return getattr(w, mode)(-1)
    return compute


def forward_pre_hooks(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the forward pre-hooks of a module whose op a step runs as a kernel, as calling the module would
    (``torch.nn.utils.weight_norm`` recomputes the weight there); the input as they leave it."""
    for key, hook in module._forward_pre_hooks.items():
        if key in module._forward_pre_hooks_with_kwargs:
            out = hook(module, (x,), {})
            out = None if out is None else out[0]
        else:
            out = hook(module, (x,))
        if out is not None:
            x = out[0] if isinstance(out, tuple) else out
    return x


def crop_select(t: int, stride: int, span: int) -> Callable:
    """compute() of a crop: the first frame of every window, windows `stride` apart."""
    index = (slice(None),) * t + (slice(None, None, stride),)

    def compute(frames: torch.Tensor) -> torch.Tensor:
        count = (frames.shape[t] - span) // stride + 1
        kept = frames.narrow(t, 0, (count - 1) * stride + 1)
        return kept if stride == 1 else kept[index]
    return compute


def fold_time(x: torch.Tensor, t: int, b: int = 0, raw: bool = False) -> torch.Tensor:
    """(.., B@b, .., n@t, ..) -> (.., n*B@b, .., 1@t, ..): each output frame becomes a sample of its own.

    Frames are folded t-major (sample index = frame * B + stream). With `raw`, the
    input holds whole windows in a trailing dimension, which takes the place of time.
    """
    if x.shape[t] == 1 and not raw:   # one frame: folding it into the batch changes nothing
        return x
    rest_b = b if b < t else b - 1
    y = x.movedim(t, 0).movedim(0, rest_b)   # frames right before the batch
    shape = list(y.shape)
    y = y.reshape(shape[:rest_b] + [shape[rest_b] * shape[rest_b + 1]] + shape[rest_b + 2:])
    return y.movedim(-1, t) if raw else y.unsqueeze(t)


def split_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(n*B, ...) -> (n, B, ...): the frames of a folded tensor on their own axis."""
    return x.reshape(x.shape[0] // batch, batch, *x.shape[1:])


def join_frames(x: torch.Tensor) -> torch.Tensor:
    """(n, B, ...) -> (n*B, ...)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def unfold_time(x: torch.Tensor, pos: int, batch: int, b: int = 0, replace: bool = True) -> torch.Tensor:
    """(.., n*B@b, ..) -> (.., B@b, .., n@pos, ..); `replace` drops the size-1 dimension at `pos`."""
    if x.shape[b] == batch:   # one frame: it is already where it goes
        return x if replace else x.unsqueeze(pos)
    shape = list(x.shape)
    y = x.reshape(shape[:b] + [shape[b] // batch, batch] + shape[b + 1:])
    frames = b
    if replace:
        y = y.squeeze(pos + 1 if pos > b else pos)
        frames = b if pos > b else b - 1
    return y.movedim(frames, pos)


def reshape(x: torch.Tensor, spec: tuple, batch: int, batch_dims: int, static: int, rows: tuple = None) -> torch.Tensor:
    """`x.reshape` with sizes that follow the stream: "B" -> batch (times its `rows` per stream), "T" -> frames,
    "BT" -> both.

    The number of frames n comes from `x.numel() = batch**batch_dims * n * static`,
    so a chunk with 0 frames reshapes too (where -1 would be ambiguous).
    """
    n = x.numel() // (batch ** batch_dims * static)
    rows = rows or (1,) * len(spec)
    sizes = [batch * r if s == "B" else n if s == "T" else batch * n * r if s == "BT" else s
             for s, r in zip(spec, rows)]
    return x.reshape(sizes)
