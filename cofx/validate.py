"""Translation validation: `convert` checks the continual model it built against the clip model.

The analysis passes give each op its continual meaning by rules; a rule that
misses an idiom (a value derived from the clip length, a leaf whose behaviour
depends on the data, a branch fixed at tracing) would otherwise step wrong
while the report says exact. So after building, `convert` runs the continual
model and the user's model on fresh random inputs (a clip from a clean state,
its frames at scales from 1e-2 to 1e2, a longer clip of another length modulo 2
and 3 where the model accepts one; non-negative where the example is, as a
spectrogram) and steps each as
one chunk and in random chunks (of 0 to 8 frames, single frames included).
Exact models must equal the clip model; every model must be chunk invariant.
On a disagreement or a crash the step graph is run again node by node beside
the clip graph, and the error names the first node whose frames differ.

Example::

    >>> class Gate(torch.nn.Module):       # a leaf that looks at the whole clip, not frame by frame
    ...     def forward(self, x):
    ...         return x * 0 if x.abs().mean() > 1.5 else x
    >>> model, clip = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3, padding=1), Gate()).eval(), torch.randn(1, 2, 8)
    >>> co = cofx.convert(model, clip, leaf_modules=[Gate], validate=False)
    >>> validate(co, model, clip)          # raises ConversionError naming the node
    Traceback (most recent call last):
        ...
    cofx.errors.ConversionError: cannot convert node '_1' (module '1'): ... does not match the clip model: ...
"""
from __future__ import annotations

import itertools
import math
import random

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from .errors import ConversionError, LengthNotTaken, describe, first_line
from .passes.temporal_geometry import WindowSpec
from .scratch_stream import scratch_stream
from .verify import as_steps, by_chunks, chunk_sizes, max_error, output_tolerance, worst_error

SCALES = (-2.0, 2.0)   # log10 range of the per-frame scales of the scaled input


def validate(co, model, clip: torch.Tensor, *, seed: int = 0) -> None:
    """Raise `ConversionError` unless continual `co` agrees with `model` on fresh inputs shaped like `clip`."""
    t = co.options["time_dim"]
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    shape = list(clip.shape)

    low, high = (float(clip.min()), float(clip.max())) if clip.numel() else (-1.0, 1.0)

    def fresh(rows: int, frames: int) -> torch.Tensor:
        """Normal noise, or where the example is non-negative (a spectrogram, a power, a probability) noise
        of its sign, in [0, 1) where it is: a model taking the log of its frames gets frames it can take."""
        shape[0], shape[t] = rows, frames
        if low >= 0 and high <= 1:
            x = torch.rand(shape, generator=gen, dtype=torch.float64)
        else:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            x = x.abs() if low >= 0 else x
        return x.to(clip.dtype)

    # two streams, the second with its frames scaled by 1e-2 to 1e2: rows must stay apart, and an op that
    # normalises across frames shows; each row is compared at its own scale
    x = fresh(2, clip.shape[t])
    scale = 10 ** torch.empty(x.shape[t], dtype=torch.float64).uniform_(*SCALES, generator=gen)
    x[1:] *= scale.to(x.dtype).view([-1 if i == t else 1 for i in range(x.dim())])
    with scratch_stream(co), torch.no_grad():   # the user's stream and every submodule's mode kept
        what = "a random clip of two streams (the second scaled by 1e-2 to 1e2 frame by frame)"
        compared = _check(co, model, x, what, ("in random chunks", "as one chunk"), rng)
        # a model's outputs on a longer clip are compared where they keep time (a reduction's steps give one
        # window per step where the model pools the longer clip whole), and where no window over the clip
        # answers for the last N frames
        extras = _extra_frames(co.stride * co._info["period"])
        for i, extra in enumerate(extras):
            longer = fresh(1, clip.shape[t] + extra)
            try:
                _check(co, model, longer, f"a longer clip ({longer.shape[t]} frames)", ("as one chunk",
                       "in random chunks"), rng, longer=True, compare=compared and not _windows(co),
                       other_length=i + 1 < len(extras))
                break
            except LengthNotTaken:   # a model that takes whole strides only: a longer clip of whole strides
                continue


def _extra_frames(period: int) -> tuple:
    """How many frames the longer clip adds: first a number prime to 2 and 3, so that its length differs from
    the example's modulo 2, 3, 4, 6, 8 and 9 (a crop or pad to a multiple of 4 computed from the length, frames
    paired even with odd, show); then, for a model that takes whole strides only, two periods of the steps."""
    whole = max(3, 2 * period)
    other = next(n for n in itertools.count(whole) if math.gcd(n, 6) == 1)
    return (other, whole) if other != whole else (whole,)


