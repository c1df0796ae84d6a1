"""Step speed of this tree against another commit of cofx, interleaved in one run (an A/B of a refactor).

    python benchmarks/ab_runtime.py --base 09e86d6                  # every case, 10 rounds
    python benchmarks/ab_runtime.py --base HEAD~3 --cases tcn_step --rounds 5

Two worker processes, one importing cofx from `--base` (extracted with
``git archive``) and one from this working tree, each convert the same models
once (same seeds, same weights) and then time one case at a time when asked;
the parent asks them in turn, in a random order each round, so that the
machine's drift reaches both alike. Each case's figure is the median over
rounds of that worker's median step time in the round, and B/A is the ratio of
those medians (above 1: this tree is slower). Cases: eager steps of X3D-S and
of the plain 3D CNN at batch 1 and 8, their compiled steps (plain network,
inductor), a backlog (a chunk of 16 frames of X3D-S at once) and the per-step
overhead of a small temporal convolution network (Python between small ops).
Writes benchmarks/results/ab_runtime.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {   # name: (model, batch, steps kind, frames per call)
    "x3d_s_eager_b1": ("x3d_s", 1, "eager", 1), "x3d_s_eager_b8": ("x3d_s", 8, "eager", 1),
    "plain_eager_b1": ("plain", 1, "eager", 1), "plain_eager_b8": ("plain", 8, "eager", 1),
    "plain_compiled_b1": ("plain", 1, "compiled", 1), "plain_compiled_b8": ("plain", 8, "compiled", 1),
    "x3d_s_backlog_16": ("x3d_s", 1, "eager", 16), "tcn_step": ("tcn", 1, "eager", 1),
}


def tcn():
    """A small dilated residual TCN over 64 channels: each step is many small ops, so Python overhead shows."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.conv = nn.Conv1d(64, 64, 3, padding=d, dilation=d)
            self.norm = nn.BatchNorm1d(64)

        def forward(self, x):
            return x + self.norm(self.conv(x)).relu()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(16, 64, 1), *[Block(d) for d in (1, 2, 4, 8)], nn.Conv1d(64, 8, 1)).eval()
    return model, torch.randn(1, 16, 32)


def worker(tree: str, threads: int, steps: int, tune: bool) -> None:
    """Answer `case` lines on stdin with a JSON median step time (seconds), importing cofx from `tree`."""
    import importlib.util
    tree_path = Path(tree)
    spec = importlib.util.spec_from_file_location(   # cofx.passes lives in passes/ at the tree's root
        "cofx", tree_path / "cofx" / "__init__.py",
        submodule_search_locations=[str(tree_path / "cofx"), str(tree_path)])
    cofx = importlib.util.module_from_spec(spec)
    sys.modules["cofx"] = cofx
    spec.loader.exec_module(cofx)
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from models import build
    torch.set_num_threads(threads)
    models, streams = {}, {}

    def model(name, kind):
        key = (name, kind)
        if key not in models:
            net, clip = tcn() if name == "tcn" else build(name)
            co = cofx.convert(net, clip, tune=tune)
            if kind == "compiled":
                co.compile_steps()
            models[key] = (co, clip)
        return models[key]

    print(json.dumps({"cofx": cofx.__file__, "passes": sys.modules["cofx.passes"].__file__}), flush=True)
    for line in sys.stdin:
        name, batch, kind, frames = CASES[line.strip()]
        co, clip = model(name, kind)
        key = (name, batch, kind, frames)
        if key not in streams:   # a stream in steady state, its calls timed from there on
            torch.manual_seed(1)
            shape = list(clip.shape)
            shape[0] = batch
            co.clean_state()
            with torch.no_grad():
                for _ in range(0, co.warmup_frames + 4, 8):
                    shape[2] = 8
                    co.forward_steps(torch.randn(shape))
            shape[2] = frames
            streams[key] = (co.get_state(), torch.randn(shape))
        state, x = streams[key]
        co.set_state(state)
        times = []
        with torch.no_grad():
            for _ in range(steps):
                began = time.perf_counter()
                if frames == 1:
                    co.forward_step(x[:, :, 0])
                else:
                    co.forward_steps(x)
                times.append(time.perf_counter() - began)
        print(json.dumps({"seconds": statistics.median(times)}), flush=True)


def extract(commit: str) -> str:
    """The tree of `commit`, extracted into a temporary folder."""
    out = tempfile.mkdtemp(prefix="cofx-ab-")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(out, filter="data")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare against (A)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="timed calls per case and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-tune", dest="tune", action="store_false",
                        help="convert without timing each Conv3d's implementations (each worker's timings may pick "
                             "others: a difference of the machine's moment, not of the code)")
    args = parser.parse_args(argv)
    base = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], check=True,
                          capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "cofx", "passes"],
                           capture_output=True, text=True).stdout.strip()
    trees = {"A": extract(args.base), "B": str(ROOT)}
    workers = {}
    for side, tree in trees.items():
        workers[side] = subprocess.Popen(
            [sys.executable, __file__, "--worker", tree, str(args.threads), str(args.steps), str(int(args.tune))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        imported = json.loads(workers[side].stdout.readline())
        assert all(Path(f).is_relative_to(tree) for f in imported.values()), (side, tree, imported)

    def ask(side, case):
        w = workers[side]
        w.stdin.write(case + "\n")
        w.stdin.flush()
        return json.loads(w.stdout.readline())["seconds"]

    load = os.getloadavg()[0]
    times = {(side, case): [] for side in trees for case in args.cases}
    rng = random.Random(0)
    for case in args.cases:   # the first call of each case converts, compiles and warms up: untimed
        print(f"preparing {case}", file=sys.stderr, flush=True)
        for side in trees:
            ask(side, case)
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for case in args.cases:
            sides = list(trees)
            rng.shuffle(sides)
            for side in sides:
                times[side, case].append(ask(side, case))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from models import load_line, machine, write_result
    lines = [f"# Step speed, A/B: A = {base}, B = {head}{' + uncommitted changes' if dirty else ''}", "",
             machine(), load_line(load, os.getloadavg()[0], args.threads),
             f"{args.rounds} rounds, interleaved in a random order; each figure the median over rounds of the median "
             f"of {args.steps} calls; {'tuned' if args.tune else 'untuned (tune=False)'} conversions.", "",
             "| case | A ms | B ms | B/A |", "|---|---|---|---|"]
    for case in args.cases:
        a, b = (statistics.median(times[side, case]) * 1e3 for side in ("A", "B"))
        lines.append(f"| {case} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
    write_result("ab_runtime.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5])))
    else:
        main()
