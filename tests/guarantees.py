"""The README's guarantees as reusable assertions (imported by the test modules)."""
from __future__ import annotations

import random

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


def max_err(a, b) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def tolerance(ref: torch.Tensor) -> float:
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    return (1e-9 if ref.dtype == torch.float64 else 1e-4) * max(scale, 1e-30)


def clip_output(co, model_out):
    """`forward(clip)` in the layout `forward_steps` returns (a classifier's (B, K) becomes (B, K, 1))."""
    out = next(n for n in co.graph.nodes if n.op == "output")
    if out.args[0].meta.get("cofx_role") == "stream":
        return model_out
    if model_out.dim() > 2 and model_out.shape[2] == 1:
        return model_out
    return model_out.unsqueeze(min(2, model_out.dim()))


def steps_frame_by_frame(co, stream, flush=True):
    t = co.options["time_dim"]
    outs = []
    for i in range(stream.shape[t]):
        y = co.forward_step(stream.select(t, i))
        if y is not None:
            outs.append(y.unsqueeze(co.output_time_axes))
    if flush:
        tail = co.forward_steps(stream.narrow(t, 0, 0), pad_end=True)
        if tail is not None:
            outs.append(tail)
    return torch.cat(outs, co.output_time_axes) if outs else None


def two_streams(clip, time_dim=2, frames=None):
    """Two fresh streams shaped like `clip` (with `frames` frames), the second at 10 times the scale, in the
    clip's memory format."""
    shape = list(clip.shape)
    shape[0] = 2
    if frames is not None:
        shape[time_dim] = frames
    x = torch.randn(shape, dtype=clip.dtype)
    x[1] *= 10.0   # the second stream at another scale
    if clip.dim() == 5 and clip.is_contiguous(memory_format=torch.channels_last_3d) and not clip.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x

def by_forward_step(co, stream, like):
    """`forward_step` frame by frame, then the end flush, joined per output along its time axis (in the
    structure of `like`, a `forward_steps` result)."""
    t = co.options["time_dim"]
    axes, _ = tree_flatten(co.output_time_axes, is_leaf=lambda a: a is None)
    _, spec = tree_flatten(like)
    parts = [[] for _ in axes]
    for i in range(stream.shape[t]):
        y = co.forward_step(stream.select(t, i))
        if y is None:
            continue
        for j, v in enumerate(tree_flatten(y)[0]):
            if v is not None:
                parts[j].append(v if axes[j] is None else v.unsqueeze(axes[j]))
    tail = co.forward_steps(stream.narrow(t, 0, 0), pad_end=True)
    if tail is not None:
        for j, v in enumerate(tree_flatten(tail)[0]):
            if v is not None:
                parts[j].append(v)
    leaves = [None if not p else p[-1] if a is None else torch.cat(p, a) for p, a in zip(parts, axes)]
    return tree_unflatten(leaves, spec)


def assert_clip_exact(co, model, x):
    """From a clean state, `x` stepped as one chunk and frame by frame (each then flushed) gives the model's
    output on `x`, and `co.forward` is the model's forward; returns (the stepped outputs, the model's)."""
    from cofx.verify import as_steps, max_error, output_tolerance
    with torch.no_grad():
        ref_clip = model(x)
        co.clean_state()
        whole = co.forward_steps(x, pad_end=True)
        assert whole is not None
        ref = as_steps(ref_clip, whole)
        tol = output_tolerance(ref)
        assert max_error(whole, ref) <= tol, max_error(whole, ref)
        co.clean_state()
        framewise = by_forward_step(co, x, whole)
        assert max_error(framewise, ref) <= tol, max_error(framewise, ref)
        assert max_error(co.forward(x), ref_clip) == 0.0
    return whole, ref_clip


def steps_in_chunks(co, stream, sizes, flush=True):
    t = co.options["time_dim"]
    outs, at = [], 0
    for n in sizes:
        y = co.forward_steps(stream.narrow(t, at, n))
        at += n
        if y is not None:
            outs.append(y)
    if flush:
        tail = co.forward_steps(stream.narrow(t, 0, 0), pad_end=True)
        if tail is not None:
            outs.append(tail)
    return torch.cat(outs, co.output_time_axes) if outs else None


def random_chunks(total: int, rng: random.Random) -> list:
    sizes = []
    while total > 0:
        n = min(total, rng.choice([0, 1, 1, 2, 3, 5]))
        sizes.append(n)
        total -= n
    return sizes


