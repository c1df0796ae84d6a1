"""Frames that start padding gives before the stream's first frame, and streams restarted apart.

A frame difference padded back to the clip length (``F.pad(x[:, :, 1:] - x[:, :, :-1], (1, 0))``, as TDN and
delta features write it) emits its padding frame on the first call, before any input frame: a merge with the
frames themselves must wait for them (an empty first chunk, the priming of restarted rows), and where that
frame is an output, a fixed-shape step (one frame out per frame in) cannot give it and says so.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cofx
from cofx.masked_step import NotSteppable
from guarantees import assert_clip_exact

D = torch.float64


class PaddedDiff(nn.Module):
    """The frame difference over `lag` frames, padded back at the start by `pad`, joined with the frames."""

    def __init__(self, lag=1, pad=1, reduce=False, join=True):
        super().__init__()
        self.lag, self.pad, self.reduce, self.join = lag, pad, reduce, join
        self.w = nn.Parameter(torch.tensor(0.5, dtype=D))

    def forward(self, x):
        d = F.pad(x[:, :, self.lag:] - x[:, :, :-self.lag], (self.pad, 0))
        if not self.join:
            return d * self.w
        y = d[:, :, -x.shape[2]:] * self.w + x if self.pad > self.lag else d * self.w + x
        return y.mean(2) if self.reduce else y


CASES = [dict(lag=1, pad=1), dict(lag=2, pad=2), dict(lag=1, pad=1, reduce=True), dict(lag=2, pad=2, reduce=True)]


def convert(model, frames=8):
    return cofx.convert(model.eval(), torch.randn(1, 3, frames, dtype=D))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_an_empty_first_chunk_changes_nothing(case):
    model = PaddedDiff(**case)
    co = convert(model)
    x = torch.randn(2, 3, 12, dtype=D)
    with torch.no_grad():
        co.clean_state()
        want = co.forward_steps(x, pad_end=True)
        co.clean_state()
        assert co.forward_steps(x[:, :, :0]) is None
        got = co.forward_steps(x, pad_end=True)
    assert torch.equal(got, want)
    if not case.get("reduce"):
        assert torch.allclose(want, model(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_round_trip_after_a_chunk(case):
    co = convert(PaddedDiff(**case))
    x = torch.randn(2, 3, 20, dtype=D)
    with torch.no_grad():
        co.clean_state()
        co.forward_steps(x[:, :, :12])
        co.set_state(co.get_state())
        got = co.forward_steps(x[:, :, 12:])
        co.clean_state()
        want = co.forward_steps(x)
    assert torch.equal(got, want[..., -got.shape[-1]:])


@pytest.mark.parametrize("reduce", [False, True])
def test_a_restarted_stream_whose_padding_meets_the_frames_equals_it_alone(reduce):
    co = convert(PaddedDiff(reduce=reduce))
    s = torch.randn(2, 3, 18, dtype=D)
    with torch.no_grad():
        co.clean_state()
        alone = [co.forward_step(s[1:, :, i]) for i in range(5, 18)]
        co.clean_state()
        together = []
        for i in range(18):
            if i == 5:
                co.clean_state(streams=[1])
            together.append(co.forward_step(s[:, :, i]))
    for a, b in zip(alone, together[5:]):
        if a is None:
            assert b is None or torch.isnan(b[1]).all()
        else:
            assert torch.allclose(b[1:], a, atol=1e-12, rtol=0)
    assert alone[0] is not None or reduce


def test_restarting_a_stream_whose_output_starts_with_padding_is_refused():
    co = convert(PaddedDiff(join=False))
    with torch.no_grad():
        co.forward_step(torch.randn(2, 3, dtype=D))
        with pytest.raises(NotSteppable, match="output frames before its first input frame"):
            co.clean_state(streams=[1])


def test_restarting_a_stream_of_a_model_without_parameters_keeps_its_dtype():
    class LogFilterbank(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("fb", torch.rand(4, 3, dtype=D))

        def forward(self, x):   # (B, T, F)
            return torch.log(torch.clamp(x.abs() @ self.fb, min=1e-5))
    model = LogFilterbank().eval()
    co = cofx.convert(model, torch.randn(1, 8, 4, dtype=D), time_dim=1)
    s = torch.randn(2, 6, 4, dtype=D)
    with torch.no_grad():
        co.forward_step(s[:, 0])
        co.clean_state(streams=[1])
        out = co.forward_step(s[:, 1])
    assert out.dtype == D and torch.allclose(out, model(s[:, 1:2])[:, 0], atol=1e-12, rtol=0)


def test_restarting_a_stream_with_joints_folded_into_a_recurrent_layer_is_refused():
    class JointGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):   # (B, T, V, C)
            B, T, V, C = x.shape
            out, _ = self.gru(x.transpose(1, 2).reshape(B * V, T, C))
            return out.view(B, V, T, -1).mean(1)
    co = cofx.convert(JointGRU().to(D).eval(), torch.randn(1, 6, 5, 3, dtype=D), time_dim=1)
    with torch.no_grad():
        co.forward_step(torch.randn(2, 5, 3, dtype=D))
        with pytest.raises(NotSteppable, match="5 rows per stream"):
            co.clean_state(streams=[1])


class ZerosConcatenated(nn.Module):
    """A motion stream padded back by concatenating zero frames made in forward (`torch.zeros_like`,
    `x.new_zeros`, `torch.zeros`), after, before or around it: the zero padding it is."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv1d(3, 3, 3, padding=1)

    def forward(self, x):
        m = x[:, :, 1:] - x[:, :, :-1]
        if self.how == "zeros_like after":
            m = torch.cat([m, torch.zeros_like(x[:, :, :1])], 2)
        elif self.how == "new_zeros before":
            m = torch.cat([x.new_zeros(x.shape[0], x.shape[1], 1), m], 2)
        else:
            z = torch.zeros(x.shape[0], x.shape[1], 2, dtype=x.dtype)
            m = torch.cat((z, m, z[:, :, :1]), dim=-1)
        return self.conv(m + 0.5 * x[:, :, :m.shape[2]] if self.how != "around" else m)


@pytest.mark.parametrize("how", ["zeros_like after", "new_zeros before", "around"])
def test_zero_frames_concatenated_along_time_are_padding(how):
    model = ZerosConcatenated(how).to(D).eval()
    co = convert(model)
    assert co.is_exact
    assert_clip_exact(co, model, torch.randn(2, 3, 13, dtype=D))   # as one chunk and frame by frame
