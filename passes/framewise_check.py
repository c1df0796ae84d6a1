"""Prove, on the example clip, that the ops claimed to act frame by frame do.

For every node marked ``cofx_check`` (activations, norms, reshapes, merges,
untraceable leaf modules, ...) the op is run a second time with one frame of
its stream inputs replaced by noise; every other output frame must come out
unchanged. This catches what no op list can: softmax or cumsum over time,
a view that scrambles frames, a norm over time, a custom module that looks
at its neighbours.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.InstanceNorm1d(4)).eval()   # a norm over time
    >>> gm, clip = cofx.tracer.trace(model), torch.randn(1, 2, 8)
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(clip, time_dim=2))
    >>> cofx.passes.label_layouts(gm); cofx.passes.mark_length_values(gm); cofx.passes.classify_nodes(gm)
    >>> check_framewise(gm, clip[:1])   # raises ConversionError on the first offender
    Traceback (most recent call last):
        ...
    cofx.errors.ConversionError: cannot convert node '_1' (module '1'): does not act frame by frame: ...
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from cofx.errors import ConversionError

from .layout import Labels, time_axes
from .node_kind import ATTENTION_FIX, LENGTH_BUILT, attention_hint
from .shape_runs import FAILED, Rec, RecordingInterpreter


def _is_stream(node: fx.Node) -> bool:
    return node.meta.get("cofx_role") == "stream" and isinstance(node.meta.get("cofx_layout"), Labels)


def _container(node_args) -> type:
    """A plain list for fx's immutable ones (a module may write into the list it is given)."""
    return list if isinstance(node_args, list) else type(node_args)


def _perturb_args(node_args, values, frame: int, gen: torch.Generator, chosen=_is_stream, sign: int = 1,
                  in_range: bool = False):
    """The values of `node_args` with frame `frame` of every `chosen` stream input replaced by noise (of sign
    `sign` where the frame has one element): large floats, integers past the values' range (or drawn from them,
    `in_range`), negated flags (a mask or a count along time mixes frames as a float does)."""
    if isinstance(node_args, fx.Node):
        if chosen(node_args) and isinstance(values, torch.Tensor) and values.numel():
            t = time_axes(node_args.meta["cofx_layout"])[0]
            out = values.clone()
            old = out.narrow(t, frame, 1)
            if values.dtype == torch.bool:
                old.logical_not_()
                return out
            noise = torch.randn(old.shape, generator=gen).abs_() * torch.where(
                torch.rand(old.shape, generator=gen) < 0.5, -sign, sign) if old.numel() > 1 else \
                torch.full(old.shape, float(sign))
            bound = float(values.abs().max()) + 1
            if values.is_floating_point() or values.is_complex():
                old.copy_(noise.to(values.dtype) * bound)
            elif in_range:   # the tensor's own values, for an op that takes no other (indices, codes)
                flat = values.flatten()
                old.copy_(flat[torch.randint(0, flat.numel(), old.shape, generator=gen)])
            else:
                old.copy_((noise.sign() * (noise.abs() + 1) * bound).round().to(values.dtype))
            return out
        return values
    if isinstance(node_args, (list, tuple)):
        return _container(node_args)(_perturb_args(a, v, frame, gen, chosen, sign, in_range)
                                     for a, v in zip(node_args, values))
    if isinstance(node_args, dict):
        return {k: _perturb_args(node_args[k], values[k], frame, gen, chosen, sign, in_range) for k in node_args}
    return values


def _other_frames_equal(node, out, out_p, frame: int) -> bool:
    leaves, _ = tree_flatten(out)
    leaves_p, _ = tree_flatten(out_p)
    labels, _ = tree_flatten(node.meta["cofx_layout"])
    for a, b, lab in zip(leaves, leaves_p, labels):
        if not isinstance(a, torch.Tensor) or not a.numel():
            continue
        if a.shape != getattr(b, "shape", None):
            return False
        exact = not (a.is_floating_point() or a.is_complex())   # integers and flags: equal or not
        diff = (a != b) if exact else (a - b).abs()
        axes = time_axes(lab)
        if axes:   # the perturbed frame itself may change
            diff.narrow(axes[0], frame, 1).zero_()
        if exact:
            if diff.any():
                return False
            continue
        if not diff.isfinite().all():   # the same infinity, or NaN, on both sides counts as equal
            same = (a == b) | (a.isnan() & b.isnan())
            diff = torch.where(same, 0.0, diff.nan_to_num(nan=float("inf"), posinf=float("inf")))
        finite = a.abs()[a.isfinite()]   # the scale of the numbers in the output
        scale = float(finite.max()) if finite.numel() else 0.0
        if float(diff.max()) > 1e-5 * scale + 1e-30:
            return False
    return True