def _check(co, model, x, what, runs, rng, longer=False, compare=True, other_length=False) -> bool:
    """Step `x` each way of `runs` from a clean state: the first equals `model(x)` for exact models (unless not
    `compare`); the second runs only where the first could not be compared with the model whole, and equals
    the first. Returns whether the model was compared. `longer`: `x` is longer than the example, and only the
    outputs that keep time are compared with the model. `other_length`: where the model does not take the
    length of `x`, raise `LengthNotTaken` (a clip of another length is tried)."""
    ref = None
    if co.is_exact and compare:
        try:
            ref = model(x)
        except Exception as e:
            if other_length:
                raise LengthNotTaken(first_line(e)) from None
            if not longer:   # a longer clip may not fit a model bound to its clip length: then it is not compared
                raise ConversionError(f"the model fails on {what} shaped like the example "
                                      f"({type(e).__name__}: {first_line(e)})") from None
    t = co.options["time_dim"]
    chunkings = {"as one chunk": [x.shape[t]], "in random chunks": chunk_sizes(x.shape[t], rng)}
    first = None
    for how in runs:
        co.clean_state()
        sizes = chunkings[how]
        fail = lambda why, sizes=sizes: _fail(co, model, x, sizes, why)  # noqa: E731
        try:
            out = by_chunks(co, x, sizes)
        except LengthNotTaken:
            if other_length:
                raise
            fail(f"stepping {what} {how} fails: the model itself does not take its length")
        except ConversionError:
            raise
        except Exception as e:
            fail(f"stepping {what} {how} fails ({type(e).__name__}: {first_line(e)})")
        if first is None:
            first = out
            if ref is None:
                continue
            want, compared = as_steps(ref, out), out
            if longer:   # reductions, which the model pools whole, are compared by the steps with each other
                compared, want = _frame_outputs(co, out), _frame_outputs(co, want)
            differs = "" if isinstance(want, list) and not want else _disagreement(compared, want, x.shape[0])
            if differs:
                fail(f"stepping {what} {how} from a clean state differs from the model's forward ({differs})")
            if len(tree_flatten(want)[0]) == len(tree_flatten(out)[0]):
                return True
            continue
        differs = _disagreement(out, first, x.shape[0])
        if differs:
            fail(f"stepping {what} {how} differs from stepping it {runs[0]} ({differs}): the steps depend on "
                 "how the stream is split")
    return False


def _frame_outputs(co, out) -> list:
    """The outputs that keep time (frames, not a reduction's windows) among the leaves of `out`, as a list."""
    leaves = tree_flatten(next(n for n in co.graph.nodes if n.op == "output").args[0])[0]
    outs = tree_flatten(out)[0]
    if len(leaves) != len(outs):
        return outs
    return [o for o, n in zip(outs, leaves) if isinstance(n, fx.Node) and n.meta.get("cofx_role") == "stream"]


def _windows(co) -> bool:
    """Whether a window over the clip answers for the last N frames somewhere in `co`."""
    return any(isinstance(n.meta.get("cofx_spec"), WindowSpec) for n in co.graph.nodes)


def _disagreement(out, ref, rows: int) -> str:
    """What differs between two outputs beyond rounding, each stream at its own scale; "" when nothing does."""
    if out is None or ref is None:
        return "" if out is ref else "no output" if out is None else "an output where the model gives none"
    shapes = _shapes_of(out), _shapes_of(ref)
    if shapes[0] != shapes[1]:
        return f"output shapes {_shapes(shapes[0])} where the model gives {_shapes(shapes[1])}"
    by_row = all(len(s) > 0 and s[0] == rows for s in shapes[0])
    for r in range(rows if by_row else 1):
        a, b = (tree_map(lambda v: v[r:r + 1] if by_row and isinstance(v, torch.Tensor) else v, o)
                for o in (out, ref))
        err, tol = worst_error((a, b))
        if not err <= tol:
            return f"max error {err:.3g}, tolerance {tol:.3g}" + (f", in stream {r}" if by_row and rows > 1 else "")
    return ""



