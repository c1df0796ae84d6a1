"""Latency of a continual step against the sliding-window clip model it replaces.

Without cofx, a streaming application re-runs the clip model on the last T
frames for every output. `bench` times that (`forward` on a clip) and one
`forward_step` in steady state, interleaved round by round so that load on the
machine hits both alike, and reports the median and interquartile range. The
speed-up is taken round by round (that round's clip against that round's
steps): a machine whose speed drifts between rounds moves both alike.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .dtype_device import dtype_device
from .scratch_stream import scratch_stream


@dataclass
class Timing:
    """Median and interquartile range of samples (seconds per call, or a ratio), and the samples."""
    median: float
    q1: float
    q3: float
    samples: int
    values: tuple

    @classmethod
    def of(cls, samples: list) -> "Timing":
        q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
        return cls(statistics.median(samples), q1, q3, len(samples), tuple(samples))


@dataclass
class BenchResult:
    step: Timing    # one forward_step (one input frame), averaged over the stride period
    clip: Timing    # one forward on a clip: what a sliding-window clip model pays per output
    stride: int
    batch: int
    threads: int
    speedups: Timing   # per round: the clip's time over the time of `stride` steps

    @property
    def per_output(self) -> float:
        """Median seconds of continual work per output (stride steps)."""
        return self.step.median * self.stride

    @property
    def speedup(self) -> float:
        """The median of the rounds' speed-ups."""
        return self.speedups.median


def bench(co, *, batch: int = 1, threads: Optional[int] = None, rounds: int = 20,
          progress: Optional[Callable[[int, int], None]] = None) -> BenchResult:
    """Time `co.forward_step` (steady state) and `co.forward` on a clip of `co.clip_shape`, batch `batch`.

    Each of `rounds` rounds times a run of steps (a multiple of the temporal
    stride, at least 8, so a sample is the mean cost of a step over the stride
    period), then one clip forward; one extra round first warms up. `threads`
    sets torch's intra-op threads for the run. `progress(done, rounds)` is
    called after each round. The stream state is cleaned before and after.
    """
    if batch < 1 or rounds < 1:
        raise ValueError("batch and rounds must be at least 1")
    time_dim = co.options["time_dim"]
    dtype, device = dtype_device(co)
    kw = dict(dtype=dtype, device=device)
    shape = [batch] + list(co.clip_shape[1:])

    def frames(n):
        return torch.randn(shape[:time_dim] + [n] + shape[time_dim + 1:], **kw)
    n_steps = co.stride * -(-8 // co.stride)
    clip, stream = torch.randn(shape, **kw), frames(n_steps)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    step_times, clip_times = [], []
    try:
        with scratch_stream(co), torch.no_grad():   # the user's stream and every submodule's mode kept
            for _ in range(0, co.warmup_frames, 8):   # in short chunks: a long one at batch 8 takes gigabytes
                co.forward_steps(frames(8))
            for r in range(rounds + 1):
                start = time.perf_counter()
                for i in range(n_steps):
                    co.forward_step(stream.select(time_dim, i))
                step = (time.perf_counter() - start) / n_steps
                start = time.perf_counter()
                co.forward(clip)
                whole = time.perf_counter() - start
                if r:   # round 0 warms up
                    step_times.append(step)
                    clip_times.append(whole)
                    if progress:
                        progress(r, rounds)
    finally:
        torch.set_num_threads(old_threads)
    speedups = [whole / (step * co.stride) if step else float("inf") for step, whole in zip(step_times, clip_times)]
    return BenchResult(Timing.of(step_times), Timing.of(clip_times), co.stride, batch,
                       threads if threads is not None else old_threads, Timing.of(speedups))
