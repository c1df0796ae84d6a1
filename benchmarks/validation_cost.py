"""What `convert`'s validation costs: conversion time with and without it, per model.

Run: python benchmarks/validation_cost.py [--rounds 3]
Writes benchmarks/results/validation_cost.md (with the machine it ran on).
"""
from __future__ import annotations

import argparse
import statistics
import time
import torch

import cofx
from models import build, machine, write_result


def small_models():
    torch.manual_seed(0)
    tcn = torch.nn.Sequential(torch.nn.Conv1d(8, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv1d(16, 16, 3, padding=2, dilation=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    return [("TCN (1-d, 3 layers)", tcn, torch.randn(1, 8, 32)),
            ("plain 3D CNN (3 layers, 112x112)", *build("plain"))]


def timed(fn, rounds):
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    cases = small_models() + [("X3D-S", *build("x3d_s"))]
    for name, model, clip in cases:
        with_check = timed(lambda: cofx.convert(model, clip, tune=False), args.rounds)
        without = timed(lambda: cofx.convert(model, clip, tune=False, validate=False), args.rounds)
        rows.append((name, without, with_check))
        print(f"{name}: {without:.2f} s without validation, {with_check:.2f} s with", flush=True)
    lines = [f"# Validation cost of `cofx.convert` (median of {args.rounds}, tune=False)", "", machine(), "",
             "| model | convert, validate=False | convert (validates) | validation's share |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {a:.2f} s | {b:.2f} s | {(b - a) / b:.0%} |" for n, a, b in rows]
    write_result("validation_cost.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
