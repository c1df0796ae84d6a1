"""One step of a continual model with explicit state, for streams that need not be in phase.

The stream kernels (`cofx.kernels`) let time be the length of a tensor: a chunk
of n frames goes in and the 0 … n frames that became available come out. That
is fast and simple when every row of the batch is at the same point of its
stream, but it cannot express a batch whose rows started at different times
(one row has an output this step, another does not), and a graph whose tensor
shapes depend on the step cannot be exported to ONNX.

`MaskedStep` runs the same continual graph (`co.step_graph`) one frame at a
time with fixed shapes: every stream tensor has exactly one frame and travels
with a per-row bool `ready` (B,) that says whether that row's frame is real.

- `Sliding` keeps exactly `keep` frames per row plus two counters per row
  (m: padded frames consumed, next_j: the next window), always computes the
  window of the last `span` frames and marks it ready where that window just
  completed; rows whose input is not ready keep their state.
- `Align` keeps, per input, a fixed number of frame slots (the most frames the
  eager kernel ever holds) and a count per row, and emits the oldest frame of
  every input where all of them have one.
- Everything else (pointwise ops, `Framewise`, `FrameConv`, the layout helpers)
  runs on the frame; its `ready` is the AND of its inputs'.

The initial state is the eager state after a 0-frame chunk from a clean state
("priming"): start padding that covers whole windows (``F.pad(x, (2, 0))`` before
a causal conv) emits its frames then, so that afterwards every input frame
completes at most one window of every kernel and one frame per step suffices.

State is a flat list of tensors, batch first: for each kernel in graph order,
`Sliding`: ``buf`` (B, …, keep@t, …) when keep > 0, then ``pos`` int64 (B, 2) =
[m, next_j]; `Align`: ``buf<i>`` (B, …, slots@axis, …) for each input with
slots, then ``count`` int64 (B, inputs). `MaskedStep.state_names` names them.

Used by `cofx.export_onnx` (ONNX of one step) and by
``co.clean_state(streams=...)`` (streams out of phase in PyTorch).
"""
from __future__ import annotations

import inspect
import operator
from typing import List, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import kernels as K
from .errors import StreamError, first_line
from .growing_window import ClipStart, NewestFrames
from .scratch_stream import scratch_stream


class NotSteppable(StreamError):
    """The continual model cannot be run one frame per step with fixed shapes (see the message)."""


# ---- the layout helpers for chunks of exactly one frame -------------------------------------------
# Each takes the arguments of its `cofx.kernels` counterpart (bound by name, so that added keyword
# parameters such as the batch axis do not shift anything).

_SIGNATURES: dict = {}


def _bind(fn, args, kwargs) -> dict:
    if fn not in _SIGNATURES:
        _SIGNATURES[fn] = inspect.signature(fn)
    bound = _SIGNATURES[fn].bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def fold_time1(*args, **kwargs) -> torch.Tensor:
    """`kernels.fold_time` of one frame: (…, 1@t, …) stays as it is (raw: the window takes the place of time)."""
    a = _bind(K.fold_time, args, kwargs)
    x, t = a["x"], a["t"]
    if not a.get("raw"):
        return x
    y = x.squeeze(t)
    return y.movedim(y.dim() - 1, t)   # (a negative index would reach the ONNX Transpose as is)


def unfold_time1(*args, **kwargs) -> torch.Tensor:
    """`kernels.unfold_time` of one frame: a size-1 time axis at `pos` (replacing a size-1 dimension there)."""
    a = _bind(K.unfold_time, args, kwargs)
    x, pos = a["x"], a["pos"]
    if a.get("replace", True) and pos < x.dim() and x.shape[pos] == 1:
        return x
    return x.unsqueeze(pos)


def reshape1(*args, **kwargs) -> torch.Tensor:
    """`kernels.reshape` of one frame: "T" is 1 and "BT" the batch (the traced batch size, dynamic in ONNX)."""
    a = _bind(K.reshape, args, kwargs)
    return a["x"].reshape([a["batch"] if s in ("B", "BT") else 1 if s == "T" else s for s in a["spec"]])


_LAYOUT = {K.fold_time: fold_time1, K.unfold_time: unfold_time1, K.reshape: reshape1}


def _rows(mask: torch.Tensor, like: torch.Tensor, b: int = 0) -> torch.Tensor:
    """A (B,) mask (or per-row values) shaped to broadcast over `like`, whose batch axis is `b`.

    Unsqueezes rather than a reshape with -1: ONNX shape inference keeps every size known.
    """
    for _ in range(b):
        mask = mask.unsqueeze(0)
    for _ in range(like.dim() - b - 1):
        mask = mask.unsqueeze(-1)
    return mask


