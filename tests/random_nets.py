"""Random small DAGs built from the blocks streaming models are made of (used by property tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

C = 4


def conv(nd, k, s=1, p=0, d=1, groups=1, cin=C, cout=C):
    sp = (3,) * (nd - 1)
    return getattr(nn, f"Conv{nd}d")(cin, cout, (k,) + sp, stride=(s,) + (1,) * (nd - 1),
                                     padding=(p,) + (1,) * (nd - 1), dilation=(d,) + (1,) * (nd - 1), groups=groups)


class Block(nn.Module):
    def __init__(self, nd, kind, k, d, offset, groups):
        super().__init__()
        self.kind, self.nd = kind, nd
        span = d * (k - 1) + 1
        same = span // 2
        if kind == "residual":        # same-padded residual
            self.a = conv(nd, k, p=same, d=d, groups=groups)
            self.b = conv(nd, 1)
        elif kind == "cropped":       # unpadded branch, skip cropped to match (centred, lagging or leading)
            self.a = conv(nd, k, p=0, d=d)
            self.start = offset % span
            self.end = span - 1 - self.start
        elif kind == "concat":        # two branches of different reach, concatenated over channels
            self.a = conv(nd, k, p=same, d=d, cout=C // 2)
            self.b = getattr(nn, f"MaxPool{nd}d")((3,) + (1,) * (nd - 1), 1, (1,) + (0,) * (nd - 1))
            self.c = conv(nd, 1, cout=C // 2)
        elif kind == "gate":          # sigmoid gate
            self.a = conv(nd, k, p=same, d=d)
        elif kind == "strided":       # strided stage with a strided 1x1 shortcut
            self.a = conv(nd, k, s=2, p=(k - 1) // 2)
            self.b = conv(nd, 1, s=2)
        elif kind == "pool":
            self.a = getattr(nn, f"AvgPool{nd}d")((k,) + (1,) * (nd - 1), (1,) * nd, (k // 2,) + (0,) * (nd - 1),
                                                   count_include_pad=bool(offset % 2))
        self.span = span

    def forward(self, x):
        if self.kind == "residual":
            return x + self.b(torch.relu(self.a(x)))
        if self.kind == "cropped":
            return self.a(x) + x[:, :, self.start:x.shape[2] - self.end]
        if self.kind == "concat":
            return torch.cat([self.a(x), self.c(self.b(x))], dim=1)
        if self.kind == "gate":
            return x * torch.sigmoid(self.a(x))
        if self.kind == "strided":
            return torch.relu(self.a(x)) + self.b(x)
        return self.a(x)


class RandomNet(nn.Module):
    def __init__(self, nd, blocks, head):
        super().__init__()
        self.stem = conv(nd, 1, cin=2)
        self.blocks = nn.ModuleList(Block(nd, *b) for b in blocks)
        self.head, self.nd = head, nd
        self.fc = nn.Linear(C, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        if self.head == "mean":
            dims = tuple(range(2, self.nd + 2))
            return self.fc(x.mean(dims))
        return x


@st.composite
def random_nets(draw):
    nd = draw(st.sampled_from([1, 3]))
    n = draw(st.integers(1, 4))
    blocks = []
    for _ in range(n):
        kind = draw(st.sampled_from(["residual", "cropped", "concat", "gate", "strided", "pool"]))
        k = draw(st.sampled_from([1, 2, 3, 5])) if kind == "cropped" else draw(st.sampled_from([1, 3, 5]))
        d = draw(st.integers(1, 2)) if kind in ("residual", "cropped", "gate") else 1
        if kind == "pool":
            k = draw(st.sampled_from([1, 3]))
        blocks.append((kind, k, d, draw(st.integers(0, 9)), draw(st.sampled_from([1, 2]))))
    head = draw(st.sampled_from(["mean", "stream"]))
    return RandomNet(nd, blocks, head).double().eval(), nd


def shortest_clip(model, nd, extra: int) -> torch.Tensor:
    """The shortest clip the model accepts, plus `extra` frames."""
    for t in range(1, 200):
        x = torch.randn(2, 2, t, *(4,) * (nd - 1), dtype=torch.float64)
        try:
            with torch.no_grad():
                y = model(x)
            if y.numel():
                break
        except RuntimeError:
            continue
    return torch.randn(2, 2, t + extra, *(4,) * (nd - 1), dtype=torch.float64)


class CausalTCN(nn.Module):
    """Causal padding that covers whole windows (a burst on the first call), a strided conv, a count-excluding
    average, a crop merged back and a global mean: every timing case of the kernels."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3)
        self.c2 = nn.Conv1d(4, 4, 3, stride=2, padding=1)
        self.p = nn.AvgPool1d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        y = torch.relu(self.c(F.pad(x, (2, 0))))
        z = self.c2(y)
        return (self.p(z) + z[:, :, 1:z.shape[2] - 1].mean(2, keepdim=True)).mean(2)
