"""Compiled steps: the steady-state step recorded as one straight-line tensor program, then compiled.

Once a stream is in steady state, a step does the same thing every `period`
frames: the same windows complete, the same buffers shift, the same frames come
out (and so does a chunk of a fixed number of frames, `chunks`). The eager step
still decides all of that in Python at every frame, and calls hundreds of small
ops one by one (an X3D-S frame: ~520 ops, a fifth of
the step spent outside them). A `CompiledSteps` runs the step of each phase
once under `make_fx`, which records the tensor ops alone (frame and state in;
output and new state out), and compiles that graph ahead of time with
AOTInductor (inductor fuses the pointwise ops and calls oneDNN for the
convolutions; the compiled library is called without `torch.compile`'s
guards and wrappers, which cost a fifth of an X3D-S step with its ~100 state
tensors), or with another `torch.compile` backend.

What the recording fixes, and how it stays right:

- the weights (and BatchNorm folds) are baked in; before every step the
  parameters and buffers are checked (same tensor, memory and version) and any
  change makes the phases be recorded again (unless `check_weights=False`
  says they are frozen: `WeightMarks`, in C++ where it can be built, ~0.15-0.2
  ms of X3D-S's ~7 ms step, ~0.5-0.7 ms in Python, as the ~500 objects it reads
  are out of cache after a step);
- the state stays in the kernels: each step reads it, and writes back the new
  state and the counters the eager kernels keep, so eager calls (chunks,
  flushes, get_state, ...) continue from a compiled step exactly; the windows
  of temporal ops live in rings the program writes in place (double rings,
  `Sliding.program_views`, or rolled rings, `Sliding.rolled_ring`), so no
  window is concatenated or shifted;
- Python side effects are not recorded: a model with forward hooks is refused.

The AOTInductor packages are kept (`Package`), so that `cofx.save` can write
them (`to_record`) and `cofx.load` run them without compiling (`from_file`):
a loaded model records each phase as it is met and runs its package only for
the same recording (`compiled_package.fingerprint`).

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.ReLU()).eval()
    >>> co = cofx.convert(model, torch.randn(1, 2, 8))
    >>> co = co.compile_steps("eager")     # records every phase now (inductor, the default, also compiles)
    >>> with torch.no_grad():
    ...     outs = [co.forward_step(torch.randn(1, 2)) for _ in range(co.warmup_frames + 1)]
    >>> co.last_step_compiled              # the recorded program served the steady-state step
    True
"""
from __future__ import annotations

import operator
import os
import shutil
import sys
import tempfile
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass
from itertools import count
from typing import Callable, Optional

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from .compiled_package import built_for, compile_package, fingerprint, load_package
from .errors import StreamError, first_line
from .dtype_device import dtype_device
from .kernels import DoubleRings, Sliding
from .pixel_convs import pixel_convs_as_sums
from .scratch_stream import scratch_stream
from .weight_marks import WeightMarks
from .whole_pools import whole_pools_as_means

INDUCTOR_OPTIONS = {"freezing": True}