def _sees_other_frames(node, out, frame: int) -> bool:
    """Whether each floating output of `node` holds a finite value outside `frame`: where every other frame is NaN
    or infinite (a log or a fractional power of negative frames), no change to `frame` can show there."""
    for a, lab in zip(tree_flatten(out)[0], tree_flatten(node.meta["cofx_layout"])[0]):
        if not isinstance(a, torch.Tensor) or not (a.is_floating_point() or a.is_complex()) or not a.numel():
            continue
        axes = time_axes(lab) if isinstance(lab, Labels) else []
        finite = a.isfinite()
        if axes and a.shape[axes[0]] > 1:
            finite = torch.cat([finite.narrow(axes[0], 0, frame),
                                finite.narrow(axes[0], frame + 1, a.shape[axes[0]] - frame - 1)], axes[0])
        if not finite.any():
            return False
    return True


def _with_other_row(node_args, values, gen: torch.Generator, scale: float):
    """The stream and folded inputs of a node with a second row after their first (batch) row: noise `scale`
    times the size of the first. (A node after a reduction or over a window runs on windows of its stream
    inputs: one row each.)"""
    if isinstance(node_args, fx.Node):
        labels = node_args.meta.get("cofx_layout")
        if node_args.meta.get("cofx_role") in ("folded", "stream") and isinstance(labels, Labels) \
                and "B" in labels and isinstance(values, torch.Tensor) and values.is_floating_point():
            b = labels.index("B")
            row = values.narrow(b, 0, 1)
            noise = torch.randn(row.shape, generator=gen, dtype=row.dtype) * (row.abs().max() + 1) * scale
            return torch.cat([row, noise], b)
        return values
    if isinstance(node_args, (list, tuple)):
        return _container(node_args)(_with_other_row(a, v, gen, scale) for a, v in zip(node_args, values))
    if isinstance(node_args, dict):
        return {k: _with_other_row(node_args[k], values[k], gen, scale) for k in node_args}
    return values


def _first_row_kept(node, out, out_2) -> bool:
    """Whether the first row of every batched output is what it was without the second row."""
    for a, b, lab in zip(tree_flatten(out)[0], tree_flatten(out_2)[0], tree_flatten(node.meta["cofx_layout"])[0]):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point() or not a.numel():
            continue
        if not isinstance(lab, Labels) or "B" not in lab or b.shape[lab.index("B")] != 2:
            return False
        first = b.narrow(lab.index("B"), 0, 1)
        if first.shape != a.shape or not torch.allclose(first, a, rtol=1e-5, atol=1e-30, equal_nan=True):
            return False
    return True


