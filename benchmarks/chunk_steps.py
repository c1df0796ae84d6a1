"""Eager steps of a few frames at a time: milliseconds per frame, with few-frame Conv3d calls sent to oneDNN
(`cofx.onednn_conv`, the default) and with PyTorch's own choice of kernel (`onednn_conv.standard_ops`).

    python benchmarks/chunk_steps.py [--models plain r2plus1d_18 x3d_s] [--chunks 1 2 4 8] [--rounds 5]

Per model and chunk size: a stream already past its start-up is fed chunk after chunk, the two settings
interleaved round by round in one process, and the median over rounds of the time per frame is reported.
Writes benchmarks/results/chunk_steps.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import build, load_line, machine, write_result  # noqa: E402

import cofx  # noqa: E402
from cofx import onednn_conv  # noqa: E402


def per_frame_ms(co, stream, chunk: int, standard: bool) -> float:
    t = co.options["time_dim"]
    began = time.perf_counter()
    with torch.no_grad(), (onednn_conv.standard_ops() if standard else contextlib.nullcontext()):
        for at in range(0, stream.shape[t] - chunk + 1, chunk):
            co.forward_steps(stream.narrow(t, at, chunk))
    return (time.perf_counter() - began) * 1000 / (stream.shape[t] // chunk * chunk)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["plain", "r2plus1d_18", "x3d_s"])
    parser.add_argument("--chunks", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=16, help="frames fed per round and setting")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    rows = []
    for name in args.models:
        model, clip = build(name)
        co = cofx.convert(model, clip)
        shape = list(clip.shape)
        shape[2] = co.warmup_frames + args.frames
        stream = torch.randn(shape)
        with torch.no_grad():
            co.forward_steps(stream.narrow(2, 0, co.warmup_frames))   # past the start-up: steady-state steps
        frames = stream.narrow(2, co.warmup_frames, args.frames)
        for chunk in args.chunks:
            times = {False: [], True: []}
            per_frame_ms(co, frames, chunk, False), per_frame_ms(co, frames, chunk, True)   # first calls
            for _ in range(args.rounds):
                for standard in (False, True):
                    times[standard].append(per_frame_ms(co, frames, chunk, standard))
            routed, standard = statistics.median(times[False]), statistics.median(times[True])
            rows.append((name, "x".join(map(str, clip.shape[2:])), chunk, routed, standard))
            print(f"{name} chunk {chunk}: {routed:.1f} ms/frame routed, {standard:.1f} standard", flush=True)
    lines = [f"# Eager steps in chunks: ms per frame (median of {args.rounds} rounds, batch 1)", "", machine(), "",
             load_line(load_start, os.getloadavg()[0], args.threads), "",
             "| model | clip | frames per call | cofx (few-frame Conv3d by oneDNN) | PyTorch's kernel choice | "
             "speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {c} | {k} | {a:.1f} | {b:.1f} | {b / a:.2f}x |" for n, c, k, a, b in rows]
    write_result("chunk_steps.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
