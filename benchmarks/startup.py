"""How long `cofx.convert` takes in a fresh process: without tuning, with an empty tuning cache, with a warm one.

    python benchmarks/startup.py [--models x3d_s plain] [--rounds 3] [--threads 2]

Every conversion runs in its own subprocess (nothing imported, traced or cached in
memory beforehand), with `COFX_CACHE_DIR` pointing at a folder of the benchmark's
own: an empty one (cold), or the one that round's cold run filled (warm). Rounds are
interleaved; each figure is the median of the rounds, with its range. "ops timed"
counts the Conv3d ops select_kernels measured (0 on a warm cache); "the tuning pass"
is the time convert spent in it (reading the cache included). The load average
is recorded beside the table. Writes benchmarks/results/startup.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()   # before torch is imported: the process's own start-up counts

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from models import build, load_line, machine, write_result  # noqa: E402

MODES = {"tune=False": False, "cold cache": True, "warm cache": True}


def child(model_name: str, tune: bool, threads: int) -> None:
    """Convert one model and print the seconds it took (convert alone, its tuning pass, and since the process
    started) and how many ops it timed."""
    import importlib
    import cofx
    from cofx import passes
    sk = importlib.import_module("cofx.passes.select_kernels")
    timed, fastest, tuning, select = [], sk._fastest, [0.0], passes.select_kernels
    sk._fastest = lambda candidates: timed.append(1) or fastest(candidates)

    def timed_select(gm):
        began = time.perf_counter()
        select(gm)
        tuning[0] += time.perf_counter() - began
    passes.select_kernels = timed_select
    torch.set_num_threads(threads)
    model, clip = build(model_name)
    began = time.perf_counter()
    cofx.convert(model, clip, tune=tune)
    done = time.perf_counter()
    print(json.dumps({"convert": done - began, "tuning": tuning[0], "process": done - STARTED, "timed": len(timed)}))


def run(model_name: str, mode: str, cache: str, threads: int) -> dict:
    env = dict(os.environ, COFX_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, __file__, "--child", model_name, str(int(MODES[mode])),
                          "--threads", str(threads)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cell(values, fmt="{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["x3d_s", "plain"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "TUNE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], bool(int(args.child[1])), args.threads)
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    runs = {(m, mode): [] for m in args.models for mode in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            for m in args.models:
                cache = tempfile.mkdtemp(dir=scratch)   # empty for this round's cold run, then warm
                for mode in MODES:
                    runs[m, mode].append(run(m, mode, cache, args.threads))
                    print(m, mode, runs[m, mode][-1], flush=True)
    load.append(os.getloadavg()[0])
    lines = [f"# `cofx.convert` in a fresh process (median of {args.rounds}, range; validate=True)", "",
             machine(), "",
             load_line(load[0], load[1], args.threads), "",
             "| model | clip | tuning | convert s | of which the tuning pass s | process start to converted s "
             "| ops timed |", "|---|---|---|---|---|---|---|"]
    for (m, mode), results in runs.items():
        clip = "x".join(str(s) for s in build(m)[1].shape[2:])
        lines.append(f"| {m} | {clip} | {mode} | {cell([r['convert'] for r in results])} "
                     f"| {cell([r['tuning'] for r in results])} | "
                     f"{cell([r['process'] for r in results])} | {cell([r['timed'] for r in results], '{:.0f}')} |")
    write_result("startup.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