@dataclass
class Phase:
    """The recorded step of one phase: `run(frame, *state, *ring views) -> (*outputs, *new state)`; it writes
    the new frame of every ring in place."""
    run: Callable
    slots: list           # (kernel, state name, None for a tensor or the type of a list/tuple of tensors, length)
    rings: list           # (Sliding kernel, its ring views now): the kernels whose frames live in a ring,
                          # those in double rings first
    layouts: list         # (shape, strides, memory format) of every state tensor the program takes and returns
    counters: list        # (kernel, counter name, increase per step)
    out_spec: object      # pytree of the step's output
    n_out: int
    frame_strides: tuple  # of the (contiguous) frame the program takes
    empty: bool           # no output frame comes out (the step returns None)
    time_axes: list       # per output, the time axis a single frame's program took off, or None
    ready: torch.Tensor   # `co.ready` after the step: (batch,) of `not empty`, shared by its steps
    partial: bool         # one frame in, some outputs without a frame: returned with time axes, as chunks are
    keeps_layouts: bool = True   # its new state comes out in `layouts` (checked once, after compiling)

    def read_state(self) -> list:
        return read_slots(self.slots)

    def ring_views(self) -> list:
        return self._double_rings() + [v for views in self._rolled_rings for v in views()]

    def laid_out(self, state: list) -> list:
        """The state in the layouts the program was compiled for (it assumes them: it checks no strides)."""
        if [t.shape for t in state] != [shape for shape, _, _ in self.layouts]:
            raise StreamError("the stream state does not have the shapes the compiled step was recorded with; "
                              "this is a bug in cofx: please report it, and call co.compile_steps(None) to "
                              "step without compiling meanwhile")
        return lay_out(state, self.layouts)

    def __post_init__(self):
        self._double_rings = DoubleRings([k for k, views in self.rings if not isinstance(views, RolledRing)])
        self._rolled_rings = [views for _, views in self.rings if isinstance(views, RolledRing)]
        self._dicts = [kernel.__dict__ for kernel, _, _ in self.counters]
        self._names = [name for _, name, _ in self.counters]
        self._steps = [step for _, _, step in self.counters]

    def write_state(self, flat) -> None:
        write_slots(self.slots, flat)
        # the counters advance in C loops (`map`): X3D-S has ~130 of them, and they are out of cache
        counts = map(operator.add, map(operator.getitem, self._dicts, self._names), self._steps)
        deque(map(operator.setitem, self._dicts, self._names, counts), maxlen=0)


@dataclass(frozen=True)
class CompiledStats:
    """What a model's compiled steps have done since `compile_steps` (``co.compiled_stats``): `runs`, the calls
    a compiled program served; `recordings`, the phases recorded (and compiled) so far, again after a change of
    the weights; `phases`, the (phase, frames per call, batch) of each program the model holds now;
    `keeps_layouts`, whether every program hands back its state in the layouts it takes (no copies between
    steps); `rings`, per program, how each kernel that keeps its frames in a ring keeps them ("double" or
    "rolled", `cofx.frame_window`); `tensors`, per program, the state tensors it takes besides the rings;
    `start`, the frames into a stream from which its steps repeat and programs serve them (`steady_keys`)."""
    runs: int
    recordings: int
    phases: tuple
    keeps_layouts: bool
    rings: dict
    tensors: dict
    start: int


@dataclass
class Package:
    """The AOTInductor package of a phase: the fingerprint of the program it compiles (`fingerprint`), its file,
    and whether the program keeps convolutions in rolled rings (a loaded model records it the same way)."""
    fingerprint: str
    path: str
    rolled: bool


def steady_keys(co) -> list:
    """Every kernel's `Stateful.steady_key`. What a step does is decided by these keys and by the frames that
    reach each kernel, which the keys upstream decide: where the keys after F frames of a stream equal those
    after F + period frames, the stream goes round the same `period` steps from F on, for ever, and a step
    recorded at F + r serves every F + r + k * period (`CompiledSteps.start`). A stream of X3D-S gets there
    after about its delay, long before every buffer holds frames of the stream alone (`co.warmup_frames`)."""
    return [k.steady_key() for k in co._kernels()]


class _NotServed(Exception):
    """The packages a model was loaded with have no program for a phase it meets (the message says why)."""


def lay_out(tensors: list, layouts: list) -> list:
    """Each tensor with the strides of its layout: as it is when it has them, else a copy."""
    return [t if t.stride() == strides else t.clone(memory_format=fmt)
            for t, (_, strides, fmt) in zip(tensors, layouts)]


def read_slots(slots) -> list:
    flat = []
    for kernel, name, kind, _ in slots:
        if kind is None:
            flat.append(getattr(kernel, name))
        else:
            flat.extend(getattr(kernel, name))
    return flat


