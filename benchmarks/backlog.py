"""Catching up on a backlog: `forward_steps` on chunks of 16 frames against the clip forward, per frame.

    python benchmarks/backlog.py [--models x3d_s plain] [--chunk 16]

A continual model that fell behind (or processes a recorded video) consumes
chunks; each chunk should cost no more per frame than the clip model's forward
does. Eager chunks, and compiled chunks (`co.compile_steps(chunks=(16,))`).
Interleaved runs, 2 threads; the ratio is the median of the rounds' own
(that round's chunk against that round's clip: this machine's speed drifts
between rounds), with its interquartile range. Writes benchmarks/results/backlog.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import cofx

sys.path.insert(0, str(Path(__file__).parent))
from models import build, machine, write_result  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["x3d_s", "plain"])
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager chunks only")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = ["| model | chunk | chunks | forward_steps ms/frame | clip forward ms/frame | ratio (IQR) |",
            "|---|---|---|---|---|---|"]
    for name in args.models:
        model, clip = build(name)
        co = cofx.convert(model, clip)
        for kind in ("eager", "compiled")[:1 + args.compile]:
            print(f"{name}, {kind} chunks: timing", file=sys.stderr, flush=True)
            co.compile_steps("inductor" if kind == "compiled" else None, chunks=(args.chunk,))
            rows.append(f"| {name} | {args.chunk} | {kind} | " + measure(co, model, clip, args.chunk, args.rounds))
            print(rows[-1], file=sys.stderr, flush=True)
    write_result("backlog.md", "\n".join([machine(), ""] + rows) + "\n")


def measure(co, model, clip, chunk: int, rounds: int) -> str:
    """The table cells of one model's chunks: ms per frame of chunks and of the clip forward, their ratio."""
    T = clip.shape[2]
    stream = torch.randn(1, 3, co.warmup_frames + chunk * (rounds + 1), *clip.shape[3:])
    chunk_times, clip_times = [], []
    with torch.no_grad():
        co.clean_state()
        co.forward_steps(stream[:, :, :co.warmup_frames])
        at = co.warmup_frames
        for r in range(rounds + 1):
            start = time.perf_counter()
            co.forward_steps(stream[:, :, at:at + chunk])
            seconds = (time.perf_counter() - start) / chunk
            at += chunk
            start = time.perf_counter()
            model(stream[:, :, at - T:at])
            whole = (time.perf_counter() - start) / T
            if r:   # round 0 warms up
                chunk_times.append(seconds)
                clip_times.append(whole)
    a, b = statistics.median(chunk_times), statistics.median(clip_times)
    q1, ratio, q3 = statistics.quantiles([c / w for c, w in zip(chunk_times, clip_times)], n=4)
    return f"{1e3 * a:.2f} | {1e3 * b:.2f} | {ratio:.2f} ({q1:.2f}-{q3:.2f}) |"


if __name__ == "__main__":
    main()