def _compact(t: torch.Tensor) -> torch.Tensor:
    """`t` cut to size 1 along every dimension (but the first) along which it is constant: broadcasting gives
    it back. Start padding and what convolutions make of it are constant per channel; an exported graph
    stores these initial states as constants, so this keeps the file small."""
    for d in range(1, t.dim()):
        first = t.narrow(d, 0, 1)
        if t.shape[d] > 1 and bool((t == first).all()):
            t = first
    return t.contiguous()


def _pin_shape(one: tuple, two: tuple):
    """The shape of 1 stream with -1 on the batch axis (the one axis where 2 streams differ), or None."""
    diff = [i for i, (u, v) in enumerate(zip(one, two)) if u != v]
    if len(one) != len(two) or len(diff) != 1:
        return None
    return [-1 if i == diff[0] else s for i, s in enumerate(one)]


def _pin(value: torch.Tensor, shape: list, ref: torch.Tensor) -> torch.Tensor:
    """`value` reshaped to `shape`, whose -1 is the batch: the batch size read off `ref` (dim 0)."""
    return value.reshape([ref.shape[0] if s == -1 else s for s in shape])


def _and(masks) -> Optional[torch.Tensor]:
    out = None
    seen = []
    for m in masks:
        if m is None or any(m is s for s in seen):
            continue
        seen.append(m)
        out = m if out is None else out & m
    return out


def _streamed(value) -> bool:
    """Whether a value can carry frames (tensors with dimensions, or containers of them); not shapes."""
    if isinstance(value, torch.Tensor):
        return value.dim() > 0
    if isinstance(value, (tuple, list)):
        return any(_streamed(v) for v in value)
    if isinstance(value, dict):
        return any(_streamed(v) for v in value.values())
    return False


# ---- kernels, one frame at a time -----------------------------------------------------------------

class _SlidingPlan:
    """`Sliding`, one frame per step. State: ``buf`` (batch first; absent when keep = 0), ``pos`` = [m, next_j]."""

    def __init__(self, name: str, k: K.Sliding, replicate: bool):
        self.name, self.k = name, k
        self.replicate_start = replicate and k.pad_l > 0
        self.has_buf = k.keep > 0
        self.fields = (["buf"] if self.has_buf else []) + ["pos"]
        self.b = 0                       # batch axis of the input (and buffer), found by `_prime`
        self.plain = False               # compute, not the timed one-window implementation (for export)
        labels = list(k.out_labels)
        self.out_b = labels.index("B") if "B" in labels else None

    def step(self, x, ready, state, tensors):
        """(output frame, ready, new state); `ready` None means every row."""
        k, t, b = self.k, self.k.t, self.b
        buf = state[0].movedim(0, b) if self.has_buf else None
        pos = state[-1]
        m, nj = pos[:, 0], pos[:, 1]
        if self.replicate_start:   # rows that have not started yet: fill the buffer with this frame
            fresh = m < 0 if ready is None else ready & (m < 0)
            if self.has_buf:
                first = x.expand([k.keep if d == t else -1 for d in range(x.dim())])
                buf = torch.where(_rows(fresh, buf, b), first, buf)
            m = torch.where(fresh, torch.full_like(m, k.pad_l), m)
        cat = torch.cat([buf, x], t) if self.has_buf else x
        frames = cat.narrow(t, k.keep + 1 - k.span, k.span)   # static sizes: traced shapes would be dynamic
        fast = k.window is not None and not self.plain
        out = k.window(frames, *tensors) if fast else k.compute(frames, *tensors)
        if not self.plain and out.untyped_storage().data_ptr() == cat.untyped_storage().data_ptr():
            out = out.clone()   # a view of the frames (a crop): in-place ops downstream must not reach the state
        m1 = m + 1 if ready is None else m + ready.to(m.dtype)
        done = k.geometry.completes(m1, nj)
        if ready is not None:
            done = done & ready
        if k.geometry.uncounted_start:
            if self.out_b is None:
                raise NotSteppable(f"'{self.name}' averages a tensor without a batch dimension")
            factor = k.avg_count[0] / k.geometry.frames_counted(nj).to(out.dtype)
            out = out * _rows(factor, out, self.out_b)
        new = []
        if self.has_buf:
            shifted = cat.narrow(t, 1, k.keep)
            kept = shifted if ready is None else torch.where(_rows(ready, buf, b), shifted, buf)
            new.append(kept.movedim(b, 0))
        new.append(torch.stack([m1, nj + done.to(nj.dtype)], 1))
        return out, done, new


