"""`ContinualModule`: the converted model. Same weights and `forward`; adds step functions."""
from __future__ import annotations

import inspect
from itertools import repeat
from typing import Optional

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import modes
from .compiled_step import CompiledSteps
from .errors import ConversionError, LengthNotTaken, NotATensor, StreamError, first_line
from .flat_step import flat_step_module
from .growing_window import NewestFrames
from .kernels import STATE_FIX, Align, Kernel, Sliding, Stateful, StreamContext, state_spec
from .masked_step import warmup_steps
from .report import Report
from .stream_position import StreamPosition
from .scratch_stream import scratch_stream
from .streams import CHILD as STREAMS_CHILD, OutOfPhase, restart_streams, set_ready
from .tracer import adopt_attributes


class ContinualModule(fx.GraphModule):
    """A GraphModule of the original model that can also process a stream frame by frame.

    - ``co(x)`` / ``co.forward(x)``: the original model, same ops, same weights;
    - ``co.forward_steps(x, pad_end=False, update_state=True)``: a chunk (B, C, T, ...) in,
      the output frames that became available out (time at dim 2 for a
      classifier: (B, K, n)), or None;
    - ``co.forward_step(x_t)``: one frame (B, C, ...) in, the next output frame or None;
    - ``co.clean_state()``, ``co.get_state()``, ``co.set_state(state)``;
    - ``co.delay``, ``co.receptive_field``, ``co.stride``, ``co.is_exact``, ``co.report``;
    - ``print(co.step_code)`` shows the continual graph as Python.
    """

    def __init__(self, traced: fx.GraphModule, step_graph: fx.Graph, kernels: dict, ctx: StreamContext,
                 info: dict, newest_graph: Optional[fx.Graph] = None):
        super().__init__(traced, traced.graph, class_name=type(traced).__name__)
        adopt_attributes(self, traced)
        self.meta.update(traced.meta)
        for name, kernel in kernels.items():
            self.add_module(name, kernel)
        self.__dict__["_ctx"] = ctx
        self.__dict__["_info"] = info
        self.__dict__["_step_graph"] = step_graph
        self.__dict__["_step_module"] = flat_step_module(self, step_graph)
        # per-frame outputs of causal attention: once every window is full, the step computes its newest row only
        self.__dict__["_newest_module"] = None if newest_graph is None else flat_step_module(self, newest_graph)
        self.__dict__["_growing"] = [k for k in kernels.values() if isinstance(k, NewestFrames)]
        self.__dict__["_position"] = StreamPosition()
        set_ready(self, None)   # before a stream's first step
        self.__dict__["_compiled"] = None    # CompiledSteps, see compile_steps()
        self.__dict__["_report"] = None
        self.__dict__["_call_mode"] = "forward"
        # the modules whose training mode changes what a step would compute (their dicts, read in a C loop)
        self.__dict__["_moded"] = [m.__dict__ for m in traced.modules()
                                   if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))]

    def recompile(self):
        """The graph's forward, which is the model's own forward while any module trains: the graph was traced
        in eval mode, so it holds the eval branches of `if self.training` and of `F.dropout(training=...)`."""
        code = super().recompile()
        cls = type(self)
        graph_forward = cls.forward

        def forward(self, *args, **kwargs):
            model = self.__dict__.get("_info", {}).get("model")
            if model is not None and (self.training or any(m.training for m in self.modules())):
                was, model.training = model.training, self.training
                try:
                    return model(*args, **kwargs)
                finally:
                    model.training = was
            return graph_forward(self, *args, **kwargs)
        forward.__signature__ = inspect.signature(graph_forward)
        cls.forward = forward
        return code

    # -- calling ---------------------------------------------------------------------------------
    @property
    def call_mode(self) -> str:
        return self._call_mode

    @call_mode.setter
    def call_mode(self, mode: str) -> None:
        self.__dict__["_call_mode"] = modes.check_mode(mode)

    def __call__(self, *args, **kwargs):
        mode = modes.active_mode() or self._call_mode
        if mode == "forward_step":
            return self.forward_step(*args, **kwargs)
        if mode == "forward_steps":
            return self.forward_steps(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def forward_steps(self, x: torch.Tensor, pad_end: bool = False, update_state: bool = True):
        """Process a chunk of frames (time at `time_dim`); returns the outputs that became available, or None.

        With ``pad_end=True`` each op's end padding is flushed and the stream ends
        (the state is cleaned): from a clean state, ``forward_steps(clip, pad_end=True)``
        equals ``forward(clip)``.
        """
        self._check_input(x, with_time=True)
        return self._run(x, pad_end, update_state)

    def forward_step(self, x: torch.Tensor, update_state: bool = True):
        """Process one frame (no time axis); returns the next output frame, or None."""
        self._check_input(x, with_time=False)
        return self._run(x, False, update_state, framewise=True)

    def _step_call(self, x: torch.Tensor):
        """One eager step of chunk `x`: the newest-row program once every growing window is full."""
        if self._newest_module is not None and all(k.full() for k in self._growing):
            return self._newest_module(x)
        return self._step_module(x)

    def _run(self, x, pad_end, update_state, framewise=False):
        """A chunk, or one frame without its time axis (`framewise`, whose output is `_frame_output`'s)."""
        position = self._position
        position.compiled = False
        self._mode_of_state()
        if any(map(dict.get, self._moded, repeat("training"))) or \
                (self.training and self._info.get("training_differs", False)):
            moded = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
            which = [f"'{n}' ({type(m).__name__})" for n, m in self.named_modules() if isinstance(m, moded) and m.training]
            raise StreamError(f"{', '.join(which[:3]) + (' ...' if len(which) > 3 else '') or 'the model'} "
                              f"{'is' if len(which) < 2 else 'are'} in training mode where a step would compute "
                              "otherwise: a BatchNorm would normalise each chunk by its own statistics, a Dropout "
                              "would drop frames at random, and branches on self.training were traced in eval "
                              "mode; call co.eval() before stepping")
        if position.batch is not None and x.shape[0] != position.batch:
            raise StreamError(f"the batch size changed mid-stream from {position.batch} to {x.shape[0]}: "
                              "each row of the batch is one stream; call co.clean_state() to start new streams")
        t = self._info["time_dim"]
        frames, n = position.frames, 1 if framewise else x.shape[t]
        if n == 0 and frames == 0 and not pad_end:
            # an empty chunk before a stream's first frame: nothing is due yet (the frames start padding makes
            # are due with the frames they pad, on every branch alike: run now, a padded branch would run ahead)
            position.batch = x.shape[0]
            set_ready(self, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
            return None
        self._ctx.batch = x.shape[0]   # kernels read it in eager steps, and in the steps a recording runs
        compiled = self._compiled
        if compiled is not None and compiled.applies_to(n) and update_state and not pad_end \
                and frames is not None and frames >= compiled.start and not torch.is_grad_enabled() \
                and not self._streams_out_of_phase():   # (no module trains: refused above otherwise)
            out = compiled(x, frames, framewise)   # the output as returned (None when empty), state advanced
            position.frames = frames + n
            set_ready(self, compiled.ready)
            return out
        self._check_state(x)
        if framewise:
            x = x.unsqueeze(t)
        if self._streams_out_of_phase():   # streams restarted apart (clean_state(streams=...))
            position.frames = None
            out = self._modules[STREAMS_CHILD].run(x, pad_end, update_state)
            return self._frame_output(out) if framewise else out
        saved = None if update_state else self._snapshot()
        ctx = self._ctx
        position.batch, position.like = x.shape[0], x.new_empty(0)
        try:
            out = self._step_call(x)
            if pad_end:
                ctx.flushing = True
                try:
                    tail = self._step_call(x.narrow(t, 0, 0))
                except Exception as e:
                    raise self._flush_error(e, None if frames is None else frames + n) from e
                finally:
                    ctx.flushing = False
                out = self._concat(out, tail)
        finally:
            if saved is not None:
                self._restore(saved)
            elif pad_end:
                self.clean_state()
            else:
                position.frames = None if frames is None else frames + n
                if torch.is_grad_enabled():   # the next call must not backpropagate into this one
                    for k in self._kernels():
                        k.detach_state()
        frames = self._frames_per_output(out)
        if frames and not any(frames):
            out = None
        set_ready(self, torch.full((x.shape[0],), out is not None and all(frames), device=x.device))
        return self._frame_output(out) if framewise else out

    def _primed(self, x: torch.Tensor):
        """Empty chunk `x` through the kernels of a clean stream, each giving what its start padding alone
        completes: the state a fixed-shape step starts from (`masked_step`). A user's empty chunk before the
        first frame runs nothing (`_run`)."""
        self._ctx.batch = x.shape[0]
        self._position.batch, self._position.like = x.shape[0], x.new_empty(0)
        return self._step_call(x)

    def _flush_error(self, error: Exception, frames: Optional[int]) -> Exception:
        """Why ending a stream of `frames` frames failed: a length the model itself does not take (branches
        strided apart that end at different frames) gets a `StreamError` (`LengthNotTaken`) saying so; any other
        error is left as it is."""
        if frames is None or isinstance(error, (StreamError, ConversionError)):
            return error
        shape = list(self.clip_shape)
        shape[self._info["time_dim"]] = frames
        p = next(iter(self.parameters()), None)
        try:
            with torch.no_grad():
                self.forward(torch.zeros(shape, dtype=p.dtype if p is not None else torch.float32,
                                         device=p.device if p is not None else None))
        except Exception as clip_error:
            return LengthNotTaken(f"the stream ended after {frames} frames, a length the model itself does not take: "
                               f"its forward fails on a clip of {frames} frames too ({type(clip_error).__name__}: "
                               f"{first_line(clip_error)}); end streams at a length the model takes (the example's "
                               f"{self.clip_shape[self._info['time_dim']]} frames, for one)")
        return error

    def _mode_of_state(self) -> None:
        """A stream begun under ``torch.inference_mode()`` goes on outside it: its state (inference tensors, which
        cannot be updated in place there) is handed over as ordinary tensors."""
        position, inference = self._position, torch.is_inference_mode_enabled()
        if position.inference and not inference:
            self.set_state(self.get_state())
        position.inference = inference

    def _streams_out_of_phase(self) -> bool:
        streams = self._modules.get(STREAMS_CHILD)
        return streams is not None and streams.active

    def _frame_axes(self, out) -> list:
        """Per output of a step on one frame, the time axis `forward_step` takes off (that of a timed output of
        one frame), or None."""
        leaves, _ = tree_flatten(out)
        axes, _ = tree_flatten(self._info["out_time_axes"], is_leaf=lambda a: a is None)
        return [a if a is not None and v.shape[a] == 1 else None for v, a in zip(leaves, axes)]

    def _frame_output(self, out):
        """A step's output of one frame as `forward_step` returns it: each timed output without its time axis,
        None for one that has no frame at this step (outputs of several delays or strides)."""
        if out is None:
            return None
        leaves, spec = tree_flatten(out)
        axes, _ = tree_flatten(self._info["out_time_axes"], is_leaf=lambda a: a is None)
        if any(a is not None and v.shape[a] > 1 for v, a in zip(leaves, axes)):
            n = max(v.shape[a] for v, a in zip(leaves, axes) if a is not None)
            raise StreamError(f"this frame completed {n} output frames (the model gives more frames than it takes, "
                              "as padding at the start of time does), which forward_step cannot return one by one; "
                              "call co.clean_state() and step with forward_steps, which returns every frame")
        return tree_unflatten([v if a is None else v.squeeze(a) if v.shape[a] == 1 else None
                               for v, a in zip(leaves, axes)], spec)

    def _concat(self, a, b):
        la, spec = tree_flatten(a)
        lb, _ = tree_flatten(b)
        axes, _ = tree_flatten(self._info["out_time_axes"], is_leaf=lambda v: v is None)
        return tree_unflatten([torch.cat([u, v], ax) if ax is not None else u for u, v, ax in zip(la, lb, axes)],
                              spec)

    def _frames_per_output(self, out) -> list:
        """The number of frames of each output that has a time axis."""
        leaves, _ = tree_flatten(out)
        axes, _ = tree_flatten(self._info["out_time_axes"], is_leaf=lambda v: v is None)
        return [v.shape[a] for v, a in zip(leaves, axes) if a is not None]

    def _none_if_empty(self, out):
        frames = self._frames_per_output(out)
        return None if frames and not any(frames) else out

    def _check_input(self, x, with_time: bool) -> None:
        info = self._info
        if not isinstance(x, torch.Tensor):
            raise NotATensor(f"expected a tensor, got {type(x).__name__}" +
                             ("; torch.from_numpy(x) makes one" if type(x).__module__ == "numpy" else ""))
        t = info["time_dim"]
        frame = tuple(info["frame_shape"])
        if with_time:
            ok = x.dim() == len(frame) + 2 and tuple(x.shape[1:t]) + tuple(x.shape[t + 1:]) == frame
        else:
            ok = x.dim() == len(frame) + 1 and tuple(x.shape[1:]) == frame
        if not ok:   # (the message is built only then: this check runs before every step)
            unbatched = x.dim() == len(frame) + with_time and \
                tuple(x.shape[:t - 1]) + tuple(x.shape[t - 1 + with_time:]) == frame
            if with_time:
                want = "(B, " + ", ".join(map(str, frame[:t - 1])) + (", " if t > 1 else "") + "T" + \
                       "".join(f", {s}" for s in frame[t - 1:]) + ")"
                hint = "for a single frame without a time axis use forward_step" if x.dim() == len(frame) + 1 \
                    else "convert with an example_input of this frame size"
            else:
                want = "(B, " + ", ".join(map(str, frame)) + ")"
                hint = "for a chunk with a time axis use forward_steps" if x.dim() == len(frame) + 2 else \
                    "convert with an example_input of this frame size"
            if unbatched:
                hint = "add the batch dimension of streams (x.unsqueeze(0) for one stream)"
            raise StreamError(f"expected input shaped {want}, got {tuple(x.shape)}; {hint}")
        if x.shape[0] == 0:
            raise StreamError("the input holds no stream (a batch of 0): each row of the batch is one stream; "
                              "skip the call while no stream runs")
        p = self._first_float_parameter()
        if p is not None and x.dtype != p.dtype:
            model = f" or the model (co.to({x.dtype}))" if x.is_floating_point() else ""
            raise StreamError(f"input dtype {x.dtype} differs from the model's {p.dtype}; "
                              f"convert the input (x.to({p.dtype})){model}")
        if p is not None and x.device != p.device:
            raise StreamError(f"input is on {x.device} but the model is on {p.device}; move one of them")

    def _first_float_parameter(self) -> Optional[torch.Tensor]:
        """The model's first floating-point parameter, whose dtype and device inputs must have. Its slot (the
        dict of its module and its name) is kept: walking the modules before each step costs ~50 us."""
        slot = self.__dict__.get("_dtype_slot")
        p = slot[0].get(slot[1]) if slot is not None else None
        if p is None or not p.is_floating_point():
            name = next((n for n, p in self.named_parameters() if p.is_floating_point()), None)
            if name is None:
                return None
            owner, _, leaf = name.rpartition(".")
            params = self.get_submodule(owner)._parameters
            if not isinstance(params, dict):   # a TorchScript submodule's: read through it each time
                return getattr(self.get_submodule(owner), leaf)
            self.__dict__["_dtype_slot"] = slot = (params, leaf)
            p = slot[0][slot[1]]
        return p

    def _check_state(self, x) -> None:
        """The stream state must be in the dtype and on the device of the input (a compiled step checks this
        itself when it does not continue from its own state); a mask held in the state keeps its own dtype."""
        state = next((s for k in self._kernels() for s in k.state_tensors() if s.is_floating_point()), None)
        if state is not None and (state.dtype != x.dtype or state.device != x.device):
            raise StreamError(f"the stream state is {state.dtype} on {state.device} but the input is {x.dtype} "
                              f"on {x.device}; call co.clean_state() before changing dtype or device")

    def compile_steps(self, backend: Optional[str] = "inductor", *, batch: int = 1,
                      options: Optional[dict] = None, check_weights: bool = True, chunks: tuple = (),
                      verbose: bool = False) -> "ContinualModule":
        """Run steady-state steps as one compiled program per phase (`cofx.compiled_step`); returns self.

        Records and compiles now, for `batch` streams in the model's dtype and on its
        device (other batch sizes, dtypes and devices are recorded when first met,
        mid-stream). A call takes the compiled program when it is one frame, or a chunk
        of one of the lengths in ``chunks`` (catching up on a backlog: ``chunks=(16,)``
        compiles ``forward_steps`` on 16 frames too), with gradients off
        (``torch.no_grad()``/``torch.inference_mode()``), ``update_state=True``, no
        ``pad_end``, and the stream has reached the frame from which its steps repeat
        (``co.compiled_stats.start``); every other call runs eagerly, from the same state.

        backend: ``"inductor"`` (AOTInductor, ahead of time; ``options``: inductor's configs,
        by default frozen weights), another ``torch.compile`` backend (``"eager"`` runs the
        recorded program without compiling it: quick to build, for checks), or None to
        stop compiling steps. Results differ from eager steps by float rounding. The
        windows of temporal ops then live in rings a step writes the new frame into, in
        place (a double ring holds twice a window): state memory grows, see
        ``co.state_bytes``. The weights are baked in and checked before every compiled
        step: a parameter or buffer replaced, written in place or given other memory
        makes the phases be recorded again. A write that bypasses PyTorch's version
        counting (through ``.data`` or a ``.detach()``-ed alias) cannot be seen: call
        ``compile_steps`` again after one. ``check_weights=False`` skips the check, for
        weights that stay frozen while the stream runs (as inductor's ``freezing``
        assumes): the check reads every parameter and buffer before each step, ~0.15-0.2
        ms of a ~7 ms X3D-S step in C++ (built on first use, once per machine: ~40 s;
        ~0.5-0.7 ms in Python where it cannot be built); a change is then not seen until
        ``compile_steps`` is called again.
        """
        if backend is None:
            self.__dict__["_compiled"] = None
            return self
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if any(not isinstance(n, int) or n < 2 for n in chunks):
            raise ValueError(f"chunks must be chunk lengths of at least 2 frames, got {chunks!r}")
        compiled = CompiledSteps(self, backend, options, verbose, check_weights, chunks)
        self.__dict__["_compiled"] = compiled
        try:
            compiled.prepare(batch)
        except BaseException:
            self.__dict__["_compiled"] = None   # eager steps, as before the call
            raise
        return self

    # -- state -------------------------------------------------------------------------------------
    def _kernels(self):
        return [m for _, m in self._named_kernels()]

    def _named_kernels(self):
        # every step reads this list; children change only when a kernel is added (cofx_streams)
        cached = self.__dict__.get("_kernel_list")
        if cached is None or cached[0] != len(self._modules):
            cached = (len(self._modules), [(n, m) for n, m in self.named_children() if isinstance(m, Stateful)])
            self.__dict__["_kernel_list"] = cached
        return cached[1]

    def _snapshot(self) -> dict:
        snap = {n: {s: getattr(k, s) for s in k.state_names} for n, k in self._named_kernels()}
        snap["_position"] = self._position.copy()
        return snap

    def _restore(self, snap: dict) -> None:
        for n, k in self._named_kernels():
            for s, v in snap[n].items():
                setattr(k, s, v)
        saved, position = snap["_position"], self._position   # (in place: a call in progress holds it)
        position.batch, position.frames, position.compiled, position.like = \
            saved.batch, saved.frames, saved.compiled, saved.like

    def clean_state(self, streams=None) -> None:
        """Forget the stream: the next frame starts a new one.

        ``streams``: restart only these rows of the batch (indices, or a (B,) bool
        mask); the other streams continue. The batch then runs out of phase until
        ``clean_state()``: see `cofx.streams` (forward_step fills the rows without an
        output with NaN and sets ``co.ready``).
        """
        position = self._position
        position.compiled = False
        if streams is not None:
            self._mode_of_state()
            if restart_streams(self, streams):
                position.frames = None
                return
        for k in self._kernels():
            k.clean()
        position.batch, position.frames, position.like, position.inference = None, 0, None, False
        set_ready(self, None)

    def get_state(self) -> dict:
        """A copy of the whole stream state; `set_state` resumes from it exactly."""
        state = {n: k.get_state() for n, k in self._named_kernels()}
        state["_stream_batch"] = self._position.batch
        state["_stream_frames"] = self._position.frames
        return state

    def set_state(self, state: dict) -> None:
        """Resume from a `get_state` dict of this model (any point of a stream: clean, mid-warm-up, out of
        phase). The state is checked against the model's own first: a state of another model (other kernel
        sizes, strides, frame sizes), of another dtype or device, or with changed counters is refused with a
        `StreamError` that names the kernel and the entry, and the current state is kept."""
        self._check_new_state(state)
        kernels = dict(self._named_kernels())
        if state.get(STREAMS_CHILD, {}).get("state") is not None and STREAMS_CHILD not in kernels:
            self.add_module(STREAMS_CHILD, OutOfPhase(self))   # a state saved out of phase, on another instance
            kernels = dict(self._named_kernels())
        for n, k in kernels.items():
            if n in state:
                k.set_state(state[n])
            else:
                k.clean()
        self._position.batch, self._position.frames = state["_stream_batch"], state.get("_stream_frames")

    def _check_new_state(self, state) -> None:
        """Raise a `StreamError` unless `state` is one this model's own stream can be in (see `set_state`)."""
        if not isinstance(state, dict):
            raise StreamError(f"set_state takes the dict co.get_state() returns, got {type(state).__name__}")
        kernels = dict(self._named_kernels())
        names = set(kernels) | {STREAMS_CHILD, "_stream_batch", "_stream_frames"}
        # the streams kernel is added on the first partial restart: absent from states saved before; states
        # of earlier versions of cofx do not count frames
        required = names - {STREAMS_CHILD, "_stream_frames"}
        given = set(state)
        if not given <= names or required - given:
            raise StreamError(f"state keys do not match this model: missing {sorted(required - given)}, unexpected "
                              f"{sorted(map(str, given - names))}\n  fix: {STATE_FIX}")
        batch, frames = state["_stream_batch"], state.get("_stream_frames")
        if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
            raise StreamError(f"set_state refused the state: entry '_stream_batch': expected None or a batch size "
                              f"(an int >= 1), got {batch!r}\n  fix: {STATE_FIX}")
        if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool) or frames < 0):
            raise StreamError(f"set_state refused the state: entry '_stream_frames': expected None or a count of "
                              f"frames (an int >= 0), got {frames!r}\n  fix: {STATE_FIX}")
        if batch is None:
            held = next((n for n in kernels if isinstance(state.get(n), dict)
                         and any(v is not None for v in state[n].values())), None)
            if held is not None:
                raise StreamError(f"set_state refused the state: entry '_stream_batch': expected the batch size of "
                                  f"the streams the kernels hold (kernel '{held}' is not clean), got None\n"
                                  f"  fix: {STATE_FIX}")
        ref = self._state_reference()
        dtype, device = self._state_dtype_device(state)
        for n, k in ref.kernels:
            k.check_state(n, state[n], ref.spec1[n], ref.spec2[n], batch, dtype, device)
        sig = tuple(k.state_signature(state[n]) for n, k in ref.kernels)
        if batch is None and any(s is not None for s in sig):
            n = next(n for (n, _), s in zip(ref.kernels, sig) if s is not None)
            raise StreamError(f"set_state refused the state: entry '_stream_batch': expected the batch size of the "
                              f"streams the kernels hold (kernel '{n}' is not clean), got None\n  fix: {STATE_FIX}")
        streams = state.get(STREAMS_CHILD)
        out_of_phase = isinstance(streams, dict) and streams.get("state") is not None
        if STREAMS_CHILD in state:
            child = kernels.get(STREAMS_CHILD) or OutOfPhase(self)
            child.check_state(STREAMS_CHILD, streams, batch, dtype, device, ref)
        if out_of_phase:
            held = next((n for (n, _), s in zip(ref.kernels, sig) if s is not None), None)
            if held is not None:
                raise StreamError(f"set_state refused the state: kernel '{held}': expected None (the streams are "
                                  f"out of phase: '{STREAMS_CHILD}' holds the state of every kernel), got a state"
                                  f"\n  fix: {STATE_FIX}")
            if frames is not None:
                raise StreamError(f"set_state refused the state: entry '_stream_frames': expected None (streams out "
                                  f"of phase have no common count of frames), got {frames}\n  fix: {STATE_FIX}")
            return
        if all(s is None for s in sig):   # clean (or only kernels that wait for their first frame)
            if frames in (None, 0) or ref.at(frames) == sig:
                return
        ref.check_counters(sig, frames)

    def _state_dtype_device(self, state: dict) -> tuple:
        """The dtype and device a state's floating tensors must have: the model's, or (a model without floating
        parameters) those of the state's first floating tensor."""
        p = self._first_float_parameter()
        if p is not None:
            return p.dtype, p.device
        leaves, _ = tree_flatten([v for n, v in state.items() if not n.startswith("_stream")])
        first = next((v for v in leaves if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
        return (None, None) if first is None else (first.dtype, first.device)

    def _state_reference(self) -> "_StateReference":
        ref = self.__dict__.get("_state_ref")
        if ref is None:
            ref = self.__dict__["_state_ref"] = _StateReference(self)
        return ref

    @property
    def state_bytes(self) -> int:
        """Bytes of state the current stream holds (0 before the first step)."""
        return sum(t.numel() * t.element_size() for k in self._kernels() for t in k.state_tensors())

    # -- facts -------------------------------------------------------------------------------------
    @property
    def delay(self) -> int:
        """Steps that return None before the first output (in input frames)."""
        return self._info["delay"]

    @property
    def receptive_field(self):
        """Input frames that one output frame depends on (math.inf after a recurrent layer)."""
        return self._info["receptive_field"]

    @property
    def stride(self) -> int:
        """Input frames per output frame."""
        return self._info["stride"]

    @property
    def period(self) -> int:
        """Input frames after which the steps repeat what they compute (the least common multiple of the
        temporal strides): compiled steps record one program per phase of it."""
        return self._info["period"]

    @property
    def output_time_axes(self):
        """Per output (in the structure of the outputs), the axis `forward_steps` gives its frames along, or
        None for an output `forward_step` returns whole (one value per window)."""
        return self._info["out_time_axes"]

    @property
    def warmup_frames(self) -> int:
        """Frames after which every state buffer is in steady state (the receptive field, or the clip after
        a recurrent layer), plus the delay and one stride."""
        rf = self.receptive_field
        span = rf if rf != float("inf") else self.clip_shape[self._info["time_dim"]]
        return int(self.delay + span + self.stride)

    @property
    def last_step_compiled(self) -> bool:
        """Whether the last `forward_step`/`forward_steps` call ran a compiled program (`compile_steps`).

        False before the stream reaches ``compiled_stats.start``, for calls a compiled program
        does not serve (a chunk of another length, ``pad_end``, a peek, gradients on),
        after ``clean_state()``, and where a loaded model's saved programs could not
        be used: benchmarks and services see which kind of step they measure.
        """
        return self._position.compiled

    @property
    def compiled_stats(self):
        """What compiled steps have done (`cofx.compiled_step.CompiledStats`: calls served, phases recorded,
        the programs held), or None where steps are not compiled (no `compile_steps`, or a loaded model whose
        saved programs could not be used)."""
        compiled = self._compiled
        return None if compiled is None else compiled.stats()

    @property
    def is_exact(self) -> bool:
        """True when every step output equals the original model's (no windowed approximation)."""
        return self._info["exact"]

    @property
    def report(self) -> Report:
        if self._report is None:
            self.__dict__["_report"] = self._info["make_report"](self)
        return self._report

    @property
    def step_code(self) -> str:
        """The continual graph as Python."""
        return fx.GraphModule(self, self._step_graph, class_name="ContinualStep").code

    @property
    def step_graph(self) -> fx.Graph:
        return self._step_graph

    @property
    def clip_shape(self) -> tuple:
        """Shape of the example clip (batch 1) the model was converted with."""
        return self._info["clip_shape"]

    @property
    def options(self) -> dict:
        """The keyword arguments `cofx.convert` was called with (to convert again)."""
        return dict(self._info["options"])

    def clip_model(self) -> fx.GraphModule:
        """The original model as a plain GraphModule sharing these weights (picklable; convert it again)."""
        gm = fx.GraphModule(self, self.graph, class_name=type(self).__name__)
        adopt_attributes(gm, self)
        for name, _ in [(n, m) for n, m in self.named_children() if isinstance(m, Kernel)]:   # every kernel the
            del gm._modules[name]                                                          # conversion added
        gm.meta.update(self.meta)
        return gm

    def __reduce__(self):
        raise TypeError("a ContinualModule is not pickled directly; pickle co.clip_model() and convert it again "
                        "(cofx.save/cofx.load do this)")

    def __deepcopy__(self, memo):
        raise TypeError("copy.deepcopy of a ContinualModule is not supported; convert a deep copy of the "
                        "original model instead")


class _StateReference:
    """What the states of a model's own streams look like, read off its kernels by running them.

    - `spec1`/`spec2`: `kernels.state_spec` of every kernel's state after a warm-up of 1 and of 2 streams (the
      entries, shapes, dtypes; a state of B streams has the shapes these give for B);
    - `table[N]`: the counters of every kernel (`Stateful.state_signature`) after N frames of one stream
      (N = 0: after an empty chunk), for N < warm-up + 2 periods; after the warm-up they repeat every `period`
      frames, advanced by a fixed amount (`at` extrapolates: a stream of any length is checked exactly).

    Built on the first `set_state` (a few hundred frames at most, on zeros; the model's hooks see them) and
    kept: it depends on the model's structure only.
    """

    MAX_PERIOD = 64

    def __init__(self, co: ContinualModule):
        self.kernels = [(n, k) for n, k in co._named_kernels() if n != STREAMS_CHILD]
        period = co.period   # every op's output stride divides it (the stack of 4 crops of 4 frames: 4, not 4 ** 4)
        self.warmup = warmup_steps(co)
        self.period = period if period <= self.MAX_PERIOD else None
        length = self.warmup + 2 * (self.period or 4)
        p = next((t for t in list(co.parameters()) + list(co.buffers()) if t.is_floating_point()), None)
        dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
        t = co._info["time_dim"]
        frame = tuple(co._info["frame_shape"])

        def zeros(batch, n):
            return torch.zeros((batch, *frame[:t - 1], n, *frame[t - 1:]), dtype=dtype, device=device)

        with scratch_stream(co, clean=False), torch.no_grad():
            self._run(co, zeros(2, self.warmup))
            self.spec2 = {n: {e: state_spec(v) for e, v in k.get_state().items()} for n, k in self.kernels}
            for primed in (True, False):   # from a stream's state before its first frame, as the fixed-shape
                try:                         # step primes it, or, where that sets branches apart (it has none,
                    self._stream(co, zeros, length, primed)   # `masked_step`), from the clean state
                    break
                except RuntimeError:
                    if not primed:
                        raise
        self.limits = [None if all(s[i] is None for s in self.table) else
                       tuple(max(c) for c in zip(*[s[i] for s in self.table if s[i] is not None]))
                       for i in range(len(self.kernels))]

    def _stream(self, co, zeros, length: int, primed: bool) -> None:
        """The counters of a stream of one row frame after frame (`table`), and its state spec at the warm-up."""
        self._run(co, zeros(1, 0), run=primed)   # clean, then primed by an empty chunk or not
        self.table = [self.signature()]
        self.spec1 = None
        frame1 = zeros(1, 1)
        for n in range(1, length):
            self._run(co, frame1, clean=False)
            self.table.append(self.signature())
            if n == self.warmup:
                self.spec1 = {n: {e: state_spec(v) for e, v in k.get_state().items()} for n, k in self.kernels}

    def _run(self, co, x, clean=True, run=True):
        if clean:
            for _, k in self.kernels:
                k.clean()
        if run:
            co._ctx.batch = x.shape[0]
            co._step_call(x)

    def signature(self) -> tuple:
        return tuple(k.state_signature({s: getattr(k, s) for s in k.state_names}) for _, k in self.kernels)

    def at(self, frames: int) -> Optional[tuple]:
        """The counters after `frames` frames of a stream (None: beyond what can be told)."""
        if frames < len(self.table):
            return self.table[frames]
        if self.period is None:
            return None
        r = self.warmup + (frames - self.warmup) % self.period
        q = (frames - r) // self.period
        return tuple(b if a is None or b is None else tuple(x + q * (y - x) for x, y in zip(a, b))
                     for a, b in zip(self.table[r], self.table[r + self.period]))

    def find(self, sig: tuple) -> tuple:
        """(frames, None) when `sig` is the counters of a stream after `frames` frames, else (None, the frames of
        the nearest such state: the one that agrees with most kernels)."""
        best, best_bad = None, None
        for n, s in enumerate(self.table):
            if s == sig:
                return n, None
            bad = sum(a != b for a, b in zip(s, sig))
            if best_bad is None or bad < best_bad:
                best, best_bad = n, bad
        if self.period is None:
            return None, best
        for r in range(self.warmup, self.warmup + self.period):
            a_sig, b_sig = self.table[r], self.table[r + self.period]
            q = None
            for a, b, g in zip(a_sig, b_sig, sig):
                if a is None or b is None or g is None or len(g) != len(a):
                    continue
                for x, y, v in zip(a, b, g):
                    if y != x and (v - x) % (y - x) == 0 and q is None:
                        q = (v - x) // (y - x)
                if q is not None:
                    break
            if q is None or q < 0:
                continue
            n = r + q * self.period
            s = self.at(n)
            if s == sig:
                return n, None
            bad = sum(a != b for a, b in zip(s, sig))
            if bad < best_bad:
                best, best_bad = n, bad
        return None, best

    def check_counters(self, sig: tuple, frames: Optional[int], what: str = "the state") -> Optional[int]:
        """Raise a `StreamError` unless the counters `sig` are those of a stream of this model (after `frames`
        frames, when known); returns the frames."""
        for (n, k), s, limit in zip(self.kernels, sig, self.limits):
            if s is not None and limit is not None and isinstance(k, Align) and any(v > m for v, m in zip(s, limit)):
                raise StreamError(f"set_state refused {what}: kernel '{n}' ({_kind(k)}): "
                                  f"expected at most {limit} frames held, got {s}\n  fix: {STATE_FIX}")
        want = self.at(frames) if frames is not None else None
        if want is not None:
            if want == sig:
                return frames
            found, _ = self.find(sig)
            n, k, got, exp = next((n, k, g, w) for (n, k), g, w in zip(self.kernels, sig, want) if g != w)
            also = f"; they are the counters after {found} frames" if found is not None else ""
            raise StreamError(
                f"set_state refused {what}: kernel '{n}' ({_kind(k)}), its counters "
                f"{_counter_names(k)}: expected {exp} after the {frames} frames '_stream_frames' counts, got {got}"
                f"{also}\n  fix: {STATE_FIX}")
        if frames is not None and self.period is None:
            return frames   # beyond the table of a model with a long period: only the local checks
        found, near = self.find(sig)
        if found is not None:
            return found
        if near is None:
            return None
        want = self.at(near)
        n, k, got, exp = next((n, k, g, w) for (n, k), g, w in zip(self.kernels, sig, want) if g != w)
        raise StreamError(
            f"set_state refused {what}: kernel '{n}' ({_kind(k)}), its counters "
            f"{_counter_names(k)}: expected {exp} (the other kernels are where a stream is after {near} frames), "
            f"got {got}; no point of a stream of this model has these counters\n  fix: {STATE_FIX}")


def _kind(k) -> str:
    extra = k.extra_repr()
    return f"{type(k).__name__}: {extra}" if extra else type(k).__name__


def _counter_names(k) -> str:
    if isinstance(k, Sliding):
        return "(m, next_j)"
    if type(k).__name__ == "Recurrent":
        return "(seen,)"
    return "(frames held per input)"
