"""3D video CNNs written the way people write them (SlowFast, I3D, (2+1)D, TSM, non-local, ...).

Every model must either convert exactly (on a fresh two-stream input at two scales, from a clean state
`forward_steps(clip, pad_end=True)` and `forward_step` frame by frame plus the end flush equal `model(clip)`
to 1e-9 in float64, and any chunking of a longer stream gives what `forward_step` gives frame by frame; where
every output keeps its time axis the longer stream must also equal `model(stream)`), or be refused with a
`cofx.ConversionError` that names what is refused. Some exact models are also exported to ONNX (float32:
ONNX Runtime has no float64 Conv on CPU) and run against `forward_step` from frame 0, and restarted with
`clean_state(streams=[1])` against a fresh single-stream run.

Cases that expose a bug are `xfail(strict=True)` with the reason.
"""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import cofx
from guarantees import assert_clip_exact, by_forward_step, steps_in_chunks, two_streams
from cofx.verify import by_chunks, chunk_sizes, max_error, output_tolerance

warnings.filterwarnings("ignore", category=UserWarning)
D = torch.float64


# ---- helpers ---------------------------------------------------------------------------------------

def seeded(cls, *args, dtype=D, **kwargs):
    """The model in eval mode with random BatchNorm statistics and affines (default ones hide nothing, but
    zero-mean unit-variance statistics make a folded BatchNorm an identity)."""
    torch.manual_seed(0)
    model = cls(*args, **kwargs).to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def video(t=8, hw=4, b=1, c=3, dtype=D):
    return torch.randn(b, c, t, hw, hw, dtype=dtype)


def all_outputs_keep_time(co):
    axes, _ = tree_flatten(co.output_time_axes, is_leaf=lambda a: a is None)
    out = next(n for n in co.graph.nodes if n.op == "output")
    leaves = [a for a in tree_flatten(out.args[0])[0] if isinstance(a, torch.fx.Node)]
    return all(a.meta.get("cofx_role") == "stream" for a in leaves)


def assert_exact(model, clip, time_dim=2, extra=5, seed=0, **kwargs):
    """Converts exactly (see the module docstring); returns the continual model."""
    torch.manual_seed(seed)
    co = cofx.convert(model, clip, time_dim=time_dim, **kwargs)
    assert co.is_exact, [(r.name, r.kind, r.note) for r in co.report if not r.exact]
    x = two_streams(clip, time_dim)
    whole, _ = assert_clip_exact(co, model, x)
    with torch.no_grad():
        # a longer stream: one chunk == frame by frame == random chunkings (0-frame chunks among them)
        stream = two_streams(clip, time_dim, frames=clip.shape[time_dim] + extra)
        co.clean_state()
        long_whole = co.forward_steps(stream, pad_end=True)
        co.clean_state()
        long_frames = by_forward_step(co, stream, long_whole)
        tol = output_tolerance(long_frames)
        assert max_error(long_whole, long_frames) <= tol, max_error(long_whole, long_frames)
        co.clean_state()
        chunked = by_chunks(co, stream, chunk_sizes(stream.shape[time_dim], random.Random(seed)))
        assert max_error(chunked, long_frames) <= tol, max_error(chunked, long_frames)
        if all_outputs_keep_time(co):   # per-frame outputs: the continual model is the model on the stream
            want = model(stream)
            assert max_error(long_whole, want) <= output_tolerance(want), max_error(long_whole, want)
        co.clean_state()
    return co


def assert_refused(model, clip, *words, time_dim=2, **kwargs):
    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(model, clip, time_dim=time_dim, **kwargs)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return msg


def bn(c):
    return nn.BatchNorm3d(c)


# ---- SlowFast -------------------------------------------------------------------------------------

class SlowFast(nn.Module):
    """Two pathways: the slow one sees x[:, :, offset::4], the fast one every frame; a lateral Conv3d with
    kernel (5, 1, 1) and stride (4, 1, 1) from fast to slow (concatenated or summed); each pathway pooled and
    the two concatenated before the classifier (as SlowFast's head does)."""

    def __init__(self, alpha=4, offset=0, fuse="cat", lateral_pad=2):
        super().__init__()
        self.alpha, self.offset, self.fuse = alpha, offset, fuse
        self.fast1 = nn.Sequential(nn.Conv3d(3, 2, (5, 3, 3), padding=(2, 1, 1)), bn(2), nn.ReLU())
        self.slow1 = nn.Sequential(nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1)), bn(8), nn.ReLU())
        self.lateral = nn.Conv3d(2, 4, (5, 1, 1), stride=(alpha, 1, 1), padding=(lateral_pad, 0, 0), bias=False)
        self.lat_proj = nn.Conv3d(4, 8, 1)
        self.slow2 = nn.Sequential(nn.Conv3d(12 if fuse == "cat" else 8, 8, 3, padding=1), bn(8), nn.ReLU())
        self.fast2 = nn.Sequential(nn.Conv3d(2, 2, 3, padding=1), bn(2), nn.ReLU())
        self.fc = nn.Linear(10, 5)
        self.cls = nn.Conv3d(10, 3, 1)

    def pathways(self, x):
        f = self.fast1(x)
        s = self.slow1(x[:, :, self.offset::self.alpha])
        lat = self.lateral(f)
        s = torch.cat([s, lat], 1) if self.fuse == "cat" else s + self.lat_proj(lat)
        return self.slow2(s), self.fast2(f)

    def forward(self, x):
        s, f = self.pathways(x)
        return self.fc(torch.cat([s.mean([2, 3, 4]), f.mean([2, 3, 4])], 1))


class SlowFastStridedFastHead(SlowFast):
    """The fast pathway average-pooled with stride alpha before the global mean: both pooled features then
    come at the slow rate (the same clip output when T is a multiple of alpha)."""

    def forward(self, x):
        s, f = self.pathways(x)
        f = F.avg_pool3d(f, (self.alpha, 1, 1), (self.alpha, 1, 1))
        return self.fc(torch.cat([s.mean([2, 3, 4]), f.mean([2, 3, 4])], 1))


class SlowFastPerFrame(SlowFast):
    """Per-frame predictions at the slow rate: the fast pathway subsampled by slicing to join the slow one."""

    def forward(self, x):
        s, f = self.pathways(x)
        return self.cls(torch.cat([s, f[:, :, self.offset::self.alpha]], 1)).mean([3, 4])