class _AlignPlan:
    """`Align`, one frame per input per step. State: ``buf<i>`` (batch first) per input with slots, ``count``.

    Input i keeps its last `slots[i]` frames, the newest last; `count` says how many
    of them each row has not emitted yet. A step appends the input's frame where it
    is ready, and where every input then has a frame, emits the oldest of each.
    """

    def __init__(self, name: str, k: K.Align):
        self.name, self.k = name, k
        self.slots = [0] * len(k.axes)
        self.b = [0] * len(k.axes)
        self.fields = ["count"]
        self.check = True       # verify the slots suffice (off while exporting)

    def set_slots(self, slots):
        self.slots = list(slots)
        self.fields = [f"buf{i}" for i, s in enumerate(self.slots) if s > 0] + ["count"]

    def step(self, xs, readies, state):
        bufs = iter(state[:-1])
        count = state[-1]
        outs, new_bufs, counts = [], [], []
        for i, (x, r, a, p, b) in enumerate(zip(xs, readies, self.k.axes, self.slots, self.b)):
            c = count[:, i]
            c1 = c + 1 if r is None else c + r.to(c.dtype)
            if p > 0:
                buf = next(bufs).movedim(0, b)
                pushed = torch.cat([buf, x], a)
                full = pushed if r is None else torch.where(_rows(r, x, b), pushed, torch.cat([x, buf], a))
                index = (p + 1 - c1).clamp(0, p)
                outs.append(torch.gather(full, a, _rows(index, x, b).expand(x.shape)))
                new_bufs.append(full.narrow(a, 1, p).movedim(b, 0))
            else:
                outs.append(x)
            counts.append(c1)
        emit = counts[0] >= 1
        for c1 in counts[1:]:
            emit = emit & (c1 >= 1)
        left = torch.stack(counts, 1) - emit.to(count.dtype).unsqueeze(1)
        if self.check and bool((left > left.new_tensor(self.slots)).any()):   # never, if the slots are right
            raise NotSteppable(f"'{self.name}' would hold more frames than its {self.slots} slots; please report "
                               "this model")
        return tuple(outs), emit, new_bufs + [left]


class _RecurrentPlan:
    """`Recurrent`, one frame per step. State: the hidden state (``h``, and ``c`` for an LSTM; batch first) and
    ``seen`` (B, 1), the frames each row has consumed.

    Rows whose frame is not ready keep their state. The state after the frame (what the model computes from
    its final state) is ready where the row has seen a whole clip's worth of frames, as the eager kernel
    emits it; the output frame is ready with the input.
    """

    def __init__(self, name: str, k: K.Recurrent):
        self.name, self.k = name, k
        self.lstm = isinstance(k.module, nn.LSTM)
        self.fields = ["h", "c", "seen"] if self.lstm else ["h", "seen"]

    def initial(self, dtype, device) -> List[torch.Tensor]:
        m = self.k.module
        layers = m.num_layers * (2 if m.bidirectional else 1)
        h = torch.zeros(1, layers, m.proj_size or m.hidden_size, dtype=dtype, device=device)
        cells = [torch.zeros(1, layers, m.hidden_size, dtype=dtype, device=device)] if self.lstm else []
        return [h, *cells, torch.zeros(1, 1, dtype=torch.long, device=device)]

    def from_eager(self, batch: int, dtype, device) -> List[torch.Tensor]:
        hx, seen = self.k.hx, self.k.seen
        if hx is None:
            return [s.expand(batch, *s.shape[1:]).clone() for s in self.initial(dtype, device)]
        hx = hx if isinstance(hx, tuple) else (hx,)
        return [h.movedim(1, 0).clone() for h in hx] + [torch.full((batch, 1), seen, device=device)]

    def step(self, x, ready, state):
        hx = tuple(s.movedim(0, 1).contiguous() for s in state[:-1])
        seen = state[-1]
        out, new = self.k.module(x, hx if self.lstm else hx[0])
        new = new if self.lstm else (new,)
        kept = [n.movedim(1, 0) if ready is None else torch.where(_rows(ready, o, 0), n.movedim(1, 0), o)
                for n, o in zip(new, state[:-1])]
        seen1 = seen + 1 if ready is None else seen + ready.to(seen.dtype).unsqueeze(1)
        whole = seen1[:, 0] >= self.k.window   # this frame ends a clip position (see `Recurrent.forward`)
        state_ready = whole if ready is None else whole & ready
        return (out, new if self.lstm else new[0]), (ready, state_ready), kept + [seen1]


