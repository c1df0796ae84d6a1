"""Attention over the clip: FLOPs and latency per step against the clip model, and against continual-inference.

    python benchmarks/attention.py                  # every model, 10 rounds
    python benchmarks/attention.py --rounds 5 --models "encoder 1 layer, last frame"

Models (N frames in the window, d channels):

- post-norm `nn.TransformerEncoder` of 1 and of 2 layers over per-frame features, read at the last frame
  (N = 64, d = 256, 4 heads, feed-forward 1024);
- a pre-norm encoder with a class token and learned positions (a table sliced by the clip length), read at
  the class token (N = 64, d = 256);
- a per-frame 2D CNN (convolutions of temporal kernel 1 on 64x64 frames) followed by a 1-layer temporal
  transformer read at the last frame (N = 16, d = 128);
- hand-written pre-norm blocks (timm's attention: one qkv Linear, heads by reshape and permute) of 1 and of 2
  layers, and a post-norm block around `nn.MultiheadAttention`, read at the last frame (N = 64, d = 256).

FLOPs are counted by torch.utils.flop_counter with the transformer layers' fused inference path off (the
fused kernel hides its matrix products from the counter); latency is the median of `rounds` rounds, one
eager `forward_step` in steady state against one clip `forward` (what a sliding-window clip model pays per
output), interleaved in one process (`cofx.bench`). Where the `continual` package (continual-inference) is
installed, its hand-built `co.TransformerEncoder` (1 and 2 layers, single output at the last frame) gets the
same weights: its outputs are checked against cofx's, and its FLOPs and latency per step are measured the
same way. Writes benchmarks/results/attention.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cofx
from cofx.bench import bench
from cofx.flops import clip_flops, step_flops

sys.path.insert(0, str(Path(__file__).parent))
from models import machine, write_result  # noqa: E402


class LastFrameEncoder(nn.Module):
    """(B, T, d) features -> post-norm encoder -> the last frame's token."""

    def __init__(self, layers: int, d: int = 256, heads: int = 4, ff: int = 1024):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(x)[:, -1]


class ClassTokenEncoder(nn.Module):
    """(B, T, d) -> class token first, learned positions sliced by the length -> pre-norm encoder -> the token."""

    def __init__(self, d: int = 256, heads: int = 4, ff: int = 1024, layers: int = 2, classes: int = 10):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 512, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        h = h + self.pos[:, :h.shape[1]]
        return self.head(self.encoder(h)[:, 0])


class FrameCNNTransformer(nn.Module):
    """(B, 3, T, 64, 64) -> a CNN on each frame -> pooled per frame -> a 1-layer transformer over frames."""

    def __init__(self, d: int = 128, classes: int = 10):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv3d(3, 32, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.ReLU(),
            nn.Conv3d(32, 64, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.ReLU(),
            nn.Conv3d(64, d, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.ReLU())
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.cnn(x).mean((3, 4)).transpose(1, 2)   # (B, T, d)
        return self.head(self.encoder(h)[:, -1])


class Attention(nn.Module):
    """Hand-written multi-head self-attention, as timm's ViT blocks write it."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """A pre-norm block: attention and an MLP, each with a residual."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HandWrittenEncoder(nn.Module):
    """(B, T, d) features -> hand-written pre-norm blocks -> the last frame's token."""

    def __init__(self, layers: int, d: int = 256, heads: int = 4, ff: int = 1024):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d, heads, ff) for _ in range(layers)])

    def forward(self, x):
        return self.blocks(x)[:, -1]


class MultiheadAttentionBlock(nn.Module):
    """(B, T, d) features -> `nn.MultiheadAttention` and an MLP with residuals -> the last frame's token."""

    def __init__(self, d: int = 256, heads: int = 4, ff: int = 1024):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.mlp(x))[:, -1]


MODELS = {
    "encoder 1 layer, last frame": (lambda: LastFrameEncoder(1), (1, 64, 256), 1),
    "encoder 2 layers, last frame": (lambda: LastFrameEncoder(2), (1, 64, 256), 1),
    "hand-written blocks, 1 layer, last frame": (lambda: HandWrittenEncoder(1), (1, 64, 256), 1),
    "hand-written blocks, 2 layers, last frame": (lambda: HandWrittenEncoder(2), (1, 64, 256), 1),
    "nn.MultiheadAttention block, last frame": (MultiheadAttentionBlock, (1, 64, 256), 1),
    "pre-norm encoder, class token, learned positions": (ClassTokenEncoder, (1, 64, 256), 1),
    "per-frame 2D CNN + temporal transformer": (FrameCNNTransformer, (1, 3, 16, 64, 64), 2),
}