@pytest.mark.parametrize("kwargs", [{}, {"fuse": "sum"}, {"offset": 1}, {"lateral_pad": 1, "offset": 2}],
                         ids=["cat", "sum", "offset1", "pad1-offset2"])
def test_slowfast_head_concatenating_pathways_of_two_rates_is_refused(kwargs):
    """Outcome: refused at the head's torch.cat of the two pooled pathways (strides 1 and 4): a limitation,
    not a wrong answer. The lateral fusion (both at stride 4) is accepted."""
    msg = assert_refused(seeded(SlowFast, **kwargs), video(16, 4), "merges branches with different temporal "
                         "strides [1, 4]", "torch.cat([s.mean([2, 3, 4]), f.mean([2, 3, 4])]", "fix:")
    assert "node 'cat" in msg


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_slowfast_with_the_fast_pathway_pooled_to_the_slow_rate_is_exact(offset):
    co = assert_exact(seeded(SlowFastStridedFastHead, offset=offset), video(16, 4))
    assert co.stride == 4


@pytest.mark.parametrize("offset,frames", [(0, 16), (2, 16), (0, 14)])
def test_slowfast_per_frame_outputs_at_the_slow_rate_equal_the_model_on_the_stream(offset, frames):
    co = assert_exact(seeded(SlowFastPerFrame, offset=offset), video(frames, 4), extra=12)
    assert co.stride == 4


# ---- I3D, (2+1)D, strided residual stages ----------------------------------------------------------

class I3D(nn.Module):
    """Inflated stem with temporal stride 2, MaxPool3d((3,3,3), (2,2,2), padding=1), inflated 3x3x3 conv,
    MaxPool3d((2,3,3), 2), a temporal conv, global average pool and a 1x1x1 classifier."""

    def __init__(self, ceil=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, (3, 5, 5), stride=2, padding=(1, 2, 2), bias=False), bn(8),
                                  nn.ReLU())
        self.pool1 = nn.MaxPool3d((3, 3, 3), (2, 2, 2), padding=1, ceil_mode=ceil)
        self.conv = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1, bias=False), bn(8), nn.ReLU())
        self.pool2 = nn.MaxPool3d((2, 3, 3), (2, 2, 2), padding=(0, 1, 1), ceil_mode=ceil)
        self.conv2 = nn.Sequential(nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)), nn.ReLU())
        self.head = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Conv3d(8, 5, 1)

    def forward(self, x):
        x = self.conv2(self.pool2(self.conv(self.pool1(self.stem(x)))))
        return self.fc(self.head(x)).flatten(1)


@pytest.mark.parametrize("ceil,frames", [(False, 16), (True, 16), (True, 13)])
def test_i3d_with_strided_max_pools(ceil, frames):
    co = assert_exact(seeded(I3D, ceil=ceil), video(frames, 8), extra=9)
    assert co.stride == 8


class R2plus1D(nn.Module):
    """(2+1)D factorised convolutions: (1,3,3) spatial, BN-ReLU, (3,1,1) temporal; a residual block."""

    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1)), bn(4), nn.ReLU(),
                                  nn.Conv3d(4, c, (3, 1, 1), padding=(1, 0, 0)), bn(c), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv3d(c, c, (1, 3, 3), padding=(0, 1, 1)), bn(c), nn.ReLU(),
                                nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)), bn(c))
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        return self.fc(x.mean([2, 3, 4]))


def test_factorised_2plus1d():
    assert_exact(seeded(R2plus1D), video(8, 4))


class DownBlock(nn.Module):
    """Strided main path (3x3x3, stride 2) and a shortcut: Conv3d(k=1, stride=(2,2,2)), or ResNet-D's
    AvgPool3d(2, 2, ceil_mode=True, count_include_pad=False) then a 1x1x1 conv."""

    def __init__(self, cin, cout, shortcut="conv"):
        super().__init__()
        self.main = nn.Sequential(nn.Conv3d(cin, cout, 3, stride=2, padding=1, bias=False), bn(cout), nn.ReLU(),
                                  nn.Conv3d(cout, cout, 3, padding=1, bias=False), bn(cout))
        if shortcut == "conv":
            self.short = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=(2, 2, 2), bias=False), bn(cout))
        else:
            self.short = nn.Sequential(nn.AvgPool3d(2, 2, ceil_mode=True, count_include_pad=False),
                                       nn.Conv3d(cin, cout, 1, bias=False), bn(cout))

    def forward(self, x):
        return torch.relu(self.main(x) + self.short(x))


class MultiStride(nn.Module):
    """Temporal stride 2 at two depths with residual downsampling; classifier, per-frame head at 1/4 rate,
    or both (logits, features)."""

    def __init__(self, out="logits", shortcut="conv"):
        super().__init__()
        self.out = out
        self.stem = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), bn(4), nn.ReLU())
        self.d1 = DownBlock(4, 6, shortcut)
        self.d2 = DownBlock(6, 8, shortcut)
        self.fc = nn.Linear(8, 3)
        self.cls = nn.Conv3d(8, 3, 1)

    def forward(self, x):
        x = self.d2(self.d1(self.stem(x)))
        if self.out == "logits":
            return self.fc(x.mean([2, 3, 4]))
        if self.out == "perframe":
            return self.cls(F.adaptive_avg_pool3d(x, (None, 1, 1))).flatten(2)    # (B, 3, T/4)
        return self.fc(x.mean([2, 3, 4])), x


@pytest.mark.parametrize("out,shortcut,frames", [("logits", "conv", 16), ("logits", "conv", 15),
                                                 ("logits", "pool", 15), ("perframe", "conv", 16),
                                                 ("both", "conv", 16)])
def test_temporal_strides_at_two_depths_with_residual_downsampling(out, shortcut, frames):
    co = assert_exact(seeded(MultiStride, out, shortcut), video(frames, 8), extra=11)
    assert co.stride == 4