class _WindowCountPlan:
    """`ClipStart` / `NewestFrames` (`cofx.growing_window`), one window per step. State: ``seen`` (B, 1), the
    windows each row has had; each row's window is rolled (or its frame read) by its own count."""

    def __init__(self, name: str, k):
        self.name, self.k = name, k
        self.fields = ["seen"]

    def from_eager(self, batch: int, dtype, device) -> List[torch.Tensor]:
        return [torch.full((batch, 1), self.k.seen or 0, dtype=torch.long, device=device)]

    def step(self, x, ready, state):
        k, seen = self.k, state[0]
        shape = [1] * x.dim()
        shape[k.t] = k.frames
        frames = torch.arange(k.frames, device=x.device).view(shape)
        row = _rows(seen[:, 0], x, k.b)
        if isinstance(k, ClipStart):   # the frames so far first: frame i of the window is frame i + shift
            shift = (k.frames - 1 - row).clamp(min=0)
            out = torch.gather(x, k.t, ((frames + shift) % k.frames).expand(x.shape))
        else:   # the newest frame: frame `seen` of an early window, the last of a full one
            size = list(x.shape)
            size[k.t] = 1
            out = torch.gather(x, k.t, row.clamp(max=k.frames - 1).expand(size))
        seen1 = seen + 1 if ready is None else seen + ready.to(seen.dtype).unsqueeze(1)
        return out, ready, [seen1]


_OWN_STATE = (_RecurrentPlan, _WindowCountPlan)   # plans that make their initial state themselves


# ---- the whole step -------------------------------------------------------------------------------

def nan_where_not(value, ready: torch.Tensor, b: Optional[int]):
    """An output with NaN in the rows (along its batch axis `b`) where `ready` is False."""
    if not (isinstance(value, torch.Tensor) and value.is_floating_point() and b is not None):
        return value
    shape = [1] * value.dim()
    shape[b] = -1
    return torch.where(ready.reshape(shape), value, torch.full_like(value, float("nan")))


def _check_one_frame_per_step(co) -> None:
    """A fixed-shape step takes one frame and gives one: refuse models whose output, or the input of a
    recurrent layer, has more frames than the model's input (padding at the start of time adds frames that
    the eager step emits all at once)."""
    frames = co._info["clip_shape"][co._info["time_dim"]]
    for name, k in co._named_kernels():
        if isinstance(k, K.Recurrent) and k.window > frames:
            raise NotSteppable(f"the recurrent layer '{name}' takes {k.window} frames of a {frames}-frame clip: the "
                               "frames padding adds at the start cannot run one per step")
    for node in co.step_graph.nodes:
        rows = node.kwargs.get("rows") if node.op == "call_function" and node.target is K.reshape else None
        if rows and any(r != 1 for r in rows):
            raise NotSteppable(f"'{node.name}' holds {max(rows)} rows per stream (persons or joints folded into the "
                               "batch): a fixed-shape step keeps one row per stream")
    out = next(n for n in co.graph.nodes if n.op == "output").args[0]
    for leaf in tree_flatten(out)[0]:
        if not isinstance(leaf, torch.fx.Node) or not isinstance(leaf.meta.get("cofx_layout"), tuple):
            continue
        axes = [i for i, lab in enumerate(leaf.meta["cofx_layout"]) if lab in ("T", "BT")]
        given = leaf.meta["cofx_runs"]["clip"].shape[axes[0]] if len(axes) == 1 else 0
        if given > frames:
            raise NotSteppable(f"the model gives {given} frames for a {frames}-frame clip: a fixed-shape step gives "
                               "one frame per frame")


