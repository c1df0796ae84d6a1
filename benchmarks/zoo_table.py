"""The model-zoo table of the README: receptive field, delay, exactness and FLOPs of every supported model.

    python benchmarks/zoo_table.py            # writes benchmarks/results/zoo.md

FLOPs are counted by torch.utils.flop_counter (convolutions and matrix products,
2 per multiply-add): per clip is one forward of the clip model, which a
sliding-window deployment pays for every prediction; per step is one
`forward_step` in steady state (averaged over a temporal-stride period). A
model with temporal stride s predicts every s frames, so the reduction per
prediction is clip / (s * step).
Models are built without weights.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import cofx
from cofx.flops import clip_flops, step_flops

sys.path.insert(0, str(Path(__file__).parent))
from models import machine  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


def models():
    import torchvision.models.video as tvm
    from pytorchvideo.models import hub
    from pytorchvideo.models.x3d import create_x3d
    for name in ("x3d_xs", "x3d_s", "x3d_m", "x3d_l"):
        yield f"pytorchvideo {name}", lambda name=name: getattr(hub, name)(pretrained=False), None
    yield "pytorchvideo create_x3d(se_ratio=0) (X3D-S size)", \
        lambda: create_x3d(input_clip_length=13, input_crop_size=160, se_ratio=0), None
    for name in ("r3d_18", "mc3_18", "r2plus1d_18"):
        yield f"torchvision {name}", lambda name=name: getattr(tvm, name)(), (1, 3, 16, 112, 112)
    yield "torchvision s3d", lambda: tvm.s3d(), (1, 3, 16, 224, 224)
    yield "pytorchvideo slow_r50", lambda: hub.slow_r50(pretrained=False), (1, 3, 8, 224, 224)
    yield "pytorchvideo i3d_r50", lambda: hub.i3d_r50(pretrained=False), (1, 3, 8, 224, 224)
    yield "torchvision mvit_v1_b", lambda: tvm.mvit_v1_b(), (1, 3, 16, 224, 224)
    yield "torchvision swin3d_t", lambda: tvm.swin3d_t(), (1, 3, 16, 224, 224)


def giga(flops: int) -> str:
    return f"{flops / 1e9:.2f}"


def row(name, build, shape) -> str:
    torch.manual_seed(0)
    model = build().eval()
    try:
        co = cofx.convert(model, None if shape is None else torch.randn(shape))
    except cofx.ConversionError as e:
        first = str(e).splitlines()[0].replace("|", "/")
        return f"| {name} | {shape and 'x'.join(map(str, shape[2:]))} | refused: {first} | | | | | | |"
    clip, step = clip_flops(co), step_flops(co)
    kind = "exact" if co.is_exact else f"windowed ({len(co.report.windowed)} SE gates)"
    size = "x".join(map(str, co.clip_shape[2:]))
    return (f"| {name} | {size} | {co.receptive_field} | {co.delay} | {co.stride} | {kind} | {giga(clip)} "
            f"| {giga(step)} | {clip / (step * co.stride):.1f}x |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo.md"))
    parser.add_argument("--only", nargs="*", help="substrings of model names to include")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    lines = ["| model | clip (TxHxW) | receptive field | delay | stride | conversion | GFLOPs per clip "
             "| GFLOPs per step | reduction per prediction |", "|---|---|---|---|---|---|---|---|---|"]
    for name, build, shape in models():
        if args.only and not any(s in name for s in args.only):
            continue
        start = time.time()
        print(f"{name} ...", file=sys.stderr, flush=True)
        lines.append(row(name, build, shape))
        print(f"  {lines[-1]}  ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    text = "\n".join([machine(), ""] + lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
