"""Temporal conv nets and skeleton models written the way people write them.

Every model must either convert exactly (float64, 1e-9 of the output's
magnitude: from a clean state `forward_steps(x, pad_end=True)` equals the
model on a fresh two-stream input, and random chunkings of a longer stream
equal frame-by-frame stepping), be reported windowed (not exact, chunk
invariant, refused by strict=True), or be refused with a `ConversionError`
whose message names what is refused.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cofx
from cofx.verify import as_steps, by_chunks, by_frame, chunk_sizes, max_error, output_tolerance

D = torch.float64
C = 6
V = 5


# -- helpers ---------------------------------------------------------------------------------------------------
def _fresh(x, time_dim=2, t=None, seed=1):
    """Two independent streams shaped like `x`, the second at another scale."""
    shape = list(x.shape)
    shape[0] = 2
    if t is not None:
        shape[time_dim] = t
    y = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)
    y[1] *= 37.0
    return y


def _chunks_equal_frames(co, x, time_dim):
    stream = _fresh(x, time_dim, t=2 * x.shape[time_dim] + 7, seed=2)
    co.clean_state()
    frames = by_frame(co, stream)
    co.clean_state()
    whole = co.forward_steps(stream, pad_end=True)
    tol = output_tolerance(frames)
    assert frames is not None and max_error(whole, frames) <= tol, max_error(whole, frames)
    rng = random.Random(0)
    for _ in range(2):
        co.clean_state()
        chunked = by_chunks(co, stream, chunk_sizes(stream.shape[time_dim], rng))
        assert max_error(chunked, frames) <= tol, max_error(chunked, frames)
    co.clean_state()


def assert_exact(model, x, time_dim=2, **kw):
    model = model.to(D).eval()
    co = cofx.convert(model, x, time_dim=time_dim, **kw)
    assert co.is_exact, str(co.report)
    with torch.no_grad():
        x2 = _fresh(x, time_dim)
        co.clean_state()
        got = co.forward_steps(x2, pad_end=True)
        want = as_steps(model(x2), got)
        assert max_error(got, want) <= output_tolerance(want), max_error(got, want)
        co.clean_state()
        got = by_frame(co, x2)
        assert max_error(got, want) <= output_tolerance(want), max_error(got, want)
        assert max_error(co.forward(x2), model(x2)) == 0.0
        _chunks_equal_frames(co, x, time_dim)
    return co


def assert_refused(model, x, *words, time_dim=2, **kw):
    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(model.to(D).eval(), x, time_dim=time_dim, **kw)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return msg


def assert_windowed(model, x):
    """An approximation: reported, not exact, chunk invariant, off the clip model, refused by strict=True."""
    model = model.to(D).eval()
    co = cofx.convert(model, x)
    assert not co.is_exact
    assert any(r.kind == "windowed" for r in co.report)
    with torch.no_grad():
        x2 = _fresh(x)
        co.clean_state()
        got = co.forward_steps(x2, pad_end=True)
        want = as_steps(model(x2), got)
        assert max_error(got, want) > 1e-3   # the causal window is not the clip's statistic
        _chunks_equal_frames(co, x, 2)
    with pytest.raises(cofx.ConversionError, match="strict=True refuses windowed"):
        cofx.convert(model, x, strict=True)


def exact_or_refused(model, x, time_dim=2):
    """The promise itself: exact, or a ConversionError; never another exception."""
    try:
        co = cofx.convert(model.to(D).eval(), x, time_dim=time_dim)
    except cofx.ConversionError:
        return None
    assert co.is_exact
    return assert_exact(model, x, time_dim)


def x1d(t=16, c=C):
    return torch.randn(1, c, t, dtype=D)


def xskel(t=12, c=3, v=V):
    return torch.randn(1, c, t, v, dtype=D)


def _bn_stats(model):
    """Non-trivial BatchNorm statistics, so folding them into convolutions is tested."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


# -- Bai et al. TCN: chomp, weight norm, residual 1x1 downsample, dilations 1..8 ------------------------------
class Chomp1d(nn.Module):
    def __init__(self, chomp):
        super().__init__()
        self.chomp = chomp

    def forward(self, x):
        return x[:, :, :-self.chomp].contiguous()


class TemporalBlock(nn.Module):
    def __init__(self, cin, cout, k, d, wn):
        super().__init__()
        p = (k - 1) * d
        self.net = nn.Sequential(wn(nn.Conv1d(cin, cout, k, padding=p, dilation=d)), Chomp1d(p), nn.ReLU(), nn.Dropout(0.2),
                                 wn(nn.Conv1d(cout, cout, k, padding=p, dilation=d)), Chomp1d(p), nn.ReLU(), nn.Dropout(0.2))
        self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x):
        res = x if self.downsample is None else self.downsample(x)
        return self.relu(self.net(x) + res)


def _plain(m):
    return m


def _old_weight_norm(m):
    return torch.nn.utils.weight_norm(m)


def _param_weight_norm(m):
    return torch.nn.utils.parametrizations.weight_norm(m)


class TCN(nn.Module):
    def __init__(self, wn=_plain, head="last", k=2):
        super().__init__()
        chans = [3, 6, 6, 8, 8]
        self.blocks = nn.Sequential(*[TemporalBlock(chans[i], chans[i + 1], k, 2 ** i, wn) for i in range(4)])
        self.linear = nn.Linear(8, 4)
        self.head = head

    def forward(self, x):
        y = self.blocks(x)
        if self.head == "last":
            return self.linear(y[:, :, -1])
        if self.head == "mean(-1)":
            return self.linear(y.mean(-1))
        return y


@pytest.mark.parametrize("wn", [_plain, _old_weight_norm, _param_weight_norm], ids=["plain", "weight_norm", "parametrizations"])
@pytest.mark.parametrize("head", ["last", "mean(-1)", "per-frame"])
def test_bai_tcn_with_chomp_is_exact(wn, head):
    torch.manual_seed(0)
    co = assert_exact(TCN(wn, head), x1d(16, 3))
    if head == "per-frame":   # receptive field 1 + 2 * (1 + 2 + 4 + 8)
        assert co.receptive_field == 31


def test_bai_tcn_with_chomp_has_no_delay():
    torch.manual_seed(0)
    co = cofx.convert(TCN(_plain, "per-frame").to(D).eval(), x1d(16, 3))
    assert co.is_exact
    assert co.delay == 0, co.delay


OLD_WEIGHT_NORM_NETS = {
    "two convolutions": lambda: nn.Sequential(_old_weight_norm(nn.Conv1d(C, C, 3, padding=1)), nn.ReLU(),
                                              _old_weight_norm(nn.Conv1d(C, C, 3, padding=1))),
    # folded with the BatchNorm after it, a convolution computes its weight through the pre-hook too (a
    # pointwise one read the weight the last clip forward left: stale after a checkpoint loaded)
    "pointwise, then BatchNorm": lambda: nn.Sequential(nn.Conv1d(C, C, 3, padding=1), nn.ReLU(),
                                                       _old_weight_norm(nn.Conv1d(C, C, 1)), nn.BatchNorm1d(C)),
    "temporal, then BatchNorm": lambda: nn.Sequential(_old_weight_norm(nn.Conv1d(C, C, 3, padding=1)),
                                                      nn.BatchNorm1d(C)),
}


@pytest.mark.parametrize("net", sorted(OLD_WEIGHT_NORM_NETS))
def test_old_weight_norm_steps_follow_a_loaded_checkpoint(net):
    torch.manual_seed(0)
    make = OLD_WEIGHT_NORM_NETS[net]
    model, checkpoint = make().to(D).eval(), {k: v * 1.5 for k, v in make().to(D).state_dict().items()}
    x = x1d(12)
    co = cofx.convert(model, x)
    assert co.is_exact
    co.load_state_dict(checkpoint)
    with torch.no_grad():
        co.clean_state()
        got = co.forward_steps(x, pad_end=True)   # before any clip forward: the pre-hook has not run
        want = model(x)
    assert max_error(got, want) <= output_tolerance(want), max_error(got, want)


