"""Property tests: every single temporal layer, over random configurations, is exact and well-behaved."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import cofx
from guarantees import assert_delay, assert_equivalent, assert_stream_discipline

SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _spatial(nd):
    return (5,) * (nd - 1)


@st.composite
def conv_layers(draw):
    nd = draw(st.sampled_from([1, 2, 3]))
    k = draw(st.integers(1, 5))
    s = draw(st.integers(1, 3))
    d = draw(st.integers(1, 3)) if k > 1 else 1
    p = draw(st.integers(0, d * (k - 1)))
    groups = draw(st.sampled_from([1, 2]))
    ks = draw(st.sampled_from([1, 3]))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "replicate"]))
    cin, cout = 2 * groups, 2 * groups
    conv = getattr(nn, f"Conv{nd}d")(cin, cout, (k,) + (ks,) * (nd - 1), stride=(s,) + (1,) * (nd - 1),
                                     padding=(p,) + (ks // 2,) * (nd - 1), dilation=(d,) + (1,) * (nd - 1),
                                     groups=groups, padding_mode=padding_mode)
    return conv, cin, nd, d * (k - 1) + 1 - 2 * p


@st.composite
def pool_layers(draw):
    nd = draw(st.sampled_from([1, 2, 3]))
    kind = draw(st.sampled_from(["avg", "max"]))
    k = draw(st.integers(1, 5))
    s = draw(st.integers(1, 3))
    p = draw(st.integers(0, k // 2))
    ceil = draw(st.booleans())
    ks = draw(st.sampled_from([1, 2, 3]))
    kernel, stride, padding = (k,) + (ks,) * (nd - 1), (s,) + (1,) * (nd - 1), (p,) + (ks // 2,) * (nd - 1)
    if kind == "avg":
        pool = getattr(nn, f"AvgPool{nd}d")(kernel, stride, padding, ceil_mode=ceil,
                                            count_include_pad=draw(st.booleans()))
        span = k
    else:
        d = draw(st.integers(1, 3)) if k > 1 else 1
        pool = getattr(nn, f"MaxPool{nd}d")(kernel, stride, padding, dilation=(d,) + (1,) * (nd - 1),
                                            ceil_mode=ceil)
        span = d * (k - 1) + 1
    return pool, 3, nd, span  # PyTorch pools need the unpadded input to cover the kernel


def _check_layer(layer, channels, nd, min_len, extra):
    model = layer.double().eval()
    T = max(min_len, 1) + extra
    clip = torch.randn(2, channels, T, *_spatial(nd), dtype=torch.float64)
    co = cofx.convert(model, clip)
    assert co.is_exact
    assert_equivalent(co, model, clip)
    stream = torch.randn(2, channels, 3 * co.receptive_field + 7, *_spatial(nd), dtype=torch.float64)
    assert_stream_discipline(co, stream)
    assert_delay(co, stream)


@settings(**SETTINGS)
@given(conv_layers(), st.integers(0, 6))
def test_conv_layers(layer, extra):
    _check_layer(*layer, extra)


@st.composite
def conv_batchnorm_layers(draw):
    """A conv followed by a BatchNorm with random statistics: the step folds the BatchNorm into the conv."""
    conv, cin, nd, min_len = draw(conv_layers())
    bn = getattr(nn, f"BatchNorm{nd}d")(conv.out_channels, affine=draw(st.booleans()))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=g)
        bn.running_var.uniform_(0.5, 2, generator=g)
        if bn.affine:
            bn.weight.uniform_(-2, 2, generator=g)
            bn.bias.uniform_(-1, 1, generator=g)
    if draw(st.booleans()):
        conv.bias = None
    return nn.Sequential(conv, bn), cin, nd, min_len


@settings(**SETTINGS)
@given(conv_batchnorm_layers(), st.integers(0, 6))
def test_conv_batchnorm_layers(layer, extra):
    _check_layer(*layer, extra)


@settings(**SETTINGS)
@given(pool_layers(), st.integers(0, 6))
def test_pool_layers(layer, extra):
    _check_layer(*layer, extra)


@pytest.mark.parametrize("pool", [nn.AvgPool1d(3, 3, ceil_mode=True, count_include_pad=False),
                                  nn.AvgPool1d(4, 2, 1, ceil_mode=True), nn.MaxPool1d(3, 3, ceil_mode=True),
                                  nn.MaxPool1d(4, 3, 1, ceil_mode=True)], ids=repr)
def test_ceil_mode_pools_of_clips_shorter_than_their_window(pool):
    """In ceil mode a clip shorter than the window still gives the window that starts in it (torch's rule):
    the flush completes it."""
    model = nn.Sequential(nn.Conv1d(2, 3, 1), pool).double().eval()
    k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    for t in range(1, k + 1):
        clip = torch.randn(2, 2, t, dtype=torch.float64)
        try:
            want = model(clip)
        except RuntimeError:   # a length torch refuses
            continue
        co = cofx.convert(model, clip)
        assert_equivalent(co, model, clip)


@pytest.mark.parametrize("k,p,s", [(3, 1, 1), (5, 2, 2), (3, 0, 1), (1, 0, 2)])
def test_delay_follows_the_paper_rule(k, p, s):
    """d = f - p - 1 for one op."""
    co = cofx.convert(nn.Conv1d(1, 1, k, stride=s, padding=p).eval(), torch.randn(1, 1, 12))
    assert co.delay == k - p - 1
    assert co.receptive_field == k
    assert co.stride == s


def test_functional_forms_match_modules():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3, 3, dtype=torch.float64))

        def forward(self, x):
            y = torch.nn.functional.conv3d(x, self.w, None, (1, 1, 1), (1, 1, 1))
            y = torch.nn.functional.max_pool3d(y, (3, 1, 1), (2, 1, 1), (1, 0, 0))
            return torch.nn.functional.avg_pool3d(y, (2, 1, 1), (1, 1, 1), count_include_pad=False)

    model = Functional().eval()
    clip = torch.randn(1, 3, 9, 4, 4, dtype=torch.float64)
    co = cofx.convert(model, clip)
    assert [r.kind for r in co.report if r.kind == "sliding"] == ["sliding"] * 3
    assert_equivalent(co, model, clip)
    assert_stream_discipline(co, torch.randn(1, 3, 30, 4, 4, dtype=torch.float64))


@st.composite
def conv3d_windows(draw):
    k = draw(st.integers(1, 4))
    d = draw(st.integers(1, 2)) if k > 1 else 1
    groups = draw(st.sampled_from([1, 2, 4]))
    ks = draw(st.sampled_from([1, 2, 3]))
    padding = draw(st.sampled_from(["same", (0, ks // 2, ks // 2), (1, 0, 1)]))
    stride = (1, draw(st.integers(1, 2)), 1) if padding != "same" else 1
    conv = nn.Conv3d(4, 4, (k, ks, ks), stride=stride, padding=padding, dilation=(d, 1, 1), groups=groups,
                     padding_mode=draw(st.sampled_from(["zeros", "replicate"])))
    return conv.double()


@settings(**SETTINGS)
@given(conv3d_windows())
def test_every_step_implementation_of_conv3d_computes_the_same_frame(conv):
    from cofx.sliding_ops import sliding_spec
    import torch.fx as fx
    gm = fx.symbolic_trace(nn.Sequential(conv))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    spec, _ = sliding_spec(node, gm, 2)
    frames = torch.randn(2, 4, spec.span, 6, 5, dtype=torch.float64)
    want = spec.compute(frames, conv.weight, conv.bias)
    for impl in spec.window_impls():
        got = spec.window(impl, frames, conv.weight, conv.bias)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12), impl


@pytest.mark.parametrize("impl", ["conv3d", "conv3d_cl", "fold2d", "taps2d"])
def test_conversion_with_each_step_implementation(impl, monkeypatch):
    """Whatever the timing picks, the stream is exact."""
    import importlib
    sk = importlib.import_module("cofx.passes.select_kernels")
    monkeypatch.setattr(sk, "_fastest", lambda candidates: impl if impl in candidates else next(iter(candidates)))
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1, dilation=(2, 1, 1)), nn.BatchNorm3d(4), nn.ReLU(),
                          nn.Conv3d(4, 4, (3, 1, 1), groups=4, stride=(2, 1, 1)), nn.Conv3d(4, 2, 1)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    clip = torch.randn(2, 3, 9, 5, 5, dtype=torch.float64)
    co = cofx.convert(model, clip)
    assert {n.meta.get("cofx_impl") for n in co.graph.nodes} - {None} == {impl}
    assert_equivalent(co, model, clip)
    assert_stream_discipline(co, torch.randn(2, 3, 25, 5, 5, dtype=torch.float64))
