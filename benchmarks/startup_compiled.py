"""Time from process start to the first compiled step: a model saved with its compiled steps, against compiling
them fresh.

    python benchmarks/startup_compiled.py [--models x3d_s plain] [--rounds 1] [--threads 2]

The parent converts each model, compiles its steps and saves it (`cofx.save(co, path, source=...)`, the
packages inline). Each run is a fresh subprocess, timed from before `import torch`:

- saved: `cofx.load(path, trust=True)`, the warm-up, then the first compiled step (the phase recorded
  and its saved package loaded; nothing compiles);
- fresh: `cofx.load(path, source=...)` (without its compiled steps), `co.compile_steps()`, the warm-up,
  the first compiled step.

The warm-up (``co.compiled_stats.start`` frames, until the steps repeat) is fed as one eager chunk,
and reported apart: a stream of single frames spends longer there, eagerly, whichever way it started.
Every process gets an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so compiling fresh is compiling
cold; all share one tuning cache (``COFX_CACHE_DIR``) that the parent's conversion filled, so every
conversion makes the same kernel choices and records the same programs (their fingerprints match).
Rounds are interleaved; each figure is the median of the rounds, with its range. Writes
benchmarks/results/startup_compiled.md.
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

SOURCES = {"plain": "models:PlainNet", "x3d_s": "pytorchvideo.models.hub:x3d_s"}


def child(path: str, mode: str, source: str, threads: int) -> None:
    """Load the saved model (with its compiled steps, or compiling them), step to steady state and take the
    first compiled step; print the seconds since the process started at each point."""
    import cofx
    torch.set_num_threads(threads)
    co = cofx.load(path, trust=True) if mode == "saved" else cofx.load(path, source=source)
    loaded = time.perf_counter()
    if mode == "fresh":
        co.compile_steps()
    compiled = time.perf_counter()
    t = co._info["time_dim"]
    start = co.compiled_stats.start
    frames = torch.randn(co.clip_shape[:t] + (start + 1,) + co.clip_shape[t + 1:])
    with torch.no_grad():
        co.forward_steps(frames.narrow(t, 0, start))
        warm = time.perf_counter()
        co.forward_step(frames.select(t, start))
        first = time.perf_counter()
    print(json.dumps({"loaded": loaded - STARTED, "compile": compiled - loaded, "warmup": warm - compiled,
                      "step": first - warm, "first": first - STARTED, "compiled": co.last_step_compiled}))


def run(path: Path, mode: str, source: str, threads: int, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as inductor:
        out = subprocess.run([sys.executable, __file__, "--child", str(path), mode, source, "--threads",
                              str(threads)], env=dict(env, TORCHINDUCTOR_CACHE_DIR=inductor),
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def save_compiled(name: str, path: Path) -> float:
    """Convert and compile `name`, save it to `path`; the seconds compile_steps took."""
    import cofx
    model, clip = build(name)
    co = cofx.convert(model, clip)
    began = time.perf_counter()
    co.compile_steps()
    took = time.perf_counter() - began
    cofx.save(co, path, source=SOURCES[name])
    return took


def cell(values, fmt="{:.1f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["x3d_s", "plain"], choices=sorted(SOURCES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("PATH", "MODE", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child, args.threads)
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, COFX_CACHE_DIR=f"{scratch}/tuning", TORCHINDUCTOR_CACHE_DIR=f"{scratch}/inductor")
        os.environ.update(env)   # the parent's conversion fills the tuning cache the runs share
        paths, sizes, parent = {}, {}, {}
        for m in args.models:
            paths[m] = Path(scratch) / f"{m}.continual.pt"
            parent[m] = save_compiled(m, paths[m])
            sizes[m] = paths[m].stat().st_size / 2 ** 20
            print(m, f"compiled in {parent[m]:.1f} s, saved {sizes[m]:.1f} MiB", flush=True)
        runs = {(m, mode): [] for m in args.models for mode in ("saved", "fresh")}
        for _ in range(args.rounds):
            for (m, mode), results in runs.items():
                results.append(run(paths[m], mode, SOURCES[m], args.threads, env))
                print(m, mode, results[-1], flush=True)
    load.append(os.getloadavg()[0])
    lines = [f"# Process start to the first compiled step: saved compiled steps vs compiling fresh "
             f"({'median of ' + str(args.rounds) + ', range' if args.rounds > 1 else '1 round'})", "",
             machine(), "",
             load_line(load[0], load[1], args.threads), "",
             "Seconds. *loaded*: process start to `cofx.load` returning (import, conversion, and validation "
             "unless the file's digest shows it done); "
             "*compile*: `co.compile_steps()` (fresh only); *warm-up*: the `co.compiled_stats.start` frames "
             "(until the steps repeat) fed as one eager chunk; *first step*: the first steady-state step (saved: "
             "the phase recorded and its package loaded); *to first compiled step*: process start to the end of "
             "that step, and without the warm-up.",
             "", "| model | steps | file MiB | loaded | compile | warm-up | first step | to first compiled step "
             "| without warm-up | compiled |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (m, mode), results in runs.items():
        col = {k: [r[k] for r in results] for k in results[0]}
        lines.append(f"| {m} | {mode} | {sizes[m]:.1f} | {cell(col['loaded'])} | "
                     f"{cell(col['compile']) if mode == 'fresh' else '-'} | {cell(col['warmup'])} | "
                     f"{cell(col['step'], '{:.2f}')} | {cell(col['first'])} | "
                     f"{cell([f - w for f, w in zip(col['first'], col['warmup'])])} | "
                     f"{'yes' if all(col['compiled']) else 'no'} |")
    lines += ["", "compile_steps in the parent (warm tuning cache, empty inductor cache): " +
              ", ".join(f"{m} {parent[m]:.1f} s" for m in args.models) + "."]
    if "x3d_s" in args.models:
        saved = {k: statistics.median(r[k] for r in runs["x3d_s", "saved"]) for k in ("first", "loaded")}
        lines += ["", f"Target: a saved compiled X3D-S steps compiled within 5 s of process start: "
                      f"{'met' if saved['first'] <= 5 else 'not met'} ({saved['first']:.1f} s, of which "
                      f"{saved['loaded']:.1f} s to cofx.load, which converts the model again)."]
    write_result("startup_compiled.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
