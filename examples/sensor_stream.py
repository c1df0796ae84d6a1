"""Streaming a sensor model: a causal TCN and an LSTM over (B, T, C) inputs, one sample at a time.

Run:  python examples/sensor_stream.py
"""
import torch
import torch.nn.functional as F
from torch import nn

import cofx

torch.manual_seed(0)


class Activity(nn.Module):
    """Accelerometer activity recognition: (B, T, 6) in, class scores per window out."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(6, 32, 1)
        self.tcn = nn.ModuleList(nn.Conv1d(32, 32, 3, dilation=d) for d in (1, 2, 4))
        self.lstm = nn.LSTM(32, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):                      # x: (B, T, 6)
        y = self.inp(x.transpose(1, 2))
        for i, conv in enumerate(self.tcn):
            y = y + torch.relu(conv(F.pad(y, (2 * 2 ** i, 0))))   # causal padding: no delay
        out, (h, _) = self.lstm(y.transpose(1, 2))
        return self.head(h[-1])               # (B, 5) from the final state


model = Activity().eval()
co = cofx.convert(model, torch.randn(1, 50, 6), time_dim=1)   # windows of 50 samples
print(co.report)
print(f"\ndelay {co.delay} samples; exact: {co.is_exact}")

window = torch.randn(4, 50, 6)                 # 4 sensors, one window each
with torch.no_grad():
    streamed = co.forward_steps(window, pad_end=True)[..., -1]
    print(f"max |stream - clip| = {(streamed - model(window)).abs().max():.2e}")
    co.clean_state()
    for t in range(60):                        # then sample by sample, one prediction per sample
        scores = co.forward_step(torch.randn(4, 6))
print(f"after 60 samples: predictions {scores.argmax(1).tolist()}")