class AlignedShortcut(nn.Module):
    """Strided main paths whose shortcut has another temporal reach: delay buffers at stride 2."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.main2 = nn.Conv3d(3, 4, (2, 1, 1), stride=(2, 1, 1))
        self.main3 = nn.Conv3d(3, 4, (3, 1, 1), stride=(2, 1, 1))
        self.short = nn.Conv3d(3, 4, 1, stride=(2, 1, 1))
        self.cls = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        if self.kind == "k2":
            y = self.main2(x) + self.short(x)
        elif self.kind == "crop":
            y = self.main3(x) + self.short(x[:, :, 1:x.shape[2] - 1])
        else:
            y = self.main3(x) + x[:, :, 1:-1:2].sum(1, keepdim=True)
        return self.cls(y).mean([3, 4])


@pytest.mark.parametrize("kind,frames", [("k2", 8), ("crop", 9), ("slice", 9)])
def test_strided_main_path_against_shortcuts_of_another_reach(kind, frames):
    # odd streams for the per-frame comparison: extra frames keep the clip model's two paths the same length
    assert_exact(seeded(AlignedShortcut, kind), video(frames, 4), extra=6)


class Unpadded(nn.Module):
    """No temporal padding anywhere: on a stream, output m must be the model on frames [s*m, s*m + T)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv3d(3, 4, (3, 1, 1), stride=(2, 1, 1))
        self.c2 = nn.Conv3d(4, 4, (2, 1, 1), stride=(2, 1, 1))
        self.fast = nn.Conv3d(3, 2, (3, 1, 1))
        self.lateral = nn.Conv3d(2, 2, (5, 1, 1), stride=(4, 1, 1))
        self.slow = nn.Conv3d(3, 4, 1)
        self.fc = nn.Linear(4, 3)
        self.fc6 = nn.Linear(6, 3)

    def forward(self, x):
        if self.kind == "strided_mean":
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean([2, 3, 4]))
        if self.kind == "strided_first_minus_last":
            y = torch.relu(self.c1(x))
            return self.fc((y[:, :, 0] - y[:, :, -1]).mean([2, 3]))
        if self.kind == "strided_max_pool":
            return self.fc(F.max_pool3d(torch.relu(self.c1(x)), (3, 1, 1), (2, 1, 1)).mean([2, 3, 4]))
        # two pathways: slow frames 3, 7, 11, ... against lateral windows of the fast pathway, stride 4
        lat = self.lateral(torch.relu(self.fast(x)))
        s = self.slow(x[:, :, 3::4])[:, :, :lat.shape[2]]
        return self.fc6(torch.cat([s, lat], 1).amax([2, 3, 4]))


@pytest.mark.parametrize("kind,frames", [("strided_mean", 9), ("strided_mean", 12), ("strided_first_minus_last", 10),
                                         ("strided_max_pool", 11), ("slowfast", 16)])
def test_unpadded_models_answer_for_the_windows_of_the_stream(kind, frames):
    model = seeded(Unpadded, kind)
    co = assert_exact(model, video(frames, 2))
    s = co.stride
    stream = video(frames + 6 * s + 3, 2, b=2)
    with torch.no_grad():
        co.clean_state()
        out = co.forward_steps(stream)
        starts = range(0, stream.shape[2] - frames + 1, s)
        want = torch.stack([model(stream[:, :, a:a + frames]) for a in starts], -1)
    # an output may come before the clip's unused last frames have arrived (never later)
    assert out.shape[-1] >= want.shape[-1]
    assert max_error(out[..., :want.shape[-1]], want) <= output_tolerance(want)


class InPlace(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv3d(3, 4, 3, padding=1)
        self.c2 = nn.Conv3d(4, 4, 3, padding=1)
        self.bn, self.bn2 = nn.BatchNorm3d(4), nn.BatchNorm3d(4)
        self.act = {"silu": nn.SiLU(inplace=True), "hardswish": nn.Hardswish(inplace=True),
                    "relu6": nn.ReLU6(inplace=True), "leaky_relu": nn.LeakyReLU(0.1, inplace=True),
                    "elu": nn.ELU(inplace=True)}.get(kind, nn.Identity())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.c1(x)
        k = self.kind
        if k == "relu_after_its_consumer":       # the temporal conv read y before it is changed in place
            z = self.c2(y)
            y.relu_()
            return self.fc((z + y).mean([2, 3, 4]))
        if k == "iadd_skip":                     # torchvision's `out += identity; relu(inplace)`
            out = self.c2(torch.relu(y))
            out += y
            return self.fc(F.relu(out, inplace=True).mean([2, 3, 4]))
        if k == "bn_and_skip_of_one_conv":       # a BatchNorm folded into a conv whose output is also used raw
            return self.fc((self.bn(y) + y).mean([2, 3, 4]))
        if k == "two_bns_of_one_conv":
            return self.fc((self.bn(y) * self.bn2(y)).mean([2, 3, 4]))
        if k == "clamp_":
            y = y.clamp_(0, 6)
        elif k == "add_":
            y.add_(1.0)
        elif k == "mul_":
            y.mul_(2)
        elif k == "div_":
            y = y.div_(3.0)
        elif k == "swish_mul_":                  # the memory-saving swish: x.mul_(torch.sigmoid(x))
            y = y.mul_(torch.sigmoid(y))
        else:
            y = self.act(y)
        return self.fc(self.c2(y).mean([2, 3, 4]))


@pytest.mark.parametrize("kind", ["silu", "hardswish", "relu6", "leaky_relu", "elu", "clamp_",
                                  "relu_after_its_consumer", "iadd_skip", "bn_and_skip_of_one_conv",
                                  "two_bns_of_one_conv"])
def test_in_place_activations_and_shared_conv_outputs(kind):
    assert_exact(seeded(InPlace, kind), video(8, 4))


@pytest.mark.parametrize("kind", ["add_", "mul_", "div_", "swish_mul_"])
def test_in_place_arithmetic_on_a_stream(kind):
    assert_exact(seeded(InPlace, kind), video(8, 4))


# ---- non-local, temporal shift, attention pooling -------------------------------------------------

class NonLocal(nn.Module):
    """Non-local block: attention over the T*H*W flattened tokens, residual."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv3d(3, c, 3, padding=1)
        self.theta, self.phi, self.g = (nn.Conv3d(c, c // 2, 1) for _ in range(3))
        self.out = nn.Conv3d(c // 2, c, 1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        b, c, t, h, w = x.shape
        q = self.theta(x).view(b, c // 2, -1).permute(0, 2, 1)
        k = self.phi(x).view(b, c // 2, -1)
        v = self.g(x).view(b, c // 2, -1).permute(0, 2, 1)
        y = (torch.softmax(q @ k, -1) @ v).permute(0, 2, 1).reshape(b, c // 2, t, h, w)
        return self.fc((x + self.out(y)).mean([2, 3, 4]))


def test_non_local_block_is_refused():
    """Outcome: refused, naming the flattening permute and the attention it feeds (correct and helpful)."""
    assert_refused(seeded(NonLocal), video(8, 4), "node 'permute'", "time flattened together with other "
                   "dimensions", "attention at node 'matmul'", "fix:")


def shift_zeros_like(x, online):
    """TSM's shift as its code writes it: slices of a torch.zeros_like buffer, on (B, C, T, H, W)."""
    fold = x.shape[1] // 4
    out = torch.zeros_like(x)
    if online:
        out[:, :fold, 1:] = x[:, :fold, :-1]
        out[:, fold:] = x[:, fold:]
    else:
        out[:, :fold, :-1] = x[:, :fold, 1:]                    # shift towards the past: the next frame
        out[:, fold:2 * fold, 1:] = x[:, fold:2 * fold, :-1]    # shift towards the future: the previous frame
        out[:, 2 * fold:] = x[:, 2 * fold:]
    return out


def shift_cat(x, online):
    """The same shift with F.pad and torch.cat."""
    fold = x.shape[1] // 4
    a = F.pad(x[:, :fold, :-1], (0, 0, 0, 0, 1, 0))
    if online:
        return torch.cat([a, x[:, fold:]], 1)
    b = F.pad(x[:, fold:2 * fold, 1:], (0, 0, 0, 0, 0, 1))
    return torch.cat([a, b, x[:, 2 * fold:]], 1)


class Shift(nn.Module):
    def __init__(self, online=False):
        super().__init__()
        self.online = online

    def forward(self, x):
        return shift_zeros_like(x, self.online)


class TSM(nn.Module):
    def __init__(self, style="cat", online=False):
        super().__init__()
        self.style, self.online = style, online
        self.conv1 = nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1))
        self.conv2 = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1))
        self.shift = Shift(online)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        if self.style == "cat":
            s = shift_cat(x, self.online)
        elif self.style == "inline":
            s = shift_zeros_like(x, self.online)
        else:
            s = self.shift(x)
        return self.fc((x + torch.relu(self.conv2(s))).mean([2, 3, 4]))


