"""Where a single-stream step loses to the clip: each convolution on one frame against the same convolution
on the whole clip, per frame.

    python benchmarks/conv_efficiency.py [--model x3d_s] [--threads 2] [--batch 1]

For every convolution of the model: the clip model's op on its real clip input
(divided by the frames it outputs), and the op as one step of the continual
model runs it (the implementation cofx chose, on the window of one output frame
in the memory layout the step keeps it in), timed interleaved. Both do the same FLOPs per output frame; the ratio is how
efficiently PyTorch's CPU kernels run the small single-frame problem. Groups the
convolutions by kind. Writes benchmarks/results/conv_efficiency.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import converted, machine, write_result  # noqa: E402


def _seconds(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _kind(weight: torch.Tensor, groups: int) -> str:
    k = "x".join(map(str, weight.shape[2:]))
    if groups > 1 and groups == weight.shape[0]:
        return f"depthwise {k}"
    return f"dense {k}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args, clip, co = converted(parser, argv)
    clip_s, step_s, count = defaultdict(float), defaultdict(float), defaultdict(int)
    with torch.no_grad():
        for node in co.graph.nodes:
            spec = node.meta.get("cofx_spec") if node.meta.get("cofx_kind") == "sliding" else \
                node.meta.get("cofx_frame_spec")
            if node.op != "call_module" or spec is None or getattr(spec, "family", None) != "conv":
                continue
            conv = co.get_submodule(node.target)
            x_rec = node.args[0].meta["cofx_runs"]["clip"]
            t = node.args[0].meta["cofx_time"]
            x_clip = torch.randn(args.batch, *x_rec.shape[1:])
            frames_out = conv(x_clip).shape[t]
            window = list(x_clip.shape)
            window[t] = spec.span
            x_step = torch.randn(window)
            if node.meta.get("cofx_impl") == "conv3d_cl":   # the layout the step keeps its frames in
                x_step = x_step.contiguous(memory_format=torch.channels_last_3d)
            impl = node.meta.get("cofx_impl", "conv3d")
            step = (lambda: spec.window(impl, x_step, conv.weight, conv.bias)) if impl else \
                (lambda: spec.compute(x_step, conv.weight, conv.bias))
            whole = lambda: conv(x_clip)  # noqa: E731
            a, b = [], []
            for _ in range(args.rounds):   # interleaved
                a.append(_seconds(whole) / frames_out)
                b.append(_seconds(step))
            kind = _kind(conv.weight, conv.groups)
            clip_s[kind] += statistics.median(a)
            step_s[kind] += statistics.median(b)
            count[kind] += 1
    rows = ["| convolutions | count | clip ms per output frame | step ms | step / clip |", "|---|---|---|---|---|"]
    for kind in sorted(clip_s, key=lambda k: -step_s[k]):
        rows.append(f"| {kind} | {count[kind]} | {1e3 * clip_s[kind]:.2f} | {1e3 * step_s[kind]:.2f} "
                    f"| {step_s[kind] / clip_s[kind]:.2f} |")
    total_c, total_s = sum(clip_s.values()), sum(step_s.values())
    rows.append(f"| all | {sum(count.values())} | {1e3 * total_c:.2f} | {1e3 * total_s:.2f} "
                f"| {total_s / total_c:.2f} |")
    text = f"{args.model}, batch {args.batch}\n\n{machine()}\n\n" + "\n".join(rows) + "\n"
    write_result("conv_efficiency.md", text)


if __name__ == "__main__":
    main()
