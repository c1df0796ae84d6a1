"""Per-frame video models and recurrent models written the way people write them.

Every model must either convert exactly (from a clean state `forward_steps(clip, pad_end=True)` and
`forward_step` frame by frame plus the end flush equal `model(clip)` on a fresh two-stream input, and random
chunkings of a longer stream give what `forward_step` gives frame by frame) or be refused with a
`cofx.ConversionError` whose message says what is refused.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import cofx
from guarantees import assert_clip_exact, by_forward_step, two_streams
from cofx.verify import by_chunks, chunk_sizes, max_error, output_tolerance

D = torch.float64


# ---- helpers ---------------------------------------------------------------------------------------

def assert_exact(model, clip, time_dim=2, seed=0, **kwargs):
    """Converts exactly: clip equivalence on a fresh 2-stream input (whole chunk and forward_step frame by
    frame), and chunk invariance of a longer stream against forward_step frame by frame."""
    torch.manual_seed(seed)
    model = model.eval()
    co = cofx.convert(model, clip, time_dim=time_dim, **kwargs)
    assert co.is_exact
    x = two_streams(clip, time_dim)
    whole, _ = assert_clip_exact(co, model, x)
    with torch.no_grad():
        # a longer stream: random chunkings (0-frame chunks among them) == forward_step frame by frame
        stream = two_streams(clip, time_dim, frames=2 * clip.shape[time_dim] + 3)
        co.clean_state()
        frames = by_forward_step(co, stream, whole)
        tol = output_tolerance(frames)
        rng = random.Random(seed)
        for _ in range(2):
            co.clean_state()
            chunked = by_chunks(co, stream, chunk_sizes(stream.shape[time_dim], rng))
            assert max_error(chunked, frames) <= tol, max_error(chunked, frames)
        co.clean_state()
    return co


def assert_refused(model, clip, *words, time_dim=2, **kwargs):
    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(model.eval(), clip, time_dim=time_dim, **kwargs)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return msg


def video(t=6, hw=4, b=1):
    return torch.randn(b, 3, t, hw, hw, dtype=D)


def seq(t=6, b=1, c=3):
    return torch.randn(b, c, t, dtype=D)


def seeded(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).double().eval()


# ---- models ----------------------------------------------------------------------------------------

class CNN(nn.Module):
    """A small 2D CNN on one frame: (N, 3, H, W) -> (N, 6, 1, 1)."""
    def __init__(self, f=6):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Conv2d(4, f, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.net(x)


class CNNRecurrent(nn.Module):
    """(B, C, T, H, W): frames folded into the batch for a 2D CNN, unfolded, then an LSTM/GRU/RNN."""
    def __init__(self, cell=nn.LSTM, batch_first=True, layers=2, read="last", bidirectional=False):
        super().__init__()
        self.cnn = CNN()
        self.rnn = cell(6, 5, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
        self.fc = nn.Linear(5 * (2 if bidirectional else 1), 3)
        self.batch_first, self.read, self.lstm = batch_first, read, cell is nn.LSTM

    def forward(self, x):
        B, C, T, H, W = x.shape
        f = self.cnn(x.transpose(1, 2).reshape(B * T, C, H, W)).view(B, T, -1)
        if not self.batch_first:
            f = f.transpose(0, 1)
        out, state = self.rnn(f)
        if self.read == "last":
            return self.fc(out[:, -1] if self.batch_first else out[-1])
        if self.read == "all":
            y = self.fc(out)
            return y if self.batch_first else y.transpose(0, 1)
        h = state[0] if self.lstm else state
        return self.fc(h[-1])


class TimeFirstCNNLSTM(nn.Module):
    """(B, T, C, H, W) input, time_dim=1, per-frame predictions."""
    def __init__(self):
        super().__init__()
        self.cnn = CNN()
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        B, T, C, H, W = x.shape
        f = self.cnn(x.view(B * T, C, H, W)).view(B, T, -1)
        out, (h, c) = self.rnn(f)
        return self.fc(out)


class SensorGRU(nn.Module):
    """(B, T, C) sensor input, time_dim=1: per-frame outputs and a head on the final state."""
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out, h = self.rnn(x)
        return self.fc(out), self.fc(h.squeeze(0))


class PlainRNN(nn.Module):
    def __init__(self, nonlinearity="tanh"):
        super().__init__()
        self.rnn = nn.RNN(3, 5, nonlinearity=nonlinearity, batch_first=True)

    def forward(self, x):
        out, h = self.rnn(x.transpose(1, 2))
        return out.transpose(1, 2), h[-1]


class HnConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        out, (h_n, c_n) = self.rnn(x.transpose(1, 2))
        return self.fc(torch.cat([h_n[-2], h_n[-1]], 1)), c_n[-1]


class ProjLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.rnn = nn.LSTM(4, 6, num_layers=2, proj_size=3, batch_first=False, bias=False)

    def forward(self, x):
        out, (h, c) = self.rnn(self.conv(x).permute(2, 0, 1))
        return out.permute(1, 2, 0), h[-1] * c[-1][:, :3]


class ReturnsHn(nn.Module):
    """Returns h_n itself: (layers, B, H), the batch at dim 1."""
    def __init__(self, layers=2):
        super().__init__()
        self.rnn = nn.GRU(3, 4, num_layers=layers, batch_first=True)

    def forward(self, x):
        return self.rnn(x.transpose(1, 2))[1]


class ResidualGRU(nn.Module):
    """A strided temporal conv, a 2-layer GRU with dropout (eval), a residual, a mean over time."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1, stride=2)
        self.rnn = nn.GRU(4, 4, batch_first=True, num_layers=2, dropout=0.3)

    def forward(self, x):
        y = self.conv(x).transpose(1, 2)
        out, _ = self.rnn(y)
        return (y + out).mean(1)