class TSMFolded(nn.Module):
    """TSM's own layout: frames folded into the batch of a 2D CNN, the shift on (N, T, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = torch.relu(self.conv1(x.transpose(1, 2).reshape(b * t, c, h, w)))
        nt, c2, h2, w2 = y.size()
        z = y.view(b, t, c2, h2, w2)
        fold = c2 // 4
        out = torch.zeros_like(z)
        out[:, :-1, :fold] = z[:, 1:, :fold]
        out[:, 1:, fold:2 * fold] = z[:, :-1, fold:2 * fold]
        out[:, :, 2 * fold:] = z[:, :, 2 * fold:]
        y = y + torch.relu(self.conv2(out.view(nt, c2, h2, w2)))
        return self.fc(y.mean([2, 3]).view(b, t, -1).mean(1))


@pytest.mark.parametrize("online", [False, True])
def test_temporal_shift_with_pad_and_cat_is_exact(online):
    co = assert_exact(seeded(TSM, "cat", online), video(8, 4))
    assert co.delay == (8 if not online else 7)


@pytest.mark.parametrize("make", [lambda: seeded(TSM, "inline"), lambda: seeded(TSM, "inline", True),
                                  lambda: seeded(TSMFolded)], ids=["offline", "online", "folded"])
def test_temporal_shift_written_into_zeros_like_is_refused(make):
    """Refused: fx cannot trace slice assignment; the fix says to build the tensor (torch.cat, F.pad), which
    converts exactly (test_temporal_shift_with_pad_and_cat_is_exact)."""
    msg = assert_refused(make(), video(8, 4), "torch.fx could not trace the model",
                         "'Proxy' object does not support item assignment")
    assert "torch.cat" in msg.split("fix:")[1] and "F.pad" in msg.split("fix:")[1]


@pytest.mark.parametrize("leaf", [True, False])
def test_temporal_shift_module_is_refused_as_a_leaf_that_mixes_frames(leaf):
    kwargs = {"leaf_modules": [Shift]} if leaf else {}
    assert_refused(seeded(TSM, "module"), video(8, 4), "node 'shift'", "does not act frame by frame", **kwargs)


class AttentionPool(nn.Module):
    """A learned score per frame, softmax over time, weighted sum of the frames' features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 3, padding=1)
        self.score = nn.Conv3d(8, 1, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        w = torch.softmax(self.score(f).mean([3, 4]), dim=2)
        return self.fc((f.mean([3, 4]) * w).sum(2))


def test_temporal_attention_pooling_is_a_window_over_the_clip():
    co = assert_exact(seeded(AttentionPool), video(8, 4))
    assert any(r.kind == "attention" for r in co.report)


# ---- heads ------------------------------------------------------------------------------------------

class Heads(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), bn(8), nn.ReLU())
        self.fc = nn.Linear(8, 3)
        self.fc2 = nn.Linear(16, 3)
        self.spatial = nn.Conv2d(8, 3, 4)
        self.time_pool = nn.AdaptiveAvgPool3d((1, None, None))

    def forward(self, x):
        f = self.conv(x)
        if self.how == "mean234":
            return self.fc(f.mean([2, 3, 4]))
        if self.how == "adaptive_1nn":   # time pooled, frame kept, then a spatial conv classifier
            return self.spatial(self.time_pool(f).squeeze(2)).flatten(1)
        if self.how == "perframe":       # AdaptiveAvgPool3d((None, 1, 1)) then a Linear per frame: (B, T, K)
            return self.fc(F.adaptive_avg_pool3d(f, (None, 1, 1)).flatten(2).transpose(1, 2))
        if self.how == "perframe_einsum":
            return torch.einsum("bct,kc->bkt", f.mean([3, 4]), self.fc.weight) + self.fc.bias[:, None]
        if self.how == "adaptive_t2":    # two temporal segments flattened into the classifier
            return self.fc2(F.adaptive_avg_pool3d(f, (2, 1, 1)).flatten(1))
        if self.how == "adaptive_max_t2":
            return self.fc2(F.adaptive_max_pool3d(f, (2, 1, 1)).flatten(1))
        if self.how == "amax_and_mean":
            return self.fc2(torch.cat([f.amax((2, 3, 4)), f.mean((2, 3, 4))], 1))