def test_parametrized_weight_norm_steps_follow_a_loaded_checkpoint():
    torch.manual_seed(0)

    def make():
        return nn.Sequential(_param_weight_norm(nn.Conv1d(C, C, 3, padding=1)), nn.ReLU(),
                             _param_weight_norm(nn.Conv1d(C, C, 3, padding=1))).to(D).eval()
    model, checkpoint = make(), make().state_dict()
    x = x1d(12)
    co = cofx.convert(model, x)
    co.load_state_dict(checkpoint)
    with torch.no_grad():
        co.clean_state()
        got = co.forward_steps(x, pad_end=True)
        want = model(x)
    assert max_error(got, want) <= output_tolerance(want)


# -- causal padding modules and F.pad ---------------------------------------------------------------------------
class PadTCN(nn.Module):
    """Residual dilated convs (1, 2, 4, 8), each behind a causal padding module."""
    def __init__(self, kind):
        super().__init__()
        dils = (1, 2, 4, 8)
        pad = {"ConstantPad1d": lambda p: nn.ConstantPad1d((p, 0), 0.0),
               "ConstantPad1d(0.5)": lambda p: nn.ConstantPad1d((p, 0), 0.5),
               "ReplicationPad1d": lambda p: nn.ReplicationPad1d((p, 0)),
               "ZeroPad2d on (B, C, T)": lambda p: nn.ZeroPad2d((p, 0, 0, 0)),
               "F.pad": lambda p: (lambda h: F.pad(h, (p, 0)))}[kind]
        self.pads = [pad(2 * d) for d in dils]
        self.pad_modules = nn.ModuleList(p for p in self.pads if isinstance(p, nn.Module))
        self.convs = nn.ModuleList(nn.Conv1d(C, C, 3, dilation=d) for d in dils)

    def forward(self, x):
        for pad, conv in zip(self.pads, self.convs):
            x = x + torch.tanh(conv(pad(x)))
        return x


@pytest.mark.parametrize("kind", ["ConstantPad1d", "ConstantPad1d(0.5)", "ReplicationPad1d", "ZeroPad2d on (B, C, T)", "F.pad"])
def test_causal_padding_modules_are_exact(kind):
    torch.manual_seed(0)
    co = assert_exact(PadTCN(kind), x1d(16))
    assert co.delay == 0 and co.receptive_field == 31


class Padded(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad, self.conv = pad, nn.Conv1d(C, C, 3)

    def forward(self, x):
        return self.conv(self.pad(x))


@pytest.mark.parametrize("name,pad", [
    ("anti-causal zeros", lambda h: F.pad(h, (0, 2))),
    ("replicate both ends", lambda h: F.pad(h, (1, 1), mode="replicate")),
    ("constant 1.5", lambda h: F.pad(h, (2, 0), value=1.5)),
    ("negative: a crop", lambda h: F.pad(h, (-1, 3))),
])
def test_fpad_forms_are_exact(name, pad):
    torch.manual_seed(0)
    assert_exact(Padded(pad), x1d(12))


@pytest.mark.parametrize("name,model,words", [
    ("ReflectionPad1d", lambda: Padded(nn.ReflectionPad1d((2, 0))), "reflect padding along time needs frames from the future"),
    ("F.pad reflect", lambda: Padded(lambda h: F.pad(h, (1, 1), mode="reflect")), "reflect padding along time"),
    ("F.pad circular", lambda: Padded(lambda h: F.pad(h, (1, 1), mode="circular")), "circular padding along time"),
    ("Conv1d padding_mode=reflect", lambda: nn.Sequential(nn.Conv1d(C, C, 3, padding=1, padding_mode="reflect")),
     "padding_mode='reflect' pads time with frames from the future"),
    ("Conv1d padding_mode=circular", lambda: nn.Sequential(nn.Conv1d(C, C, 3, padding=1, padding_mode="circular")),
     "padding_mode='circular'"),
])
def test_paddings_that_need_the_future_are_refused(name, model, words):
    torch.manual_seed(0)
    assert_refused(model(), x1d(12), words, "fix:")


class SeriesDecomposition(nn.Module):
    """DLinear's series decomposition on (B, T, C): a moving average over edge frames repeated at both ends."""
    def __init__(self, form):
        super().__init__()
        self.form, self.avg, self.trend, self.season = form, nn.AvgPool1d(5, 1), nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        if self.form == "repeat":
            padded = torch.cat([x[:, 0:1].repeat(1, 2, 1), x, x[:, -1:].repeat(1, 2, 1)], 1)
        elif self.form == "repeat, every dim indexed":   # Autoformer's moving_avg, verbatim
            padded = torch.cat([x[:, 0:1, :].repeat(1, 2, 1), x, x[:, -1:, :].repeat(1, 2, 1)], dim=1)
        elif self.form == "expand":
            padded = torch.cat([x[:, :1].expand(-1, 2, -1), x, x[:, -1:].expand(-1, 2, -1)], 1)
        else:   # the last frame before the clip: not an edge padding
            padded = torch.cat([x[:, -1:].repeat(1, 2, 1), x, x[:, :1].repeat(1, 2, 1)], 1)
        trend = self.avg(padded.permute(0, 2, 1)).permute(0, 2, 1)
        return self.trend(trend) + self.season(x - trend)


@pytest.mark.parametrize("form", ["repeat", "repeat, every dim indexed", "expand"])
def test_edge_frames_concatenated_are_replicate_padding(form):
    torch.manual_seed(0)
    co = assert_exact(SeriesDecomposition(form), torch.randn(1, 12, C, dtype=D), time_dim=1)
    assert co.delay == 2


def test_frames_concatenated_at_the_other_end_are_refused():
    torch.manual_seed(0)
    assert_refused(SeriesDecomposition("swapped"), torch.randn(1, 12, C, dtype=D), "changes the number of frames",
                   time_dim=1)


class TokenShift(nn.Module):
    """RWKV's token shift on (B, T, C): the previous frame, by a padding negative at the end."""
    def __init__(self, form):
        super().__init__()
        self.form, self.shift, self.mix, self.out = form, nn.ZeroPad2d((0, 0, 1, -1)), nn.Parameter(torch.rand(C)), \
            nn.Linear(C, C)

    def forward(self, x):
        previous = self.shift(x) if self.form == "nn.ZeroPad2d" else F.pad(x, (0, 0, 1, -1))
        return self.out(x * self.mix + previous * (1 - self.mix))


@pytest.mark.parametrize("form", ["nn.ZeroPad2d", "F.pad"])
def test_negative_padding_is_the_crop_it_makes(form):
    torch.manual_seed(0)
    co = assert_exact(TokenShift(form), torch.randn(1, 12, C, dtype=D), time_dim=1)
    assert co.delay == 0


class UnfoldTDNN(nn.Module):
    """A TDNN layer as x-vector code writes it: context frames gathered by im2col over (B, 1, T, C)."""
    def __init__(self, context, dilation, form):
        super().__init__()
        self.context, self.dilation, self.form = context, dilation, form
        self.unfold = nn.Unfold((context, C), dilation=(dilation, 1), stride=(1, C))
        self.kernel = nn.Linear(context * C, 6)

    def forward(self, x):
        features = x.shape[2]   # as authors write it: the feature size read off the input
        x = x.unsqueeze(1)
        if self.form == "F.unfold":
            x = F.unfold(x, (self.context, features), stride=(1, features), dilation=(self.dilation, 1))
        else:
            x = self.unfold(x)
        return torch.relu(self.kernel(x.transpose(1, 2)))


@pytest.mark.parametrize("context,dilation,form", [(3, 1, "F.unfold"), (3, 2, "F.unfold"), (5, 1, "nn.Unfold")])
def test_tdnn_context_gathered_by_im2col_is_a_sliding_window(context, dilation, form):
    torch.manual_seed(0)
    co = assert_exact(UnfoldTDNN(context, dilation, form), torch.randn(1, 14, C, dtype=D), time_dim=1)
    assert co.delay == dilation * (context - 1)


class Patches(nn.Module):
    def forward(self, x):   # (B, T, C): 2x2 patches sliding along time and across the features
        return F.unfold(x.unsqueeze(1), (2, 2), stride=(1, 2)).transpose(1, 2)


def test_im2col_patches_that_also_slide_across_features_are_refused():
    assert_refused(Patches(), torch.randn(1, 12, C, dtype=D), "time flattened together with other dimensions",
                   time_dim=1)


@pytest.mark.parametrize("mode", ["zeros", "replicate"])
def test_conv_padding_modes_and_same_padding(mode):
    torch.manual_seed(0)
    assert_exact(nn.Sequential(nn.Conv1d(C, C, 3, padding=1, padding_mode=mode), nn.ReLU(),
                               nn.Conv1d(C, C, 3, padding=2, dilation=2, padding_mode=mode)), x1d(12))
    # an even kernel with padding='same' pads the two ends differently
    assert_exact(nn.Sequential(nn.Conv1d(C, C, 4, padding="same", dilation=2), nn.ReLU(), nn.Conv1d(C, C, 2, padding="same")),
                 x1d(12))


# -- depthwise-separable, strided, pooled --------------------------------------------------------------------
class StridedTCN(nn.Module):
    """Depthwise-separable dilated convs, a stride-2 stage with a strided 1x1 residual, ceil-mode pools."""
    def __init__(self, head):
        super().__init__()
        self.dw = nn.Conv1d(C, C, 3, padding=2, dilation=2, groups=C)
        self.pw = nn.Conv1d(C, 2 * C, 1)
        self.bn = nn.BatchNorm1d(2 * C)
        self.down = nn.Conv1d(C, 2 * C, 1, stride=2)
        self.strided = nn.Conv1d(2 * C, 2 * C, 3, stride=2, padding=1)
        self.dw2 = nn.Conv1d(2 * C, 2 * C, 5, padding=8, dilation=4, groups=2 * C)
        self.maxpool = nn.MaxPool1d(3, 2, ceil_mode=True)
        self.avgpool = nn.AvgPool1d(3, 1, padding=1, count_include_pad=False)
        self.fc = nn.Linear(2 * C, 3)
        self.head = head

    def forward(self, x):
        h = torch.relu(self.bn(self.pw(self.dw(x))))
        h = torch.relu(self.strided(h) + self.down(x))
        h = self.avgpool(self.maxpool(self.dw2(h)))
        if self.head == "mean(-1)":
            return self.fc(h.mean(-1))
        if self.head == "last":
            return self.fc(h[:, :, -1])
        return h


@pytest.mark.parametrize("head", ["mean(-1)", "last", "per-frame"])
@pytest.mark.parametrize("t", [15, 16])
def test_depthwise_separable_strided_ceil_mode_tcn(head, t):
    torch.manual_seed(0)
    co = assert_exact(_bn_stats(StridedTCN(head)), x1d(t))
    assert co.stride == 4


def _unpacked(values_and_indices):
    values, indices = values_and_indices   # as models write it: the indices named, never read
    return values


class Lam(nn.Module):
    """A temporal conv, then the op under test."""
    def __init__(self, fn):
        super().__init__()
        self.c = nn.Conv1d(C, C, 3, padding=1)
        self.g = nn.Conv1d(C, C, 1)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, self.c(x))


