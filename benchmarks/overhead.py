"""Framework overhead of a continual step: the share of its wall time not spent inside PyTorch ops.

    python benchmarks/overhead.py [--model x3d_s] [--steps 60] [--threads 2]

The profiler gives the time of every top-level ATen op of a step (the tensor
kernels and PyTorch's dispatch to them); everything else (the continual graph's
Python, kernel bookkeeping, module calls, argument parsing before an op) is
overhead. The profiler's own recording lands outside the ops too, so two
figures bound the overhead: against the profiled step's wall time (an upper
bound) and against the median wall time of unprofiled steps, timed in the same
process (a lower bound: the ops' own times still carry some profiler cost).
Writes benchmarks/results/overhead.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import cofx

sys.path.insert(0, str(Path(__file__).parent))
from models import build, write_result  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="x3d_s")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, clip = build(args.model)
    co = cofx.convert(model, clip)
    t = co.warmup_frames
    frames = torch.randn(1, 3, t + 2 * args.steps, *clip.shape[3:])
    with torch.no_grad():
        co.forward_steps(frames[:, :, :t])
        wall = []
        for i in range(args.steps):
            start = time.perf_counter()
            co.forward_step(frames[:, :, t + i])
            wall.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for i in range(args.steps):
                co.forward_step(frames[:, :, t + args.steps + i])
            profiled = (time.perf_counter() - start) / args.steps
    top = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    in_ops = sum(e.cpu_time_total for e in top) / 1e6 / args.steps
    step = statistics.median(wall)
    text = ("| model | threads | top-level ATen ops per step | in ATen ops ms | step ms (unprofiled) "
            "| step ms (profiled) | overhead |\n|---|---|---|---|---|---|---|\n"
            f"| {args.model} | {args.threads} | {len(top) / args.steps:.0f} | {1e3 * in_ops:.2f} | {1e3 * step:.2f} "
            f"| {1e3 * profiled:.2f} | {100 * max(0.0, 1 - in_ops / step):.0f}% to {100 * (1 - in_ops / profiled):.0f}% |\n")
    write_result("overhead.md", text)


if __name__ == "__main__":
    main()