def _shapes_of(value) -> list:
    """Shapes of an output's tensors (a longer clip is compared only where the model keeps time as the steps do:
    a head sized for the clip, as X3D's, pools a longer clip whole)."""
    return [tuple(v.shape) for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _shapes(shapes) -> str:
    return ", ".join(map(str, shapes)) if len(shapes) != 1 else str(shapes[0])


def _fail(co, model, x, sizes: list, why: str):
    node, detail = first_divergent_node(co, x, sizes)
    if node is None and not detail:
        with torch.no_grad():
            traced, ref = co.forward(x), model(x)
        err, tol = worst_error((traced, ref))
        if not err <= tol:
            detail = ("the traced graph differs from the model's forward on this input: Python control flow "
                      "that torch.fx fixed at tracing (a branch on a shape or a value)")
        else:   # an op dropped from the steps as doing nothing on the example (a crop to a multiple of 4)
            node = next((n for n in co.graph.nodes if n.meta.get("cofx_role") == "stream" and
                         any(a.meta.get("cofx_length") is not None for a in n.all_input_nodes)), None)
            if node is not None:
                detail = (f"{describe(node)} uses the clip length, which is each chunk's length when stepping; it "
                          "is the first op that does")
    hooked = _hooked(model, co, node)
    if hooked:
        detail = f"{detail}; {hooked}" if detail else hooked
    raise ConversionError(f"the continual model does not match the clip model: {why}" +
                          (f"; the first node that differs: {detail}" if detail else ""), node=node,
                          fix="remove the hook before converting, or fold what it does into a module of your own"
                              if hooked else
                              "make this op act frame by frame (no use of the clip's length or of values "
                              "outside its receptive field), or keep it out of the streamed part; "
                              "convert(..., validate=False) skips this check and the steps may then be wrong")


def _hooked(model, co, node) -> str:
    """What forward hook may explain a disagreement: the model's own (tracing records what forward does, not
    what hooks around it do), or one of the diverging module's (a continual kernel computes the op itself)."""
    if model._forward_hooks or model._forward_pre_hooks:
        return "the model has forward hooks of its own, which tracing does not record"
    if node is not None and node.op == "call_module" and co.get_submodule(node.target)._forward_hooks:
        return (f"module '{node.target}' has a forward hook, which the step computing its op frame by frame does "
                "not run (one that changes the output is refused)")
    return ""


def first_divergent_node(co, x, sizes=None) -> tuple:
    """(node of the clip graph, what differed) for the first stream node whose frames, stepped from a clean
    state in chunks of `sizes` frames (default: one chunk) and flushed, differ from its values in the clip
    graph; (None, "") when none does."""
    clip_nodes = {n.name: n for n in co.graph.nodes}
    clip_values: dict = {}

    class Clip(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            clip_values[n.name] = out
            return out

    step_values: dict = {}

    class Steps(fx.Interpreter):
        def run_node(self, n):
            try:
                out = super().run_node(n)
            except Exception as e:
                origin = n.meta.get("cofx_origin") or _origin_by_name(n, clip_nodes)
                raise _StepCrash(origin, e) from None
            origin = n.meta.get("cofx_origin")
            if origin is not None and isinstance(out, torch.Tensor):
                step_values.setdefault(origin, []).append(out)
            return out

    with torch.no_grad():
        try:
            Clip(co).run(x)
        except Exception as e:   # a clip the model's own graph cannot take (a table sized for the example)
            return None, f"the clip graph itself fails on it ({type(e).__name__}: {first_line(e)})"
        co.clean_state()
        ctx, steps, t = co._ctx, Steps(co._step_module), co.options["time_dim"]
        sizes = sizes or [x.shape[t]]
        ctx.batch = x.shape[0]
        try:
            for at, n in zip(itertools.accumulate([0] + sizes), sizes):
                steps.run(x.narrow(t, at, n))
            ctx.flushing = True
            steps.run(x.narrow(t, 0, 0))
        except _StepCrash as crash:
            node = clip_nodes.get(crash.origin)
            return node, f"its step fails ({type(crash.error).__name__}: {first_line(crash.error)})"
        finally:
            ctx.flushing = False
            co.clean_state()
    for n in co.graph.nodes:
        parts = step_values.get(n.name)
        ref = clip_values.get(n.name)
        if not parts or not isinstance(ref, torch.Tensor) or n.meta.get("cofx_role") != "stream" \
                or "cofx_bn" in n.meta:   # a convolution that computes the BatchNorm after it: compared there
            continue
        axis = n.meta.get("cofx_time")
        if axis is not None and n.meta["cofx_layout"][axis] == "BT":   # frames folded into the batch, stream-major
            parts = [p.unflatten(axis, (x.shape[0], -1)) for p in parts]
            ref, axis = ref.unflatten(axis, (x.shape[0], -1)), axis + 1
        got = torch.cat(parts, axis) if axis is not None and len(parts) > 1 else parts[0]
        if got.shape != ref.shape:
            return n, f"its frames stepped form {tuple(got.shape)} where the clip gives {tuple(ref.shape)}"
        err, tol = max_error(got, ref), output_tolerance(ref)
        if not err <= tol:
            return n, f"its frames stepped differ from its values on the clip (max error {err:.3g})"
    return None, ""


def _origin_by_name(step_node: fx.Node, clip_nodes: dict):
    """A copied time-free node keeps its name; anything else is attributed to the node it serves."""
    if step_node.name in clip_nodes:
        return step_node.name
    for user in step_node.users:
        if user.meta.get("cofx_origin"):
            return user.meta["cofx_origin"]
    return None


class _StepCrash(Exception):
    def __init__(self, origin, error):
        super().__init__(str(error))
        self.origin, self.error = origin, error