def assert_equivalent(co, model, clip):
    """Guarantee 1: from a clean state, forward_steps(clip, pad_end=True) == forward(clip)."""
    co.clean_state()
    with torch.no_grad():
        ref = clip_output(co, model(clip))
        out = co.forward_steps(clip, pad_end=True)
        assert out is not None, "no output for a whole clip"
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert max_err(out, ref) <= tolerance(ref), max_err(out, ref)
        # the same, frame by frame plus the end flush
        co.clean_state()
        by_frame = steps_frame_by_frame(co, clip)
        assert by_frame.shape == ref.shape and max_err(by_frame, ref) <= tolerance(ref)
    assert co.forward(clip).shape == model(clip).shape
    assert torch.equal(co.forward(clip), model(clip))


def assert_stream_discipline(co, stream, seed=0):
    """Guarantees 2 and 3 on a stream longer than the receptive field."""
    rng = random.Random(seed)
    t = co.options["time_dim"]
    with torch.no_grad():
        co.clean_state()
        whole = co.forward_steps(stream, pad_end=True)
        co.clean_state()
        by_frame = steps_frame_by_frame(co, stream)
        assert (whole is None) == (by_frame is None)
        if whole is not None:
            assert torch.equal(whole, by_frame) or max_err(whole, by_frame) <= tolerance(whole)
        for _ in range(2):
            co.clean_state()
            chunked = steps_in_chunks(co, stream, random_chunks(stream.shape[t], rng))
            if whole is not None:
                assert chunked.shape == whole.shape and max_err(chunked, whole) <= tolerance(whole)

        # update_state=False leaves what follows unchanged; get/set_state resumes exactly
        half = stream.shape[t] // 2
        co.clean_state()
        co.forward_steps(stream.narrow(t, 0, half))
        saved = co.get_state()
        peek = co.forward_steps(stream.narrow(t, half, 2), update_state=False)
        peek_flush = co.forward_steps(stream.narrow(t, half, 1), pad_end=True, update_state=False)
        rest = co.forward_steps(stream.narrow(t, half, stream.shape[t] - half), pad_end=True)
        co.clean_state()
        co.set_state(saved)
        again = co.forward_steps(stream.narrow(t, half, stream.shape[t] - half), pad_end=True)
        assert (rest is None) == (again is None)
        if rest is not None:
            assert torch.equal(rest, again)
        co.clean_state()
        co.forward_steps(stream.narrow(t, 0, half))
        peek2 = co.forward_steps(stream.narrow(t, half, 2), update_state=False)
        assert (peek is None) == (peek2 is None) and (peek is None or torch.equal(peek, peek2))
        assert peek_flush is None or peek_flush.shape[co.output_time_axes] >= 0

        # clean_state restarts: the same stream gives the same outputs
        co.clean_state()
        first = co.forward_steps(stream.narrow(t, 0, half))
        co.forward_steps(stream.narrow(t, half, 3))
        co.clean_state()
        second = co.forward_steps(stream.narrow(t, 0, half))
        assert (first is None) == (second is None) and (first is None or torch.equal(first, second))

        # state memory is fixed: after 10x the receptive field as after 1x (at the same stride phase)
        co.clean_state()
        period = co.stride
        steps = period * -(-co.warmup_frames // period)
        frames = stream.narrow(t, 0, 1)

        def sizes_over_a_period():
            sizes = []
            for _ in range(period):
                co.forward_steps(frames)
                sizes.append(co.state_bytes)
            return sizes
        for _ in range(steps - period):
            co.forward_steps(frames)
        one = sizes_over_a_period()
        for _ in range(9 * steps):
            co.forward_steps(frames)
        assert sizes_over_a_period() == one
        co.clean_state()


def assert_delay(co, stream):
    """The first `delay` steps return None, the next one returns a frame."""
    t = co.options["time_dim"]
    co.clean_state()
    with torch.no_grad():
        results = [co.forward_step(stream.select(t, i)) for i in range(co.delay + 1)]
    assert all(r is None for r in results[:-1]) and results[-1] is not None
    co.clean_state()


def assert_chunk_invariance(co, stream, chunk=5):
    """Guarantee 2 on a long stream, cheaply: frame by frame == one call == fixed chunks."""
    t = co.options["time_dim"]
    with torch.no_grad():
        co.clean_state()
        whole = co.forward_steps(stream, pad_end=True)
        co.clean_state()
        by_frame = steps_frame_by_frame(co, stream)
        co.clean_state()
        chunked = steps_in_chunks(co, stream, [chunk] * (stream.shape[t] // chunk) + [stream.shape[t] % chunk])
    assert whole is not None and by_frame.shape == whole.shape == chunked.shape
    assert max_err(by_frame, whole) <= tolerance(whole)
    assert max_err(chunked, whole) <= tolerance(whole)
    co.clean_state()
