"""Convolutions of one pixel become sums of products in recorded step graphs, with the same values; others stay."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from cofx.pixel_convs import pixel_convs_as_sums

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def convolutions(gm) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution.default))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.booleans(),
       st.integers(1, 2))
def test_pixel_convolutions_become_matrix_products_with_the_same_values(nd, batch, cin, cout, bias, stride):
    torch.manual_seed(cin * 10 + cout)
    conv = CONVS[nd](cin, cout, 1, stride=stride, bias=bias).double()
    x = torch.randn(batch, cin, *(1,) * nd, dtype=torch.float64)
    gm = make_fx(lambda v: torch.sigmoid(conv(torch.relu(v))))(x)
    assert pixel_convs_as_sums(gm) == 1 and convolutions(gm) == 0
    got, want = gm(x), torch.sigmoid(conv(torch.relu(x)))
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv3d(4, 6, 1, padding=1), (1, 4, 1, 1, 1)),      # padding: the output has more than one pixel
    (nn.Conv3d(4, 6, 1, groups=2), (1, 4, 1, 1, 1)),
    (nn.Conv3d(4, 6, 1), (1, 4, 2, 1, 1)),                 # more than one pixel
    (nn.Conv2d(4, 6, 3), (1, 4, 3, 3)),                    # a larger kernel
    (nn.ConvTranspose2d(4, 6, 1), (1, 4, 1, 1)),
])
def test_other_convolutions_stay(conv, shape):
    x = torch.randn(shape)
    gm = make_fx(conv)(x)
    assert pixel_convs_as_sums(gm) == 0 and convolutions(gm) == 1
    assert torch.allclose(gm(x), conv(x))
