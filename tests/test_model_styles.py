"""Models written the many ways people write them: each converts exactly."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cofx
from guarantees import assert_delay, assert_equivalent, assert_stream_discipline

D = torch.float64


def check(model, clip, stream_len=30, **kwargs):
    model = model.double().eval()
    co = cofx.convert(model, clip, **kwargs)
    assert co.is_exact
    assert_equivalent(co, model, clip)
    shape = list(clip.shape)
    shape[kwargs.get("time_dim", 2)] = stream_len
    stream = torch.randn(shape, dtype=D)
    assert_stream_discipline(co, stream)
    assert_delay(co, stream)
    return co


class CausalTCN(nn.Module):
    """Sensor-style TCN: causal padding with F.pad, dilated convs, residuals, per-frame output."""
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(4, 4, 3, dilation=d) for d in (1, 2, 4))
        self.inp = nn.Conv1d(3, 4, 1)

    def forward(self, x):
        x = self.inp(x)
        for i, conv in enumerate(self.convs):
            d = 2 ** i
            x = x + torch.relu(conv(F.pad(x, (2 * d, 0))))
        return x


def test_causal_tcn_has_no_delay():
    co = check(CausalTCN(), torch.randn(2, 3, 16, dtype=D))
    assert co.delay == 0 and co.receptive_field == 15


class TimeLast(nn.Module):
    """(B, T, C) input, as sensor and skeleton pipelines often feed it; time_dim=1."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(6, 8, 5, padding=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x.transpose(1, 2)))
        return self.fc(y.transpose(1, 2))


def test_time_dim_1():
    co = check(TimeLast(), torch.randn(2, 10, 6, dtype=D), time_dim=1)
    assert co.forward_step(torch.randn(2, 6, dtype=D)) is None   # delay 2


class FramesThrough2DCNN(nn.Module):
    """TSN-style: frames folded into the batch for a 2D CNN, unfolded, temporal conv, mean over time."""
    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1))
        self.temporal = nn.Conv1d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.cnn(x.transpose(1, 2).reshape(b * t, c, h, w))
        y = y.view(b, t, -1).transpose(1, 2)
        y = self.temporal(y)
        return self.fc(y.mean(2))


def test_frames_through_a_2d_cnn():
    check(FramesThrough2DCNN(), torch.randn(2, 3, 6, 5, 5, dtype=D))