@pytest.mark.parametrize("how", ["mean234", "adaptive_1nn", "perframe", "perframe_einsum", "adaptive_t2",
                                 "adaptive_max_t2", "amax_and_mean"])
def test_heads(how):
    co = assert_exact(seeded(Heads, how), video(8, 4))
    assert co.delay == (1 if how.startswith("perframe") else 8)


class PerFrameStride2(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv3d(4, 6, 3, stride=(2, 1, 1), padding=1), nn.ReLU())
        self.cls = nn.Conv3d(6, 3, 1)

    def forward(self, x):
        return self.cls(self.c2(self.c1(x))).mean([3, 4])      # (B, 3, ceil(T / 2))


@pytest.mark.parametrize("frames", [8, 9])
def test_per_frame_outputs_at_half_rate(frames):
    co = assert_exact(seeded(PerFrameStride2), video(frames, 4), extra=8)
    assert co.stride == 2
    with torch.no_grad():
        co.clean_state()
        outs = [co.forward_step(f) for f in video(12, 4).unbind(2)]
    assert [y is not None for y in outs] == [False, False] + [True, False] * 5


class LogitsAndFeatures(nn.Module):
    def __init__(self, kind="tuple"):
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), bn(6), nn.ReLU(),
                                  nn.Conv3d(6, 6, 3, stride=(2, 2, 2), padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        feats = self.body(x)
        logits = self.fc(feats.mean([2, 3, 4]))
        if self.kind == "tuple":
            return logits, feats
        if self.kind == "dict":
            return {"logits": logits, "features": feats, "pooled": feats.mean([3, 4])}
        return [logits, feats.flatten(3)]


@pytest.mark.parametrize("kind", ["tuple", "dict", "list"])
def test_models_returning_logits_and_features(kind):
    co = assert_exact(seeded(LogitsAndFeatures, kind), video(8, 4))
    with torch.no_grad():
        co.clean_state()
        y = [co.forward_step(f) for f in video(4, 4).unbind(2)]
    # the features (stride 2, delay 2) come before the logits (a window of the clip)
    assert y[1] is None and y[3] is None
    first = tree_flatten(y[2])[0]
    assert first[0] is None and all(v is not None for v in first[1:])


# ---- convolution variants ---------------------------------------------------------------------------

class Depthwise(nn.Module):
    def __init__(self, mult=1):
        super().__init__()
        self.pw = nn.Conv3d(3, 6, 1)
        self.dw = nn.Conv3d(6, 6 * mult, 3, padding=1, groups=6)
        self.dw2 = nn.Conv3d(6 * mult, 6 * mult, (5, 3, 3), padding=(4, 1, 1), dilation=(2, 1, 1), groups=6 * mult)
        self.fc = nn.Linear(6 * mult, 3)

    def forward(self, x):
        y = torch.relu(self.dw(torch.relu(self.pw(x))))
        return self.fc((y + self.dw2(y)).mean([2, 3, 4]))


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv3d(mult):
    assert_exact(seeded(Depthwise, mult), video(8, 4))


class SamePadding(nn.Module):
    def __init__(self, kt=2, dilation=1, mode="zeros"):
        super().__init__()
        self.c1 = nn.Conv3d(3, 4, (kt, 3, 3), padding="same", dilation=(dilation, 1, 1), padding_mode=mode)
        self.c2 = nn.Conv3d(4, 4, (4, 1, 1), padding="same", padding_mode=mode)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


@pytest.mark.parametrize("kt,dilation,mode", [(2, 1, "zeros"), (4, 2, "zeros"), (2, 1, "replicate")])
def test_same_padding_with_even_temporal_kernels(kt, dilation, mode):
    """padding='same' with an even kernel pads one frame more at the end; per-frame outputs, so the stream
    must equal the model on the stream."""
    assert_exact(seeded(SamePadding, kt, dilation, mode), video(8, 4))


class Replicate(nn.Module):
    def __init__(self, stride=1, mode="replicate"):
        super().__init__()
        self.c1 = nn.Conv3d(3, 4, 3, padding=1, padding_mode=mode)
        self.c2 = nn.Conv3d(4, 4, (5, 3, 3), stride=(stride, 1, 1), padding=(2, 1, 1), padding_mode=mode)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean([2, 3, 4]))


@pytest.mark.parametrize("stride", [1, 2])
def test_replicate_padding_mode(stride):
    assert_exact(seeded(Replicate, stride), video(8, 4))


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_padding_modes_that_read_the_future_are_refused(mode):
    assert_refused(seeded(Replicate, 1, mode), video(8, 4), "node 'c1'", f"padding_mode='{mode}' pads time "
                   "with frames from the future", "fix:")


@pytest.mark.parametrize("make,frames", [(lambda: seeded(MultiStride), 16), (lambda: seeded(Depthwise), 8)],
                         ids=["strided-residual", "depthwise"])
def test_channels_last_3d(make, frames):
    model = make().to(memory_format=torch.channels_last_3d)
    assert_exact(model, video(frames, 8).contiguous(memory_format=torch.channels_last_3d))


