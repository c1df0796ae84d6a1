"""Tiny clip models for the command-line tests, importable by the `cofx` subprocesses (tests/ on PYTHONPATH)."""
import torch
from torch import nn
import torch.nn.functional as F


class Tiny(nn.Module):
    """A residual 3D CNN whose last pool spans the clip, so cofx infers the input (1, 3, 6, 8, 8).

    The skip connection around `res` arrives one frame early: the add gets a 1-frame delay buffer.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(3, 4, 3, padding=1)
        self.res = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
        self.head = nn.Conv3d(4, 4, (3, 1, 1))
        self.pool = nn.AvgPool3d((4, 8, 8), stride=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.res(x)
        return self.fc(self.pool(self.head(x)).flatten(1))


class Open(nn.Module):
    """Global adaptive pooling: nothing in the model tells the clip length (needs --input-shape)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool3d(self.conv(x), 1).flatten(1))


class Flipped(Open):
    """Reverses time: no continual form (cofx refuses it)."""

    def forward(self, x):
        return super().forward(torch.flip(x, [2]))


class Squeeze(Open):
    """Squeeze-and-excitation over the whole clip mid-network, a layer after it: a windowed approximation."""

    def __init__(self):
        super().__init__()
        self.after = nn.Conv3d(4, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        x = self.after(x * torch.sigmoid(x.mean((2, 3, 4), keepdim=True)))
        return self.fc(x.mean((2, 3, 4)))


class Recurrent(nn.Module):
    """A GRU over (B, T, C) sensor frames: time is dimension 1, and the receptive field is unbounded."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def tiny():
    torch.manual_seed(0)
    return Tiny()


def hub_style(pretrained=True):
    """Like pytorchvideo's hub builders, which download weights when pretrained=True."""
    if pretrained:
        raise RuntimeError("tried to download weights")
    return tiny()


def open_model():
    torch.manual_seed(0)
    return Open()


def flipped():
    return Flipped()


def squeeze():
    torch.manual_seed(0)
    return Squeeze()


def recurrent():
    torch.manual_seed(0)
    return Recurrent()


def not_a_model():
    return 42


def unpicklable():
    """`tiny()` holding a lambda, as pytorchvideo's X3D does: its graph cannot be pickled."""
    model = tiny()
    model.stem.scale = lambda x: x
    return model


def corrupted():
    """`tiny()`, with cofx's sliding kernels patched to be slightly wrong: its continual form no longer matches."""
    from cofx import kernels
    forward = kernels.Sliding.forward

    def wrong(self, x, *tensors):
        out = forward(self, x, *tensors)
        return out * 1.01
    kernels.Sliding.forward = wrong
    return tiny()


class FunctionalPools(nn.Module):
    """Max pools called as functions (torch builds F.max_pool1d and F.adaptive_max_pool1d as local functions)."""
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        h = F.max_pool1d(torch.relu(self.conv(x)), 2)
        return self.fc(F.adaptive_max_pool1d(h, 1).flatten(1))