class Skeleton(nn.Module):
    """ST-GCN-style: (B, C, T, V) with Conv2d kernels (9, 1) over time and a joint-mixing matmul."""
    def __init__(self):
        super().__init__()
        self.adj = nn.Parameter(torch.rand(5, 5))
        self.spatial = nn.Conv2d(3, 8, 1)
        self.temporal = nn.Conv2d(8, 8, (9, 1), padding=(4, 0), stride=(2, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.einsum("bctv,vw->bctw", self.spatial(x), self.adj)
        y = torch.relu(self.temporal(y))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_skeleton_model_with_einsum_over_joints():
    co = check(Skeleton(), torch.randn(2, 3, 12, 5, dtype=D))
    assert co.stride == 2


class FlattenedClipClassifier(nn.Module):
    """A TCN whose classifier reads the whole clip flattened into features: a window of the clip length."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_classifier_over_the_flattened_clip():
    co = check(FlattenedClipClassifier(), torch.randn(2, 3, 8, dtype=D))
    assert next(r for r in co.report if r.name == "flatten").kind == "reduction"
    assert co.delay == 8 and co.receptive_field == 10


class LastFrame(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y[:, :, -1] + y[:, :, 0] + y[:, :, 2:5].amax(2)


def test_fixed_frames_of_the_clip_become_windows():
    check(LastFrame(), torch.randn(2, 3, 7, dtype=D))


class MaxOverTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)

    def forward(self, x):
        values, index = self.conv(x).max(dim=2)
        return values + index.to(values.dtype)


def test_max_with_indices_over_time():
    check(MaxOverTime(), torch.randn(2, 3, 7, dtype=D))


class NumpyKernels(nn.Module):
    """pytorchvideo keeps kernel sizes as numpy integers."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, (int(np.int64(3)), 1, 1), padding=(1, 0, 0))
        self.k = np.int64(3)

    def forward(self, x):
        return F.avg_pool3d(self.conv(x), kernel_size=(self.k, 1, 1), stride=1)


def test_numpy_integers_in_arguments():
    check(NumpyKernels(), torch.randn(2, 3, 6, 4, 4, dtype=D))


class SwishFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Swish(nn.Module):
    def forward(self, x):
        return SwishFn.apply(x)


class NeighbourMix(nn.Module):
    def forward(self, x):
        if x.sum() > -1e9:   # data-dependent control flow: untraceable
            return x + x.roll(1, 2)
        return x


class WithCustomModules(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


def test_untraceable_frame_by_frame_modules_become_leaves():
    check(WithCustomModules(Swish()), torch.randn(2, 3, 6, 4, 4, dtype=D))


def test_untraceable_modules_that_mix_frames_are_refused():
    with pytest.raises(cofx.ConversionError, match="'act'.*does not act frame by frame.*could not trace"):
        cofx.convert(WithCustomModules(NeighbourMix()).eval(), torch.randn(1, 3, 6, 4, 4))


def test_leaf_modules_by_type_name_and_instance():
    swish = Swish()
    for leaves in ([Swish], ["act"], [swish]):
        co = cofx.convert(WithCustomModules(swish).eval(), torch.randn(1, 3, 6, 4, 4), leaf_modules=leaves)
        assert any(n.op == "call_module" and n.target == "act" for n in co.graph.nodes)


class Strided(nn.Module):
    """Temporal subsampling by slicing, then a strided pool."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)[:, :, 1::2]
        return F.max_pool1d(y, 2, 2)


def test_strided_slices():
    co = check(Strided(), torch.randn(2, 3, 13, dtype=D), stream_len=40)
    assert co.stride == 4


class SensorLSTM(nn.Module):
    """A sensor classifier: temporal conv, 2-layer LSTM, a head on the final state and the last output."""
    def __init__(self, cell=nn.LSTM, batch_first=True):
        super().__init__()
        self.batch_first, self.lstm = batch_first, cell is nn.LSTM
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.rnn = cell(8, 6, num_layers=2, batch_first=batch_first)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y.transpose(1, 2) if self.batch_first else y.permute(2, 0, 1)
        out, state = self.rnn(y)
        h = state[0] if self.lstm else state
        last = out[:, -1] if self.batch_first else out[-1]
        return self.fc(h[-1]) + self.fc(last)


@pytest.mark.parametrize("cell,batch_first", [(nn.LSTM, True), (nn.GRU, False), (nn.RNN, True)])
def test_recurrent_layers_carry_their_state(cell, batch_first):
    co = check(SensorLSTM(cell, batch_first), torch.randn(2, 3, 7, dtype=D))
    assert co.receptive_field == float("inf")
    assert next(r for r in co.report if r.name == "rnn").kind == "recurrent"


class PerFrameGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)

    def forward(self, x):
        return self.rnn(x.transpose(1, 2))[0].transpose(1, 2)


def test_per_frame_recurrent_outputs_have_no_delay():
    co = check(PerFrameGRU(), torch.randn(2, 3, 6, dtype=D))
    assert co.delay == 0


def test_a_namedtuple_output_streams_as_the_same_namedtuple():
    """torchvision-style outputs: the namedtuple comes back from forward, forward_steps and forward_step, each
    field streamed as a tuple's element would be (per-frame frames, one pooled value per window)."""
    from collections import namedtuple

    from guarantees import assert_clip_exact
    Out = namedtuple("Out", "frames pooled")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x).relu()
            return Out(h, self.fc(h.mean(2)))

    torch.manual_seed(0)
    model = Model().double().eval()
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    co = cofx.convert(model, x[:1])
    whole, ref = assert_clip_exact(co, model, x)
    assert type(whole) is Out and type(ref) is Out and type(co(x)) is Out
    assert whole.frames.shape == ref.frames.shape and whole.pooled.shape == (2, 2, 1)
    co.clean_state()
    assert co.forward_step(x[:, :, 0]) is None
    step = co.forward_step(x[:, :, 1])
    assert type(step) is Out and step.pooled is None
    assert torch.allclose(step.frames, ref.frames[:, :, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, dim, method", [(1, 2, False), (1, -1, True), (2, 2, False), (3, -1, True),
                                            (1, 1, False), (0, 2, True)])
def test_torch_diff_streams_as_frame_differences(n, dim, method):
    """Velocity and acceleration features as sensor and skeleton models write them: exact, with delay n."""
    from guarantees import assert_clip_exact

    class Velocity(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)

        def forward(self, x):
            h = self.conv(x)
            return h.diff(n=n, dim=dim) if method else torch.diff(h, n=n, dim=dim)

    torch.manual_seed(n)
    model = Velocity().double().eval()
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    co = cofx.convert(model, x[:1])
    assert co.is_exact and co.delay == 1 + (n if dim != 1 else 0)
    assert_clip_exact(co, model, x)


class TutorialPositions(nn.Module):
    """The PyTorch tutorial's sinusoidal PositionalEncoding: a registered buffer sliced by the clip length."""

    def __init__(self, d=8, max_len=32):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-np.log(10000.0) / d))
        pe = torch.zeros(max_len, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe)
        self.inp = nn.Linear(4, d)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True), 1,
                                         enable_nested_tensor=False)

    def forward(self, x):   # (B, T, 4)
        h = self.inp(x)
        return self.enc(h + self.pe[:h.size(1)])[:, -1]


