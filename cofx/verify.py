"""`cofx.verify`: measure that a continual model keeps the guarantees of the README, on given or random input.

The checks a user (or their CI) wants before trusting a converted model:

- clip equivalence: from a clean state, ``forward_steps(clip, pad_end=True)``
  and frame-by-frame stepping plus the end flush equal the original ``model(clip)``;
- chunk invariance: any split of a stream into chunks gives the outputs of
  frame-by-frame stepping;
- state reset: ``clean_state()`` restarts, ``update_state=False`` changes
  nothing, ``get_state``/``set_state`` resume exactly.

Errors are measured against the reference's largest magnitude: float64 within
1e-9 of it proves the logic, float32 within 1e-4 allows only rounding. A
windowed (not exact) model cannot pass clip equivalence by design: its
deviation from the original is measured and reported, and only fails with
``strict=True``.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .dtype_device import dtype_device
from .scratch_stream import scratch_stream


@dataclass
class Check:
    name: str
    max_error: float
    tolerance: float
    required: bool = True   # False: measured and shown, but not a failure (a windowed model's deviation)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance


@dataclass
class VerifyReport:
    """The checks with their max errors; `ok` when every required check is within its tolerance."""
    checks: list = field(default_factory=list)
    exact: bool = True
    dtype: str = "float32"
    input: str = ""

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks if c.required)

    def __str__(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = []
        for c in self.checks:
            verdict = "ok" if c.passed else "FAIL" if c.required else "deviates (not exact by design)"
            lines.append(f"  {c.name:<{width}}  max error {c.max_error:.3g}  tolerance {c.tolerance:.3g}  {verdict}"
                         + (f"  ({c.note})" if c.note else ""))
        return "\n".join(lines)


def tolerance(ref: torch.Tensor) -> float:
    """The largest error allowed against `ref`, of its largest magnitude: 1e-9 (float64), 1e-4 (float32), eight
    rounding steps in half precision (float16, bfloat16: a step alone is 1e-3 and 8e-3)."""
    magnitude = ref.detach().abs()
    magnitude = magnitude.masked_fill(magnitude.isnan(), 0.0) if magnitude.is_floating_point() else magnitude
    scale = float(magnitude.max()) if ref.numel() else 1.0
    relative = {torch.float64: 1e-9, torch.float32: 1e-4}.get(ref.dtype)
    if relative is None:
        relative = 8 * torch.finfo(ref.dtype).eps if ref.is_floating_point() else 1e-4
    return relative * max(scale, 1e-30)


def verify(co, model=None, *, steps: Optional[int] = None, video: Optional[str] = None, seed: int = 0,
           strict: bool = False) -> VerifyReport:
    """Check continual model `co` against `model` (default: `co`'s own clip forward).

    Args:
        co: a `ContinualModule`.
        model: the original clip model; `co.forward` is compared with it too.
        steps: frames in the stream of the chunk and state checks (default:
            the clip length plus the delay plus 8 strides, so outputs appear).
        video: a video file whose frames (decoded with PyAV, resized to the
            model's frame size) replace the random input.
        seed: of the random input and the random chunk sizes.
        strict: a windowed model's deviation from the original fails the report.

    The stream state of `co` is cleaned before and after.
    """
    time_dim = co.options["time_dim"]
    clip_len = co.clip_shape[time_dim]
    steps = steps if steps is not None else clip_len + co.delay + 8 * co.stride
    if steps <= co.delay:
        raise ValueError(f"steps must exceed the delay ({co.delay} frames) so that the checks see outputs, got "
                         f"{steps}")
    clip, stream, where = _inputs(co, steps, video, seed)
    model = model if model is not None else co
    report = VerifyReport(exact=co.is_exact, dtype=str(clip.dtype).removeprefix("torch."), input=where)
    with scratch_stream(co), torch.no_grad():   # the user's stream and every submodule's mode kept
        report.checks.append(_clip_equivalence(co, model, clip, strict))
        whole, chunked = _chunk_invariance(co, stream, random.Random(seed))
        report.checks.append(chunked)
        report.checks.append(_state_reset(co, stream, whole))
    return report


def _inputs(co, steps, video, seed):
    """(clip, stream, description): a clip of the converted length and a stream of `steps` frames."""
    time_dim = co.options["time_dim"]
    shape = list(co.clip_shape)
    clip_len = shape[time_dim]
    dtype, device = dtype_device(co)
    if video is None:
        gen = torch.Generator().manual_seed(seed)
        shape[0] = 2   # two independent streams
        shape[time_dim] = max(steps, clip_len)
        frames = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        desc = f"random input, 2 streams, clip of {clip_len} frames, stream of {steps} frames"
    else:
        from .video import read_frames
        if len(shape) != 5 or time_dim != 2 or shape[1] != 3:
            raise ValueError(f"--video needs a model that takes RGB clips (B, 3, T, H, W); this one takes "
                             f"{tuple(shape)} with time at dim {time_dim}")
        frames = read_frames(video, max(steps, clip_len), shape[3:]).to(dtype=dtype, device=device)
        have = frames.shape[2]
        if have < clip_len:
            raise ValueError(f"'{video}' has {have} frames; the model's clip is {clip_len} frames")
        steps = min(steps, have)
        desc = f"frames of {video}, clip of {clip_len} frames, stream of {steps} frames"
    # contiguous, as a model's input usually is (a model may ``view`` it)
    return frames.narrow(time_dim, 0, clip_len).contiguous(), frames.narrow(time_dim, 0, steps).contiguous(), desc


def max_error(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    tensors = [isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) for x, y in zip(la, lb)]
    if sa != sb or any(x.shape != y.shape if t else x != y for x, y, t in zip(la, lb, tensors)):
        return float("inf")   # another structure, shape or plain value
    return max((_tensor_error(x, y) if t and x.numel() else 0.0 for x, y, t in zip(la, lb, tensors)), default=0.0)


def _tensor_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """The largest difference; NaN where both are NaN counts as equal (a log of the frames where they are
    negative), as do equal infinities, and NaN on one side is infinitely far; masks and indices (not floating
    point) differ wholly or not at all."""
    if x.is_floating_point() or x.is_complex():
        diff = (x - y).detach().abs()
        if diff.isnan().any():
            same = (x == y) | (x.isnan() & y.isnan())   # (infinities of one sign are equal too)
            diff = torch.where(same, 0.0, diff.masked_fill(diff.isnan(), float("inf")))
        return float(diff.max())
    return 0.0 if torch.equal(x, y) else float("inf")


def worst_error(*pairs) -> tuple:
    """(error, tolerance) of the output furthest outside its own tolerance over `(out, ref)` pairs: each output
    is held to its own magnitude, so that one that is zero (a ReLU that is off) does not tighten the others'."""
    found = []
    for a, b in pairs:
        if a is None or b is None:
            found.append((0.0 if a is b else math.inf, 0.0))
            continue
        la, sa = tree_flatten(a)
        lb, sb = tree_flatten(b)
        if sa != sb:
            found.append((math.inf, output_tolerance(b)))
            continue
        found += [(max_error(x, y), output_tolerance(y)) for x, y in zip(la, lb)]
    return max(found, key=lambda e: e[0] / e[1] if e[1] else math.inf if e[0] else 0.0, default=(0.0, 0.0))


def output_tolerance(ref) -> float:
    if ref is None:
        return 0.0
    leaves, _ = tree_flatten(ref)
    floats = [t for t in leaves if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    return min((tolerance(t) for t in floats), default=0.0)


def cat_outputs(co, parts):
    """Outputs of successive calls of `co` joined along each output's time axis."""
    parts = [p for p in parts if p is not None]
    return functools.reduce(co._concat, parts) if parts else None


def as_steps(ref, like):
    """`model(clip)` in the layout of `forward_steps` (a classifier's (B, K) becomes (B, K, 1)), output by output."""
    if like is None:
        return ref
    refs, spec = tree_flatten(ref)
    likes, like_spec = tree_flatten(like)
    if spec != like_spec:
        return ref
    return tree_unflatten([r.unsqueeze(min(2, r.dim())) if isinstance(r, torch.Tensor) and isinstance(l, torch.Tensor)
                           and l.dim() == r.dim() + 1 else r for r, l in zip(refs, likes)], spec)


def by_frame(co, stream):
    t = co.options["time_dim"]
    outs = [co.forward_steps(stream.narrow(t, i, 1)) for i in range(stream.shape[t])]
    outs.append(co.forward_steps(stream.narrow(t, 0, 0), pad_end=True))
    return cat_outputs(co, outs)


def chunk_sizes(frames: int, rng) -> list:
    """Random chunk lengths (0 to 8 frames) that add up to `frames`: an empty chunk first, then single frames
    (the second and the fourth chunk), then any."""
    sizes = [0]
    while sum(sizes) < frames:
        n = 1 if len(sizes) in (1, 3) else rng.choice([0, 1, 2, 3, 5, 8])
        sizes.append(min(frames - sum(sizes), n))
    return sizes


def by_chunks(co, stream, sizes):
    """The outputs of stepping `stream` in chunks of `sizes` frames, then flushing it."""
    t = co.options["time_dim"]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    outs = [co.forward_steps(stream.narrow(t, at, n)) for at, n in zip(starts, sizes)]
    outs.append(co.forward_steps(stream.narrow(t, 0, 0), pad_end=True))
    return cat_outputs(co, outs)


def _clip_equivalence(co, model, clip, strict) -> Check:
    ref_clip = model(clip)
    co.clean_state()
    whole = co.forward_steps(clip, pad_end=True)
    co.clean_state()
    frames = by_frame(co, clip)
    if whole is None:
        return Check("clip equivalence", float("inf"), 0.0, note="no output for a whole clip")
    ref = as_steps(ref_clip, whole)
    err, tol = worst_error((whole, ref), (frames, ref), (co.forward(clip), ref_clip))
    if co.is_exact:
        return Check("clip equivalence", err, tol)
    windows = [r for r in co.report if not r.exact and r.kind == "windowed"]
    why = f"{len(windows)} windowed reduction{'s' if len(windows) != 1 else ''}" if windows else "not exact"
    return Check("deviation from the original", err, tol, required=strict, note=why)


def _chunk_invariance(co, stream, rng):
    co.clean_state()
    whole = co.forward_steps(stream, pad_end=True)
    co.clean_state()
    outs = [by_frame(co, stream)]
    for _ in range(2):
        co.clean_state()
        outs.append(by_chunks(co, stream, chunk_sizes(stream.shape[co.options['time_dim']], rng)))
    return whole, Check("chunk invariance", *worst_error(*[(o, whole) for o in outs]), note=_no_output(whole))


def _state_reset(co, stream, whole) -> Check:
    t = co.options["time_dim"]
    n = stream.shape[t]
    half = n // 2
    first, second = stream.narrow(t, 0, half), stream.narrow(t, half, n - half)
    other = torch.flip(stream, [t])
    outs = []
    # clean_state restarts: a stream after another one gives the same outputs as from the start
    co.clean_state()
    co.forward_steps(other)
    co.clean_state()
    outs.append(co.forward_steps(stream, pad_end=True))
    # update_state=False changes nothing
    co.clean_state()
    head = co.forward_steps(first)
    co.forward_steps(other, update_state=False)
    co.forward_steps(other, pad_end=True, update_state=False)
    outs.append(cat_outputs(co, [head, co.forward_steps(second, pad_end=True)]))
    # get_state / set_state resume exactly
    co.clean_state()
    head = co.forward_steps(first)
    saved = co.get_state()
    co.forward_steps(other)
    co.set_state(saved)
    outs.append(cat_outputs(co, [head, co.forward_steps(second, pad_end=True)]))
    return Check("state reset", *worst_error(*[(o, whole) for o in outs]), note=_no_output(whole))


def _no_output(whole) -> str:
    return "" if whole is not None else "no outputs: the stream is shorter than the delay; raise steps"

