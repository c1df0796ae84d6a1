"""A crop of the frames a convolution computes from its end padding is folded into it: the locuslab TCN
(pad both ends, chomp the end) steps with delay 0 and the same values."""
import random

import pytest
import torch
from torch import nn

import cofx
from cofx.verify import by_chunks, by_frame, chunk_sizes, max_error

D = torch.float64


class Chomp(nn.Module):
    """The end crop, written as x[:, :, :-p] or with the tensor's own size (both in the wild)."""
    def __init__(self, p, form="negative"):
        super().__init__()
        self.p, self.form = p, form

    def forward(self, x):
        if self.form == "size":
            return x[:, :, :x.size(2) - self.p].contiguous()
        if self.form == "shape":
            return x[:, :, 0:x.shape[-1] - self.p]
        return x[:, :, :-self.p].contiguous()


class TemporalBlock(nn.Module):
    """As in Bai et al.'s TCN: two padded, chomped dilated convolutions and a residual."""

    def __init__(self, cin, cout, k, d, chomp, form="negative"):
        super().__init__()
        p = (k - 1) * d
        self.net = nn.Sequential(nn.Conv1d(cin, cout, k, padding=p, dilation=d), Chomp(chomp or p, form), nn.ReLU(),
                                 nn.Conv1d(cout, cout, k, padding=p, dilation=d), Chomp(chomp or p, form), nn.ReLU())
        self.down = nn.Conv1d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        return torch.relu(self.net(x) + (x if self.down is None else self.down(x)))


@pytest.mark.parametrize("seed", range(12))
def test_chomped_tcns_are_causal_and_exact(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    widths = [rng.choice([2, 3, 4]) for _ in range(rng.randint(1, 3) + 1)]
    k, form = rng.choice([2, 3, 5]), rng.choice(["negative", "size", "shape"])
    blocks = [TemporalBlock(a, b, k, 2 ** i, None, form) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
    model = nn.Sequential(*blocks).to(D).eval()
    clip = torch.randn(1, widths[0], rng.randint(6, 20), dtype=D)
    co = cofx.convert(model, clip)
    assert co.delay == 0 and co.is_exact
    assert co.receptive_field == 1 + sum(2 * (k - 1) * 2 ** i for i in range(len(blocks)))
    x = torch.randn(2, widths[0], 25, dtype=D)
    with torch.no_grad():
        want = model(x)
        assert max_error(co.forward_steps(x, pad_end=True), want) < 1e-12
        co.clean_state()
        assert max_error(by_frame(co, x), want) < 1e-12
        co.clean_state()
        assert max_error(by_chunks(co, x, chunk_sizes(25, rng)), want) < 1e-12


def test_a_crop_that_takes_more_than_the_end_padding_keeps_the_rest():
    """Chomp 3 of a convolution padded by 2: 2 folded, 1 frame still cropped (delay 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 2, 3, padding=2), Chomp(3)).to(D).eval()
    co = cofx.convert(model, torch.randn(1, 2, 9, dtype=D))
    assert co.delay == 1
    row = next(r for r in co.report if r.name == "getitem")
    assert "crop 0 at start, 1 at end (2 more" in row.note
    x = torch.randn(2, 2, 12, dtype=D)
    with torch.no_grad():
        assert max_error(co.forward_steps(x, pad_end=True), model(x)) < 1e-12


def test_a_convolution_read_elsewhere_keeps_its_padding():
    """The conv's padded frames reach another user too: nothing is folded."""
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=2)

        def forward(self, x):
            h = self.conv(x)
            return h[:, :, :-2] + h[:, :, 2:]
    torch.manual_seed(0)
    model = Both().to(D).eval()
    co = cofx.convert(model, torch.randn(1, 2, 9, dtype=D))
    assert co.delay == 2
    x = torch.randn(2, 2, 12, dtype=D)
    with torch.no_grad():
        assert max_error(co.forward_steps(x, pad_end=True), model(x)) < 1e-12