class TimeFirst(nn.Module):
    """(B, T, C, H, W) input permuted inside; per-frame features at half rate out, (B, T/2, C)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 4, 3, stride=(2, 1, 1), padding=1)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv(x.permute(0, 2, 1, 3, 4))))
        return y.mean([3, 4]).transpose(1, 2)


def test_time_first_layout():
    co = assert_exact(seeded(TimeFirst), torch.randn(1, 8, 3, 4, 4, dtype=D), time_dim=1, extra=7)
    assert co.stride == 2


class Norms(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.norm = {"bn_batch_stats": nn.BatchNorm3d(4, track_running_stats=False), "gn": nn.GroupNorm(2, 4),
                     "in": nn.InstanceNorm3d(4, affine=True), "ln_channels": nn.LayerNorm(4),
                     "ln_frame": nn.LayerNorm([4, 4, 4])}[kind]
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        f = self.conv(x)
        if self.kind == "ln_channels":
            f = self.norm(f.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        elif self.kind == "ln_frame":
            f = self.norm(f.transpose(1, 2)).transpose(1, 2)
        else:
            f = self.norm(f)
        return self.fc(torch.relu(f).mean([2, 3, 4]))


@pytest.mark.parametrize("kind", ["ln_channels", "ln_frame"])
def test_layer_norm_per_frame_is_exact(kind):
    assert_exact(seeded(Norms, kind), video(8, 4))


@pytest.mark.parametrize("kind", ["bn_batch_stats", "gn", "in"])
def test_norms_over_time_are_refused(kind):
    assert_refused(seeded(Norms, kind), video(8, 4), "node 'norm'", "does not act frame by frame")


class Upsample(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.down = nn.Conv3d(3, 4, 3, stride=(2, 1, 1), padding=1)
        self.up = nn.ConvTranspose3d(4, 4, (2, 1, 1), stride=(2, 1, 1))
        self.cls = nn.Conv3d(4, 3, 1)

    def forward(self, x):
        y = torch.relu(self.down(x))
        if self.kind == "convT":
            y = self.up(y)
        elif self.kind == "nearest":
            y = F.interpolate(y, scale_factor=(2, 1, 1), mode="nearest")
        elif self.kind == "trilinear":
            y = F.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)
        else:
            y = y.repeat_interleave(2, dim=2)
        return self.cls(y).mean([3, 4])


@pytest.mark.parametrize("kind,words", [("convT", "a transposed convolution that upsamples time"),
                                        ("nearest", "has 4, its output 8)"),
                                        ("trilinear", "has 4, its output 8)"),
                                        ("repeat_interleave", "has 4, its output 8)")])
def test_temporal_upsampling_is_refused(kind, words):
    assert_refused(seeded(Upsample, kind), video(8, 4), words, "fix:")


class SpatialDecoder(nn.Module):
    """A U-Net decoder's upsampling by transposed convolutions of temporal kernel 1: frame by frame."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.down = nn.Conv3d(3, 4, 3, stride=(1, 2, 2), padding=1)
        self.up = nn.ConvTranspose3d(4, 4, (1, 2, 2), stride=(1, 2, 2))
        self.up2d = nn.Parameter(torch.randn(4, 2, 1, 3, 3) * 0.3)

    def forward(self, x):
        y = torch.relu(self.down(x))
        if self.functional:
            return F.conv_transpose3d(y, self.up2d, None, (1, 2, 2), (0, 1, 1), (0, 1, 1))
        return self.up(y) + x.mean(1, keepdim=True)


