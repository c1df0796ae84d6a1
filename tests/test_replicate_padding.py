"""Replicate padding of either end of time, alone or before a strided convolution: the end padding repeats the
stream's last frame, which the step keeps until the flush (PatchTST pads its end this way before patching)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cofx
from cofx.verify import by_chunks, by_frame, chunk_sizes

D = torch.float64


class Padded(nn.Module):
    def __init__(self, pad, kernel, stride, functional):
        super().__init__()
        self.pad, self.functional = pad, functional
        self.layer = nn.ReplicationPad1d(pad)
        self.conv = nn.Conv1d(3, 4, kernel, stride)

    def forward(self, x):
        x = F.pad(x, self.pad, mode="replicate") if self.functional else self.layer(x)
        return self.conv(x)


def configs(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        pad = (rng.randint(0, 3), rng.randint(1, 3))
        yield pad, rng.randint(1, 4), rng.randint(1, 2), rng.random() < 0.5


@pytest.mark.parametrize("pad,kernel,stride,functional", list(configs(10, 0)))
def test_replicate_end_padding_is_exact(pad, kernel, stride, functional):
    torch.manual_seed(0)
    model = Padded(pad, kernel, stride, functional).to(D).eval()
    co = cofx.convert(model, torch.randn(1, 3, 9, dtype=D))
    assert co.is_exact
    x = torch.randn(2, 3, 13, dtype=D)
    with torch.no_grad():
        want = model(x)
        co.clean_state()
        assert torch.allclose(co.forward_steps(x, pad_end=True), want, atol=1e-12, rtol=0)
        co.clean_state()
        assert torch.allclose(by_frame(co, x), want, atol=1e-12, rtol=0)
        co.clean_state()
        assert torch.allclose(by_chunks(co, x, chunk_sizes(13, random.Random(1))), want, atol=1e-12, rtol=0)
