"""Tables indexed by the clip's positions (a relative-position bias ``bias[i[:, None] - i[None, :]]`` of
``i = torch.arange(T)``): built for the window's N frames, never for a chunk's length, which may exceed the table."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from test_attention_forms import C, D, N, assert_exact

import cofx


class RelativeBias(nn.Module):
    def __init__(self, max_frames=N + 2):
        super().__init__()
        self.qkv, self.max_frames = nn.Linear(C, 3 * C), max_frames
        self.bias = nn.Parameter(torch.randn(2 * max_frames - 1))

    def forward(self, x):   # (B, T, C)
        T = x.shape[1]
        q, k, v = self.qkv(x).chunk(3, -1)
        i = torch.arange(T, device=x.device)
        a = q @ k.transpose(-2, -1) + self.bias[i[:, None] - i[None, :] + self.max_frames - 1]
        return (a.softmax(-1) @ v)[:, -1]


def test_a_relative_position_bias_is_exact_over_the_window():
    assert_exact(RelativeBias())


def test_chunks_longer_than_the_table_step_as_frame_by_frame():
    torch.manual_seed(0)
    model = RelativeBias().to(D).eval()
    co = cofx.convert(model, torch.randn(1, N, C, dtype=D), time_dim=1)
    stream = torch.randn(2, 4 * N, C, dtype=D)
    with torch.no_grad():
        whole = co.forward_steps(stream)
        co.clean_state()
        by_frame = [co.forward_step(stream[:, t]) for t in range(4 * N)]
    assert torch.allclose(whole, torch.stack(by_frame[N - 1:], -1), atol=1e-12, rtol=0)
    assert torch.allclose(whole[..., -1], model(stream[:, -N:]), atol=1e-12, rtol=0)


class SplitTable(nn.Module):
    """GPT-J's rotary table: sin and cos split off one table sliced by the clip length (its parts are tables too)."""
    def __init__(self, how):
        super().__init__()
        self.qkv, self.how = nn.Linear(C, 3 * C), how
        self.register_buffer("sincos", torch.randn(4 * N, 2 * C))

    def forward(self, x):   # (B, T, C)
        parts = self.sincos[:x.shape[1]]
        sin, cos = {"split": lambda: torch.split(parts, C, -1), "chunk": lambda: parts.chunk(2, -1),
                    "unbind": lambda: parts.unflatten(-1, (2, C)).unbind(-2)}[self.how]()
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k = q * cos + q.roll(1, -1) * sin, k * cos + k.roll(1, -1) * sin
        return ((q @ k.transpose(-2, -1)).softmax(-1) @ v)[:, -1]


@pytest.mark.parametrize("how", ["split", "chunk", "unbind"])
def test_a_table_split_into_parts_is_a_table_over_the_window(how):
    assert_exact(SplitTable(how))


class BloomAlibi(nn.Module):
    """BLOOM's ALiBi: a bias per head and key position, repeated over the batch (B read off the input) and added
    by baddbmm to scores with the heads folded into the batch (B * H rows)."""
    def __init__(self, heads=2):
        super().__init__()
        self.qkv, self.heads = nn.Linear(C, 3 * C), heads
        self.register_buffer("slopes", torch.tensor([0.5, 0.25]))

    def forward(self, x):   # (B, T, C)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4).reshape(3, B * self.heads, T, -1)
        alibi = (self.slopes[:, None] * torch.arange(T, dtype=x.dtype)[None, :])[:, None, :].repeat(B, 1, 1)
        s = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=0.5)
        y = torch.bmm(s.softmax(-1), v).view(B, self.heads, T, -1).transpose(1, 2).reshape(B, T, -1)
        return y[:, -1]


def test_a_batch_size_read_beside_heads_folded_into_the_batch_is_the_streams():
    """Inside the window the batch size is the windows times the streams, read off a window whose batch axis
    holds the heads too (it was read as windows * streams * heads)."""
    assert_exact(BloomAlibi())
