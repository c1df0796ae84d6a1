"""`cofx.export_onnx`: one step of a continual model as an ONNX graph with explicit state.

The exported graph is `cofx.masked_step.MaskedStep` traced once:

    inputs   frame (B, C, …)            one frame per stream, no time axis
             reset (B,) bool            True: this stream starts now (its state inputs are ignored)
             state_0 … state_N          the state, batch first
    outputs  output (as forward_step)   defined where ready is True
             ready (B,) bool            False where forward_step would return None
             next_state_0 … next_state_N   same order, shapes and dtypes as the state inputs

Streams are independent rows: each may start (reset) at any step. A caller
starts every stream with zeros for every state and ``reset=True``. The batch
dimension is dynamic on every input and output; every other dimension is
static. The file's metadata (``cofx.*`` keys) records the state names, the
delay, stride and receptive field.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from typing import Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from . import onednn_conv
from .dtype_device import dtype_device
from .errors import first_line
from .masked_step import ROUNDING, MaskedStep, NotSteppable, nan_where_not
from .scratch_stream import scratch_stream
from .unfused import unfused_attention
from .verify import worst_error


class _StaticShapes:
    """Sizes that do not depend on the batch are plain ints while tracing, so that they are constants in ONNX.

    A trace records every size read off a tensor (``x.shape``, ``x.size(i)``,
    ``x.numel()``) as a dynamic value, and some ONNX symbolics (convolution kernels,
    adaptive pooling, unfold) refuse those. The step is first run untraced for two
    batch sizes (mode "record"); each size that is the same for both is then a
    constant while tracing (mode "replay"). Queries are matched by their order
    within one call of the step, and checked. While active (``with``), the three
    accessors of `torch.Tensor` are wrapped; the wrappers act only between
    `start` and `stop` (inside the step) and are removed on exit.
    """

    def __init__(self):
        self.logs, self.static, self.mode, self.at, self.inside = [], None, "record", 0, False

    def start(self):
        self.at, self.inside = 0, True
        if self.mode == "record":
            self.logs.append([])

    def stop(self):
        self.inside = False

    def finish_recording(self) -> bool:
        a, b = self.logs
        if len(a) != len(b) or any(_kind(u) != _kind(v) for u, v in zip(a, b)):
            return False
        self.static = [_same(u, v) for u, v in zip(a, b)]
        self.log, self.mode = a, "replay"
        return True

    def __enter__(self):
        base = torch._C.TensorBase
        size, shape, numel = base.size, base.shape.__get__, base.numel
        hook = self._answer
        torch.Tensor.size = lambda t, *a, **k: hook(size(t, *a, **k))
        torch.Tensor.shape = property(lambda t: hook(shape(t)))
        torch.Tensor.numel = lambda t: hook(numel(t))
        return self

    def __exit__(self, *exc):
        for name in ("size", "shape", "numel"):
            delattr(torch.Tensor, name)

    def _answer(self, out):
        if not self.inside or self.mode == "off":
            return out
        if self.mode == "record":
            self.logs[-1].append(tuple(out) if isinstance(out, torch.Size) else int(out))
            return out
        if self.at >= len(self.static):
            raise _Misaligned()
        i = self.at
        self.at += 1
        want, static = self.log[i], self.static[i]
        if isinstance(out, torch.Size):
            if tuple(int(v) for v in out) != want:
                raise _Misaligned()
            return torch.Size([w if s else v for v, w, s in zip(out, want, static)])
        if int(out) != want:
            raise _Misaligned()
        return want if static else out


class _Misaligned(RuntimeError):
    pass


def _kind(v):
    return len(v) if isinstance(v, tuple) else -1


def _same(u, v):
    return [x == y for x, y in zip(u, v)] if isinstance(u, tuple) else u == v


class _OnnxStep(nn.Module):
    """(frame, reset, *state) -> (*outputs, ready, *next_state); `co` is a submodule so its weights are traced."""

    def __init__(self, co, step: MaskedStep):
        super().__init__()
        self.co = co
        self.__dict__["masked"] = step
        self.__dict__["shapes"] = None

    def forward(self, frame, reset, *state):
        if self.shapes is None:
            return self._step(frame, reset, state)
        self.shapes.start()
        try:
            return self._step(frame, reset, state)
        finally:
            self.shapes.stop()

    def _step(self, frame, reset, state):
        step = self.masked
        out, own, new = step.step(frame.unsqueeze(step.time_dim), reset, list(state), per_output=True)
        leaves, _ = tree_flatten(out)
        axes, _ = tree_flatten(step.out_time_axes, is_leaf=lambda a: a is None)
        leaves = [v.squeeze(a) if a is not None and v.shape[a] == 1 else v for v, a in zip(leaves, axes)]
        every = reset | ~reset
        own = [every if r is None else r for r in own]
        ready = own[0]
        for r in own[1:]:   # a row is ready where any output has its frame, as forward_step returns not None
            ready = ready | r
        if len(own) > 1:    # each output NaN in the rows where it has no frame of its own
            leaves = [nan_where_not(v, r, b) for v, r, b in zip(leaves, own, step.out_batch_axes)]
        return (*leaves, ready, *new)



def export_onnx(co, path, opset: Optional[int] = None) -> dict:
    """Write an ONNX model of one step of `co` with explicit state (see the module docstring).

    Args:
        co: a `ContinualModule` (`cofx.convert`'s result). Left exactly as it was
            found: training mode and stream state are restored.
        path: the .onnx file to write.
        opset: the ONNX opset (default: the exporter's).

    Returns:
        A summary: input and output names, state names, shapes (batch as "batch") and dtypes.
    """
    from .module import ContinualModule
    if not isinstance(co, ContinualModule):
        raise TypeError(f"export_onnx takes a converted model (cofx.convert(...)), got {type(co).__name__}")
    import onnx

    # transformer layers as ops ONNX has; what the export steps is not the user's stream
    with unfused_attention(), onednn_conv.standard_ops(), scratch_stream(co, clean=False):
        dtype, device = dtype_device(co)
        step = MaskedStep(co, dtype, device)
        step.exporting()
        wrapper = _OnnxStep(co, step)
        batch = 2
        frame = torch.randn((batch, *co._info["frame_shape"]), dtype=dtype, device=device)
        reset = torch.tensor([True, False], device=device)
        state = step.initial_state(batch)
        with torch.no_grad():
            outs = wrapper(frame, reset, *state)
        n_out = len(outs) - 1 - len(state)
        out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        state_in = [f"state_{i}" for i in range(len(state))]
        state_out = [f"next_state_{i}" for i in range(len(state))]
        input_names = ["frame", "reset", *state_in]
        output_names = [*out_names, "ready", *state_out]
        batch_axes = {"frame": 0, "reset": 0, "ready": 0, **{n: 0 for n in state_in + state_out}}
        for name, axis in zip(out_names, step.out_batch_axes):
            if axis is not None:
                batch_axes[name] = axis
        shapes = _record_shapes(wrapper, step, co)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapper.__dict__["shapes"] = shapes
            try:
                with shapes, _exporter_output_dropped():
                    torch.onnx.export(wrapper, (frame, reset, *state), os.fspath(path), dynamo=False,
                                      input_names=input_names, output_names=output_names,
                                      dynamic_axes={n: {a: "batch"} for n, a in batch_axes.items()},
                                      opset_version=opset, do_constant_folding=True, verbose=False)
            except _Misaligned:
                raise NotSteppable("cannot export this model to ONNX: an op of its step reads tensor sizes in "
                                   "another order while torch.onnx traces it than when it runs (attention given "
                                   "a key-padding mask does); the model still steps in PyTorch") from None
            except Exception as e:   # an op torch.onnx has no export for (its symbolics raise any error type)
                raise NotSteppable(f"cannot export this model to ONNX: torch.onnx cannot export an op of its step "
                                   f"({type(e).__name__}: {first_line(e)}); the model still steps in PyTorch") from None
            finally:
                wrapper.__dict__["shapes"] = None
        values = dict(zip(input_names, (frame, reset, *state)))
        values.update(zip(output_names, outs))
        model = onnx.load(os.fspath(path))
        _static_shapes(model, values, batch_axes)
        names = step.state_names
        meta = {"cofx.state_names": json.dumps(names), "cofx.delay": str(co.delay),
                "cofx.stride": str(co.stride), "cofx.receptive_field": str(co.receptive_field),
                "cofx.time_dim": str(co._info["time_dim"]), "cofx.exact": str(co.is_exact)}
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        model.doc_string = (f"cofx continual step: frame, reset, state_0..state_{len(state) - 1} -> "
                            f"{', '.join(out_names)}, ready, next_state_*; start each stream with zero states "
                            "and reset=True")
        _transpose_perms_positive(model)
        try:
            onnx.checker.check_model(model, full_check=True)   # with shape inference
        except Exception as e:   # an export torch.onnx got wrong in a way not mended here
            raise NotSteppable(f"cannot export this model to ONNX: the model torch.onnx wrote does not pass "
                               f"onnx.checker ({type(e).__name__}: {first_line(e)}); the model still steps in "
                               "PyTorch") from None
        onnx.save(model, os.fspath(path))
        _runs_as_exported(path, wrapper, step, co, n_out)
        return dict(inputs=input_names, outputs=output_names, state_names=names,
                    shapes={n: _shape(v, batch_axes.get(n)) for n, v in values.items()},
                    dtypes={n: str(v.dtype).replace("torch.", "") for n, v in values.items()})


def _runs_as_exported(path, wrapper: _OnnxStep, step: MaskedStep, co, n_out: int) -> None:
    """The written file run by ONNX Runtime (where it is installed) beside the step it was traced from, each
    fed its own state, on a random stream of two rows (the second restarted at frame 3) as long as the one the
    step checked itself on: a file that computes otherwise is removed and refused; one ONNX Runtime cannot run is
    kept, with a warning."""
    try:
        import onnxruntime
    except ImportError:
        return
    try:
        session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    except Exception as e:   # an op without a kernel there (Erf in float64)
        warnings.warn(f"ONNX Runtime cannot run the exported '{path}' ({first_line(e)}), so it was not checked "
                      "against the model's step: another runtime may run it", stacklevel=3)
        return
    names = [i.name for i in session.get_inputs()]
    wrapper.eval()   # as exported (torch.onnx gave the wrapper back in training mode; the caller restores modes)
    gen = torch.Generator().manual_seed(0)
    state = step.initial_state(2)
    theirs = [s.cpu().numpy() for s in state]
    compared = [([], []) for _ in range(n_out)]   # each output's rows that are ready, frame after frame
    for i in range(step.check_frames):   # the stream the step checked itself on
        frame = torch.randn((2, *co._info["frame_shape"]), generator=gen, dtype=torch.float64).to(step.dtype)
        frame = frame.to(step.device)
        reset = torch.tensor([i == 0, i in (0, 3)], device=step.device)
        with torch.no_grad():
            ours = wrapper(frame, reset, *state)
        got = session.run(None, dict(zip(names, [frame.cpu().numpy(), reset.cpu().numpy(), *theirs])))
        state, theirs = list(ours[n_out + 1:]), got[n_out + 1:]
        ready = ours[n_out].cpu()
        if not torch.equal(torch.from_numpy(got[n_out]), ready):
            _refuse(path, f"which rows are ready otherwise than the model's step at frame {i}")
        rows = ready.nonzero().flatten()
        for (mine, file), want, have, b in zip(compared, ours[:n_out], got[:n_out], step.out_batch_axes):
            want, have = want.cpu(), torch.from_numpy(have).to(want.dtype)
            mine.append((want if b is None else want.index_select(b, rows)).reshape(-1))
            file.append((have if b is None else have.index_select(b, rows)).reshape(-1))
    for mine, file in compared:
        error, tolerance = worst_error((torch.cat(file), torch.cat(mine)))
        if not error <= tolerance * ROUNDING:   # ONNX Runtime's kernels round otherwise than PyTorch's
            _refuse(path, f"an output otherwise than the model's step (max error {error:.3g}, tolerance "
                          f"{tolerance * ROUNDING:.3g})")


def _refuse(path, wrong: str):
    """Remove the written file and say what ONNX Runtime computed otherwise."""
    os.remove(path)
    raise NotSteppable(f"cannot export this model to ONNX: the file torch.onnx wrote computes {wrong}, run by ONNX "
                       "Runtime on a random stream; the model still steps in PyTorch")


def _transpose_perms_positive(model) -> None:
    """torch.onnx writes `movedim(-1, 1)` as a Transpose whose perm counts from the end ({0, -1, 1, 2}), which
    ONNX does not allow: each entry is counted from the front."""
    for node in model.graph.node:
        if node.op_type != "Transpose":
            continue
        for attr in node.attribute:
            if attr.name == "perm" and any(p < 0 for p in attr.ints):
                rank = len(attr.ints)
                attr.ints[:] = [p % rank for p in attr.ints]


@contextlib.contextmanager
def _exporter_output_dropped():
    """torch.onnx writes the whole TorchScript graph to the process's stdout (from C++) when an op fails to
    export; the error raised says which op, so that dump is dropped."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _record_shapes(wrapper, step, co) -> "_StaticShapes":
    shapes = _StaticShapes()
    wrapper.__dict__["shapes"] = shapes
    try:
        with torch.no_grad(), shapes:
            for batch in (2, 3):
                frame = torch.zeros((batch, *co._info["frame_shape"]), dtype=step.dtype, device=step.device)
                wrapper(frame, torch.zeros(batch, dtype=torch.bool, device=step.device), *step.initial_state(batch))
    finally:
        wrapper.__dict__["shapes"] = None
    if not shapes.finish_recording():
        shapes.mode = "off"
    return shapes


def _shape(value: torch.Tensor, batch_axis) -> list:
    return ["batch" if i == batch_axis else s for i, s in enumerate(value.shape)]


def _static_shapes(model, values: dict, batch_axes: dict) -> None:
    """Write every input's and output's shape into the graph: "batch" on the batch axis, numbers elsewhere."""
    for info in list(model.graph.input) + list(model.graph.output):
        value = values.get(info.name)
        if value is None:
            continue
        dims = info.type.tensor_type.shape.dim
        del dims[:]
        for size in _shape(value, batch_axes.get(info.name)):
            d = dims.add()
            if size == "batch":
                d.dim_param = "batch"
            else:
                d.dim_value = size