EXACT_OPS = {
    "unfold(2, 3, 1)": lambda m, h: h.unfold(2, 3, 1).mean(-1),
    "unfold(2, 4, 2)": lambda m, h: h.unfold(2, 4, 2).amax(-1),
    "max_pool1d k2 s2 ceil": lambda m, h: F.max_pool1d(h, 2, 2, ceil_mode=True),
    "max_pool1d pad dilation ceil": lambda m, h: F.max_pool1d(h, 3, 2, padding=1, dilation=2, ceil_mode=True),
    "avg_pool1d ceil count_include_pad=False": lambda m, h: F.avg_pool1d(h, 3, 2, padding=1, ceil_mode=True,
                                                                         count_include_pad=False),
    "avg_pool1d k4 s3 ceil": lambda m, h: F.avg_pool1d(h, 4, 3, ceil_mode=True),
    "GLU over channels": lambda m, h: F.glu(torch.cat([h, m.g(h)], 1), dim=1),
    "WaveNet gate": lambda m, h: torch.tanh(h) * torch.sigmoid(m.g(h)),
    "chunk over channels gate": lambda m, h: h.chunk(2, 1)[0] * torch.sigmoid(h.chunk(2, 1)[1]),
    "velocity by slices": lambda m, h: h[:, :, 1:] - h[:, :, :-1],
    "softmax over channels": lambda m, h: h.softmax(1),
    "normalize over channels": lambda m, h: F.normalize(h, dim=1),
    "where": lambda m, h: torch.where(h > 0, h, 0.1 * h),
    # heads over time: one answer per window of the clip length
    "h[:, :, -1]": lambda m, h: h[:, :, -1],
    "h[..., -1]": lambda m, h: h[..., -1],
    "h.select(2, -1)": lambda m, h: h.select(2, -1),
    "h.mean(-1)": lambda m, h: h.mean(-1),
    "std over time": lambda m, h: h.std(2),
    "mean and var": lambda m, h: torch.cat([h.mean(2), h.var(2)], 1),
    "logsumexp over time": lambda m, h: h.logsumexp(2),
    "median over time": lambda m, h: h.median(2).values,
    "topk over time": lambda m, h: h.topk(2, dim=2).values,
    "argmax over time": lambda m, h: h.argmax(2),
    "adaptive_max_pool1d(1) with indices": lambda m, h: F.adaptive_max_pool1d(h, 1, return_indices=True)[0],
    "adaptive_avg_pool1d(4)": lambda m, h: F.adaptive_avg_pool1d(h, 4),
    "index_select fixed frames": lambda m, h: h.index_select(2, torch.tensor([0, 2, 4])),
    "narrow to the first frames": lambda m, h: h.narrow(2, 0, 3).mean(2),
    "variance by hand": lambda m, h: (h - h.mean(2, keepdim=True)).pow(2).mean(2),
    "softmax pooling, stable by hand": lambda m, h: (torch.exp(h - h.amax(2, keepdim=True)) * h).sum(2)
    / torch.exp(h - h.amax(2, keepdim=True)).sum(2),
    "normalised by the clip's statistics, then pooled": lambda m, h: (
        (h - h.mean(2, keepdim=True)) / (h.std(2, keepdim=True) + 1e-5)).amax(2),
    "a gate from the clip, then pooled": lambda m, h: (h * torch.sigmoid(m.g(h).mean(2, keepdim=True))).mean(2),
    "narrow to the last frames": lambda m, h: h.narrow(2, -3, 3).amax(2),
    "narrow as a crop": lambda m, h: h.narrow(2, 1, h.shape[2] - 2),
    # ops that return values and indices, the indices unread; power-average pools
    "max_pool1d with indices, values read": lambda m, h: F.max_pool1d(h, 2, 2, return_indices=True)[0],
    "max_pool1d with indices unpacked, indices unused": lambda m, h: _unpacked(F.max_pool1d(h, 2, 2, return_indices=True)),
    "torch.max over time unpacked, indices unused": lambda m, h: _unpacked(torch.max(h, 2)),
    "torch.max over time [0]": lambda m, h: torch.max(h, 2)[0],
    "min(dim=2).values": lambda m, h: h.min(dim=2).values,
    "lp_pool1d p=2": lambda m, h: F.lp_pool1d(h, 2, 3, 2),
    "lp_pool1d p=3 ceil": lambda m, h: F.lp_pool1d(h.abs(), 3, 2, ceil_mode=True),
    "lp_pool1d p=inf": lambda m, h: F.lp_pool1d(h, float("inf"), 2),
    "interpolate to its own length": lambda m, h: F.interpolate(h, size=h.shape[2], mode="linear"),
    "torch.diff with the first frame prepended": lambda m, h: torch.diff(h, dim=2, prepend=h[:, :, :1]),
    "differences keeping the first frame": lambda m, h: torch.cat([h[:, :, :1], h[:, :, 1:] - h[:, :, :-1]], 2),
    "differences keeping the first frame, ...": lambda m, h: torch.cat((h[..., :1], h[..., 1:] - h[..., :-1]),
                                                                        dim=-1),
}


