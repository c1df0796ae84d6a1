"""Framework overhead of a continual step: the share of its wall time not spent running PyTorch ops.

    python benchmarks/overhead.py [--model x3d_s] [--steps 40] [--threads 2]

One steady-state `forward_step` is recorded at the ATen level (every op PyTorch
dispatches, with its arguments). Replaying that list of ops is the step's tensor
work plus PyTorch's own dispatch: what any eager program with the same ops
would pay. Everything a real step costs beyond the replay (the continual
graph's Python, kernel bookkeeping, module calls, checks) is cofx's overhead:

    overhead = 1 - replay time / step time      (medians, runs interleaved)

The profiler's view is reported beside it: the share of a profiled step's wall
time outside top-level ATen ops. That is an upper bound, as the profiler's own
recording of every op and sub-op lands outside the ops. Writes
benchmarks/results/overhead.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import cofx

sys.path.insert(0, str(Path(__file__).parent))
from models import build  # noqa: E402


class Recorder(TorchDispatchMode):
    """Keeps every ATen call (op, args, kwargs) made while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def replay(calls) -> None:
    for func, args, kwargs in calls:
        func(*args, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="x3d_s")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, clip = build(args.model)
    co = cofx.convert(model, clip)
    t = co.warmup_frames
    frames = torch.randn(1, 3, t + 2 * args.steps + 1, *clip.shape[3:])
    step_s, replay_s = [], []
    with torch.no_grad():
        co.forward_steps(frames[:, :, :t])
        with Recorder() as rec:
            co.forward_step(frames[:, :, t])
        for i in range(args.steps):   # interleaved, so that load on the machine hits both alike
            start = time.perf_counter()
            co.forward_step(frames[:, :, t + 1 + i])
            step_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            replay(rec.calls)
            replay_s.append(time.perf_counter() - start)
        n = min(10, args.steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for i in range(n):
                co.forward_step(frames[:, :, t + 1 + args.steps + i])
            profiled = (time.perf_counter() - start) / n
    in_ops = sum(e.cpu_time_total for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    in_ops = in_ops / 1e6 / n
    step, ops = statistics.median(step_s), statistics.median(replay_s)
    text = ("| model | threads | step ms | ATen ops per step | replay of those ops ms | overhead (replay) "
            "| profiled step ms | in top-level ATen ops ms | overhead (profiler, upper bound) |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| {args.model} | {args.threads} | {1e3 * step:.2f} | {len(rec.calls)} | {1e3 * ops:.2f} "
            f"| {100 * (1 - ops / step):.1f}% | {1e3 * profiled:.2f} | {1e3 * in_ops:.2f} "
            f"| {100 * (1 - in_ops / profiled):.1f}% |\n")
    out = Path(__file__).parent / "results" / "overhead.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