def check_framewise(gm: fx.GraphModule, clip: torch.Tensor) -> None:
    """Also checks that a module cofx did not trace into, after a reduction or inside a window over the clip
    (where each row of the batch is one window of one stream), keeps the rows of its batch apart."""
    gen = torch.Generator().manual_seed(0)
    untraceable = gm.meta.get("cofx_untraceable", {})

    failures = []
    run = {"name": "clip", "only": None, "seen": set()}   # the run the hook sees, the nodes it checks there
    #                                                        (None: all), and those it met
    thin = []   # nodes given a single frame by the example: checked again on a longer clip

    def check_rows(node, args, kwargs, result):
        def with_row(scale):
            return getattr(interp, node.op)(node.target, _with_other_row(node.args, args, gen, scale),
                                            _with_other_row(node.kwargs, kwargs, gen, scale))
        # statistics of the batch then cross any threshold they meet
        kept = all(_first_row_kept(node, result, with_row(scale)) for scale in (1e-3, 1.0, 1e3))
        if not kept:
            failures.append(ConversionError(
                "mixes the rows of its batch: after a global reduction or inside a window over the clip, each row "
                "is one window of one stream, and this module's answer for one depends on the others", node=node,
                fix="make the module act on each sample of the batch alone, or let cofx trace into it"))

    def on_node(node, args, kwargs, result):
        if failures:
            return
        if node.meta.get("cofx_role") == "folded" and node.op == "call_module" and \
                not type(gm.get_submodule(node.target)).__module__.startswith("torch."):
            check_rows(node, args, kwargs, result)
            return
        if not node.meta.get("cofx_check") or run["only"] is not None and node not in run["only"]:
            return
        if run["only"] is not None:
            run["seen"].add(node)
        streams = [a for a in node.all_input_nodes if a.meta.get("cofx_role") == "stream"
                   and isinstance(a.meta.get("cofx_layout"), Labels)]
        if not streams:
            return
        first = streams[0]
        length = first.meta["cofx_runs"][run["name"]].shape[time_axes(first.meta["cofx_layout"])[0]]
        if length < 2:   # one frame cannot show that an op mixes frames (a valid conv as long as the clip)
            if run["name"] == "clip":
                thin.append(node)
            else:
                failures.append(ConversionError(
                    "gets a single frame on the example clip and on a longer one, so cofx cannot check that it "
                    "acts frame by frame", node=node, fix="convert with a longer example clip"))
            return
        # the middle frame, but not the one an odd number of frames mirrors onto itself (a flip along time); of a
        # few frames, each (of two, the middle one is the last, whose change a running sum never shows)
        frames = range(length) if length <= 4 else [length // 2 - (1 if length % 2 else 0)]

        def others_kept(sign, frame):
            def perturbed(in_range):
                return getattr(interp, node.op)(
                    node.target, _perturb_args(node.args, args, frame, gen, sign=sign, in_range=in_range),
                    _perturb_args(node.kwargs, kwargs, frame, gen, sign=sign, in_range=in_range))
            try:
                out_p = perturbed(False)
            except Exception:   # integers past their range (indices): the op's own values then
                if all(a.meta["cofx_runs"][run["name"]].dtype.is_floating_point for a in streams):
                    raise
                out_p = perturbed(True)
            return _other_frames_equal(node, result, out_p, frame)

        if _cumulative_along(node, time_axes(first.meta["cofx_layout"])[0], args[0]):   # by rule, whatever the
            failures.append(ConversionError(                                            # example's values show
                "is a cumulative op along time (each frame carries every frame before it, a running state from the "
                "clip's first frame), which cofx does not stream", node=node,
                fix="keep a running state with a recurrent layer (nn.GRU/nn.LSTM stream exactly), or normalise "
                    "over a fixed window (a pool over time)"))
            return
        if not _sees_other_frames(node, result, frames[0]):
            failures.append(ConversionError(
                "is NaN or infinite in every frame on the example clip, so cofx cannot check that it acts frame by "
                "frame", node=node, fix="convert with an example on which the model computes numbers: frames of the "
                "kind it takes (non-negative where it takes a log or a fractional power of them)"))
            return
        # a running maximum shows a frame raised, a running minimum one lowered: both, where a frame is one value
        single = _single_valued_frames(streams, run["name"])
        if not all(others_kept(1, f) and (not single or others_kept(-1, f)) for f in frames):
            hint = attention_hint(node, gm)
            why = "does not act frame by frame: changing one input frame changed other output frames." + hint
            fix = ATTENTION_FIX if hint else \
                "ops that mix frames (softmax/cumsum/norms over time, attention) are not supported"
            if node.op == "call_module" and node.target in untraceable:
                why += f" (torch.fx could not trace into it: {untraceable[node.target]})"
                fix = "make the module traceable so cofx can see its temporal ops"
            failures.append(ConversionError(why, node=node, fix=fix))

    interp = RecordingInterpreter(gm, "clip", on_node=on_node)
    with torch.no_grad():
        interp.run(clip)
    if thin and not failures:
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        longer = placeholder.meta["cofx_runs"].get("longer")
        if not isinstance(longer, Rec) or any(n.meta["cofx_runs"].get("longer") in (None, FAILED) for n in thin):
            raise ConversionError("gets a single frame on the example clip, so cofx cannot check that it acts frame "
                                  "by frame", node=thin[0], fix="convert with a longer example clip")
        run.update(name="longer", only=set(thin))
        # (a layer after them made for the clip's length fails on the longer clip: they run before it)
        interp = RecordingInterpreter(gm, None, tolerate_failures=True, on_node=on_node)
        with torch.no_grad():
            frames = torch.randn(longer.shape, generator=gen, dtype=torch.float64)
            interp.run((frames.abs() if clip.min() >= 0 else frames).to(clip.dtype))   # (of the example's sign)
        unseen = [n for n in thin if n not in run["seen"]]
        if unseen and not failures:
            raise ConversionError("gets a single frame on the example clip, and the model fails before it on a longer "
                                  "one, so cofx cannot check that it acts frame by frame", node=unseen[0],
                                  fix="convert with a longer example clip")
    if failures:
        raise failures[0]


def _single_valued_frames(streams, run: str = "clip") -> bool:
    """Whether a stream input's frames hold one value each (a mask of one stream, one channel)."""
    shapes = [(n.meta["cofx_runs"][run].shape, time_axes(n.meta["cofx_layout"])[0]) for n in streams]
    return any(math.prod(shape) == shape[t] for shape, t in shapes)


_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"}


def _cumulative_along(node: fx.Node, t: int, x) -> bool:
    """Whether `node` is a cumulative op (torch.cumsum, Tensor.cummax, ...) along dim `t` of its input `x` (or
    along a dim it does not name plainly): a running maximum need not show a changed frame on the example."""
    if node.op not in ("call_function", "call_method") or \
            getattr(node.target, "__name__", node.target) not in _CUMULATIVE:
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(dim, int) or not isinstance(x, torch.Tensor):
        return True
    return dim % x.dim() == t


def check_causal(gm: fx.GraphModule, clip: torch.Tensor) -> None:
    """Per-frame outputs of windows over the clip (`WindowSpec.growing`) must come from causal attention: with a
    frame of every window's inputs replaced by noise, the outputs at the frames before it stay as they were. On
    the example, and on it with its first frames zero: a key-padding mask from the frames that masks every key a
    query may see, with a finite fill (-1e9), spreads that query over every frame, future ones included."""
    starts = [n for n in gm.graph.nodes if getattr(n.meta.get("cofx_spec"), "growing", False)]
    if not starts:
        return
    leaves = [n for n in tree_flatten(gm.graph.find_nodes(op="output")[0].args[0])[0]
              if isinstance(n, fx.Node) and n.meta.get("cofx_newest") is not None]
    frames = starts[0].meta["cofx_spec"].window
    gen = torch.Generator().manual_seed(1)

    def run(frame, clip):
        values = {}

        class Perturbed(fx.Interpreter):
            def run_node(self, n):
                if frame is not None and n in starts:   # the frame of each windowed input, in its place
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    windowed = set(n.meta["cofx_window_inputs"]).__contains__
                    args = _perturb_args(n.args, args, frame, gen, windowed)
                    kwargs = _perturb_args(n.kwargs, kwargs, frame, gen, windowed)
                    out = getattr(self, n.op)(n.target, args, kwargs)
                else:
                    out = super().run_node(n)
                values[n] = out
                return out

        with torch.no_grad():
            Perturbed(gm).run(clip)
        return values

    t = time_axes(next(n for n in gm.graph.nodes if n.op == "placeholder").meta["cofx_layout"])[0]
    padded = clip.clone()
    padded.narrow(t, 0, (clip.shape[t] + 1) // 2).zero_()
    plain = {id(ex): run(None, ex) for ex in (clip, padded)}   # each example's own values, run once
    for example, frame in [(ex, f) for ex in (clip, padded) for f in sorted({frames - 1, frames // 2}) if f >= 1]:
        changed = run(frame, example)
        for leaf in leaves:
            axis = leaf.meta["cofx_newest"]
            before, after = plain[id(example)][leaf].narrow(axis, 0, frame), changed[leaf].narrow(axis, 0, frame)
            if example is not clip:   # rows every key of which is masked: NaN on one path of torch's attention,
                unknown = before.isnan() | after.isnan()   # zeros on another (its safe softmax)
                before, after = before.masked_fill(unknown, 0), after.masked_fill(unknown, 0)
            scale = before.abs()[before.isfinite()]
            tol = 1e-6 * (float(scale.max()) if scale.numel() else 0.0) + 1e-30
            if not torch.allclose(before, after, rtol=1e-5, atol=tol, equal_nan=True):
                source = leaf.meta["cofx_window_source"]
                what = source.meta["cofx_spec"].what
                built = "; or build constants from the frames (torch.ones_like(x[:, :1]), not torch.ones(B, 1, T))" \
                    if what == LENGTH_BUILT else ""
                why = "the attention is not causal (or an op after it looks ahead: a convolution or pool padded at " \
                      "the end)" if example is clip else \
                    "on the example with its first frames zero (padding): a query whose every key is masked, by a " \
                    "finite fill such as -1e9, attends to every frame, future ones too (fill with -inf)"
                raise ConversionError(
                    f"returns per-frame outputs computed over a window of the clip ({what} at node '{source.name}'), "
                    f"and frame {frame} of the window changes the outputs of the frames before it: {why}; so a step "
                    "cannot answer for its newest frame", node=leaf,
                    fix="make the attention causal (is_causal=True, a causal mask) to get per-frame outputs, or return "
                    f"one value per clip (a class token, the last frame out[:, -1], a pool over time){built}")
