"""Numbers and tensors that follow the batch inside a window over the clip: there the batch holds one row per
window and stream (and, where the model merges them, N frames of each), never the chunk's."""
from __future__ import annotations

import torch
from torch import nn

import cofx

D = torch.float64
N = 6


def assert_answers_for_the_last_frames(model, frame_shape, time_dim=1):
    """Converted exactly, and step t answers as the model on frames t-N+1 ... t, frame by frame and in one
    chunk."""
    model = model.to(D).eval()
    torch.manual_seed(0)
    co = cofx.convert(model, torch.randn(1, N, *frame_shape, dtype=D), time_dim=time_dim)
    assert co.is_exact, str(co.report)
    stream = torch.randn(2, N + 7, *frame_shape, dtype=D)
    with torch.no_grad():
        whole = co.forward_steps(stream)
        co.clean_state()
        frames = [co.forward_step(stream[:, t]) for t in range(stream.shape[1])]
        for t in range(N - 1, stream.shape[1]):
            want = model(stream[:, t - N + 1:t + 1])
            assert torch.allclose(frames[t], want, atol=1e-12, rtol=0), t
            assert torch.allclose(whole[..., t - N + 1], want, atol=1e-12, rtol=0), t
    return co


class DividedAttention(nn.Module):
    """TimeSformer's divided attention: attention over time per patch, then back to frames of patches."""

    def __init__(self, c=3):
        super().__init__()
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):   # (B, T, P, C)
        B, T, P, C = x.shape
        h = x.permute(0, 2, 1, 3).reshape(B * P, T, C)
        q, k, v = self.qkv(h).chunk(3, -1)
        a = (q @ k.transpose(-2, -1) * C ** -0.5).softmax(-1) @ v
        a = a.view(B, P, T, C).permute(0, 2, 1, 3).reshape(B * T, P, C)
        return self.proj(a).view(B, T, P, C).mean((1, 2))


class CellLoop(nn.Module):
    """An LSTMCell unrolled over the clip's frames, its state made from the batch size."""

    def __init__(self):
        super().__init__()
        self.cell, self.fc = nn.LSTMCell(3, 5), nn.Linear(5, 2)

    def forward(self, x):   # (B, T, C)
        h = c = x.new_zeros(x.shape[0], 5)
        for t in range(N):
            h, c = self.cell(x[:, t], (h, c))
        return self.fc(h)


def test_batch_and_frames_merged_inside_a_window():
    assert_answers_for_the_last_frames(DividedAttention(), (4, 3))


def test_a_state_made_from_the_batch_size_over_fixed_frames():
    assert_answers_for_the_last_frames(CellLoop(), (3,))


class FrameToken(nn.Module):
    """A learned token put before each frame's patches (ViViT's spatial class token): the same for every frame."""

    def __init__(self, c=3):
        super().__init__()
        self.tok = nn.Parameter(torch.randn(1, 1, c))
        self.attn = nn.MultiheadAttention(c, 1, batch_first=True)

    def forward(self, x):   # (B, T, P, C)
        b, t, n, c = x.shape
        p = torch.cat([self.tok.expand(b * t, -1, -1), x.reshape(b * t, n, c)], 1)
        return self.attn(p, p, p, need_weights=False)[0][:, 0].view(b, t, c)


def test_a_token_repeated_for_every_frame_steps_frame_by_frame():
    model = FrameToken().to(D).eval()
    co = cofx.convert(model, torch.randn(1, N, 4, 3, dtype=D), time_dim=1)
    assert co.is_exact and co.delay == 0
    x = torch.randn(2, 9, 4, 3, dtype=D)
    with torch.no_grad():
        assert torch.allclose(co.forward_steps(x), model(x), atol=1e-12, rtol=0)
        co.clean_state()
        frames = torch.stack([co.forward_step(x[:, t]) for t in range(9)], 1)
    assert torch.allclose(frames, model(x), atol=1e-12, rtol=0)


class C3DHead(nn.Module):
    """C3D's classifier: ``x.view(-1, 8192)`` after the last pool, the -1 being the batch on the clip."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv3d(3, 4, 3, padding=1), nn.Linear(4 * 2 * 2 * 2, 5)

    def forward(self, x):
        x = torch.nn.functional.max_pool3d(self.conv(x), 4)
        return self.fc(x.view(-1, 4 * 2 * 2 * 2))


def test_a_view_whose_minus_one_is_the_batch_flattens_the_clip_into_features():
    from guarantees import assert_equivalent
    model = C3DHead().to(D).eval()
    co = cofx.convert(model, torch.randn(1, 3, 8, 8, 8, dtype=D))
    assert co.is_exact
    assert_equivalent(co, model, torch.randn(2, 3, 8, 8, 8, dtype=D))
