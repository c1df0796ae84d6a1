"""Per-step latency of continual models against re-running the clip model on a sliding window.

    python benchmarks/step_latency.py                 # all models, batch 1 and 8
    python benchmarks/step_latency.py --models plain --batches 1 --rounds 10

For each model: median and interquartile range of one `forward_step` in steady
state and of one clip `forward` on the last clip, interleaved round by round in
one process (`cofx.bench`), torch.set_num_threads(2), with eager steps, compiled
steps (`co.compile_steps()`) and the same compiled steps with frozen weights
(`check_weights=False`: no check of the weights before each step); `--no-compile`
skips the compiled ones. The speed-up per output is the median of the rounds'
own (clip time over the time of `stride` steps in the same round: this machine's
speed drifts between rounds). FLOPs per step and per clip
(torch.utils.flop_counter); state memory of the batch (compiled steps keep the
windows of temporal ops in rings). The realised speed-up divided by the FLOP
reduction says how much of the saving reaches the clock. Writes
benchmarks/results/step_latency.md and step_latency.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import cofx
from cofx.barchart import bar_rows
from cofx.bench import bench
from cofx.flops import clip_flops, step_flops

sys.path.insert(0, str(Path(__file__).parent))
from models import RESULTS, build, machine, write_result  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["plain", "x3d_s", "x3d_m", "r2plus1d_18"])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager steps only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, bars = [], []
    for name in args.models:
        model, clip = build(name)
        print(f"{name}: converting", file=sys.stderr, flush=True)
        co = cofx.convert(model, clip)
        flops_clip, flops_step = clip_flops(co), step_flops(co)
        reduction = flops_clip / (flops_step * co.stride)
        kinds = ("eager", "compiled", "frozen") if args.compile else ("eager",)
        for batch, steps in [(b, k) for b in args.batches for k in kinds]:
            print(f"{name} batch {batch}, {steps} steps: timing", file=sys.stderr, flush=True)
            if steps == "frozen":   # the same compiled phases, without the check of the weights before each step
                co._compiled.check_weights = False
            else:
                co.compile_steps("inductor" if steps == "compiled" else None, batch=batch)
                state = state_bytes(co, clip, batch)
            r = bench(co, batch=batch, threads=args.threads, rounds=args.rounds,
                      progress=lambda done, total: print(f"  round {done}/{total}", end="\r", file=sys.stderr))
            rows.append(f"| {name} | {'x'.join(map(str, clip.shape[2:]))} | {batch} | {steps} "
                        f"| {1e3 * r.step.median:.1f} ({1e3 * r.step.q1:.1f}-{1e3 * r.step.q3:.1f}) "
                        f"| {1e3 * r.clip.median:.1f} ({1e3 * r.clip.q1:.1f}-{1e3 * r.clip.q3:.1f}) "
                        f"| {r.speedup:.1f}x ({r.speedups.q1:.1f}-{r.speedups.q3:.1f}) | {flops_step / 1e9:.3f} "
                        f"| {flops_clip / 1e9:.2f} | {reduction:.1f}x | {r.speedup / reduction:.2f} "
                        f"| {state / 2**20:.1f} |")
            print(f"\n  {rows[-1]}", file=sys.stderr, flush=True)
            bars.append((f"{name} b{batch} {steps} step x{co.stride}", 1e3 * r.per_output,
                         1e3 * r.step.q1 * co.stride, 1e3 * r.step.q3 * co.stride))
            if steps == "eager":
                bars.append((f"{name} b{batch} clip", 1e3 * r.clip.median, 1e3 * r.clip.q1, 1e3 * r.clip.q3))
        write_table(rows)   # after every model: a long run that fails late keeps what it measured
    bar_rows(RESULTS / "step_latency.png", bars, "Latency per output: continual step vs clip model", "ms",
             note=f"median, whiskers: interquartile range; {args.threads} threads")


def state_bytes(co, clip, batch: int) -> int:
    """State memory of a stream of `batch` in steady state, after one single-frame step (which enters the rings
    of compiled steps)."""
    with torch.no_grad():
        co.clean_state()
        for _ in range(0, co.warmup_frames, 8):
            co.forward_steps(torch.randn(batch, *clip.shape[1:2], 8, *clip.shape[3:]))
        co.forward_step(torch.randn(batch, *clip.shape[1:2], *clip.shape[3:]))
        state = co.state_bytes
        co.clean_state()
    return state


def write_table(rows: list) -> None:
    head = ["| model | clip | batch | steps | step ms (IQR) | clip ms (IQR) | speed-up (IQR) | GFLOPs/step | GFLOPs/clip "
            "| FLOP reduction | speed-up / FLOP reduction | state MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    write_result("step_latency.md", "\n".join([machine(), ""] + head + rows) + "\n")


if __name__ == "__main__":
    main()