class TwoStream(nn.Module):
    """RGB frames and frame differences, each through a per-frame CNN, concatenated into a GRU."""
    def __init__(self):
        super().__init__()
        self.rgb, self.flow = CNN(), CNN()
        self.rnn = nn.GRU(12, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        B, C, T, H, W = x.shape
        d = x[:, :, 1:] - x[:, :, :-1]
        fr = self.rgb(x[:, :, 1:].transpose(1, 2).reshape(B * (T - 1), C, H, W)).view(B, T - 1, -1)
        ff = self.flow(d.transpose(1, 2).reshape(B * (T - 1), C, H, W)).view(B, T - 1, -1)
        out, h = self.rnn(torch.cat([fr, ff], 2))
        return self.fc(out[:, -1])


class FoldVariant(nn.Module):
    """Other spellings of folding frames into the batch (and one classic bug: B and T swapped)."""
    def __init__(self, how):
        super().__init__()
        self.cnn = CNN()
        self.rnn = nn.GRU(6, 4, batch_first=True)
        self.how = how

    def forward(self, x):
        B, C, T, H, W = x.shape
        if self.how == "minus1":
            f = self.cnn(x.transpose(1, 2).reshape(-1, C, H, W)).view(B, -1, 6)
        elif self.how == "flatten":
            f = self.cnn(torch.flatten(x.transpose(1, 2), 0, 1)).flatten(1).unflatten(0, (B, T))
        elif self.how == "permute":
            f = self.cnn(x.permute(0, 2, 1, 3, 4).contiguous().view(B * T, C, H, W)).squeeze(-1).squeeze(-1)
            f = f.view(B, T, -1)
        else:   # "swapped": unfolded as (T, B) although folded as (B, T): mixes the streams
            f = self.cnn(x.transpose(1, 2).reshape(B * T, C, H, W)).view(T, B, -1).transpose(0, 1)
        return self.rnn(f)[0]


class PoolHead(nn.Module):
    """Per-frame features (spatial mean), a temporal conv, then a pooling head over time (dim 1)."""
    def __init__(self, how):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.how = how

    def forward(self, x):
        h = self.conv(x.mean((3, 4))).transpose(1, 2)   # (B, T, 4)
        how = self.how
        if how == "mean":
            return h.mean(1)
        if how == "amax":
            return h.amax(1)
        if how == "logsumexp":
            return torch.logsumexp(h, 1)
        if how == "std":
            return h.std(1)
        if how == "var":
            return h.var(1)
        if how == "median":
            return h.median(1).values
        if how == "norm":
            return h.norm(dim=1)
        if how == "prod":
            return h.prod(1)
        if how == "topk":
            return h.topk(2, dim=1).values.sum(1)
        if how == "softmax_pool":
            return (h.softmax(1) * h).sum(1)
        if how == "cumsum":
            return h.cumsum(1).transpose(1, 2)
        if how == "sort":
            return h.sort(1).values[:, -1]
        raise ValueError(how)


class TemporalConvOverFrames(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = CNN()
        self.tconv = nn.Conv1d(6, 4, 3, padding=2, dilation=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        B, C, T, H, W = x.shape
        f = self.cnn(x.transpose(1, 2).reshape(B * T, C, H, W)).view(B, T, -1).permute(0, 2, 1)
        return self.fc(torch.relu(self.tconv(f)).amax(-1))


class FrameDiff(nn.Module):
    def __init__(self, pooled=True):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
        self.pooled = pooled

    def forward(self, x):
        d = x[:, :, 1:] - x[:, :, :-1]
        if self.pooled:
            return self.conv(d).mean((2, 3, 4))
        return d.abs().mean((3, 4))


class FlowStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(6, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(torch.cat([x[:, :, :-1], x[:, :, 1:]], 1)).mean((3, 4))


class TimeOp(nn.Module):
    """A conv, with an op along time before it."""
    def __init__(self, op):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.op = op

    def forward(self, x):
        return self.conv(self.op(x))


class MoveToCpu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.rnn = nn.GRU(4, 4, batch_first=True)

    def forward(self, x):
        y = self.conv(x.to("cpu")).to(torch.device("cpu"))
        return self.rnn(y.transpose(1, 2).cpu())[0][:, -1]


class SharedLSTM(nn.Module):
    """One LSTM module applied to two different feature streams."""
    def __init__(self, last=False):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.fc = nn.Linear(8, 2)
        self.last = last

    def forward(self, x):
        a = x.transpose(1, 2)
        oa, (ha, _) = self.rnn(a)
        ob, (hb, _) = self.rnn(torch.tanh(2 * a))
        if self.last:
            return self.fc(torch.cat([ha[-1], hb[-1]], 1))
        return self.fc(torch.cat([oa, ob], 2)).transpose(1, 2)


class GRUThenAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        y = self.rnn(x.transpose(1, 2))[0]
        return F.scaled_dot_product_attention(y, y, y)[:, -1]


class RecurrentFixedFrames(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)

    def forward(self, x):
        out = self.rnn(x.transpose(1, 2))[0]
        return out[:, 0] + out[:, -3]


class SlicedRecurrent(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.how = how

    def forward(self, x):
        y = x[:, :, ::2] if self.how == "every2" else x[:, :, 2:] if self.how == "crop" else F.pad(x, (2, 0))
        out, (h, c) = self.rnn(y.transpose(1, 2))
        return out[:, 1:].amax(1) + h[-1]


class MaxPoolThenGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(F.max_pool1d(x, 3, 2, padding=1).transpose(1, 2))[0].transpose(1, 2)


class LayerNormGRU(nn.Module):
    def __init__(self, norm="ln"):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 1)
        self.ln, self.inorm, self.gn = nn.LayerNorm(4), nn.InstanceNorm1d(3), nn.GroupNorm(1, 3)
        self.rnn = nn.GRU(4, 4, batch_first=True)
        self.norm = norm

    def forward(self, x):
        if self.norm == "ln":
            y = self.ln(self.conv(x).transpose(1, 2))
        elif self.norm == "instance":
            y = self.conv(self.inorm(x)).transpose(1, 2)
        else:
            y = self.conv(self.gn(x)).transpose(1, 2)
        return self.rnn(y)[0][:, -1]


class CellLoopShape(nn.Module):
    """A cell unrolled over range(x.shape[2]): torch.fx cannot trace the loop."""
    def __init__(self, cell=nn.GRUCell):
        super().__init__()
        self.cell = cell(3, 5)
        self.lstm = cell is nn.LSTMCell

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 5)
        c = x.new_zeros(x.shape[0], 5)
        outs = []
        for t in range(x.shape[2]):
            if self.lstm:
                h, c = self.cell(x[:, :, t], (h, c))
            else:
                h = self.cell(x[:, :, t], h)
            outs.append(h)
        return torch.stack(outs, 2)


class CellLoopUnbind(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(3, 5)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 5)
        for xt in x.unbind(2):
            h = self.cell(xt, h)
        return h


class CellLoopFixed(nn.Module):
    """A cell unrolled over a fixed length stored on the module: fx unrolls it; x[:, :, t] are fixed frames
    of the clip, so the continual model answers for the last T frames (a window over the clip)."""
    def __init__(self, cell=nn.GRUCell, T=6, read="last", h0="none"):
        super().__init__()
        self.cell = cell(3, 5)
        self.T, self.read, self.h0, self.lstm = T, read, h0, cell is nn.LSTMCell
        self.h_init = nn.Parameter(torch.zeros(1, 5))

    def forward(self, x):
        if self.h0 == "none":
            hx = None
        elif self.h0 == "batch":
            hx = torch.zeros(x.shape[0], 5, dtype=x.dtype)
            hx = (hx, hx) if self.lstm else hx
        else:   # a learned initial state expanded to the batch
            hx = self.h_init.expand(x.shape[0], -1)
            hx = (hx, hx) if self.lstm else hx
        outs = []
        for t in range(self.T):
            hx = self.cell(x[:, :, t], hx)
            outs.append(hx[0] if self.lstm else hx)
        return outs[-1] if self.read == "last" else torch.stack(outs, 2)


class ManualRNN(nn.Module):
    """A hand-written Elman RNN unrolled over a fixed length."""
    def __init__(self, T=6, read="all"):
        super().__init__()
        self.inp, self.rec = nn.Linear(3, 5), nn.Linear(5, 5, bias=False)
        self.T, self.read = T, read

    def forward(self, x):
        xs = self.inp(x.transpose(1, 2))
        h = torch.zeros_like(xs[:, 0])
        outs = []
        for t in range(self.T):
            h = torch.tanh(xs[:, t] + self.rec(h))
            outs.append(h)
        return h if self.read == "last" else torch.stack(outs, 1)


class H0Given(nn.Module):
    def __init__(self, cell=nn.LSTM, learned=False):
        super().__init__()
        self.rnn = cell(3, 5, num_layers=2, batch_first=True)
        self.h = nn.Parameter(torch.randn(2, 1, 5))
        self.lstm, self.learned = cell is nn.LSTM, learned

    def forward(self, x):
        y = x.transpose(1, 2)
        h0 = self.h.expand(-1, y.size(0), -1).contiguous() if self.learned else \
            torch.zeros(2, y.size(0), 5, dtype=y.dtype)
        out, _ = self.rnn(y, (h0, torch.zeros_like(h0)) if self.lstm else h0)
        return out[:, -1]


class Bidirectional(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.rnn(x.transpose(1, 2))[0][:, -1]


class LastByLength(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)

    def forward(self, x):
        y = x.transpose(1, 2)
        self.rnn.flatten_parameters()
        return self.rnn(y)[0][:, y.size(1) - 1, :]


class FinalStateOntoFrames(nn.Module):
    """The final state broadcast back onto every frame: every frame then depends on the clip's future."""
    def __init__(self):
        super().__init__()
        self.a = nn.LSTM(3, 4, batch_first=True)
        self.b = nn.GRU(4, 5, batch_first=True)
        self.conv = nn.Conv1d(5, 5, 3, padding=1)

    def forward(self, x):
        y, _ = self.a(x.transpose(1, 2))
        y, h = self.b(torch.tanh(y))
        return self.conv(y.transpose(1, 2)) + h[-1].unsqueeze(-1)


class PackedSequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        y = x.transpose(1, 2)
        lengths = torch.full((y.shape[0],), y.shape[1], dtype=torch.long)
        packed = nn.utils.rnn.pack_padded_sequence(y, lengths, batch_first=True, enforce_sorted=False)
        return self.rnn(packed)[1][-1]


class StridedStateAndMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1, stride=2)
        self.side = nn.Conv1d(3, 4, 5, padding=2)
        self.rnn = nn.GRU(4, 4, batch_first=True)

    def forward(self, x):
        out, h = self.rnn(self.conv(x).transpose(1, 2))
        return h[-1] + self.side(x).mean(2)


class RowLSTM(nn.Module):
    """An LSTM over the pixel rows of each frame (time folded into the batch): it never runs along time."""
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3 * 4, 5, batch_first=True)

    def forward(self, x):
        B, C, T, H, W = x.shape
        out, (h, c) = self.rnn(x.permute(0, 2, 3, 1, 4).reshape(B * T, H, C * W))
        return h[-1].view(B, T, -1).transpose(1, 2)


class PositionsThenGRU(nn.Module):
    """Positions sliced by the clip length, then a GRU: a recurrent layer inside a window over the clip."""
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 32, 3))
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        y = x.transpose(1, 2)
        return self.rnn(y + self.pos[:, :y.shape[1]])[0][:, -1]