def write_slots(slots, flat) -> None:
    values, i = [], 0
    for _, _, kind, n in slots:
        values.append(flat[i] if kind is None else kind(flat[i:i + n]))
        i += n
    # state is set as `Stateful.__setattr__` sets it, in a C loop: the kernels are out of cache after a step
    deque(map(object.__setattr__, map(_first, slots), map(_second, slots), values), maxlen=0)


_first, _second = operator.itemgetter(0), operator.itemgetter(1)


class CompiledSteps:
    """The compiled phases of a continual module's step, recorded on demand (see the module docstring)."""

    def __init__(self, co, backend: str, options: Optional[dict], verbose: bool, check_weights: bool = True,
                 chunks: tuple = ()):
        if options is None and backend == "inductor":
            options = dict(INDUCTOR_OPTIONS)
        self.co, self.backend, self.options, self.check_weights = co, backend, options, check_weights
        self.chunks = frozenset(chunks)   # chunk lengths besides single frames that run compiled
        self.say = (lambda msg: print(f"cofx: {msg}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
        self.period = co._info["period"]
        self.start = co.warmup_frames   # frames into a stream from which programs serve (`prepare` finds it)
        self.phases: dict = {}   # (phase, frames in the chunk, batch, dtype, device) -> Phase
        self.weights: Optional[WeightMarks] = None
        self.written: list = []  # the state tensors the last compiled step wrote (already laid out)
        self.written_as: tuple = ()   # their (dtype, device)
        self.ready: Optional[torch.Tensor] = None   # `co.ready` after the last compiled step
        self.runs = 0            # compiled steps taken
        self.recordings = 0      # phases recorded
        self.packages: dict = {}  # key -> Package: the AOTInductor packages of the phases compiled or loaded
        self.loaded = False       # the packages came from a file: a phase without one steps eagerly (`from_file`)
        self.folder = tempfile.mkdtemp(prefix="cofx-steps-")   # their files, removed with self
        weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        self._names = count()

    def applies_to(self, frames: int) -> bool:
        """Whether a chunk of `frames` frames runs compiled (in steady state, without gradients, ...)."""
        return frames == 1 or frames in self.chunks

    def prepare(self, batch: int) -> None:
        """Record and compile every phase of single frames, and the phases a stream of each chunk length meets
        from there, on a stream of zeros; the module's own stream is left as it was."""
        co = self.co
        dtype, device = dtype_device(co)
        t = co._info["time_dim"]
        shape = list(co.clip_shape)
        shape[0] = batch
        with scratch_stream(co, eval_mode=False), torch.no_grad():
            shape[t] = 1   # chunks of one frame: a start that gives several frames at once (padding) is no error
            frame = torch.zeros(shape, dtype=dtype, device=device)
            keys, end = [steady_keys(co)], self.start + self.period
            while len(keys) <= end:   # `end` frames; the phases are recorded on the way, from `start` on
                co._run(frame, False, True)
                keys.append(steady_keys(co))
                first = len(keys) - 1 - self.period
                if 0 <= first < self.start and keys[first] == keys[-1]:   # the steps repeat from `first` on
                    self.start, end = first, len(keys) - 1 + self.period
            for n in sorted(self.chunks):
                shape[t] = n
                chunk = torch.zeros(shape, dtype=dtype, device=device)
                for _ in range(self.period):
                    co._run(chunk, False, True)

    @classmethod
    def from_file(cls, co, record: dict) -> "CompiledSteps":
        """Compiled steps that run the packages of a `to_record` record (its machine checked and trusted by the
        caller) and compile nothing: each phase is recorded when a stream first reaches it, as when compiling,
        and runs its package only if the recording has the package's fingerprint (the same program, the same
        weights); otherwise, and for a phase without a package, steps run eagerly from there, with a notice."""
        steps = cls(co, "inductor", None, False, record["check_weights"], tuple(record["chunks"]))
        steps.loaded = True
        start = record.get("start")   # found when compiled (`prepare`); files before it start at the warm-up
        if type(start) is int and 0 <= start < steps.start:
            steps.start = start
        for entry in record["programs"]:
            key = (entry["phase"], entry["frames"], entry["batch"], getattr(torch, entry["dtype"]),
                   torch.device(entry["device"]))
            path = steps._package_path()
            with open(path, "wb") as file:
                file.write(entry["package"])
            steps.packages[key] = Package(entry["fingerprint"], path, entry["rolled"])
        steps.weights = WeightMarks(co, say=steps.say)   # the packages bake the weights loaded
        return steps

    def to_record(self) -> Optional[dict]:
        """The packages of the phases compiled so far with what `from_file` checks, as `cofx.save` keeps them
        (plain values and bytes, read with weights_only); None, with a notice, when none can be kept."""
        if self.backend != "inductor":
            warnings.warn(f"cofx.save keeps compiled steps of the inductor backend only (AOTInductor packages), "
                          f"not of {self.backend!r}: the file is saved without them; call co.compile_steps() "
                          "after loading", stacklevel=3)
            return None
        if self.weights is None or not self.weights.unchanged():   # checked even with check_weights=False
            warnings.warn("the weights changed since the steps were compiled: the file is saved without compiled "
                          "steps; call co.compile_steps() before cofx.save to keep them", stacklevel=3)
            return None
        if not self.packages:
            return None
        programs = []
        for (phase, frames, batch, dtype, device), package in self.packages.items():
            with open(package.path, "rb") as file:
                programs.append({"phase": phase, "frames": frames, "batch": batch,
                                 "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                                 "rolled": package.rolled, "fingerprint": package.fingerprint,
                                 "package": file.read()})
        return {"built_for": built_for(key[4] for key in self.packages), "chunks": sorted(self.chunks),
                "check_weights": self.check_weights, "start": self.start, "programs": programs}

    def __call__(self, x: torch.Tensor, frames: int, framewise: bool):
        """The output of `x`, `frames` frames into the stream (>= `start`), or None when no frame comes out:
        one frame without its time axis when `framewise` (the output as `forward_step` returns it), else a
        chunk of one frame or a length of `chunks` (as `forward_steps` returns it)."""
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            raise StreamError("a global module forward hook is registered: compiled steps record tensor ops "
                              "only and would skip it; remove the hook or call co.compile_steps(None)")
        given = x
        if not self._weights_unchanged():
            if self.loaded:
                return self._eagerly(given, framewise, "the weights changed since the model was loaded, and its "
                                                       "saved compiled steps bake the weights loaded")
            self.phases.clear()
            self.packages.clear()
            self.weights = WeightMarks(self.co, say=self.say)
        t = self.co._info["time_dim"]
        one = not framewise and x.shape[t] == 1   # a chunk of one frame runs the program of a frame
        if one:
            x = x.select(t, 0)
        key = (frames % self.period, 1 if framewise or one else x.shape[t], x.shape[0], x.dtype, x.device)
        phase = self.phases.get(key)
        if phase is None:
            self.co._check_state(x)
            try:
                phase = self.phases[key] = self._record(x, key)
            except _NotServed as why:
                return self._eagerly(given, framewise, str(why))
        state = phase.read_state()
        if not phase.keeps_layouts or self.written_as != key[3:] or len(state) != len(self.written) or \
                not all(map(operator.is_, state, self.written)):   # an eager call or set_state came in between
            self.co._check_state(x)
            state = phase.laid_out(state)
        if x.stride() != phase.frame_strides:   # a view of a longer tensor (strides of size-1 dims count too)
            x = x.clone(memory_format=torch.contiguous_format)
        res = phase.run(x, *state, *phase.ring_views())
        self.co._position.compiled = True
        self.written, self.written_as = res[phase.n_out:], key[3:]
        phase.write_state(self.written)
        self.runs += 1
        self.ready = phase.ready
        if phase.empty:
            return None
        out = res[:phase.n_out]
        if one and not phase.partial:   # (a partial program returns the frames with their time axes)
            out = [v if a is None else v.unsqueeze(a) for v, a in zip(out, phase.time_axes)]
        out = tree_unflatten(list(out), phase.out_spec)
        return self.co._frame_output(out) if phase.partial and framewise else out

    def stats(self) -> CompiledStats:
        phases = {key[:3]: p for key, p in self.phases.items()}
        return CompiledStats(self.runs, self.recordings, tuple(phases), all(p.keeps_layouts for p in phases.values()),
                             {k: tuple("rolled" if isinstance(v, RolledRing) else "double" for _, v in p.rings)
                              for k, p in phases.items()},
                             {k: len(p.layouts) for k, p in phases.items()}, self.start)

    def _eagerly(self, x: torch.Tensor, framewise: bool, why: str):
        """The eager step of `x`, and eager steps from here on: the packages loaded do not serve this stream."""
        warnings.warn(f"cofx: {why}; steps run eagerly (co.compile_steps() compiles them here)", stacklevel=5)
        co = self.co
        co.__dict__["_compiled"] = None
        out = co._run(x, False, True, framewise)
        self.ready = co.__dict__.get("ready")
        return out

    def _weights_unchanged(self) -> bool:
        return self.weights is not None and (not self.check_weights or self.weights.unchanged())

    def _record(self, x: torch.Tensor, key: tuple) -> Phase:
        co = self.co
        package = self._package(key) if self.loaded else None   # before anything reads the kernels' rings
        for m in co.modules():
            if m._forward_hooks or m._forward_pre_hooks:
                raise StreamError(f"module {type(m).__name__} has a forward hook: compiled steps record tensor "
                                  "ops only and would skip it; remove the hook or call co.compile_steps(None)")
        began = time.perf_counter()
        self.recordings += 1
        self.say(f"recording the step of phase {key[0] + 1}/{self.period} ({key[1]} frame(s), batch {key[2]}, "
                 f"{key[3]})")
        if key[1] > 1:   # a chunk: the ordered frames of the kernels' state in, the new ones out (no rings)
            return self._record_with(x, key, began, rolled=False, ringed=False)
        rolled = any(isinstance(k, Sliding) and k.program_ring == "rolled" for k in co._kernels())
        if package is not None:   # recorded as its package was
            return self._record_with(x, key, began, rolled=rolled and package.rolled)
        if not rolled:
            return self._record_with(x, key, began, rolled=False)
        try:
            return self._record_with(x, key, began, rolled=True)
        except Exception as error:  # noqa: BLE001 -- a compiler's failure on the rolled rings' inputs
            self.say(f"compiling with rolled rings failed ({type(error).__name__}); recording with double rings")
            return self._record_with(x, key, began, rolled=False)

    def _record_with(self, x: torch.Tensor, key: tuple, began: float, rolled: bool, ringed: bool = True) -> Phase:
        """Record and compile one phase; `rolled`: may keep convolutions in rolled rings, `ringed`: may keep
        frames in rings at all (see `_state_slots`)."""
        co = self.co
        framewise = key[1] == 1   # a frame without its time axis in, outputs as forward_step returns them
        t = co._info["time_dim"]
        with scratch_stream(co, clean=False, eval_mode=False):
            co._step_call(x.unsqueeze(t) if framewise else x)   # refreshes the caches (BatchNorm folds) it bakes
        rings = []
        with scratch_stream(co, clean=False, eval_mode=False):
            try:
                slots, flat, counters, rings = _state_slots(co, rolled, ringed)
                formats = _memory_formats(slots, flat, co._kernels())
                layouts = [_canonical_layout(t, fmt) for t, fmt in zip(flat, formats)]
                flat = [t.clone(memory_format=fmt) for t, (_, _, fmt) in zip(flat, layouts)]
                now = [views() for _, views in rings]
                views = [_copy_strided(v) for vs in now for v in vs]
                outputs = []   # (pytree spec, empty, time axes taken off)

                def step(frame, *args):
                    state, views = args[:len(flat)], args[len(flat):]
                    write_slots(slots, state)
                    at = 0
                    for (k, _), vs in zip(rings, now):
                        k.__dict__["_program"] = views[at:at + len(vs)]
                        at += len(vs)
                    out = co._step_call(frame.unsqueeze(t) if framewise else frame)
                    empty = co._none_if_empty(out) is None
                    axes = co._frame_axes(out) if framewise and not empty else []
                    partial = bool(axes) and any(v is None for v in tree_flatten(co._frame_output(out))[0])
                    if axes and not partial:
                        out = co._frame_output(out)
                    leaves, spec = tree_flatten(out)
                    outputs.append((spec, empty, [] if partial else axes, partial))
                    return (*leaves, *lay_out(read_slots(slots), layouts))

                try:
                    graph = make_fx(step)(x.clone(memory_format=torch.contiguous_format), *flat, *views)
                except Exception as e:   # an op that reads a value out of a tensor (F.one_hot, .item())
                    raise StreamError(f"cannot record the step as one program ({type(e).__name__}: "
                                      f"{first_line(e)}): an op of the model reads a value out of a tensor "
                                      "(F.one_hot, .item(), nonzero); the model steps eagerly") from None
                pixel_convs_as_sums(graph)
                whole_pools_as_means(graph)
                after = {(id(k), name): getattr(k, name) for k, name, _ in counters}
                counters = [(k, name, after[id(k), name] - v) for k, name, v in counters]
                n_out = len(graph.graph.find_nodes(op="output")[0].args[0]) - len(flat)
            finally:   # the kernels step eagerly again
                for k, _ in rings:
                    k.__dict__["_program"] = None
        x = x.clone(memory_format=torch.contiguous_format)
        args = (x, *flat, *map(_copy_strided, views))
        run = self._program(graph, args, key, rolled) if self.backend == "inductor" else \
            torch.compile(graph, backend=self.backend, options=self.options, fullgraph=True, dynamic=False)
        spec, empty, axes, partial = outputs[0]
        ready = torch.full((key[2],), not empty, device=x.device)
        phase = Phase(run, slots, rings, layouts, [c for c in counters if c[2]], spec, n_out, x.stride(), empty,
                      axes, ready, partial)
        new = phase.run(*args)[n_out:]   # compiles now, with a torch.compile backend (nothing is written back)
        phase.keeps_layouts = all(t.stride() == strides for t, (_, strides, _) in zip(new, layouts))
        self.say(f"phase {key[0] + 1}/{self.period} ({key[1]} frame(s)): {len(graph.graph.nodes)} nodes, "
                 f"{time.perf_counter() - began:.1f} s")
        return phase

    def _program(self, graph, args: tuple, key: tuple, rolled: bool) -> Callable:
        """AOTInductor's library of a recorded phase: compiled into a package kept for `cofx.save`, or the
        loaded package compiled from the same program (`compiled_package.fingerprint`)."""
        mark = fingerprint(graph, args)
        if self.loaded:
            if self._package(key).fingerprint != mark:
                raise _NotServed(f"the step of {_describe(key, self.period)} recorded on this model differs from "
                                 "the one its saved compiled program was compiled from (other weights, or "
                                 "converted differently)")
            return load_package(self._package(key).path)
        path = self._package_path()
        run = compile_package(graph, args, self.options, path)
        self.packages[key] = Package(mark, path, rolled)
        return run

    def _package(self, key: tuple) -> Package:
        package = self.packages.get(key)
        if package is None:
            saved = "; ".join(_describe(k, self.period) for k in self.packages)
            raise _NotServed(f"the compiled steps saved with the model have no program for "
                             f"{_describe(key, self.period)} (saved: {saved})")
        return package

    def _package_path(self) -> str:
        return os.path.join(self.folder, f"step{next(self._names)}.pt2")


def _describe(key: tuple, period: int) -> str:
    phase, frames, batch, dtype, device = key
    return (f"phase {phase + 1}/{period} of {frames} frame(s), batch {batch}, "
            f"{str(dtype).removeprefix('torch.')} on {device}")


def _state_slots(co, rolled: bool, ringed: bool = True):
    """The state of every kernel: tensor slots, their tensors, the integer counters the kernels keep, and the
    kernels whose frames a compiled step keeps in a ring, with their ring views (their tensor state is not a
    slot): double rings, then rolled rings where `rolled` allows them (`Sliding.program_ring`); none unless
    `ringed` (a chunk of several frames reads and writes the ordered frames)."""
    slots, flat, counters, rings, rolled_rings = [], [], [], [], []
    for k in co._kernels():
        kind = ringed and isinstance(k, Sliding) and k.program_ring
        kind = "double" if kind == "rolled" and not rolled else kind
        ring = bool(kind)
        if kind == "double":
            k.program_views()   # enters the double ring
            rings.append((k, k.program_views))
            counters.append((k.store, "pos", k.store.pos))
        elif kind == "rolled":
            views = RolledRing(k)
            views()   # enters the ring
            rolled_rings.append((k, views))
            counters.append((k.store, "oldest", k.store.oldest))
        for name in k.state_names:
            value = getattr(k, name) if not (ring and name == "buf") else None
            if isinstance(value, torch.Tensor):
                slots.append((k, name, None, 1))
                flat.append(value)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
                slots.append((k, name, type(value), len(value)))
                flat.extend(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                counters.append((k, name, value))
            elif value is not None:
                raise StreamError(f"cannot record the step: state {name!r} of {type(k).__name__} holds a "
                                  f"{type(value).__name__}; call co.compile_steps(None) to step without compiling")
    return slots, flat, counters, rings + rolled_rings


class RolledRing:
    """The inputs a compiled step takes for a rolled ring (`Sliding.rolled_ring`): the ring, the index of the
    slot the frame goes to, and the weight of the last eager step (baked, as the recording bakes every weight)
    rolled for that slot."""

    def __init__(self, kernel: Sliding):
        span, t, weight = kernel.span, kernel.t, kernel._weight
        self.kernel = kernel
        self.slots = [torch.tensor([p], device=weight.device) for p in range(span)]
        self.weights = [weight.detach().roll((p + 1) % span, t) for p in range(span)]

    def __call__(self) -> tuple:
        ring, slot = self.kernel.rolled_ring()
        return ring, self.slots[slot], self.weights[slot]


def _copy_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy with the strides of `t` (a view into a double ring), in memory of its own."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _memory_formats(slots, flat, kernels) -> list:
    """Per state tensor, the memory format its kernel keeps it in (`Sliding.layout`); the other state tensors
    of a rank whose convolutions (any of `kernels`) run channels-last in compiled steps
    (`Sliding.program_layout`) take that layout too. Inductor computes the feature maps around such
    convolutions channels-last, while eager steps hand them on contiguous: a delay buffer taken and returned
    contiguous would be transposed in and out at every step (X3D-S: ~0.3 ms of a ~7 ms step)."""
    declared = [getattr(kernel, "layout", None) if kind is None else None for kernel, _, kind, n in slots
                for _ in range(n)]
    by_rank = {_RANKS[fmt]: fmt for fmt in (getattr(k, "program_layout", None) for k in kernels) if fmt in _RANKS}
    return [fmt or by_rank.get(t.dim(), torch.contiguous_format) for fmt, t in zip(declared, flat)]


_RANKS = {torch.channels_last: 4, torch.channels_last_3d: 5}


def _canonical_layout(t: torch.Tensor, fmt: torch.memory_format) -> tuple:
    if _RANKS.get(fmt, t.dim()) != t.dim():
        fmt = torch.contiguous_format
    return t.shape, torch.empty(t.shape, memory_format=fmt, device="meta").stride(), fmt
