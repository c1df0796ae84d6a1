"""Average pools over their whole input become means in recorded step graphs, with the same values; others
stay."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from cofx.whole_pools import POOLS, whole_pools_as_means

AVG = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def pools(gm) -> int:
    return sum(n.op == "call_function" and n.target in POOLS for n in gm.graph.nodes)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.integers(1, 2), st.integers(1, 4), st.data(), st.booleans(), st.booleans())
def test_whole_window_pools_become_means_with_the_same_values(nd, batch, channels, data, ceil_mode, include_pad):
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=nd, max_size=nd))
    stride = data.draw(st.integers(1, 3))
    pool = AVG[nd](sizes, stride=stride, ceil_mode=ceil_mode, count_include_pad=include_pad)
    x = torch.randn(batch, channels, *sizes, dtype=torch.float64)
    window = x.transpose(1, -1).contiguous().transpose(1, -1)   # strided, as a window of a ring
    gm = make_fx(lambda v: pool(v.relu()) * 2)(window)
    assert whole_pools_as_means(gm) == 1 and pools(gm) == 0
    got, want = gm(window), pool(window.relu()) * 2
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool, shape", [
    (nn.AvgPool3d(3, padding=1), (1, 2, 3, 3, 3)),           # padding: the window reaches outside the input
    (nn.AvgPool3d(2), (1, 2, 3, 3, 3)),                      # a window smaller than the input
    (nn.AvgPool2d(3, divisor_override=2), (1, 2, 3, 3)),
    (nn.MaxPool2d(3), (1, 2, 3, 3)),
])
def test_other_pools_stay(pool, shape):
    x = torch.randn(shape)
    gm = make_fx(pool)(x)
    assert whole_pools_as_means(gm) == 0
    assert torch.allclose(gm(x), pool(x))