class StartTokenGRU(nn.Module):
    """A learned start-of-sequence frame put in front of the clip, then a GRU."""
    def __init__(self):
        super().__init__()
        self.sos = nn.Parameter(torch.randn(1, 3, 1))
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        y = torch.cat([self.sos.expand(x.shape[0], -1, -1), x], 2)
        return self.rnn(y.transpose(1, 2))[0].transpose(1, 2)


class TraceDiverges(nn.Module):
    """fx takes another branch of an isinstance test than eager PyTorch: the traced graph is not the model."""
    def __init__(self):
        super().__init__()
        self.cnn = CNN()

    def forward(self, x):
        B, C, T, H, W = x.shape
        y = self.cnn(x.transpose(1, 2).reshape(B * T, C, H, W)).view(B, T, -1).mean(1)
        return y * 2 if isinstance(y, torch.Tensor) else y


class TimeReducingLeaf(nn.Module):
    """Untraceable (data-dependent branch) but row-independent: a mean over time of each sample."""
    def forward(self, x):
        if x.sum() > -1e30:
            return x.mean(2)
        return x.amax(2)


class WithLeaf(nn.Module):
    def __init__(self, leaf):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3, padding=1)
        self.leaf = leaf

    def forward(self, x):
        return self.leaf(self.conv(x))