@pytest.mark.parametrize("op", sorted(EXACT_OPS))
def test_ops_that_convert_exactly(op):
    torch.manual_seed(0)
    assert_exact(Lam(EXACT_OPS[op]), x1d(15 if "ceil" in op else 16))


def test_power_average_pool_modules_are_exact():
    torch.manual_seed(0)
    assert_exact(nn.Sequential(nn.Conv1d(C, C, 3, padding=1), nn.ReLU(), nn.LPPool1d(2, 3, 2)), x1d(16))
    assert_exact(nn.Sequential(nn.Conv2d(3, 4, (3, 1), padding=(1, 0)), nn.ReLU(), nn.LPPool2d(1.5, (2, 1))), xskel(12))


REFUSED_OPS = {   # op -> words the message must hold
    "max_pool1d return_indices": (lambda m, h: F.max_pool1d(h, 3, 2, padding=1, return_indices=True),
                                  "max pooling that returns indices along time"),
    "max_pool1d indices used": (lambda m, h: F.max_pool1d(h, 2, 2, return_indices=True)[1].to(h.dtype),
                                "max pooling that returns indices along time"),
    "nn.Upsample nearest x2": (lambda m, h: F.interpolate(h, scale_factor=2, mode="nearest"), "changes the number of frames"),
    "interpolate linear x2": (lambda m, h: F.interpolate(h, scale_factor=2, mode="linear"), "changes the number of frames"),
    "pool then upsample back": (lambda m, h: h + F.interpolate(F.max_pool1d(h, 2, 2), size=h.shape[2]),
                                "changes the number of frames"),
    "repeat_interleave": (lambda m, h: h.repeat_interleave(2, dim=2), "changes the number of frames"),
    "cumsum": (lambda m, h: torch.cumsum(h, 2), "is a cumulative op along time"),
    "cummax": (lambda m, h: torch.cummax(h, 2).values, "is a cumulative op along time"),
    "cummax method [0]": (lambda m, h: h.cummax(dim=2)[0], "is a cumulative op along time"),
    "cumprod": (lambda m, h: torch.cumprod(torch.sigmoid(h), 2), "is a cumulative op along time"),
    "cumsum over channels": (lambda m, h: h.cumsum(1).cumsum(-1), "node 'cumsum_1'"),
    "logcumsumexp": (lambda m, h: torch.logcumsumexp(h, 2), "is a cumulative op along time"),
    "cumsum then mean head": (lambda m, h: torch.cumsum(h, -1).mean(-1), "node 'cumsum'"),
    "roll": (lambda m, h: torch.roll(h, 1, 2), "does not act frame by frame"),
    "log_softmax over time": (lambda m, h: F.log_softmax(h, dim=-1), "does not act frame by frame"),
    "normalize over time": (lambda m, h: F.normalize(h, dim=2), "does not act frame by frame"),
    "narrow at T - 1": (lambda m, h: h.narrow(2, h.shape[2] - 1, 1), "fixed distance from the start and the end"),
    "halves of the clip": (lambda m, h: h[:, :, :h.shape[2] // 2].mean(2) - h[:, :, h.shape[2] // 2:].mean(2),
                           "crops time at a position computed from the clip length by other arithmetic"),
    "split(8, dim=2)": (lambda m, h: torch.split(h, 8, dim=2)[0], "node 'split'"),
    "unbind(2)[-1]": (lambda m, h: h.unbind(2)[-1], "node 'unbind'"),
    "gather over time": (lambda m, h: h.gather(2, torch.zeros_like(h, dtype=torch.long)), "node 'gather'"),
}


@pytest.mark.parametrize("op", sorted(REFUSED_OPS))
def test_ops_that_are_refused(op):
    torch.manual_seed(0)
    fn, words = REFUSED_OPS[op]
    assert_refused(Lam(fn), x1d(16), words)


class RunningMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.cummax(self.c(x), dim=2).values


def test_a_cumulative_op_along_time_is_refused_whatever_the_example_shows():
    """A running maximum need not show a changed middle frame on the example (this one does not): cumulative
    ops are refused by rule, not by what the example happens to show."""
    torch.manual_seed(0)
    model = RunningMax().to(D).eval()
    with pytest.raises(cofx.ConversionError, match="node 'cummax'.*is a cumulative op along time"):
        cofx.convert(model, torch.randn(1, 3, 12, dtype=D), validate=False)


@pytest.mark.parametrize("op", ["chunk", "chunk method", "tensor_split"])
def test_chunk_along_time_is_refused_not_crashed(op):
    torch.manual_seed(0)
    fn = {"chunk": lambda m, h: torch.chunk(h, 2, dim=2)[1],
          "chunk method": lambda m, h: h.chunk(2, 2)[0].mean(2),
          "tensor_split": lambda m, h: h.tensor_split(2, dim=2)[0]}[op]
    exact_or_refused(Lam(fn), x1d(16))


@pytest.mark.parametrize("name,conv", [
    ("k3 padding 1", lambda: nn.ConvTranspose1d(C, C, 3, padding=1)),
    ("k3 no padding, dilation 2, groups 2", lambda: nn.ConvTranspose1d(C, C, 3, dilation=2, groups=2)),
    ("k2 padding 1: crops", lambda: nn.ConvTranspose1d(C, C, 2, padding=1)),
    ("bias off", lambda: nn.ConvTranspose1d(C, 2 * C, 4, padding=2, bias=False)),
])
def test_transposed_convolutions_at_temporal_stride_1_are_the_convolutions_they_are(name, conv):
    torch.manual_seed(0)
    assert_exact(nn.Sequential(nn.Conv1d(C, C, 3, padding=1), nn.ReLU(), conv()), x1d(12))


def test_transposed_convs_and_upsampling_decoders_are_refused():
    torch.manual_seed(0)
    for model in (nn.Sequential(nn.Conv1d(C, C, 3, padding=1), nn.ConvTranspose1d(C, C, 2, stride=2)),
                  nn.Sequential(nn.Conv1d(C, C, 3, padding=1), nn.ConvTranspose1d(C, C, 3, stride=2,
                                                                                   output_padding=1))):
        assert_refused(model, x1d(12), "a transposed convolution that upsamples time")
    assert_refused(nn.Sequential(nn.Conv1d(C, C, 3, padding=1), nn.MaxPool1d(2), nn.Upsample(scale_factor=2),
                                 nn.Conv1d(C, C, 3, padding=1)), x1d(12), "changes the number of frames (its input", "has 6, its output 12)")


# -- squeeze-excitation over time: windowed, never reported exact -----------------------------------------------
class SE(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.c, self.c2 = nn.Conv1d(C, C, 3, padding=1), nn.Conv1d(C, C, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(C, 3), nn.Linear(3, C)
        self.eca = nn.Conv1d(C, C, 1)
        self.how = how

    def forward(self, x):
        h = self.c(x)
        if self.how == "centred by the clip mean":
            return self.c2(h - h.mean(2, keepdim=True))
        if self.how == "ECA-style conv gate":
            return self.c2(h * torch.sigmoid(self.eca(F.adaptive_avg_pool1d(h, 1))).expand_as(h))
        s = {"mean(2)": lambda: h.mean(2), "adaptive_avg_pool1d": lambda: F.adaptive_avg_pool1d(h, 1).squeeze(-1),
             "amax(2)": lambda: h.amax(2), "std(2)": lambda: h.std(2), "last frame": lambda: h[:, :, -1],
             "sum / T": lambda: h.sum(2) / h.shape[2]}[self.how]()
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return self.c2(h * g.unsqueeze(-1))


@pytest.mark.parametrize("how", ["mean(2)", "adaptive_avg_pool1d", "amax(2)", "centred by the clip mean", "ECA-style conv gate"])
def test_squeeze_excitation_over_time_is_windowed(how):
    torch.manual_seed(0)
    assert_windowed(SE(how), x1d(16))


@pytest.mark.parametrize("how,words", [("std(2)", "as a causal window over the frames so far only mean"),
                                       ("last frame", "frames kept from fixed positions of the clip"),
                                       ("sum / T", "uses the clip length as a value")])
def test_squeeze_excitation_that_cannot_be_windowed_is_refused(how, words):
    torch.manual_seed(0)
    assert_refused(SE(how), x1d(16), words)


# -- normalization layers -----------------------------------------------------------------------------------
class Norm(nn.Module):
    def __init__(self, norm, channels_last=False):
        super().__init__()
        self.c, self.c2, self.n, self.channels_last = nn.Conv1d(C, C, 3, padding=1), nn.Conv1d(C, C, 3, padding=1), norm, channels_last

    def forward(self, x):
        h = self.c(x)
        h = self.n(h.transpose(1, 2)).transpose(1, 2) if self.channels_last else self.n(h)
        return self.c2(torch.relu(h))


def _instance_norm_with_stats():
    n = nn.InstanceNorm1d(C, affine=True, track_running_stats=True)
    n.running_mean.normal_()
    n.running_var.uniform_(0.5, 2)
    return n


def test_per_frame_norms_are_exact():
    torch.manual_seed(0)
    assert_exact(Norm(nn.LayerNorm(C), channels_last=True), x1d(12))   # LayerNorm over channels via (B, T, C)
    assert_exact(Norm(_instance_norm_with_stats()), x1d(12))            # running statistics in eval: per frame
    assert_exact(_bn_stats(Norm(nn.BatchNorm1d(C))), x1d(12))
    assert_exact(Norm(nn.LocalResponseNorm(3)), x1d(12))


@pytest.mark.parametrize("name,norm", [("GroupNorm(2, C)", lambda: nn.GroupNorm(2, C)), ("GroupNorm(1, C)", lambda: nn.GroupNorm(1, C)),
                                       ("InstanceNorm1d", lambda: nn.InstanceNorm1d(C)),
                                       ("InstanceNorm1d affine", lambda: nn.InstanceNorm1d(C, affine=True))])
def test_norms_with_statistics_over_time_are_refused(name, norm):
    torch.manual_seed(0)
    assert_refused(Norm(norm()), x1d(12), "node 'n'", "does not act frame by frame")


def test_layernorm_over_channels_and_time_is_a_window_over_the_clip():
    """A norm sized for the clip's frames: each step runs it and what follows on the last 12 frames of its
    input stream (the conv before it streams as ever)."""
    torch.manual_seed(0)
    model = Norm(nn.LayerNorm([C, 12])).double().eval()
    co = cofx.convert(model, x1d(12))
    stream = torch.randn(2, C, 20, dtype=torch.float64)
    with torch.no_grad():
        outs = [co.forward_step(stream[:, :, i]) for i in range(20)]
        frames = model.c(stream)   # the conv's output stream: frame j once frame j + 1 has come
        assert all(y is None for y in outs[:12])   # the window, and the frame the conv waits for
        for t in range(12, 20):
            want = model.c2(torch.relu(model.n(frames[:, :, t - 12:t])))
            assert outs[t].shape == want.shape and torch.allclose(outs[t], want, rtol=0, atol=1e-12)


class GroupNormJoints(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.n = nn.Conv2d(C, C, (3, 1), padding=(1, 0)), nn.GroupNorm(3, C)

    def forward(self, x):
        return self.n(self.c(x)).mean(-1)


class LayerNormJoints(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.n = nn.Conv2d(C, C, (3, 1), padding=(1, 0)), nn.LayerNorm([C, 4])

    def forward(self, x):
        return self.n(self.c(x).permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def test_norms_on_skeleton_tensors():
    torch.manual_seed(0)
    assert_refused(GroupNormJoints(), torch.randn(1, C, 12, 4, dtype=D), "does not act frame by frame")
    assert_exact(LayerNormJoints(), torch.randn(1, C, 12, 4, dtype=D))   # per frame over (C, V)


# -- (B, T, C) sensor TCN, time_dim=1 -----------------------------------------------------------------------
class SensorTCN(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.c1 = nn.Conv1d(4, C, 3)
        self.ln = nn.LayerNorm(C)
        self.dw, self.pw = nn.Conv1d(C, C, 3, dilation=2, groups=C), nn.Conv1d(C, C, 1)
        self.fc = nn.Linear(C, 3)
        self.head = head

    def forward(self, x):                       # (B, T, 4)
        h = self.c1(F.pad(x.transpose(1, 2), (2, 0)))
        h = self.ln(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.pw(F.gelu(self.dw(F.pad(h, (4, 0)))))
        out = self.fc(h.transpose(1, 2))        # (B, T, 3)
        return out[:, -1] if self.head == "last" else out


@pytest.mark.parametrize("head", ["per-frame", "last"])
def test_sensor_tcn_time_dim_1(head):
    torch.manual_seed(0)
    co = assert_exact(SensorTCN(head), torch.randn(1, 12, 4, dtype=D), time_dim=1)
    if head == "per-frame":
        assert co.delay == 0


# -- MS-TCN: stages stacked on a new leading axis -----------------------------------------------------------------
class DilatedResidual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.cd, self.c1, self.drop = nn.Conv1d(C, C, 3, padding=d, dilation=d), nn.Conv1d(C, C, 1), nn.Dropout()

    def forward(self, x):
        return x + self.drop(self.c1(F.relu(self.cd(x))))


class Stage(nn.Module):
    def __init__(self, cin, ncls=4):
        super().__init__()
        self.inp = nn.Conv1d(cin, C, 1)
        self.layers = nn.Sequential(*[DilatedResidual(2 ** i) for i in range(4)])
        self.out = nn.Conv1d(C, ncls, 1)

    def forward(self, x):
        return self.out(self.layers(self.inp(x)))


class MSTCN(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.s1, self.stages, self.layout = Stage(C), nn.ModuleList(Stage(4) for _ in range(2)), layout

    def forward(self, x, mask=None):
        out = self.s1(x)
        outs = [out]
        for s in self.stages:
            out = s(F.softmax(out, dim=1))
            if mask is not None:
                out = out * mask[:, 0:1, :]
            outs.append(out)
        if self.layout == "cat unsqueeze(0)":
            return torch.cat([o.unsqueeze(0) for o in outs], 0)
        if self.layout == "stack(-1)":
            return torch.stack(outs, -1)
        return outs


@pytest.mark.parametrize("layout", ["cat unsqueeze(0)", "stack(-1)", "list"])
def test_ms_tcn_stage_outputs(layout):
    torch.manual_seed(0)
    assert_exact(MSTCN(layout), x1d(12))


# -- temporal shift (TSM) ------------------------------------------------------------------------------------
class TSM(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.c, self.c2, self.how = nn.Conv1d(C, C, 1), nn.Conv1d(C, C, 3, padding=1), how

    def forward(self, x):
        x = self.c(x)
        f = C // 3
        if self.how == "pad":
            back, fwd = F.pad(x[:, :f, 1:], (0, 1)), F.pad(x[:, f:2 * f, :-1], (1, 0))
        else:
            back = torch.cat([x[:, :f, 1:], torch.zeros_like(x[:, :f, :1])], 2)
            fwd = torch.cat([torch.zeros_like(x[:, f:2 * f, :1]), x[:, f:2 * f, :-1]], 2)
        return self.c2(torch.cat([back, fwd, x[:, 2 * f:]], 1))


@pytest.mark.parametrize("how", ["pad", "cat"])
def test_temporal_shift(how):
    """TSM's shift, by F.pad or (as its authors write it) by concatenating a zero frame: the same padding."""
    torch.manual_seed(0)
    assert_exact(TSM(how), x1d(12))


# -- ST-GCN on (B, C, T, V) -----------------------------------------------------------------------------------
def _adjacency(k=3):
    a = torch.zeros(k, V, V, dtype=D)
    a[0] = torch.eye(V)
    for i in range(V - 1):
        a[1, i, i + 1] = 1
        a[2, i + 1, i] = 1
    return a / a.sum(1, keepdim=True).clamp(min=1)


class STGCN4(nn.Module):
    """Fixed adjacency buffer, einsum over joints, (9, 1) temporal convs, strided residual, several heads."""
    def __init__(self, head="pool"):
        super().__init__()
        self.register_buffer("A", _adjacency().sum(0))
        self.g1, self.t1, self.bn = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, (9, 1), padding=(4, 0)), nn.BatchNorm2d(8)
        self.g2, self.t2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, (9, 1), padding=(4, 0), stride=(2, 1))
        self.down, self.fc, self.head = nn.Conv2d(8, 8, 1, stride=(2, 1)), nn.Linear(8, 4), head

    def forward(self, x, A=None, return_features: bool = False):
        A = self.A if A is None else A
        h = torch.einsum('nctv,vw->nctw', self.g1(x), A)
        h = torch.relu(self.bn(self.t1(h)))
        h = torch.relu(self.t2(torch.einsum('nctv,vw->nctw', self.g2(h), A)) + self.down(h))
        if return_features:
            return h
        if self.head == "pool":
            return self.fc(F.avg_pool2d(h, h.size()[2:]).view(h.size(0), -1))
        if self.head == "mean(-1)":
            return h.mean(-1)
        if self.head == "last":
            return self.fc(h[:, :, -1].mean(-1))
        if self.head == "matmul":
            return torch.matmul(h, A).mean((2, 3))
        if self.head == "adaptive (None, 1)":
            return F.adaptive_avg_pool2d(h, (None, 1)).squeeze(-1)
        if self.head == "tuple":
            return self.fc(h.mean((2, 3))), h.mean(-1)
        return {"logits": self.fc(h.mean((2, 3))), "frames": h.mean(-1)}


@pytest.mark.parametrize("head", ["pool", "mean(-1)", "last", "matmul", "adaptive (None, 1)", "tuple", "dict"])
@pytest.mark.parametrize("t", [12, 13])
def test_st_gcn_on_joints(head, t):
    torch.manual_seed(0)
    co = assert_exact(_bn_stats(STGCN4(head)), xskel(t))
    assert co.stride == 2


def test_st_gcn_dict_output_steps_per_output():
    torch.manual_seed(0)
    model = _bn_stats(STGCN4("dict")).to(D).eval()
    x = xskel(12)
    co = assert_exact(model, x)
    co.clean_state()
    with torch.no_grad():
        outs = [co.forward_step(x[:, :, i]) for i in range(12)]
    assert all(set(o) == {"logits", "frames"} for o in outs if o is not None)
    assert all(o is None or o["logits"] is None for o in outs)   # the pooled window is not full before the end
    assert any(o is not None and o["frames"] is not None for o in outs)


class GCNUnit(nn.Module):
    """mmskeleton ConvTemporalGraphical: K partitions, einsum 'nkctv,kvw->nctw'."""
    def __init__(self, cin, cout, k=3):
        super().__init__()
        self.k, self.conv = k, nn.Conv2d(cin, cout * k, 1)

    def forward(self, x, A):
        x = self.conv(x)
        n, kc, t, v = x.size()
        x = x.view(n, self.k, kc // self.k, t, v)
        return torch.einsum('nkctv,kvw->nctw', (x, A)).contiguous(), A


class STGCNBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, residual=True):
        super().__init__()
        self.gcn = GCNUnit(cin, cout)
        self.tcn = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, (9, 1), (stride, 1), (4, 0)),
                                 nn.BatchNorm2d(cout), nn.Dropout(0.5, inplace=True))
        if not residual:
            self.residual = lambda x: 0
        elif cin == cout and stride == 1:
            self.residual = lambda x: x
        else:
            self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=(stride, 1)), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, A):
        res = self.residual(x)
        x, A = self.gcn(x, A)
        return self.relu(self.tcn(x) + res), A


class STGCN(nn.Module):
    """mmskeleton st_gcn.Model: input (N, C, T, V, M), data_bn over (N, M*V*C, T), persons folded into the batch."""
    def __init__(self, M=2):
        super().__init__()
        self.register_buffer("A", _adjacency())
        self.data_bn = nn.BatchNorm1d(3 * V * M)
        self.st_gcn_networks = nn.ModuleList((STGCNBlock(3, 8, 1, residual=False), STGCNBlock(8, 8, 1), STGCNBlock(8, 16, 2)))
        self.edge_importance = nn.ParameterList([nn.Parameter(torch.ones(self.A.size())) for _ in self.st_gcn_networks])
        self.fcn = nn.Conv2d(16, 4, kernel_size=1)

    def forward(self, x):
        N, C, T, V, M = x.size()
        x = x.permute(0, 4, 3, 1, 2).contiguous()
        x = x.view(N, M * V * C, T)
        x = self.data_bn(x)
        x = x.view(N, M, V, C, T)
        x = x.permute(0, 1, 3, 4, 2).contiguous()
        x = x.view(N * M, C, T, V)
        for gcn, importance in zip(self.st_gcn_networks, self.edge_importance):
            x, _ = gcn(x, self.A * importance)
        x = F.avg_pool2d(x, x.size()[2:])
        x = x.view(N, M, -1, 1, 1).mean(dim=1)
        x = self.fcn(x)
        return x.view(x.size(0), -1)


class PersonsInBatch(nn.Module):
    """The minimal form: (N, C, T, V, M) -> (N*M, C, T, V) -> conv -> back."""
    def __init__(self, fold):
        super().__init__()
        self.c, self.fold = nn.Conv2d(3, 4, (3, 1), padding=(1, 0)), fold

    def forward(self, x):
        N, C, T, V, M = x.size()
        if self.fold == "view(N * M, ...)":
            y = x.permute(0, 4, 1, 2, 3).contiguous().view(N * M, C, T, V)
        elif self.fold == "reshape(-1, ...)":
            y = x.permute(0, 4, 1, 2, 3).reshape(-1, C, T, V)
        else:
            y = x.permute(0, 4, 1, 2, 3).flatten(0, 1)
        h = self.c(y)
        if self.fold == "flatten(0, 1)":
            return h.unflatten(0, (N, M)).mean(1).mean(-1)
        return h.view(N, M, 4, h.size(2), V).mean(1).mean(-1)   # the batch split back by view


@pytest.mark.parametrize("fold", ["flatten(0, 1)"])
def test_persons_folded_into_the_batch_by_flatten(fold):
    torch.manual_seed(0)
    assert_exact(PersonsInBatch(fold), torch.randn(1, 3, 8, V, 2, dtype=D))


@pytest.mark.parametrize("model,x", [
    (lambda: PersonsInBatch("view(N * M, ...)"), lambda: torch.randn(1, 3, 8, V, 2, dtype=D)),
    (lambda: PersonsInBatch("reshape(-1, ...)"), lambda: torch.randn(1, 3, 8, V, 2, dtype=D)),
    (lambda: PersonsInBatch("flatten(0, 1), back by view"), lambda: torch.randn(1, 3, 8, V, 2, dtype=D)),
    (lambda: _bn_stats(STGCN()), lambda: torch.randn(1, 3, 12, V, 2, dtype=D)),
], ids=["view(N*M)", "reshape(-1)", "flatten then view(N, M, ...)", "mmskeleton ST-GCN"])
def test_persons_folded_into_the_batch_by_view_convert_exactly(model, x):
    """A batch dimension with several rows per stream (`cofx.passes.layout.BatchRows`)."""
    torch.manual_seed(0)
    assert_exact(model(), x())


class FlatGraphConv(nn.Module):
    """2s-AGCN's graph convolution: the joints mixed by a learned adjacency through a view that flattens
    (channels, frames); `adaptive` adds a graph computed from the clip (its frames flattened into features)."""
    def __init__(self, form, persons=False):
        super().__init__()
        self.form, self.persons = form, persons
        self.A, self.B = nn.Parameter(torch.rand(V, V)), nn.Parameter(torch.rand(V, V) * 0.1)
        self.conv, self.tcn = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, (3, 1), padding=(1, 0))

    def forward(self, x):
        if self.persons:
            N0, C, T, V_, M = x.size()
            x = x.permute(0, 4, 1, 2, 3).contiguous().view(N0 * M, C, T, V_)
        N, C, T, V_ = x.size()
        if self.form == "matmul(view)":
            y = torch.matmul(x.view(N, C * T, V_), self.A + self.B).view(N, C, T, V_)
        elif self.form == "reshape(-1) @":
            y = (x.reshape(N, -1, V_) @ self.A.softmax(0)).reshape(N, C, T, V_)
        elif self.form == "adaptive":
            a = self.conv(x).view(N, 4 * T, V_)
            graph = torch.softmax(a.transpose(1, 2) @ a / a.size(1), -1)   # (N, V, V), from the whole clip
            y = torch.matmul(x.view(N, C * T, V_), self.A + graph).view(N, C, T, V_)
        y = self.tcn(torch.relu(self.conv(y)))
        if self.persons:
            return y.view(N0, M, 4, -1, V_).mean(1).mean(-1)
        return y.mean(-1)


@pytest.mark.parametrize("form,persons", [("matmul(view)", False), ("reshape(-1) @", False),
                                          ("matmul(view)", True)])
def test_graph_convolution_through_a_view_that_flattens_the_frames_is_exact(form, persons):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 10, V, 2, dtype=D) if persons else xskel(10)
    co = assert_exact(FlatGraphConv(form, persons), x)
    assert co.delay == 1


def test_an_adjacency_computed_from_the_whole_clip_is_refused():
    torch.manual_seed(0)
    assert_refused(FlatGraphConv("adaptive"), xskel(10), "time flattened together with other dimensions")


class JointsInBatch(nn.Module):
    """A per-joint temporal conv: joints folded into the batch."""
    def __init__(self, fold):
        super().__init__()
        self.c, self.fold = nn.Conv1d(3, C, 3, padding=1), fold

    def forward(self, x):
        N, Cin, T, V = x.shape
        if self.fold == "flatten":
            return self.c(x.permute(0, 3, 1, 2).flatten(0, 1)).unflatten(0, (N, V)).mean(1)
        return self.c(x.permute(0, 3, 1, 2).reshape(N * V, Cin, T)).view(N, V, C, T).mean(1)


def test_joints_folded_into_the_batch():
    torch.manual_seed(0)
    assert_exact(JointsInBatch("flatten"), xskel(10, v=4))
    assert_exact(JointsInBatch("reshape"), xskel(10, v=4))


class DataBN(nn.Module):
    """data_bn with persons kept beside the joints (no fold into the batch)."""
    def __init__(self):
        super().__init__()
        self.bn, self.c = nn.BatchNorm1d(3 * V * 2), nn.Conv2d(3, C, (3, 1), padding=(1, 0))

    def forward(self, x):
        N, Cin, T, V, M = x.size()
        y = self.bn(x.permute(0, 4, 3, 1, 2).contiguous().view(N, M * V * Cin, T))
        y = y.view(N, M, V, Cin, T).permute(0, 3, 4, 2, 1).contiguous().view(N, Cin, T, V * M)
        return self.c(y).mean(-1)


def test_data_bn_on_five_dim_skeleton_input():
    torch.manual_seed(0)
    assert_exact(_bn_stats(DataBN()), torch.randn(1, 3, 10, V, 2, dtype=D))


# -- 2s-AGCN-style adaptive graphs ----------------------------------------------------------------------------
class AGCNUnit(nn.Module):
    def __init__(self, adaptive, inter=2):
        super().__init__()
        self.register_buffer("A", torch.eye(V, dtype=D).repeat(3, 1, 1) + 0.1)
        self.PA = nn.Parameter(torch.full((3, V, V), 1e-2))
        self.conv_a = nn.ModuleList(nn.Conv2d(C, inter, 1) for _ in range(3))
        self.conv_b = nn.ModuleList(nn.Conv2d(C, inter, 1) for _ in range(3))
        self.conv_d = nn.ModuleList(nn.Conv2d(C, C, 1) for _ in range(3))
        self.bn, self.soft, self.adaptive, self.inter = nn.BatchNorm2d(C), nn.Softmax(-2), adaptive, inter
        self.tcn, self.fc = nn.Conv2d(C, C, (5, 1), padding=(2, 0)), nn.Linear(C, 3)

    def forward(self, x):
        N, C, T, V = x.size()
        A = self.A + self.PA
        y = 0
        for i in range(3):
            if self.adaptive == "per-frame einsum":     # a graph per frame, joints mixed by einsum
                a, b = self.conv_a[i](x), self.conv_b[i](x)
                A1 = torch.softmax(torch.einsum('nctu,nctv->ntuv', a, b), -1) + A[i]
                y = y + self.conv_d[i](torch.einsum('nctu,ntuv->nctv', x, A1))
                continue
            if self.adaptive == "2s-AGCN":              # contracts over (inter, T) and divides by inter * T
                A1 = self.conv_a[i](x).permute(0, 3, 1, 2).contiguous().view(N, V, self.inter * T)
                A2 = self.conv_b[i](x).view(N, self.inter * T, V)
                A1 = self.soft(torch.matmul(A1, A2) / A1.size(-1)) + A[i]
            else:                                       # learned graph only, applied as 2s-AGCN applies it
                A1 = A[i].expand(N, V, V)
            y = y + self.conv_d[i](torch.matmul(x.view(N, C * T, V), A1).view(N, C, T, V))
        h = self.tcn(torch.relu(self.bn(y) + x))
        return self.fc(h.view(h.size(0), h.size(1), -1).mean(2))


def test_agcn_per_frame_adaptive_graph_is_exact():
    torch.manual_seed(0)
    assert_exact(_bn_stats(AGCNUnit("per-frame einsum")), xskel(10, c=C))


def test_agcn_data_dependent_graph_over_the_clip_is_refused():
    torch.manual_seed(0)
    assert_refused(_bn_stats(AGCNUnit("2s-AGCN")), xskel(10, c=C), "node 'matmul_1'", "time flattened")


def test_agcn_learned_graph_applied_through_view_c_times_t_is_refused():
    """`x.view(N, C * T, V) @ A` mixes joints only, frame by frame, but puts time inside a matrix's rows:
    refused (documented: time flattened mid-network), though the message calls it attention across time."""
    torch.manual_seed(0)
    assert_refused(_bn_stats(AGCNUnit("learned")), xskel(10, c=C), "node 'matmul'", "time flattened together")


# -- hooks ----------------------------------------------------------------------------------------------------
def _net():
    return nn.Sequential(nn.Conv1d(C, C, 3, padding=1), nn.ReLU(), nn.Conv1d(C, C, 3, padding=1)).to(D).eval()


def test_hooks_that_change_values_are_refused_and_observing_hooks_convert():
    """Forward pre-hooks of a convolution run in its steps as in a call (weight_norm needs them): one that
    scales the input frame by frame converts; forward hooks that change the output do not run in steps and
    are refused."""
    torch.manual_seed(0)
    m = _net()
    m[0].register_forward_hook(lambda mod, i, o: o * 2 + 1)
    assert_refused(m, x1d(12), "node '_0'", "does not match the clip model", "module '0' has a forward hook, which the "
                   "step computing its op frame by frame does not run", "fix: remove the hook")
    m = _net()
    m[2].register_forward_pre_hook(lambda mod, i: (i[0] * 3,))
    assert_exact(m, x1d(12))
    m = _net()
    m[2].register_forward_pre_hook(lambda mod, i, kw: ((i[0] * 3,), kw), with_kwargs=True)
    assert_exact(m, x1d(12))
    m = _net()
    m.register_forward_hook(lambda mod, i, o: o * 2)
    assert_refused(m, x1d(12), "does not match the clip model", "the model has forward hooks of its own",
                   "fix: remove the hook")
    m = _net()
    m[0].register_forward_hook(lambda mod, i, o: None)
    assert_exact(m, x1d(12))


# -- causal ST-GCN: time padded on the (B, C, T, V) layout ------------------------------------------------------
class CausalSTGCN(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.g, self.t = nn.Conv2d(3, C, 1), nn.Conv2d(C, C, (9, 1))
        self.t2 = nn.Conv2d(C, C, (3, 1), dilation=(2, 1))
        self.pad = nn.ZeroPad2d((0, 0, 8, 0))
        self.register_buffer("A", torch.rand(V, V, dtype=D))
        self.At = nn.Parameter(torch.rand(32, V, V))   # a learned graph per frame position
        self.pool = nn.AvgPool2d((3, 1), stride=(2, 1), padding=(1, 0), ceil_mode=True, count_include_pad=False)

    def forward(self, x):
        h = torch.einsum('nctv,vw->nctw', self.g(x), self.A)
        h = torch.relu(self.t(F.pad(h, (0, 0, 8, 0)) if self.how == "F.pad" else self.pad(h)))
        h = self.t2(F.pad(h, (0, 0, 4, 0)))
        if self.how == "AvgPool2d ceil count_include_pad=False":
            return self.pool(h).mean(-1)
        if self.how == "graph table sliced by T":
            return torch.einsum('nctv,tvw->nctw', h, self.At[:h.size(2)]).mean(-1)
        if self.how == "graph table sliced by T, pooled":
            return torch.einsum('nctv,tvw->nctw', h, self.At[:h.size(2)]).mean((2, 3))
        return h


@pytest.mark.parametrize("how", ["ZeroPad2d", "F.pad", "AvgPool2d ceil count_include_pad=False", "graph table sliced by T",
                                 "graph table sliced by T, pooled"])
def test_causal_st_gcn(how):
    torch.manual_seed(0)
    co = assert_exact(CausalSTGCN(how), xskel(12))
    if how in ("ZeroPad2d", "F.pad"):
        assert co.delay == 0 and co.receptive_field == 13


def test_persons_folded_into_the_batch_are_not_restarted_apart():
    """In phase exact; a fixed-shape step keeps one row per stream, so restarting one stream is refused, saying
    why."""
    torch.manual_seed(0)
    model = PersonsInBatch("view(N * M, ...)").to(D).eval()
    co = cofx.convert(model, torch.randn(1, 3, 8, V, 2, dtype=D))
    with torch.no_grad():
        co.forward_steps(torch.randn(2, 3, 5, V, 2, dtype=D))
        with pytest.raises(cofx.StreamError, match="holds 2 rows per stream"):
            co.clean_state(streams=[1])


class PersonsGate(nn.Module):
    """Persons folded into the batch (mmskeleton's N * M), a squeeze-and-excitation gate over the clip (AAGCN's
    channel attention), pooled right after with the persons averaged back: a statistic of the clip combined
    back with its frames, exact over a window of the clip, as the same gate is without persons; with a layer
    after the gate (`after`), windowed."""

    def __init__(self, after=False):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 4, (3, 1), padding=(1, 0)), nn.Linear(4, 4)
        self.after = nn.Conv2d(4, 4, 1) if after else None

    def forward(self, x):
        N, C, T, Vv, M = x.size()
        h = self.c(x.permute(0, 4, 1, 2, 3).reshape(N * M, C, T, Vv))
        h = h * torch.sigmoid(self.fc(h.mean(3).mean(2)))[:, :, None, None]
        if self.after is not None:
            h = self.after(h)
        return h.mean(3).mean(2).view(N, M, -1).mean(1)


def test_a_gate_over_the_clip_with_persons_folded_into_the_batch():
    torch.manual_seed(0)
    assert_exact(PersonsGate(), torch.randn(1, 3, 10, V, 2, dtype=D))
    assert_windowed(PersonsGate(after=True), torch.randn(1, 3, 10, V, 2, dtype=D))


class CTRGCNHead(nn.Module):
    """CTR-GCN's head: persons split out of the batch and (frames, joints) flattened by one view, then pooled:
    ``x.view(N, M, c, -1).mean(3).mean(1)``, a global pool over time."""

    def __init__(self, reduce):
        super().__init__()
        self.c, self.reduce = nn.Conv2d(3, 4, (3, 1), padding=(1, 0)), reduce

    def forward(self, x):
        N, C, T, Vv, M = x.size()
        h = self.c(x.permute(0, 4, 1, 2, 3).reshape(N * M, C, T, Vv))
        return getattr(h.view(N, M, h.size(1), -1), self.reduce)(3).mean(1)


@pytest.mark.parametrize("reduce", ["mean", "amax"])
def test_ctr_gcn_head_flattening_frames_and_joints_is_a_global_pool(reduce):
    torch.manual_seed(0)
    assert_exact(CTRGCNHead(reduce), torch.randn(1, 3, 10, V, 2, dtype=D))



def test_a_statistic_combined_back_and_pooled_is_the_model_on_each_window():
    """Such a statistic runs over a window of the clip (its frames combined with it by ops on each value, then
    pooled): with frame-by-frame ops before it, each step's output is the model on the last N frames. A gate
    that feeds a layer stays a causal window (squeeze-and-excitation: cheap steps, not exact)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(C, C, 1), Lam(lambda m, h: (h - h.mean(2, keepdim=True)).pow(2).mean(2)))
    model[1].c = nn.Conv1d(C, C, 1)
    model = model.to(D).eval()
    co = cofx.convert(model, x1d(10))
    assert co.is_exact and any(r.kind == "window" for r in co.report)
    stream = torch.randn(2, C, 27, dtype=D)
    with torch.no_grad():
        got = co.forward_steps(stream, pad_end=True)
        want = torch.stack([model(stream[:, :, t - 9:t + 1]) for t in range(9, 27)], -1)
    assert max_error(got, want) < 1e-12
    gated = Lam(lambda m, h: m.g(h * torch.sigmoid(h.mean(2, keepdim=True))).mean(2)).to(D).eval()
    co = cofx.convert(gated, x1d(10))
    assert not co.is_exact and any(r.kind == "windowed" for r in co.report)


class G3DWindows(nn.Module):
    """MS-G3D's temporal windows: nn.Unfold((w, 1)) over (N, C, T, V), viewed back as (N, C, w, T, V)."""
    def __init__(self, w=3, dilation=1):
        super().__init__()
        self.w = w
        self.unfold = nn.Unfold((w, 1), dilation=(dilation, 1), padding=(dilation * (w - 1) // 2, 0))
        self.conv = nn.Conv3d(4, 4, (1, w, 1))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        n, c, t, v = x.shape
        windows = self.unfold(x).view(n, c, self.w, t, v).permute(0, 1, 3, 2, 4)
        return self.fc(torch.relu(self.conv(windows).squeeze(3)).mean((2, 3)))


@pytest.mark.parametrize("w, dilation", [(3, 1), (5, 1), (3, 2)])
def test_ms_g3d_windows_gathered_by_nn_unfold_are_exact(w, dilation):
    torch.manual_seed(0)
    assert_exact(G3DWindows(w, dilation), torch.randn(1, 4, 16, 5, dtype=D))