class MaskedStep:
    """One step of `co` with explicit state: ``step(x, reset, state) -> (out, ready, new_state)``.

    ``x`` is one frame with its time axis (B, C, 1, …); ``reset`` (B,) bool or None
    restarts rows from the initial state before the step; ``out`` is the step
    graph's output (time axis of size 1), defined only where ``ready`` (B,) is
    True (``ready`` is None when every row is always ready). Built for one dtype
    and device; it reads `co`'s kernels' configuration and weights, never their
    state (building it runs `co` on a short stream and restores its state).
    """

    def __init__(self, co, dtype: torch.dtype, device):
        self.co = co
        self.dtype, self.device = dtype, torch.device(device)
        self.graph = co.step_graph
        self.time_dim = co._info["time_dim"]
        self.out_time_axes = co._info["out_time_axes"]
        replicate_all = co._ctx.init == "replicate"
        _check_one_frame_per_step(co)
        self.plans = {}
        for node in self.graph.nodes:
            if node.op != "call_module":
                continue
            mod = co.get_submodule(node.target)
            if isinstance(mod, K.Sliding):
                self.plans[node] = _SlidingPlan(node.target, mod, mod.replicate or replicate_all)
            elif isinstance(mod, K.Align):
                self.plans[node] = _AlignPlan(node.target, mod)
            elif isinstance(mod, K.Recurrent):
                self.plans[node] = _RecurrentPlan(node.target, mod)
            elif isinstance(mod, (ClipStart, NewestFrames)):
                self.plans[node] = _WindowCountPlan(node.target, mod)
            elif isinstance(mod, K.Stateful):
                raise NotSteppable(f"kernel '{node.target}' ({type(mod).__name__}) has no fixed-shape step yet: "
                                   "ONNX export and streams out of phase are not supported for this model")
        self.order = list(self.plans)
        primed, primed2, seen, slots, own = _prime(
            co, dtype, self.device, {p.name: p.k for p in self.plans.values() if not isinstance(p, _OWN_STATE)},
            [p for p in self.plans.values() if isinstance(p, _OWN_STATE)])
        self.init: List[torch.Tensor] = []
        self.state_names: List[str] = []
        self._slices = {}
        for node in self.order:
            plan = self.plans[node]
            if isinstance(plan, _AlignPlan):
                plan.set_slots(slots[plan.name])
            at = len(self.init)
            self.init += own[plan.name] if isinstance(plan, _OWN_STATE) else \
                _initial(plan, primed[plan.name], primed2[plan.name], seen.get(plan.name), dtype, self.device)
            self._slices[node] = (at, len(self.init))
            self.state_names += [f"{plan.name}.{f}" for f in plan.fields]
        self._compact = [_compact(i) for i in self.init]   # what reset_rows broadcasts
        self._modules = {n.target: co.get_submodule(n.target) for n in self.graph.nodes if n.op == "call_module"}
        self.pins = {}
        self.pin = False   # see `exporting`
        self.out_batch_axes = self._output_batch_axes()
        ahead = any(k.get("next_j") or any(p.numel() for p in k.get("pending") or ()) for k in primed.values()) or \
            any(int(state[-1].max()) > 0 for state in own.values())   # (the frames a recurrent layer or window saw)
        self._check_against_eager(ahead)

    def _check_against_eager(self, ahead: bool) -> None:
        """This step and the eager steps side by side from a clean state on a random stream of two rows: a model
        whose fixed-shape step answers otherwise is refused, as `convert` refuses a conversion that does not match
        its model. Where the priming ran some kernel `ahead` (start padding that completes windows before the first
        frame), as long as the priming's stream (past the delay, the windows and a stride): one branch a frame ahead
        of another into a window over the clip cannot be paired one frame per step. Elsewhere the step starts level
        with the eager steps, and a few periods past its windows over the clip are checked. Values are compared at
        the scale of each output over the whole stream (a frame where an output happens to be small holds its
        rounding to that output's size), to `ROUNDING` times the validation's tolerance: a step that cannot follow
        errs by the outputs' own size."""
        from .verify import worst_error
        co, t = self.co, self.time_dim
        frame_shape = tuple(co._info["frame_shape"])
        frames = self.check_frames = warmup_steps(co) if ahead else min(warmup_steps(co), 2 * co.period + 6 + max(
            (p.k.frames for p in self.plans.values() if isinstance(p, _WindowCountPlan)), default=0))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((2, *frame_shape[:t - 1], frames, *frame_shape[t - 1:]), generator=gen, dtype=torch.float64)
        x = x.to(device=self.device, dtype=self.dtype)
        state = self.initial_state(2)
        compared: dict = {}   # output leaf -> (its values here, the eager step's), frame after frame
        why = None
        with scratch_stream(co), torch.no_grad():
            co.clean_state()
            for i in range(frames):
                frame = x.narrow(t, i, 1)
                want = co.forward_steps(frame)
                out, readies, state = self.step(frame, None, state, per_output=True)
                leaves = tree_flatten(out)[0]
                wanted = [None] * len(leaves) if want is None else tree_flatten(want)[0]
                for k, (got, ready, value) in enumerate(zip(leaves, readies, wanted)):   # each output when due
                    given = value is not None and (not isinstance(value, torch.Tensor) or value.numel() > 0)
                    due = given if ready is None else bool(ready.all())
                    if given != due or ready is not None and bool(ready.any()) != due:
                        why = f"gives an output {'later' if given else 'earlier'} than the steps at frame {i}"
                        break
                    if given and isinstance(value, torch.Tensor):
                        ours, theirs = compared.setdefault(k, ([], []))
                        ours.append(got.reshape(-1))
                        theirs.append(value.reshape(-1))
                if why:
                    break
        for ours, theirs in compared.values() if why is None else ():
            error, tolerance = worst_error((torch.cat(ours), torch.cat(theirs)))
            tolerance *= ROUNDING   # its plain ops round otherwise than the timed ones
            if not error <= tolerance:
                why = f"computes another value than the steps (max error {error:.3g}, tolerance {tolerance:.3g})"
        if why:
            raise NotSteppable(f"the fixed-shape step of this model (ONNX export, streams out of phase) {why} on a "
                               "stream: start padding runs a branch of the model ahead of another in a way one "
                               "frame per step cannot express; the model still steps in phase in PyTorch")

    def exporting(self, on: bool = True) -> None:
        """Trace-friendly steps: the plain implementation of every op (the ones chosen by timing read sizes
        off tensors, which a trace records as dynamic), and kernel outputs reshaped to their static shapes."""
        self.pin = on
        for plan in self.plans.values():
            if isinstance(plan, _SlidingPlan):
                plan.plain = on
            else:
                plan.check = not on

    def _output_batch_axes(self) -> list:
        """Batch axis of each output leaf (None for leaves that are not batched tensors); fills `self.pins`.

        `pins` holds, for the output of every `Sliding` kernel and for its input (key
        ``(node, "in")``), its shape with -1 on the batch axis: an exported graph
        reshapes to it, so that every size but the batch is static in the file,
        whatever a kernel's compute read off its input.
        """
        t = self.time_dim
        frame = tuple(self.co._info["frame_shape"])
        leaves, records = [], []
        with torch.no_grad():
            for batch in (1, 2):
                x = torch.zeros((batch, *frame[:t - 1], 1, *frame[t - 1:]), dtype=self.dtype, device=self.device)
                records.append({})
                out, _, _ = self.step(x, None, self.initial_state(batch), record=records[-1])
                leaves.append(tree_flatten(out)[0])
        for node, one in records[0].items():
            two = records[1][node]
            if isinstance(one, list):
                pins = [_pin_shape(u, v) for u, v in zip(one, two)]
                if all(p is not None for p in pins):
                    self.pins[node] = pins
            elif _pin_shape(one, two) is not None:
                self.pins[node] = _pin_shape(one, two)
        axes = []
        for one, two in zip(*leaves):
            if not isinstance(one, torch.Tensor) or one.shape == two.shape:
                axes.append(None)
            else:
                axes.append(_batch_axis(one, two, "an output"))
        return axes

    # -- state -------------------------------------------------------------------------------------
    def initial_state(self, batch: int) -> List[torch.Tensor]:
        return [s.expand(batch, *s.shape[1:]).clone() for s in self.init]

    def reset_rows(self, state: Sequence[torch.Tensor], rows: torch.Tensor) -> List[torch.Tensor]:
        """`state` with the rows where `rows` (B,) is True set to the initial state."""
        return [torch.where(_rows(rows, s), i, s) for s, i in zip(state, self._compact)]

    def from_eager(self, batch: int) -> List[torch.Tensor]:
        """The state equal to `co`'s current eager state (streams in phase) for `batch` streams."""
        state = []
        for node in self.order:
            plan, (lo, hi) = self.plans[node], self._slices[node]
            if isinstance(plan, _OWN_STATE):
                state += plan.from_eager(batch, self.dtype, self.device)
                continue
            k = plan.k
            eager = _kernel_state(k)
            if all(v is None for v in eager.values()):   # not started
                state += [s.expand(batch, *s.shape[1:]).clone() for s in self.init[lo:hi]]
                continue
            if isinstance(plan, _SlidingPlan):
                if plan.has_buf:
                    state.append(eager["buf"].movedim(plan.b, 0))
                state.append(torch.tensor([[eager["m"], eager["next_j"]]], device=self.device).expand(batch, 2)
                             .clone())
                continue
            counts = []
            for p, a, b, slots in zip(eager["pending"], k.axes, plan.b, plan.slots):
                have = p.shape[a]
                if have > slots:
                    raise NotSteppable(f"'{plan.name}' holds {have} frames, more than the {slots} slots of its "
                                       "fixed-shape step")
                if slots:
                    shape = list(p.shape)
                    shape[a] = slots - have
                    state.append(torch.cat([p.new_zeros(shape), p], a).movedim(b, 0))
                counts.append(have)
            state.append(torch.tensor([counts], device=self.device).expand(batch, len(counts)).clone())
        return state

    # -- the step ----------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, reset: Optional[torch.Tensor], state: Sequence[torch.Tensor], record=None,
             per_output: bool = False):
        """(output, ready, next state): `ready` (B,) where every output with time has its frame (None: always),
        or with `per_output` a list of each output leaf's own."""
        if reset is not None:
            state = self.reset_rows(state, reset)
        state = list(state)
        new_state: List[Optional[torch.Tensor]] = [None] * len(state)
        slices = self._slices
        env, ready = {}, {}
        co = self.co
        out_value = out_ready = None
        for node in self.graph.nodes:
            op = node.op
            if op == "placeholder":
                env[node], ready[node] = x, None
                continue
            if op == "output":
                leaves, spec = tree_flatten(fx.node.map_arg(node.args[0], lambda a: a))
                axes, _ = tree_flatten(self.out_time_axes, is_leaf=lambda a: a is None)
                values = [env[leaf] if isinstance(leaf, fx.Node) else leaf for leaf in leaves]
                own = [ready.get(leaf) if isinstance(leaf, fx.Node) and ax is not None else None
                       for leaf, ax in zip(leaves, axes)]
                out_ready = own if per_output else _and(own)
                out_value = tree_unflatten(values, spec)
                break
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            r_in = _and(ready.get(a) for a in node.all_input_nodes)
            if op == "get_attr":
                value = _fetch(co, node.target)
            elif op == "call_module":
                plan = self.plans.get(node)
                if plan is None:
                    mod = self._modules[node.target]
                    if self.pin and isinstance(mod, K.FrameConv) and callable(getattr(mod, "compute", None)):
                        value = mod.compute(*args, **kwargs)   # the plain conv: static shapes when traced
                    else:
                        value = mod(*args, **kwargs)
                else:
                    a, b = slices[node]
                    if isinstance(plan, _SlidingPlan):
                        frames = args[0]   # static in an export too, whatever op made it (a unfold needs that)
                        if record is not None:
                            record[(node, "in")] = tuple(frames.shape)
                        elif self.pin and (node, "in") in self.pins:
                            frames = _pin(frames, self.pins[(node, "in")], x)
                        value, r_in, new = plan.step(frames, ready.get(node.args[0]), state[a:b], args[1:])
                    elif isinstance(plan, _OWN_STATE):   # a recurrent layer's r_in: that of each of its outputs
                        value, r_in, new = plan.step(args[0], ready.get(node.args[0]), state[a:b])
                    else:
                        value, r_in, new = plan.step(args, [ready.get(n) for n in node.args], state[a:b])
                    if record is not None and not isinstance(plan, _RecurrentPlan):   # its shapes are static
                        record[node] = [tuple(v.shape) for v in value] if isinstance(value, tuple) \
                            else tuple(value.shape)
                    elif self.pin and node in self.pins:
                        value = tuple(_pin(v, p, x) for v, p in zip(value, self.pins[node])) \
                            if isinstance(value, tuple) else _pin(value, self.pins[node], x)
                    new_state[a:b] = new
            elif op == "call_function":
                fn = _LAYOUT.get(node.target, node.target)
                value = fn(*args, **kwargs)
                if fn is operator.getitem and isinstance(ready.get(node.args[0]), tuple):
                    r_in = ready[node.args[0]][node.args[1]]   # one output of a recurrent layer
            else:   # call_method
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            env[node] = value
            ready[node] = r_in if _streamed(value) else None
        return out_value, out_ready, new_state


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---- the initial state ----------------------------------------------------------------------------