class PadRecurrent(nn.Module):
    """Causal zero padding along time (the TCN habit) in front of a recurrent layer."""
    def __init__(self, read="last", pad=2, cell=nn.GRU):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.read, self.pad, self.lstm = read, pad, cell is nn.LSTM

    def forward(self, x):
        out, h = self.rnn(F.pad(x, (self.pad, 0)).transpose(1, 2))
        h = h[0] if self.lstm else h
        if self.read == "frames":
            return out.transpose(1, 2)
        if self.read == "hn":
            return h[-1]
        return out[:, -1]


# ---- exact -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell,batch_first,read", [
    (nn.LSTM, True, "last"), (nn.LSTM, False, "hn"), (nn.GRU, False, "all"), (nn.RNN, True, "hn")])
def test_per_frame_cnn_then_recurrent(cell, batch_first, read):
    co = assert_exact(seeded(CNNRecurrent, cell, batch_first, 2, read), video())
    assert co.receptive_field == float("inf")
    assert next(r for r in co.report if r.name == "rnn").kind == "recurrent"


def test_time_first_video_layout():
    co = assert_exact(seeded(TimeFirstCNNLSTM), torch.randn(1, 6, 3, 8, 8, dtype=D), time_dim=1)
    assert co.delay == 0


EXACT_CASES = [
    ("sensor GRU, time_dim=1", lambda: seeded(SensorGRU), lambda: torch.randn(1, 6, 3, dtype=D), 1),
    ("nn.RNN tanh", lambda: seeded(PlainRNN, "tanh"), seq, 2),
    ("nn.RNN relu", lambda: seeded(PlainRNN, "relu"), seq, 2),
    ("h_n of both layers and c_n", lambda: seeded(HnConcat), seq, 2),
    ("LSTM proj_size, seq first, no bias", lambda: seeded(ProjLSTM), seq, 2),
    ("h_n returned, batch at dim 1", lambda: seeded(ReturnsHn), seq, 2),
    ("strided conv, 2-layer GRU with dropout, residual, mean", lambda: seeded(ResidualGRU), lambda: seq(8), 2),
    ("two-stream RGB + frame differences into a GRU", lambda: seeded(TwoStream), lambda: video(5, 4), 2),
    ("fold with -1", lambda: seeded(FoldVariant, "minus1"), lambda: video(5, 4), 2),
    ("fold with flatten/unflatten", lambda: seeded(FoldVariant, "flatten"), lambda: video(5, 4), 2),
    ("fold with permute().contiguous().view()", lambda: seeded(FoldVariant, "permute"), lambda: video(5, 4), 2),
    ("one LSTM on two streams, frames", lambda: seeded(SharedLSTM, False), seq, 2),
    ("one LSTM on two streams, final states", lambda: seeded(SharedLSTM, True), seq, 2),
    ("GRU then attention, last frame", lambda: seeded(GRUThenAttention), seq, 2),
    ("out[:, 0] + out[:, -3] of an LSTM", lambda: seeded(RecurrentFixedFrames), seq, 2),
    ("LSTM over x[:, :, ::2]", lambda: seeded(SlicedRecurrent, "every2"), lambda: seq(8), 2),
    ("LSTM over x[:, :, 2:]", lambda: seeded(SlicedRecurrent, "crop"), lambda: seq(8), 2),
    ("LSTM after F.pad(x, (2, 0))", lambda: seeded(SlicedRecurrent, "pad"), lambda: seq(8), 2),
    ("max pool stride 2 then GRU frames", lambda: seeded(MaxPoolThenGRU), lambda: seq(8), 2),
    ("LayerNorm per frame then GRU", lambda: seeded(LayerNormGRU, "ln"), seq, 2),
    (".to('cpu') inside forward", lambda: seeded(MoveToCpu), seq, 2),
    ("temporal conv over per-frame CNN features", lambda: seeded(TemporalConvOverFrames), video, 2),
    ("frame difference, pooled", lambda: seeded(FrameDiff, True), video, 2),
    ("frame difference, per frame", lambda: seeded(FrameDiff, False), video, 2),
    ("optical-flow-like stacking of frame pairs", lambda: seeded(FlowStack), video, 2),
    ("replicate padding along time", lambda: seeded(TimeOp, lambda x: F.pad(x, (1, 1), mode="replicate")), seq, 2),
    ("h0 zeros built from the batch size (LSTM)", lambda: seeded(H0Given, nn.LSTM), seq, 2),
    ("h0 zeros built from the batch size (GRU)", lambda: seeded(H0Given, nn.GRU), seq, 2),
    ("out[:, T - 1] with T read off the clip (the last frame, as out[:, -1])", lambda: seeded(LastByLength), seq, 2),
    ("cell unrolled over a fixed length from a batch-sized h0",
     lambda: seeded(CellLoopFixed, nn.GRUCell, 6, "last", "batch"), seq, 2),
    ("cell unrolled over a fixed length from a learned h0",
     lambda: seeded(CellLoopFixed, nn.LSTMCell, 6, "all", "learned"), seq, 2),
]


