"""Framework overhead of a continual step: the share of its wall time not spent inside PyTorch ops.

    python benchmarks/overhead.py [--model x3d_s] [--steps 60] [--threads 2]

For eager steps and compiled steps (`co.compile_steps()`, its generated kernels
recorded by the profiler too): the profiler gives the time of every top-level
ATen op and generated kernel of a step (the tensor kernels and PyTorch's
dispatch to them); everything else (the continual graph's Python, kernel
bookkeeping, module calls, argument parsing before an op) is overhead. The profiler's own recording lands outside the ops too, so two
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

sys.path.insert(0, str(Path(__file__).parent))
from models import converted, write_result  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args, clip, co = converted(parser, argv)
    rows = [measure(co, clip, "eager", args.steps)]
    co.compile_steps(options={"freezing": True, "cpp.enable_kernel_profile": True})
    rows.append(measure(co, clip, "compiled", args.steps))
    text = ("| model | steps | threads | kernels per step | in kernels ms | step ms (unprofiled) "
            "| step ms (profiled) | overhead |\n|---|---|---|---|---|---|---|---|\n" +
            "".join(f"| {args.model} | {steps} | {args.threads} | {n:.0f} | {1e3 * in_ops:.2f} | {1e3 * step:.2f} "
                    f"| {1e3 * profiled:.2f} | {100 * max(0.0, 1 - in_ops / step):.0f}% to "
                    f"{100 * (1 - in_ops / profiled):.0f}% |\n" for steps, n, in_ops, step, profiled in rows))
    write_result("overhead.md", text)


def is_kernel(event) -> bool:
    """An ATen op, an op a compiled library calls through its C shim, or a kernel inductor generated."""
    return event.name.startswith(("aten::", "mkldnn::", "aoti_torch_")) or "cpp_fused" in event.name


def measure(co, clip, steps_kind: str, steps: int):
    """(steps kind, kernels per step, seconds in kernels, unprofiled and profiled seconds per step)."""
    t = co.warmup_frames
    frames = torch.randn(1, 3, t + 2 * steps, *clip.shape[3:])
    with torch.no_grad():
        co.forward_steps(frames[:, :, :t])
        wall = []
        for i in range(steps):
            start = time.perf_counter()
            co.forward_step(frames[:, :, t + i])
            wall.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for i in range(steps):
                co.forward_step(frames[:, :, t + steps + i])
            profiled = (time.perf_counter() - start) / steps
    top = [e for e in prof.events() if is_kernel(e) and (e.cpu_parent is None or not is_kernel(e.cpu_parent))]
    in_ops = sum(e.cpu_time_total for e in top) / 1e6 / steps
    return steps_kind, len(top) / steps, in_ops, statistics.median(wall), profiled


if __name__ == "__main__":
    main()
