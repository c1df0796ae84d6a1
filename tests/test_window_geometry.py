"""The window rules every stepping path shares (`cofx.window_geometry`) agree with PyTorch's pools, and their
int (eager, in phase) and per-row tensor (fixed-shape step) forms agree with each other."""
import random

import pytest
import torch
import torch.nn.functional as F

from cofx.window_geometry import WindowGeometry


def _configs(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        k = rng.randint(1, 6)
        s = rng.randint(1, 4)
        p = rng.randint(0, k // 2)
        yield k, s, p, rng.random() < 0.5, rng.random() < 0.5, rng.randint(k, 20)


@pytest.mark.parametrize("k, s, p, ceil_mode, include_pad, length", list(_configs(60)))
def test_outputs_and_divisors_match_avg_pool1d(k, s, p, ceil_mode, include_pad, length):
    g = WindowGeometry(span=k, stride=s, pad_l=p, pad_r=p, ceil_mode=ceil_mode, avg_count=(k, include_pad))
    ones = torch.ones(1, 1, length, dtype=torch.float64)
    avg = F.avg_pool1d(ones * 2.0, k, s, p, ceil_mode=ceil_mode, count_include_pad=include_pad)
    padded = p + length + g.end_frames(p + length)   # what a flush leaves: start padding, frames, end padding
    assert g.last_window(padded) + 1 == avg.shape[-1]
    # the average of ones over the real frames, divided by what PyTorch counts, is real frames / counted
    real = F.avg_pool1d(F.pad(ones, (p, padded - p - length)), k, s, 0, count_include_pad=True) * k
    counted = torch.tensor([g.frames_counted(j, p + length) for j in range(avg.shape[-1])], dtype=torch.float64)
    torch.testing.assert_close(avg[0, 0], 2.0 * real[0, 0, :avg.shape[-1]] / counted, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k, s, p, ceil_mode, include_pad, length", list(_configs(20, seed=1)))
def test_int_and_per_row_counters_agree(k, s, p, ceil_mode, include_pad, length):
    g = WindowGeometry(span=k, stride=s, pad_l=p, pad_r=p, ceil_mode=ceil_mode, avg_count=(k, include_pad))
    m = torch.arange(p, p + length)
    nj = torch.tensor([g.next_window(int(v)) for v in m])
    assert g.completes(m + 1, nj).tolist() == [g.completes(int(v) + 1, int(j)) for v, j in zip(m, nj)]
    assert g.frames_counted(nj).tolist() == [g.frames_counted(int(j)) for j in nj]


def test_a_frame_completes_at_most_one_window_after_the_start():
    # what lets a one-frame step advance next_j by one at most
    for k, s, p, *_ in _configs(40, seed=2):
        g = WindowGeometry(span=k, stride=s, pad_l=p, pad_r=p)
        assert all(g.next_window(m + 1) - g.next_window(m) <= 1 for m in range(p, p + 30))
