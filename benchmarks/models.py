"""The models the benchmarks measure, built without weights, and where their tables go (shared by the
benchmark scripts)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore", category=UserWarning)


class PlainNet(nn.Module):
    """The plain three-layer 3D CNN of issue 5: 3->16->32->32 channels, 3x3x3 kernels, then a classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv3d(32, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def build(name: str):
    """(model in eval mode, example clip of batch 1) for a benchmark model name."""
    torch.manual_seed(0)
    if name == "plain":
        return PlainNet().eval(), torch.randn(1, 3, 16, 112, 112)
    if name.startswith("x3d_"):
        from pytorchvideo.models import hub
        size = {"x3d_xs": (4, 160), "x3d_s": (13, 160), "x3d_m": (16, 224), "x3d_l": (16, 312)}[name]
        return getattr(hub, name)(pretrained=False).eval(), torch.randn(1, 3, size[0], size[1], size[1])
    import torchvision.models.video as tvm
    return getattr(tvm, name)().eval(), torch.randn(1, 3, 16, 112, 112)


def converted(parser, argv=None):
    """(args, clip, continual model) for a benchmark of one model: adds --model and --threads to `parser`,
    sets the threads, builds and converts the model."""
    import cofx
    parser.add_argument("--model", default="x3d_s")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, clip = build(args.model)
    return args, clip, cofx.convert(model, clip)


def machine() -> str:
    """The line every table carries: figures taken on one CPU do not hold on another."""
    from cofx.machine import describe
    return f"Machine: {describe()}"


RESULTS = Path(__file__).parent / "results"


def load_line(start: float, end: float, threads: int) -> str:
    """The machine's load over a run, and whether other work shared the cores the run used."""
    shared = " (above the thread count: other work shared the cores)" if max(start, end) > threads else ""
    return f"Load average (1 min) at start and end: {start:.1f}, {end:.1f} on {os.cpu_count()} CPUs{shared}."


def write_result(filename: str, text: str) -> None:
    """Write a benchmark's table to benchmarks/results/<filename> and print it."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / filename).write_text(text)
    print(text)
