"""The composition examples of the continual-inference paper, written in plain torch.nn."""
import pytest
import torch
from torch import nn

import cofx
from guarantees import assert_delay, assert_equivalent, assert_stream_discipline

C = 4


def conv(cin, cout, k=3, groups=1):
    return nn.Conv3d(cin, cout, k, padding=k // 2, groups=groups)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv(C, C), conv(C, C)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1x1 expansion, depthwise 3x3x3, 1x1x1 projection, skip."""
    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv3d(C, 4 * C, 1), nn.BatchNorm3d(4 * C), nn.ReLU6())
        self.depthwise = nn.Sequential(conv(4 * C, 4 * C, groups=4 * C), nn.BatchNorm3d(4 * C), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv3d(4 * C, C, 1), nn.BatchNorm3d(C))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class Inception(nn.Module):
    """3D inception: four branches of different temporal reach, concatenated over channels."""
    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv3d(C, 2, 1)
        self.b2 = nn.Sequential(nn.Conv3d(C, 2, 1), conv(2, 2))
        self.b3 = nn.Sequential(nn.Conv3d(C, 2, 1), conv(2, 2), conv(2, 2))
        self.b4 = nn.Sequential(nn.MaxPool3d(3, 1, 1), nn.Conv3d(C, 2, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class SqueezeExcitationHead(nn.Module):
    """Conv, squeeze-and-excitation (`after`: a layer on the gated frames, as in a network's blocks), then a
    global pool and a classifier."""
    def __init__(self, after=False):
        super().__init__()
        self.conv = conv(C, C)
        self.se = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(C, 2, 1), nn.ReLU(), nn.Conv3d(2, C, 1),
                                nn.Sigmoid())
        self.after = nn.Conv3d(C, C, 1) if after else nn.Identity()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(C, 3)

    def forward(self, x):
        x = self.conv(x)
        x = self.after(x * self.se(x))
        return self.fc(self.pool(x).flatten(1))


def _clip(t=6):
    return torch.randn(2, C, t, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("block,delay,rf", [(Residual, 2, 5), (InvertedResidual, 1, 3), (Inception, 2, 5)])
def test_exact_compositions(block, delay, rf):
    model = block().double().eval()
    co = cofx.convert(model, _clip())
    assert (co.delay, co.receptive_field, co.stride) == (delay, rf, 1)
    assert co.is_exact
    assert_equivalent(co, model, _clip())
    assert_stream_discipline(co, _clip(20))
    assert_delay(co, _clip(20))


def test_residual_gets_a_delay_buffer_of_the_branch_delay():
    co = cofx.convert(Residual().double().eval(), _clip())
    merge = next(r for r in co.report if r.kind == "merge")
    assert merge.delay == 2
    # the skip edge holds the 2 frames the branch is behind: 2 frames of (C, 4, 4) float64
    assert merge.state_bytes == 2 * C * 4 * 4 * 8


def test_squeeze_excitation_is_windowed_and_reported():
    model = SqueezeExcitationHead(after=True).double().eval()
    clip = _clip(8)
    co = cofx.convert(model, clip)
    assert not co.is_exact
    windowed = co.report.windowed
    assert [r.name for r in windowed] == ["se_0"]
    assert "causal window of 8 frames" in windowed[0].note
    # the end pool stays exact; everything after the SE gate is marked inexact
    assert next(r for r in co.report if r.name == "pool").kind == "reduction"
    assert not next(r for r in co.report if r.name == "fc").exact
    assert_stream_discipline(co, _clip(30))
    with pytest.raises(cofx.ConversionError, match="strict=True refuses windowed approximations: se_0"):
        cofx.convert(model, clip, strict=True)


def test_a_gate_pooled_right_after_it_runs_over_a_window_of_the_clip_exactly():
    """Nothing but the gate's product between the two pools: the gate is a statistic of the clip combined
    back with its frames, run over a window of the clip, exact (and cheap: no layer runs on the window)."""
    model = SqueezeExcitationHead().double().eval()
    co = cofx.convert(model, _clip(8))
    assert co.is_exact and not co.report.windowed
    assert next(r for r in co.report if r.name == "se_0").kind == "window"
    assert_stream_discipline(co, _clip(30))


def test_squeeze_excitation_causal_window_values():
    """Frame t of the SE gate averages the last `window` frames seen (fewer at the stream start)."""
    model = SqueezeExcitationHead().double().eval()
    clip = _clip(8)
    co = cofx.convert(model, clip, window={"se.0": 3})
    stream = _clip(12)
    with torch.no_grad():
        feats = model.conv(stream)
        means = feats.mean((3, 4))
        expected = []
        for t in range(stream.shape[2]):
            lo = max(0, t - 2)
            gate = model.se[1:](means[:, :, lo:t + 1].mean(2)[..., None, None, None])
            expected.append(feats[:, :, t] * gate[:, :, 0])
        gated = torch.stack(expected, 2)
        # pool over the clip length (8 frames) of gated frames, then the classifier
        want = torch.stack([model.fc(gated[:, :, j:j + 8].mean((2, 3, 4))) for j in range(0, 12 - 8 + 2)], 2)
        got = co.forward_steps(stream, pad_end=True)
    # the conv's end padding makes the last window include one flushed frame
    assert torch.allclose(got[..., :4], want[..., :4], atol=1e-12)
