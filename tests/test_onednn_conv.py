"""Few-frame 3D convolutions routed to oneDNN: the same values as `F.conv3d`, and the standard op wherever a
tracer, a dispatch mode, autograd or an export is watching."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cofx
from cofx import onednn_conv

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _calls(fn) -> list:
    """The aten ops `fn` runs, by name (seen through the profiler, which is no dispatch mode)."""
    with torch.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.events()]


def _random_conv(rng: random.Random):
    groups = rng.choice([1, 1, 1, 2])
    cin, cout = groups * rng.randint(1, 6), groups * rng.randint(1, 6)
    kernel = (rng.choice([1, 2, 3]), rng.choice([1, 3, 5]), rng.choice([1, 3]))
    stride = (1, rng.choice([1, 2]), rng.choice([1, 2]))
    dilation = (rng.choice([1, 2]), rng.choice([1, 2]), 1)
    padding = (0, rng.randint(0, 2), rng.randint(0, 1))
    frames = dilation[0] * (kernel[0] - 1) + rng.randint(1, 5)
    x = torch.randn(1, cin, frames, rng.randint(5, 40), rng.randint(5, 40))
    if rng.random() < 0.3:   # a view of a longer buffer, as a window of a chunk is
        x = torch.randn(1, cin, frames + 2, *x.shape[3:])[:, :, 1:-1]
    weight = torch.randn(cout, cin // groups, *kernel)
    bias = torch.randn(cout) if rng.random() < 0.7 else None
    return x, weight, bias, stride, padding, dilation, groups


@pytest.mark.parametrize("seed", range(40))
def test_equals_f_conv3d_over_random_configurations(seed, monkeypatch):
    monkeypatch.setattr(onednn_conv, "MIN_MACS", 0)   # route every configuration PyTorch would run natively
    x, weight, bias, stride, padding, dilation, groups = _random_conv(random.Random(seed))
    with torch.no_grad():
        got = onednn_conv.conv3d(x, weight, bias, stride, padding, dilation, groups)
        want = F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * (want.abs().max() + 1)


def test_a_spatial_conv_of_a_few_frames_runs_in_onednn_and_a_pointwise_one_natively():
    spatial = torch.randn(32, 16, 3, 3, 3), torch.randn(1, 16, 5, 56, 56)
    pointwise = torch.randn(32, 16, 1, 1, 1), torch.randn(1, 16, 1, 28, 28)
    with torch.no_grad():
        assert "aten::mkldnn_convolution" in _calls(lambda: onednn_conv.conv3d(spatial[1], spatial[0], None, 1,
                                                                                (0, 1, 1), 1, 1))
        assert "aten::mkldnn_convolution" not in _calls(lambda: onednn_conv.conv3d(pointwise[1], pointwise[0], None,
                                                                                    1, 0, 1, 1))


def test_the_standard_op_under_a_dispatch_mode_autograd_or_standard_ops():
    weight, x = torch.randn(32, 16, 3, 3, 3), torch.randn(1, 16, 5, 56, 56)
    conv = lambda: onednn_conv.conv3d(x, weight, None, 1, (0, 1, 1), 1, 1)   # noqa: E731
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        conv()
    assert flops.get_total_flops() == 2 * 32 * 16 * 27 * 3 * 56 * 56   # counted: the op was aten.convolution
    with onednn_conv.standard_ops(), torch.no_grad():
        assert "aten::mkldnn_convolution" not in _calls(conv)
    weight.requires_grad_(True)
    out = conv()
    out.sum().backward()
    assert weight.grad is not None and "aten::mkldnn_convolution" not in _calls(conv)
    with torch.no_grad():   # float64 is not routed
        assert "aten::mkldnn_convolution" not in _calls(
            lambda: onednn_conv.conv3d(x.double(), weight.double(), None, 1, (0, 1, 1), 1, 1))


def test_chunks_of_a_float32_stream_step_through_onednn_and_equal_the_clip():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv3d(32, 8, (3, 3, 3), padding=(2, 1, 1), dilation=(2, 1, 1))).eval()
    clip = torch.randn(1, 16, 9, 40, 40)
    co = cofx.convert(model, clip, tune=False)
    with torch.no_grad():
        want = model(clip)
        co.clean_state()
        calls = _calls(lambda: co.forward_steps(clip[:, :, :4]))
        co.clean_state()
        got = torch.cat([o for o in (co.forward_steps(clip[:, :, :4]), co.forward_steps(clip[:, :, 4:]),
                                     co.forward_steps(clip[:, :, :0], pad_end=True)) if o is not None], 2)
    assert "aten::mkldnn_convolution" in calls
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4 * want.abs().max()
