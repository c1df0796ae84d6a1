"""Framework overhead of a continual step: the share of wall time not spent inside PyTorch ops.

    python benchmarks/overhead.py [--model x3d_s] [--steps 30]

Profiles steady-state `forward_step` calls with torch.profiler; the CPU time of
top-level aten ops (kernels and their dispatch) is the tensor work, everything
else (Python, the graph's generated code, kernel bookkeeping, module calls) is
overhead. Writes benchmarks/results/overhead.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import cofx

sys.path.insert(0, str(Path(__file__).parent))
from models import build  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="x3d_s")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, clip = build(args.model)
    co = cofx.convert(model, clip)
    frames = torch.randn(1, 3, co.warmup_frames + args.steps, *clip.shape[3:])
    with torch.no_grad():
        co.forward_steps(frames[:, :, :co.warmup_frames])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for i in range(co.warmup_frames, frames.shape[2]):
                co.forward_step(frames[:, :, i])
            wall = time.perf_counter() - start
    ops = sum(e.cpu_time_total for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    ops_s = ops / 1e6
    text = (f"| model | wall ms/step (profiled) | in aten ops ms/step | overhead |\n|---|---|---|---|\n"
            f"| {args.model} | {1e3 * wall / args.steps:.2f} | {1e3 * ops_s / args.steps:.2f} "
            f"| {100 * (1 - ops_s / wall):.1f}% |\n")
    out = Path(__file__).parent / "results" / "overhead.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
