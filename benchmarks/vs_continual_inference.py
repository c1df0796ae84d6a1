"""cofx against the reference library, continual-inference, on the plain three-layer 3D CNN.

    pip install continual-inference     # optional; the script skips cleanly without it
    python benchmarks/vs_continual_inference.py

Both step the same network with the same weights over the same frames
(112x112, 16-frame clip, batch 1, 2 threads); their steps are timed
interleaved, and their outputs compared frame by frame.
Writes benchmarks/results/vs_continual_inference.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import cofx

sys.path.insert(0, str(Path(__file__).parent))
from models import build, machine, write_result  # noqa: E402


def reference_net(model):
    """The same network built from continual-inference's hand-written modules, same weights."""
    import continual as ci
    convs = [m for m in model.features if isinstance(m, nn.Conv3d)]
    layers = []
    for conv in convs:
        layers += [ci.Conv3d(conv.in_channels, conv.out_channels, 3, padding=1), nn.ReLU()]
    net = ci.Sequential(*layers, ci.AdaptiveAvgPool3d((1, 1, 1), kernel_size=16),
                        ci.Linear(model.fc.in_features, model.fc.out_features, channel_dim=1))
    source = [p for m in convs for p in (m.weight, m.bias)] + [model.fc.weight, model.fc.bias]
    with torch.no_grad():
        for p, s in zip([p for p in net.parameters()], source):
            p.copy_(s.reshape(p.shape))
    return net.eval()


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    try:
        import continual  # noqa: F401
    except ImportError:
        print("continual-inference is not installed; skipping (pip install continual-inference)")
        return
    torch.set_num_threads(2)
    model, clip = build("plain")
    ours = cofx.convert(model, clip)
    ref = reference_net(model)
    frames = torch.randn(1, 3, 80, 112, 112)
    outs = {"cofx": [], "continual-inference": []}
    times = {"cofx": [], "continual-inference": []}
    with torch.no_grad():
        ref.clean_state()
        for t in range(frames.shape[2]):
            for name, step in (("cofx", ours.forward_step), ("continual-inference", ref.forward_step)):
                start = time.perf_counter()
                y = step(frames[:, :, t])
                if t >= 40:
                    times[name].append(time.perf_counter() - start)
                if isinstance(y, torch.Tensor):
                    outs[name].append(y.reshape(-1))
    n = min(len(v) for v in outs.values())
    diff = max(float((a - b).abs().max()) for a, b in zip(outs["cofx"][-n:], outs["continual-inference"][-n:]))
    med = {k: statistics.median(v) for k, v in times.items()}
    text = (f"{machine()}\n\n"
            "| library | step ms (median) | outputs compared | max abs difference |\n|---|---|---|---|\n"
            + "".join(f"| {k} | {1e3 * med[k]:.2f} | {n} | {diff:.2e} |\n" for k in med)
            + f"\ncofx step is {med['continual-inference'] / med['cofx']:.1f}x faster.\n")
    write_result("vs_continual_inference.md", text)


if __name__ == "__main__":
    main()