class MaskBuffer(nn.Module):
    """nanoGPT's causal attention: a registered lower-triangular mask sliced [:T, :T], per-frame outputs."""

    def __init__(self):
        super().__init__()
        self.inp, self.qkv = nn.Linear(4, 8), nn.Linear(8, 24)
        self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, x):   # (B, T, 4)
        t = x.shape[1]
        q, k, v = self.qkv(self.inp(x)).split(8, 2)
        att = (q @ k.transpose(-2, -1)) / np.sqrt(8)
        return att.masked_fill(self.bias[0, :, :t, :t] == 0, float("-inf")).softmax(-1) @ v


class TensorAttribute(nn.Module):
    """A plain tensor attribute of the root (not a buffer) read in forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.scale = torch.tensor(2.5, dtype=torch.float64)

    def forward(self, x):
        return self.conv(x) * self.scale


@pytest.mark.parametrize("make, shape, time_dim", [(TutorialPositions, (2, 6, 4), 1), (MaskBuffer, (2, 6, 4), 1),
                                                   (TensorAttribute, (2, 3, 9), 2)])
def test_tables_masks_and_tensors_held_by_the_model_convert_exactly(make, shape, time_dim):
    from guarantees import assert_clip_exact
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    co = cofx.convert(model, x[:1], time_dim=time_dim)
    assert co.is_exact and co.state_dict().keys() == model.state_dict().keys()
    assert_clip_exact(co, model, x)


class TimeMixer(nn.Module):
    """A TSMixer-style forecaster on (B, T, C): linear layers over time (sized for the clip) and over features,
    then a horizon of H steps from the last T frames."""

    def __init__(self, t=12, c=3, h=4):
        super().__init__()
        self.feat, self.time, self.head = nn.Linear(c, c), nn.Linear(t, t), nn.Linear(t, h)

    def forward(self, x):
        x = x + self.time(x.transpose(1, 2)).relu().transpose(1, 2)
        x = x + self.feat(x).relu()
        return self.head(x.transpose(1, 2)).transpose(1, 2)


def test_linear_layers_over_time_forecast_from_the_last_clip_of_frames_each_step():
    torch.manual_seed(0)
    n = 12
    model = TimeMixer(t=n).double().eval()
    co = cofx.convert(model, torch.randn(1, n, 3, dtype=torch.float64), time_dim=1)
    assert co.is_exact and any(r.kind == "window" and "sized for the clip" in r.note for r in co.report)
    stream = torch.randn(2, n + 9, 3, dtype=torch.float64)
    with torch.no_grad():
        outs = [co.forward_step(stream[:, i]) for i in range(stream.shape[1])]
        assert all(y is None for y in outs[:n - 1])
        for t in range(n - 1, stream.shape[1]):   # the forecast of the model on the last n frames
            assert torch.allclose(outs[t], model(stream[:, t - n + 1:t + 1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size, step, dim", [(3, 1, 2), (4, 2, 2), (2, 3, -1), (1, 1, 2), (2, 2, 1)])
def test_frames_stacked_into_windows_by_unfold_stream_exactly(size, step, dim):
    """`h.unfold(2, k, s)`, frame stacking as audio and sensor front ends write it, then a classifier per window."""
    from guarantees import assert_clip_exact

    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * size, 5)

        def forward(self, x):
            h = self.conv(x).unfold(dim, size, step)
            if dim == 1:   # windows of channels: each frame's own, (B, windows, T, size)
                return h.sum(-1)
            return self.fc(h.permute(0, 2, 1, 3).flatten(2)).transpose(1, 2)

    torch.manual_seed(size)
    model = Stacked().double().eval()
    x = torch.randn(2, 3, 13, dtype=torch.float64)
    co = cofx.convert(model, x[:1])
    assert co.is_exact and co.stride == (step if dim != 1 else 1)
    assert_clip_exact(co, model, x)
