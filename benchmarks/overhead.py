"""Framework overhead of a continual step: the share of its wall time not spent inside tensor kernels.

    python benchmarks/overhead.py [--model x3d_s] [--steps 60] [--threads 2]

Eager steps, compiled steps (`co.compile_steps()`) and compiled steps with frozen
weights (`check_weights=False`: no per-step check of the weights), measured two ways:

- with the profiler (generated kernels recorded too, `cpp.enable_kernel_profile`):
  the time of every top-level ATen op and generated kernel of a step is in the
  kernels, the rest is overhead. The profiler's own recording lands outside the
  ops too, so this gives bounds: against the profiled step's wall time (upper)
  and against unprofiled steps timed in the same process (lower; the ops' own
  times still carry some profiler cost);
- without the profiler, for compiled steps: one call of the compiled library
  (every kernel of the step and the library's own C++ glue between them) timed
  against a whole `forward_step`, interleaved; the difference is cofx's Python
  around the library (the weight check, state and ring bookkeeping, input checks).

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
from models import converted, machine, write_result  # noqa: E402

PROFILED = {"freezing": True, "cpp.enable_kernel_profile": True}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args, clip, co = converted(parser, argv)
    rows = [profiled(co, clip, "eager", args.steps) + ("",)]
    for label, check in [("compiled", True), ("compiled, frozen weights", False)]:
        co.compile_steps(options=PROFILED, check_weights=check)
        row = profiled(co, clip, label, args.steps)
        co.compile_steps(check_weights=check)   # the library timed directly is built without kernel profiling
        library, step = direct(co, clip, args.steps)
        rows.append(row + (f"{1e3 * library:.2f} of {1e3 * step:.2f} ms: {100 * (1 - library / step):.0f}%",))
    text = (f"{machine()}\n\n| model | steps | threads | kernels per step | in kernels ms | step ms (unprofiled) "
            "| step ms (profiled) | overhead (profiler) | library call of a step, unprofiled: outside it |\n"
            "|---|---|---|---|---|---|---|---|---|\n" +
            "".join(f"| {args.model} | {steps} | {args.threads} | {n:.0f} | {1e3 * in_ops:.2f} | {1e3 * step:.2f} "
                    f"| {1e3 * prof:.2f} | {100 * max(0.0, 1 - in_ops / step):.0f}% to "
                    f"{100 * (1 - in_ops / prof):.0f}% | {outside} |\n"
                    for steps, n, in_ops, step, prof, outside in rows))
    write_result("overhead.md", text)


def is_kernel(event) -> bool:
    """An ATen op, an op a compiled library calls through its C shim, or a kernel inductor generated."""
    return event.name.startswith(("aten::", "mkldnn::", "aoti_torch_")) or "cpp_fused" in event.name


def steady(co, clip, steps: int) -> list:
    """Contiguous frames for `steps` steps, the stream brought to steady state."""
    t = co.warmup_frames
    co.clean_state()
    co.forward_steps(torch.randn(1, 3, t, *clip.shape[3:]))
    return [torch.randn(1, 3, *clip.shape[3:]) for _ in range(steps)]


def profiled(co, clip, steps_kind: str, steps: int):
    """(steps kind, kernels per step, seconds in kernels, unprofiled and profiled seconds per step)."""
    with torch.no_grad():
        frames = steady(co, clip, steps)
        wall = []
        for frame in frames:
            start = time.perf_counter()
            co.forward_step(frame)
            wall.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for frame in frames:
                co.forward_step(frame)
            seconds = (time.perf_counter() - start) / steps
    top = [e for e in prof.events() if is_kernel(e) and (e.cpu_parent is None or not is_kernel(e.cpu_parent))]
    in_ops = sum(e.cpu_time_total for e in top) / 1e6 / steps
    return steps_kind, len(top) / steps, in_ops, statistics.median(wall), seconds


def direct(co, clip, steps: int):
    """(median seconds of one call of the compiled library, of one forward_step), interleaved: after each step,
    the library runs once more on that step's inputs (it writes a frame into the rings: the stream's values
    go astray, its work does not change)."""
    library, whole = [], []
    with torch.no_grad():
        for frame in steady(co, clip, steps):
            start = time.perf_counter()
            co.forward_step(frame)
            whole.append(time.perf_counter() - start)
            phase = co._compiled.phases[(co._frames % co._compiled.period, 1, 1, frame.dtype, frame.device)]
            inputs = (frame.unsqueeze(2), *phase.read_state(), *phase.ring_views())
            co.forward_step(frame)   # the library's inputs out of cache again, as in a step
            start = time.perf_counter()
            phase.run(*inputs)
            library.append(time.perf_counter() - start)
    co.clean_state()
    return statistics.median(library), statistics.median(whole)


if __name__ == "__main__":
    main()