def _kernel_state(k):
    if isinstance(k, K.Sliding):
        return dict(buf=None if k.buf is None else k.buf.clone(), m=k.m, next_j=k.next_j)
    return dict(pending=None if k.pending is None else [p.clone() for p in k.pending])


ROUNDING = 100   # how much more rounding than the validation allows a backend's other kernels may add


def warmup_steps(co) -> int:
    """Steps after which every kernel has started and the arrivals at every merge repeat: the warm-up
    (``co.warmup_frames``), a stride and two frames more."""
    return co.warmup_frames + co.stride + 2


def _prime(co, dtype, device, kernels: dict, own: list):
    """Eager kernel states after a 0-frame chunk for 1 and for 2 streams, and during a short stream.

    Returns (primed states of 1 stream, of 2 streams, last seen states of the
    stream, Align slots, the initial states of the `own` plans: theirs after the
    priming of 1 stream, which start padding may reach, a zero frame before an
    LSTM). The stream (1 stream of zeros) runs past the delay and a few strides, so
    that every pattern of arrivals at the merges has occurred; the most frames an
    `Align` input ever holds is its number of slots.
    """
    t = co._info["time_dim"]
    frame_shape = tuple(co._info["frame_shape"])
    steps = warmup_steps(co)
    primed = []
    with scratch_stream(co), torch.no_grad():
        for batch in (1, 2):
            co.clean_state()
            try:
                out = co._primed(torch.zeros((batch, *frame_shape[:t - 1], 0, *frame_shape[t - 1:]), dtype=dtype,
                                             device=device))
            except RuntimeError as e:   # a branch primed with frames meets one without (rows of two sizes)
                raise NotSteppable("the fixed-shape step of this model (ONNX export, streams out of phase) cannot "
                                   "start it: start padding runs a branch of the model ahead of another in a way one "
                                   f"frame per step cannot express ({first_line(e)}); the model still steps in phase "
                                   "in PyTorch") from None
            if any(isinstance(v, torch.Tensor) and v.numel() for v in tree_flatten(out)[0]):
                raise NotSteppable("the model gives output frames before its first input frame (padding at the "
                                   "start of time reaches its output): a fixed-shape step, one frame out per frame "
                                   "in, would lose them")
            primed.append({n: _kernel_state(k) for n, k in kernels.items()})
            if batch == 1:
                own_state = {plan.name: plan.from_eager(1, dtype, device) for plan in own}
        co.clean_state()
        frame = torch.zeros((1, *frame_shape), dtype=dtype, device=device)
        slots = {n: [0] * len(k.axes) for n, k in kernels.items() if isinstance(k, K.Align)}
        seen = {}
        for _ in range(steps):
            co.forward_steps(frame.unsqueeze(t))
            for n, k in kernels.items():
                if isinstance(k, K.Sliding):
                    if k.buf is not None and n not in seen:
                        seen[n] = _kernel_state(k)
                elif k.pending is not None:
                    slots[n] = [max(s, p.shape[a]) for s, p, a in zip(slots[n], k.pending, k.axes)]
    for n, k in kernels.items():
        if isinstance(k, K.Sliding) and n not in seen:
            raise NotSteppable(f"kernel '{n}' received no frame in {steps} steps")
        if primed[0][n].get("pending") is not None:   # what priming left must fit too
            slots[n] = [max(s, p.shape[a]) for s, p, a in zip(slots[n], primed[0][n]["pending"], k.axes)]
    return primed[0], primed[1], seen, slots, own_state