def reference_encoder(model: LastFrameEncoder, frames: int):
    """continual-inference's encoder with `model`'s weights, or None where the package is not installed."""
    try:
        import continual
    except ImportError:
        return None
    layer = model.encoder.layers[0]
    ref = continual.TransformerEncoder(continual.TransformerEncoderLayerFactory(
        d_model=layer.self_attn.embed_dim, nhead=layer.self_attn.num_heads, dim_feedforward=layer.linear1.out_features,
        dropout=0.0, sequence_len=frames), num_layers=len(model.encoder.layers)).eval()
    ours = model.state_dict()
    mapped = {}
    for key in ref.state_dict():
        layer_index = int(key.split(".")[1])
        name = key.split(".")[-1]
        owner = next(p for p in ("self_attn.out_proj", "self_attn", "norm1", "norm2", "linear1", "linear2")
                     if f".{p.split('.')[-1]}." in f".{key}." or (p == "self_attn" and "in_proj" in name))
        mapped[key] = ours[f"encoder.layers.{layer_index}.{owner}.{name}"]
    ref.load_state_dict(mapped)
    return ref


def time_steps(step, frames: torch.Tensor, rounds: int) -> float:
    """Median seconds of one step over `rounds` rounds of 8 steps (after a warm-up of the whole window)."""
    with torch.no_grad():
        for i in range(frames.shape[-1]):
            step(frames[..., i])
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(8):
                step(frames[..., i])
            times.append((time.perf_counter() - start) / 8)
    return statistics.median(times)


def compare_reference(name: str, model, co, rounds: int) -> list:
    """Rows for continual-inference on the same weights: outputs checked against cofx's, FLOPs and latency."""
    frames = co.clip_shape[1]
    ref = reference_encoder(model, frames)
    if ref is None:
        return []
    stream = torch.randn(1, 3 * frames, co.clip_shape[2])
    with torch.no_grad():
        co.clean_state()
        ref.clean_state()
        ours = [co.forward_step(stream[:, i]) for i in range(stream.shape[1])]
        theirs = [ref.forward_step(stream[:, i]) for i in range(stream.shape[1])]
        pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and isinstance(b, torch.Tensor)]
        error = max(float((a - b.reshape(a.shape)).abs().max()) for a, b in pairs[-frames:])
        counter = FlopCounterMode(display=False)
        with counter:
            ref.forward_step(stream[:, 0])
        flops = int(counter.get_total_flops())
        latency = time_steps(ref.forward_step, stream.transpose(1, 2), rounds)
        co.clean_state()
        ref.clean_state()
    return [f"| {name}: continual-inference `co.TransformerEncoder` (same weights; max difference from cofx's "
            f"outputs {error:.1e}) | {flops / 1e6:.2f} | | | {1e3 * latency:.2f} | | |"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        make, shape, time_dim = MODELS[name]
        torch.manual_seed(0)
        model = make().eval()
        print(f"{name}: converting", file=sys.stderr, flush=True)
        co = cofx.convert(model, torch.randn(shape), time_dim=time_dim)
        per_step, per_clip = step_flops(co), clip_flops(co)   # (counted unfused)
        print(f"{name}: timing", file=sys.stderr, flush=True)
        r = bench(co, batch=1, threads=args.threads, rounds=args.rounds)
        rows.append(f"| {name} | {per_step / 1e6:.2f} | {per_clip / 1e6:.2f} | {per_clip / per_step:.1f}x "
                    f"| {1e3 * r.step.median:.2f} | {1e3 * r.clip.median:.2f} | {r.speedup:.1f}x |")
        if isinstance(model, LastFrameEncoder):
            rows += compare_reference(name, model, co, args.rounds)
        print(rows[-1], file=sys.stderr, flush=True)
    head = [f"# Attention over the clip (eager steps, batch 1, median of {args.rounds} rounds)", "", machine(), "",
            "| model | MFLOPs/step | MFLOPs/clip | FLOP reduction | step ms | clip ms | speed-up |",
            "|---|---|---|---|---|---|---|"]
    write_result("attention.md", "\n".join(head + rows) + "\n")


if __name__ == "__main__":
    main()