@pytest.mark.parametrize("name,make,clip,time_dim", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_exact(name, make, clip, time_dim):
    assert_exact(make(), clip(), time_dim=time_dim)


@pytest.mark.parametrize("how", ["mean", "amax", "logsumexp", "std", "var", "median", "norm", "prod", "topk",
                                 "softmax_pool"])
def test_temporal_pooling_heads(how):
    co = assert_exact(seeded(PoolHead, how), video(6, 4))
    assert co.delay == 6


@pytest.mark.parametrize("cell,read", [(nn.GRUCell, "last"), (nn.LSTMCell, "last"), (nn.RNNCell, "all"),
                                       (nn.GRUCell, "all")])
def test_cell_unrolled_over_a_fixed_length_is_a_window(cell, read):
    """fx unrolls the loop at T=6: exact on the clip, and on a longer stream each step answers for the last
    six frames, never for a longer history."""
    model = seeded(CellLoopFixed, cell, 6, read)
    co = assert_exact(model, seq(6))
    x = torch.randn(2, 3, 14, dtype=D)
    with torch.no_grad():
        co.clean_state()
        for i in range(14):
            y = co.forward_step(x[:, :, i])
            if i < 5:
                assert y is None
            else:
                ref = model(x[:, :, i - 5:i + 1])
                assert max_error(y, ref) <= 1e-12 * float(ref.abs().max())


def test_manual_rnn_unrolled_over_a_fixed_length():
    assert_exact(seeded(ManualRNN, 6, "all"), seq(6))
    assert_exact(seeded(ManualRNN, 6, "last"), seq(6))


# ---- refused ---------------------------------------------------------------------------------------

REFUSED_CASES = [
    ("bidirectional LSTM after a per-frame CNN", lambda: seeded(CNNRecurrent, nn.LSTM, True, 2, "last", True),
     video, ["node 'rnn'", "bidirectional recurrent layer reads future frames", "fix:"]),
    ("bidirectional GRU", lambda: seeded(Bidirectional, nn.GRU), seq,
     ["node 'rnn'", "bidirectional", "fix:"]),
    ("learned h0", lambda: seeded(H0Given, nn.GRU, True), seq, ["node 'rnn'", "given an initial state", "fix:"]),
    ("learned h0, zero c0", lambda: seeded(H0Given, nn.LSTM, True), seq, ["node 'rnn'", "given an initial state"]),
    ("GRUCell loop over range(x.shape[2])", lambda: seeded(CellLoopShape, nn.GRUCell), seq,
     ["torch.fx could not trace", "fix:"]),
    ("LSTMCell loop over range(x.shape[2])", lambda: seeded(CellLoopShape, nn.LSTMCell), seq,
     ["torch.fx could not trace"]),
    ("loop over x.unbind(2)", lambda: seeded(CellLoopUnbind), seq, ["torch.fx could not trace", "iterated"]),
    ("torch.flip on time", lambda: seeded(TimeOp, lambda x: torch.flip(x, [2])), seq,
     ["node 'flip'", "does not act frame by frame"]),
    ("x.flip(-1) on time", lambda: seeded(TimeOp, lambda x: x + x.flip(-1)), seq, ["node 'flip'"]),
    ("x.roll(1, 2)", lambda: seeded(TimeOp, lambda x: x.roll(1, 2)), seq,
     ["node 'roll'", "does not act frame by frame"]),
    ("x.roll(-1, 2)", lambda: seeded(TimeOp, lambda x: x.roll(-1, 2)), seq, ["node 'roll'"]),
    ("reflect padding along time", lambda: seeded(TimeOp, lambda x: F.pad(x, (1, 1), mode="reflect")), seq,
     ["node 'pad'", "reflect padding along time needs frames from the future"]),
    ("circular padding_mode", lambda: seeded(nn.Conv1d, 3, 4, 3, padding=1, padding_mode="circular"), seq,
     ["circular padding along time needs frames from the future"]),
    ("cumsum over time", lambda: seeded(PoolHead, "cumsum"), lambda: video(6, 4), ["node 'cumsum'"]),
    ("sort over time", lambda: seeded(PoolHead, "sort"), lambda: video(6, 4), ["node 'sort'"]),
    ("InstanceNorm1d over time", lambda: seeded(LayerNormGRU, "instance"), seq,
     ["node 'inorm'", "does not act frame by frame"]),
    ("GroupNorm over time", lambda: seeded(LayerNormGRU, "group"), seq, ["node 'gn'"]),
    ("final state broadcast onto every frame", lambda: seeded(FinalStateOntoFrames), seq, ["node 'add'"]),
    ("packed sequence", lambda: seeded(PackedSequence), seq, ["torch.fx could not trace"]),
    ("final state of a strided branch plus a mean of an unstrided one", lambda: seeded(StridedStateAndMean),
     lambda: seq(8), ["node 'add'", "different temporal strides"]),
    ("per-frame fold unfolded with B and T swapped", lambda: seeded(FoldVariant, "swapped"),
     lambda: video(5, 4), ["does not match the clip model"]),
    ("recurrent over pixel rows of each frame", lambda: seeded(RowLSTM), lambda: video(6, 4),
     ["node 'rnn'", "time reaches the recurrent layer at dim 0"]),
]


@pytest.mark.parametrize("name,make,clip,words", REFUSED_CASES, ids=[c[0] for c in REFUSED_CASES])
def test_refused(name, make, clip, words):
    assert_refused(make(), clip(), *words)


def test_mixed_dtypes_are_clear_errors():
    torch.manual_seed(0)
    model = CNNRecurrent().float().eval()
    clip = torch.randn(1, 3, 6, 8, 8)
    for dtype in (torch.bfloat16, torch.float64):
        msg = assert_refused(model, clip.to(dtype), str(dtype), "torch.float32")
        assert "fix:" in msg
    co = cofx.convert(model, clip)
    for frame in (torch.randn(1, 3, 8, 8).bfloat16(), torch.randn(1, 3, 8, 8, dtype=D)):
        with pytest.raises(cofx.StreamError, match="input dtype .* differs from the model's torch.float32"):
            co.forward_step(frame)
    with pytest.raises(cofx.StreamError, match="float16"):
        co.forward_steps(torch.randn(1, 3, 2, 8, 8).half())
    # a model in bfloat16 with bfloat16 frames converts
    mb = CNNRecurrent().bfloat16().eval()
    cb = cofx.convert(mb, clip.bfloat16())
    x = torch.randn(2, 3, 6, 8, 8).bfloat16()
    with torch.no_grad():
        assert max_error(cb.forward_steps(x, pad_end=True), mb(x).unsqueeze(-1)) == 0.0


def test_dtype_change_mid_stream_is_a_stream_error():
    torch.manual_seed(0)
    co = cofx.convert(CNNRecurrent().float().eval(), torch.randn(1, 3, 6, 4, 4))
    with torch.no_grad():
        co.forward_steps(torch.randn(2, 3, 3, 4, 4))
        co.double()
        with pytest.raises(cofx.StreamError, match="clean_state"):
            co.forward_steps(torch.randn(2, 3, 3, 4, 4, dtype=D))
        co.clean_state()
        model = CNNRecurrent().double().eval()
        model.load_state_dict(co.state_dict())
        x = torch.randn(2, 3, 6, 4, 4, dtype=D)
        assert max_error(co.forward_steps(x, pad_end=True), model(x).unsqueeze(-1)) <= 1e-12


# ---- state: per-stream restarts, get/set, save/load, gradients --------------------------------------

def restarted_rows_error(co, x, restarts):
    """Step batch `x` (B, C, T, ...) frame by frame, restarting rows {step: [rows]}; every row must give
    what its stream gives alone from its last restart (readiness and values). Returns the max error."""
    B, T = x.shape[0], x.shape[2]
    worst = 0.0
    with torch.no_grad():
        co.clean_state()
        got = []
        for i in range(T):
            if i in restarts:
                co.clean_state(streams=restarts[i])
            got.append((co.forward_step(x[:, :, i]), co.ready.clone()))
        for b in range(B):
            starts = [0] + [i for i in sorted(restarts) if b in restarts[i]]
            for s, e in zip(starts, starts[1:] + [T]):
                co.clean_state()
                for i in range(s, e):
                    alone = co.forward_step(x[b:b + 1, :, i])
                    y, ready = got[i]
                    assert bool(ready[b]) == (alone is not None), f"stream {b}, step {i}: ready {bool(ready[b])}"
                    if alone is None:
                        continue
                    for want, have in zip(tree_flatten(alone)[0], tree_flatten(y)[0]):
                        bdim = 1 if have.dim() == 3 and have.shape[0] != B else 0   # h_n: batch at dim 1
                        row = have.narrow(bdim, b, 1)
                        worst = max(worst, float((row - want).abs().max()) / max(float(want.abs().max()), 1e-30))
        co.clean_state()
    return worst


RESTART_CASES = [
    ("CNN + LSTM, last frame", lambda: seeded(CNNRecurrent, nn.LSTM, True, 2, "last"), lambda: video(6, 4)),
    ("CNN + GRU, every frame", lambda: seeded(CNNRecurrent, nn.GRU, False, 2, "all"), lambda: video(6, 4)),
    ("h_n of both layers and c_n", lambda: seeded(HnConcat), seq),
    ("h_n returned, batch at dim 1", lambda: seeded(ReturnsHn), seq),
    ("strided conv + GRU + mean", lambda: seeded(ResidualGRU), lambda: seq(8)),
    ("LSTM over x[:, :, ::2]", lambda: seeded(SlicedRecurrent, "every2"), lambda: seq(8)),
]


@pytest.mark.parametrize("name,make,clip", RESTART_CASES, ids=[c[0] for c in RESTART_CASES])
def test_restarting_one_stream_of_a_recurrent_model(name, make, clip):
    model, c = make(), clip()
    co = cofx.convert(model, c)
    shape = list(c.shape)
    shape[0], shape[2] = 3, 18
    x = torch.randn(shape, dtype=D)
    assert restarted_rows_error(co, x, {7: [1], 11: [2], 12: [1]}) <= 1e-12


def test_recurrent_state_round_trips_and_peeks():
    model = seeded(CNNRecurrent, nn.LSTM, True, 2, "last")
    co = cofx.convert(model, video(6, 4))
    x = torch.randn(2, 3, 16, 4, 4, dtype=D)
    with torch.no_grad():
        co.clean_state()
        head = co.forward_steps(x[:, :, :7])
        saved = co.get_state()
        peek = co.forward_steps(x[:, :, 7:9], update_state=False)
        rest = co.forward_steps(x[:, :, 7:], pad_end=True)
        co.clean_state()
        co.forward_steps(torch.randn(2, 3, 5, 4, 4, dtype=D))
        co.set_state(saved)
        again = co.forward_steps(x[:, :, 7:], pad_end=True)
        assert torch.equal(rest, again)
        assert torch.equal(peek, rest[:, :, :2])
        co.clean_state()
        whole = co.forward_steps(x, pad_end=True)
        assert torch.equal(torch.cat([head, rest], 2), whole)


def test_recurrent_save_load_round_trip(tmp_path):
    model = seeded(HnConcat)
    co = cofx.convert(model, seq())
    path = os.path.join(tmp_path, "hn.continual.pt")
    cofx.save(co, path)
    with pytest.raises(ValueError, match="trust=True"):
        cofx.load(path)
    loaded = cofx.load(path, trust=True)
    assert loaded.is_exact and loaded.delay == co.delay and loaded.receptive_field == float("inf")
    x = torch.randn(2, 3, 20, dtype=D)
    with torch.no_grad():
        co.clean_state()
        a = co.forward_steps(x, pad_end=True)
        b = loaded.forward_steps(x, pad_end=True)
        assert max_error(a, b) == 0.0
        # a state taken from one instance resumes in the other
        loaded.forward_steps(x[:, :, :9])
        co.set_state(loaded.get_state())
        assert max_error(co.forward_steps(x[:, :, 9:], pad_end=True),
                         loaded.forward_steps(x[:, :, 9:], pad_end=True)) == 0.0
        assert torch.equal(loaded(x[:, :, :6])[0], model(x[:, :, :6])[0])


def test_gradients_through_recurrent_steps():
    model = seeded(TwoStream)
    co = cofx.convert(model, video(6, 4))
    x1 = torch.randn(2, 3, 6, 4, 4, dtype=D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g_ref = torch.autograd.grad(model(x1).sum(), [x1, *model.parameters()])
    co.clean_state()
    g_co = torch.autograd.grad(co.forward_steps(x2, pad_end=True).sum(), [x2, *co.parameters()])
    assert max(max_error(a, b) for a, b in zip(g_ref, g_co)) <= 1e-12


def test_onnx_export_of_a_per_frame_cnn_gru_with_a_restart(tmp_path):
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    co = cofx.convert(CNNRecurrent(nn.GRU, read="all").eval(), torch.randn(1, 3, 6, 8, 8))
    path = os.path.join(tmp_path, "g.onnx")
    cofx.export_onnx(co, path)
    sess = ort.InferenceSession(path)
    states = sess.get_inputs()[2:]
    state = [np.zeros([2, *s.shape[1:]], np.float32 if s.type == "tensor(float)" else np.int64) for s in states]
    reset = np.ones(2, dtype=bool)
    x = torch.randn(2, 3, 12, 8, 8)
    co.clean_state()
    for i in range(12):
        if i == 5:
            reset[1] = True
            co.clean_state(streams=[1])
        out, ready, *state = sess.run(None, {"frame": x[:, :, i].numpy(), "reset": reset,
                                             **{s.name: v for s, v in zip(states, state)}})
        reset[:] = False
        with torch.no_grad():
            y = co.forward_step(x[:, :, i])
        assert (ready == co.ready.numpy()).all()
        assert np.abs(out[ready] - y.numpy()[ready]).max() <= 1e-5


# ---- bugs found ------------------------------------------------------------------------------------

def test_set_state_out_of_phase_on_a_recurrent_model():
    model = seeded(CNNRecurrent, nn.GRU, True, 1, "all")
    co = cofx.convert(model, video(5, 4))
    x = torch.randn(2, 3, 12, 4, 4, dtype=D)
    with torch.no_grad():
        for i in range(4):
            co.forward_step(x[:, :, i])
        co.clean_state(streams=[0])
        co.forward_step(x[:, :, 4])
        saved = co.get_state()
        a = [co.forward_step(x[:, :, i]) for i in range(5, 9)]
        co.clean_state()
        co.set_state(saved)
        b = [co.forward_step(x[:, :, i]) for i in range(5, 9)]
    assert all(torch.equal(p.nan_to_num(7.0), q.nan_to_num(7.0)) for p, q in zip(a, b))


def test_forward_step_refuses_a_step_that_yields_several_frames():
    """Padding in front of a recurrent layer that returns every frame: the first frame completes 3 output
    frames, which forward_step cannot return one by one (it says so; forward_steps returns them)."""
    model = seeded(PadRecurrent, "frames", 2)
    co = cofx.convert(model, seq(6))
    x = torch.randn(2, 3, 6, dtype=D)
    with torch.no_grad():
        co.clean_state()
        with pytest.raises(cofx.StreamError, match="completed 3 output frames.*forward_steps"):
            co.forward_step(x[:, :, 0])
        co.clean_state()
        got = co.forward_steps(x, pad_end=True)
        assert max_error(got, model(x)) <= 1e-12


@pytest.mark.parametrize("read,pad", [("last", 1), ("last", 2), ("hn", 2)])
def test_restart_with_causal_padding_before_a_recurrent_layer_is_refused(read, pad):
    """The frames padding adds at the start reach the recurrence all at once: a one-frame step cannot feed them,
    so streams are not restarted apart (in phase the model is exact)."""
    co = cofx.convert(seeded(PadRecurrent, read, pad), seq(6))
    assert co.is_exact
    with torch.no_grad():
        co.clean_state()
        co.forward_steps(torch.randn(2, 3, 4, dtype=D))
        with pytest.raises(cofx.StreamError, match="cannot restart some streams.*padding adds at the start"):
            co.clean_state(streams=[1])


def test_onnx_export_with_causal_padding_before_a_recurrent_layer_is_refused(tmp_path):
    torch.manual_seed(0)
    co = cofx.convert(PadRecurrent("last", 2).eval(), torch.randn(1, 3, 6))
    with pytest.raises(cofx.StreamError, match="padding adds at the start"):
        cofx.export_onnx(co, os.path.join(tmp_path, "p.onnx"))


@pytest.mark.parametrize("make", [lambda: seeded(PositionsThenGRU), lambda: seeded(StartTokenGRU)],
                         ids=["positions sliced by T", "start token along time"])
def test_recurrent_in_a_window_is_refused_for_the_right_reason(make):
    msg = assert_refused(make(), seq())
    assert "given an initial state" not in msg, msg


def test_traced_graph_divergence_after_a_per_frame_fold_is_diagnosed():
    msg = assert_refused(seeded(TraceDiverges), video(5, 4), "does not match the clip model")
    assert "traced graph differs" in msg and "node 'reshape'" not in msg, msg


def test_time_reducing_leaf_is_not_said_to_mix_rows():
    leaf = TimeReducingLeaf()
    x = torch.randn(2, 3, 6, dtype=D)
    assert torch.equal(leaf(x)[:1], leaf(x[:1]))   # it does keep rows apart
    try:
        co = cofx.convert(seeded(WithLeaf, leaf), seq())
    except cofx.ConversionError as e:
        assert "mixes the rows of its batch" not in str(e), str(e)
    else:
        assert co.is_exact


def test_recurrent_over_folded_frames_says_what_to_do():
    assert_refused(seeded(RowLSTM), video(6, 4), "fix:")