def _batch_axis(one: torch.Tensor, two: torch.Tensor, what: str) -> int:
    """The axis where a state of 1 stream has size 1 and the same state of 2 streams size 2."""
    if one.dim() == two.dim():
        diff = [i for i, (u, v) in enumerate(zip(one.shape, two.shape)) if u != v]
        if len(diff) == 1 and (one.shape[diff[0]], two.shape[diff[0]]) == (1, 2):
            return diff[0]
        if len(diff) == 1 and two.shape[diff[0]] == 2 * one.shape[diff[0]]:
            raise NotSteppable(f"the state of {what} holds {one.shape[diff[0]]} rows per stream (persons or joints "
                               "folded into the batch): a fixed-shape step keeps one row per stream")
    raise NotSteppable(f"cannot tell the batch dimension of the state of {what} "
                       f"({tuple(one.shape)} for 1 stream, {tuple(two.shape)} for 2)")


def _check_burst(plan: "_SlidingPlan"):
    """A kernel that starts on its first frame (replicate padding) must not complete several windows then."""
    k = plan.k
    windows = k.geometry.first_frame_windows()
    if windows > 1:
        raise NotSteppable(
            f"kernel '{plan.name}' pads the start of the stream by repeating its first frame {k.pad_l} times, so "
            f"that frame completes {windows} windows at once; a one-frame step cannot express "
            "that burst (" + ("its padding is the model's: pad with zeros or a constant there" if k.replicate else
                              "convert with init='zeros'") + ")")