class SpatialResize(nn.Module):
    """Feature-pyramid skips and heads that resize space to a size read off a tensor, time included and kept."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.c = nn.Conv3d(3, 4, 3, padding=1)
        self.d = nn.Conv3d(4, 4, 3, stride=(1, 2, 2), padding=1)

    def forward(self, x):
        a = torch.relu(self.c(x))
        b = self.d(a)
        corners = {"align_corners": True} if self.mode == "trilinear" else {}
        skip = a + F.interpolate(b, size=a.shape[2:], mode=self.mode, **corners)
        return skip + F.interpolate(b, size=(b.shape[2], x.shape[3], x.shape[4]), mode=self.mode, **corners)


@pytest.mark.parametrize("model,delay", [
    (lambda: seeded(SpatialDecoder, False), 1), (lambda: seeded(SpatialDecoder, True), 1),
    *[(lambda mode=mode: seeded(SpatialResize, mode), 2) for mode in ("nearest", "trilinear", "area", "nearest-exact")],
], ids=["ConvTranspose3d (1, 2, 2)", "conv_transpose3d (1, 3, 3)", "resize nearest", "resize trilinear",
        "resize area", "resize nearest-exact"])
def test_spatial_upsampling_decoders_act_frame_by_frame(model, delay):
    """Transposed convolutions of temporal kernel 1, and resizes to a size read off a tensor that keeps the frames
    (an FPN's skips): each frame upsampled alone."""
    model, x = model(), video(8, 8)
    co = cofx.convert(model, x)
    assert co.is_exact and co.delay == delay
    assert_clip_exact(co, model, x)
    assert_clip_exact(co, model, two_streams(video(11, 8)))


class TSMResidual(nn.Module):
    """Temporal Shift Module as its authors fold it: frames into the batch, a quarter of the channels shifted a frame
    back (the next frame's) and a quarter a frame forward, inside a residual block."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def shift(self, x, segments):
        nt, c, h, w = x.size()
        x = x.view(nt // segments, segments, c, h, w)
        fold = c // 4
        back = torch.cat([x[:, 1:, :fold], torch.zeros_like(x[:, :1, :fold])], 1)
        forward = torch.cat([torch.zeros_like(x[:, :1, fold:2 * fold]), x[:, :-1, fold:2 * fold]], 1)
        return torch.cat([back, forward, x[:, :, 2 * fold:]], 2).view(nt, c, h, w)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.embed(x.transpose(1, 2).reshape(b * t, c, h, w))
        y = y + self.conv2(torch.relu(self.conv1(self.shift(y, t))))
        return y.view(b, t, 8, h, w).mean((3, 4)).transpose(1, 2)


def test_tsm_with_a_shift_from_the_next_frame_in_a_residual_block_is_exact_for_several_streams():
    """The residual waits a frame for the shifted branch; with the frames folded into the batch, the wait holds
    back a frame of every stream (each stream's frames are a run of rows)."""
    model = seeded(TSMResidual)
    co = cofx.convert(model, video(8, 4))
    assert co.is_exact and co.delay == 1
    x = two_streams(video(11, 4))
    assert_clip_exact(co, model, x)
    with torch.no_grad():
        for sizes in ([3, 8], [0, 2, 5, 4], [11]):
            got = steps_in_chunks(co, x, sizes)
            assert max_error(got, model(x)) <= output_tolerance(model(x)), sizes


class TimeIdioms(nn.Module):
    """Other ways video code handles time after a 3x3x3 conv on an 8-frame clip."""

    def __init__(self, kind, t=8):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4 * t, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.fc8 = nn.Linear(8, 3)
        self.cls = nn.Conv3d(4, 3, 1)
        self.register_buffer("idx", torch.tensor([0, 3, 6]))

    def forward(self, x):
        f = torch.relu(self.conv(x))
        b, c, t, h, w = f.shape
        k = self.kind
        if k == "reshape_segments":    # temporal pooling by reshape into (T/4, 4)
            return self.cls(f.reshape(b, c, t // 4, 4, h, w).mean(3)).mean([3, 4])
        if k == "unfold_segments":
            return self.cls(f.unfold(2, 4, 4).mean(-1)).mean([3, 4])
        if k == "chunk_halves":
            first, second = f.chunk(2, dim=2)
            return self.fc8(torch.cat([first.mean([2, 3, 4]), second.mean([2, 3, 4])], 1))
        if k == "early_fusion":        # time folded into the channels of a 2D conv
            return self.fc(self.c2(f.flatten(1, 2)).mean([2, 3]))
        if k == "index_list":          # TSN-style fixed segment frames
            return self.fc(f[:, :, [0, 3, 6]].mean([2, 3, 4]))
        if k == "index_select_buffer":
            return self.fc(f.index_select(2, self.idx).mean([2, 3, 4]))
        if k == "stack_even_frames":
            return self.cls(torch.stack([f[:, :, i] for i in range(0, 8, 2)], 2)).mean([3, 4])


@pytest.mark.parametrize("kind", ["early_fusion", "index_list", "index_select_buffer", "stack_even_frames"])
def test_time_idioms_that_read_the_clip_are_windows_over_it(kind):
    co = assert_exact(seeded(TimeIdioms, kind), video(8, 4))
    assert co.delay == 8


@pytest.mark.parametrize("kind", ["unfold_segments", "reshape_segments"])
def test_segments_stacked_by_unfold_or_a_view_stream_as_strided_windows(kind):
    co = assert_exact(seeded(TimeIdioms, kind), video(8, 4), extra=8)   # (the view takes whole segments only)
    assert co.stride == 4


@pytest.mark.parametrize("kind,words", [
    ("chunk_halves", ["node 'chunk'", "splits the frames into parts", "fix:"])])
def test_time_idioms_that_regroup_frames_are_refused(kind, words):
    assert_refused(seeded(TimeIdioms, kind), video(8, 4), *words)


# ---- real models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,delay,stride", [("r3d_18", 54, 8), ("mc3_18", 12, 1), ("r2plus1d_18", 54, 8)])
def test_torchvision_video_resnets_float32(name, delay, stride):
    tvm = pytest.importorskip("torchvision.models.video")
    model = seeded(getattr(tvm, name), num_classes=5, dtype=torch.float32)
    co = assert_exact(model, video(8, 32, dtype=torch.float32), extra=3)
    assert (co.delay, co.stride) == (delay, stride)


def test_pytorchvideo_csn():
    """Channel-separated network (depthwise 3x3x3 bottlenecks, temporal strides): not in the zoo table."""
    from pytorchvideo.models.csn import create_csn
    model = seeded(create_csn, model_depth=50, stem_dim_out=8, model_num_class=5, head_pool_kernel_size=(1, 2, 2))
    co = assert_exact(model, video(8, 32), extra=3)
    assert co.stride == 8


def test_pytorchvideo_r2plus1d():
    from pytorchvideo.models.r2plus1d import create_r2plus1d
    model = seeded(create_r2plus1d, model_depth=50, stem_dim_out=8, model_num_class=5,
                   head_pool_kernel_size=(2, 1, 1), head_activation=None)
    co = assert_exact(model, video(8, 32), extra=3)
    assert co.stride == 4


class PyTorchVideoSlowFast(nn.Module):
    def __init__(self):
        super().__init__()
        from pytorchvideo.models.slowfast import create_slowfast
        self.net = create_slowfast(model_depth=50, stem_dim_outs=(8, 2), slowfast_channel_reduction_ratio=(4,),
                                   model_num_class=5, dropout_rate=0.0,
                                   head_pool_kernel_sizes=((4, 1, 1), (16, 1, 1)))

    def forward(self, x):
        return self.net([x[:, :, ::4], x])


def test_pytorchvideo_slowfast_is_refused():
    pytest.importorskip("pytorchvideo")
    model = seeded(PyTorchVideoSlowFast, dtype=torch.float32)
    clip = video(16, 32, dtype=torch.float32)
    model(clip)    # the model itself runs on this clip
    assert_refused(model, clip)


def test_save_and_load_resume_a_two_pathway_model(tmp_path):
    model = seeded(SlowFastPerFrame, offset=1)
    co = cofx.convert(model, video(16, 4))
    stream = video(30, 4, b=2)
    with torch.no_grad():
        co.clean_state()
        want = co.forward_steps(stream, pad_end=True)
        cofx.save(co, tmp_path / "sf.continual.pt")
        loaded = cofx.load(tmp_path / "sf.continual.pt", trust=True)
        assert loaded.is_exact and (loaded.delay, loaded.stride) == (co.delay, co.stride)
        got = by_chunks(loaded, stream, [7, 0, 1, 9, 13])
    assert max_error(got, want) <= output_tolerance(want)


# ---- bugs ---------------------------------------------------------------------------------------------

class DataDependentSwish(nn.Module):
    """A frame-by-frame activation that fx cannot trace (Python control flow on a tensor value)."""

    def forward(self, x):
        if x.sum() > -1e30:
            return x * torch.sigmoid(x)
        return x


class ConvAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 3, 3, padding=1)
        self.act = DataDependentSwish()

    def forward(self, x):
        return self.act(self.conv(x))


class NestedUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConvAct()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.block(x).mean([2, 3, 4]))


def test_untraceable_child_of_the_root_becomes_a_leaf_alone():
    """Control: the same activation directly under the root converts exactly."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 3, 3, padding=1)
            self.act = DataDependentSwish()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean([2, 3, 4]))
    assert_exact(seeded(Flat), video(6, 4))


def test_untraceable_module_nested_in_a_block_becomes_a_leaf_alone():
    assert_exact(seeded(NestedUntraceable), video(6, 4))


class InPlaceList(nn.Module):
    """Writes into the list it is given (as pytorchvideo's MultiPathWayWithFuse(inplace=True) does), then
    calls an untraceable module."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(3, 3, 1)
        self.act = DataDependentSwish()

    def forward(self, xs):
        xs[0] = self.a(xs[0])
        return self.act(xs[0] + xs[1])


class ListInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 3, 3, padding=1)
        self.two = InPlaceList()

    def forward(self, x):
        y = self.conv(x)
        return self.two([y, 2 * y]).mean([2, 3, 4])


def test_module_writing_into_its_list_input_converts_or_is_refused():
    model = seeded(ListInput)
    try:
        co = cofx.convert(model, video(6, 4))
    except cofx.ConversionError:
        return
    assert co.is_exact
    assert_exact(model, video(6, 4))


def test_pytorchvideo_slowfast_refusal_names_its_untraceable_head():
    pytest.importorskip("pytorchvideo")
    model = seeded(PyTorchVideoSlowFast, dtype=torch.float32)
    msg = assert_refused(model, video(16, 32, dtype=torch.float32))
    assert "check the example input's shape" not in msg and "blocks.5" in msg


# ---- ONNX export and streams restarted -----------------------------------------------------------------

ONNX_CASES = [
    ("i3d-ceil", lambda dt: seeded(I3D, ceil=True, dtype=dt), (16, 8)),
    ("strided-residual", lambda dt: seeded(MultiStride, dtype=dt), (16, 4)),
    ("slowfast-strided-head", lambda dt: seeded(SlowFastStridedFastHead, offset=1, dtype=dt), (16, 4)),
    ("tsm-cat", lambda dt: seeded(TSM, "cat", dtype=dt), (8, 4)),
    ("per-frame-stride-2", lambda dt: seeded(PerFrameStride2, dtype=dt), (8, 4)),
]


@pytest.mark.parametrize("name,make,size", ONNX_CASES, ids=[c[0] for c in ONNX_CASES])
def test_onnx_export_matches_forward_step_from_frame_0(tmp_path, name, make, size):
    pytest.importorskip("onnxruntime")
    from test_export import assert_matches, run_alone, run_onnx, session
    co = cofx.convert(make(torch.float32), video(*size, dtype=torch.float32))
    assert co.is_exact
    steps = co.receptive_field + 2 * co.stride + 1
    frames = torch.randn(2, 3, steps, size[1], size[1])
    cofx.export_onnx(co, tmp_path / f"{name}.onnx")
    restart = steps // 2 + 1   # out of stride phase with the other row
    results = run_onnx(session(tmp_path / f"{name}.onnx"), frames, resets={restart: [1]})
    expected = [run_alone(co, frames[0]), run_alone(co, frames[1, :, :restart]) + run_alone(co, frames[1, :, restart:])]
    assert_matches(results, expected)
    ready = [bool(r[0]) for _, r in results]
    assert ready.index(True) == co.delay


@pytest.mark.parametrize("name,make,size", ONNX_CASES, ids=[c[0] for c in ONNX_CASES])
def test_clean_state_of_one_stream_equals_a_fresh_run(name, make, size):
    from test_streams import assert_rows, expected_per_row, step_batch
    co = cofx.convert(make(D), video(*size))
    steps = co.receptive_field + 2 * co.stride + 1
    frames = video(steps, size[1], b=2)
    frames[1] *= 10
    restarts = {steps // 2 + 1: [1]}
    assert_rows(step_batch(co, frames, restarts), expected_per_row(co, frames, restarts), tol=1e-9)


def _alone_outputs(co, stream):
    co.clean_state()
    with torch.no_grad():
        outs = [co.forward_step(stream[:, i].unsqueeze(0)) for i in range(stream.shape[1])]
    co.clean_state()
    return outs


def test_restarted_stream_of_a_model_with_several_outputs_keeps_each_output():
    co = cofx.convert(seeded(LogitsAndFeatures), video(8, 4))
    frames = video(30, 4, b=2)
    restart = 15
    alone = [_alone_outputs(co, frames[0]),
             _alone_outputs(co, frames[1, :, :restart]) + _alone_outputs(co, frames[1, :, restart:])]
    co.clean_state()
    missing = []
    with torch.no_grad():
        for i in range(frames.shape[2]):
            if i == restart:
                co.clean_state(streams=[1])
            y = co.forward_step(frames[:, :, i])
            for b in (0, 1):
                want = alone[b][i]
                for j in range(2):
                    if want is None or want[j] is None:
                        continue
                    got = None if y is None or y[j] is None else y[j][b]
                    if got is None or torch.isnan(got).all():
                        missing.append((i, b, j))
                    else:
                        assert max_error(got, want[j][0]) <= 1e-9 * float(want[j].abs().max())
    assert not missing, f"(step, row, output) with an output alone and none in the batch: {missing}"


def test_onnx_ready_of_a_model_with_several_outputs(tmp_path):
    """`ready` where any output has its frame (as forward_step returns not None); each output NaN where it has
    none of its own."""
    pytest.importorskip("onnxruntime")
    from test_export import _NP, session
    co = cofx.convert(seeded(LogitsAndFeatures, dtype=torch.float32), video(8, 4, dtype=torch.float32))
    info = cofx.export_onnx(co, tmp_path / "lf.onnx")
    assert info["outputs"][:3] == ["output_0", "output_1", "ready"]
    sess = session(tmp_path / "lf.onnx")
    inputs = sess.get_inputs()
    frames = torch.randn(1, 3, 12, 4, 4)
    state = [np.zeros([1, *i.shape[1:]], _NP[i.type]) for i in inputs[2:]]
    reset = np.ones(1, bool)
    co.clean_state()
    wrong = []
    with torch.no_grad():
        for i in range(frames.shape[2]):
            logits, feats, ready, *state = sess.run(None, {"frame": frames[:, :, i].numpy(), "reset": reset,
                                                           **{s.name: v for s, v in zip(inputs[2:], state)}})
            reset = np.zeros(1, bool)
            y = co.forward_step(frames[:, :, i])
            if bool(ready[0]) != (y is not None):
                wrong.append(i)
            elif y is not None:
                assert np.abs(feats - y[1].numpy()).max() <= 1e-5 * float(y[1].abs().max())
                assert np.isnan(logits).all() if y[0] is None else np.abs(logits - y[0].numpy()).max() <= 1e-4
    assert not wrong, f"steps where ready disagrees with forward_step returning None: {wrong}"
