"""Online action detection: a causal transformer over per-frame features, one prediction per frame as it arrives.

Run:  python examples/online_action_detection.py

The model is written as for clips of 32 frames: learned positions sliced by the
clip length, a causal mask, per-frame class scores. cofx streams it: each step
answers for the newest frame, from the first frame on, exactly as the model
answers for that frame of a clip (after 32 frames: of the last 32).
"""
import torch
from torch import nn

import cofx

torch.manual_seed(0)


class OnlineDetector(nn.Module):
    """(B, T, 512) frame features in, (B, T, 20) action scores out, each frame seeing only the past."""

    def __init__(self, features=512, d=128, classes=20):
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.positions = nn.Parameter(torch.randn(1, 256, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x) + self.positions[:, :x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.head(self.encoder(h, mask=mask, is_causal=True))


model = OnlineDetector().eval()
co = cofx.convert(model, torch.randn(1, 32, 512), time_dim=1)
print([(row.name, row.kind, row.note) for row in co.report if row.kind in ("attention", "window")])
print(f"delay {co.delay} frames; exact: {co.is_exact}")

clip = torch.randn(2, 32, 512)                 # two videos' first 32 frames of features
with torch.no_grad():
    frame_by_frame = torch.stack([co.forward_step(clip[:, t]) for t in range(32)], 1)
    print(f"max |stream - clip| = {(frame_by_frame - model(clip)).abs().max():.2e}")
    later = co.forward_step(torch.randn(2, 512))   # frame 33: the model on the last 32 frames
    print(f"frame 33 scores: {tuple(later.shape)}")