def _initial(plan, primed: dict, primed2: dict, seen: Optional[dict], dtype, device) -> List[torch.Tensor]:
    """The plan's state tensors for 1 stream (batch first), equal to the primed eager state."""
    if isinstance(plan, _SlidingPlan):
        if primed["buf"] is None:   # waits for its first frame (replicate start padding)
            if not plan.replicate_start:
                raise NotSteppable(f"kernel '{plan.name}' did not start on an empty chunk")
            _check_burst(plan)
            if plan.out_b is None:
                raise NotSteppable(f"cannot tell the batch dimension of the state of '{plan.name}'")
            plan.b = plan.out_b
            ref = seen["buf"].movedim(plan.b, 0)
            buf = torch.zeros((1, *ref.shape[1:]), dtype=dtype, device=device)
            pos = torch.tensor([[-1, 0]], device=device)
        else:
            plan.b = _batch_axis(primed["buf"], primed2["buf"], f"'{plan.name}'")
            buf = primed["buf"].movedim(plan.b, 0)
            pos = torch.tensor([[primed["m"], primed["next_j"]]], device=device)
        return ([buf] if plan.has_buf else []) + [pos]
    out, counts = [], []
    for i, (a, slots, p, q) in enumerate(zip(plan.k.axes, plan.slots, primed["pending"], primed2["pending"])):
        one, two = list(p.shape), list(q.shape)
        one[a] = two[a] = 0
        b = _batch_axis(p.new_empty(one), q.new_empty(two), f"input {i} of '{plan.name}'")
        plan.b[i] = b
        have = p.shape[a]
        counts.append(have)
        if slots:
            shape = list(p.shape)
            shape[a] = slots - have
            out.append(torch.cat([p.new_zeros(shape), p], a).movedim(b, 0))
    return out + [torch.tensor([counts], device=device)]
