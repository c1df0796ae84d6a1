"""What makes steps fast never changes what they compute: folded BatchNorms follow their weights,
delay buffers own what they keep, ring buffers read in order."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import cofx
from guarantees import assert_equivalent, clip_output, max_err, steps_frame_by_frame, tolerance
from test_single_layers import conv_layers

D = torch.float64


def conv_bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                        nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), groups=2, bias=False), nn.BatchNorm3d(4))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net.double().eval()


def stream(T=9):
    return torch.randn(2, 3, T, 4, 4, dtype=D)


def assert_steps_match_forward(co, x):
    co.clean_state()
    with torch.no_grad():
        got = steps_frame_by_frame(co, x)
        want = clip_output(co, co(x))
    assert max_err(got, want) <= tolerance(want)


def test_batchnorms_after_convs_are_folded():
    co = cofx.convert(conv_bn_net(), stream())
    assert co.step_code.count("BatchNorm") == 0 and "self.co_1_bn" not in co.step_code
    assert sum(type(m).__name__ == "BatchNormFold" for m in co.children()) == 2
    assert_steps_match_forward(co, stream())


def test_folded_batchnorm_follows_changed_weights():
    co = cofx.convert(conv_bn_net(), stream())
    x = stream()
    assert_steps_match_forward(co, x)
    with torch.no_grad():
        co.get_submodule("1").running_var.mul_(3)           # in place, as a training step would
        co.get_submodule("0").weight.add_(0.5)
        co.get_submodule("4").running_mean.add_(1)
    assert_steps_match_forward(co, x)
    other = conv_bn_net()
    with torch.no_grad():
        for p in other.parameters():
            p.uniform_(-1, 1)
    co.load_state_dict(other.state_dict())
    assert_steps_match_forward(co, x)
    co.get_submodule("1").weight = nn.Parameter(torch.rand(4, dtype=D))   # replaced, not changed in place
    assert_steps_match_forward(co, x)


def test_folded_batchnorm_passes_gradients():
    co = cofx.convert(conv_bn_net(), stream())
    x = stream()
    co.forward_steps(x, pad_end=True).square().sum().backward()
    stepped = [p.grad.clone() for p in co.parameters()]
    co.zero_grad()
    co(x).square().sum().backward()
    for a, p in zip(stepped, co.parameters()):
        assert max_err(a, p.grad) <= tolerance(p.grad)


def test_batchnorm_switched_to_training_alone_is_refused():
    co = cofx.convert(conv_bn_net(), stream())
    co.get_submodule("1").train()
    with pytest.raises(cofx.StreamError, match=r"'1' \(BatchNorm3d\) is in training mode.*co.eval\(\)"):
        co.forward_step(stream()[:, :, 0])


def test_a_model_in_training_mode_with_every_batchnorm_frozen_steps():
    """Fine-tuning a head with the backbone's BatchNorms frozen in eval: nothing a step computes changes."""
    model = conv_bn_net().double()
    co = cofx.convert(model, stream())
    co.train()
    for m in co.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eval()
    x = stream()
    with torch.no_grad():
        got = co.forward_steps(x, pad_end=True)
        want = model.eval()(x)
    assert max_err(got, want) <= tolerance(want)


class MutatesAfterMerge(nn.Module):
    """A residual whose inputs are changed in place after the merge read them."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        skip = x * 2
        y = self.conv(x) + skip          # delay buffer on the skip path
        return y + self.act(skip - 1).sum(1, keepdim=True) + self.act(skip)   # the last relu_ rewrites skip


def test_delay_buffers_own_what_they_keep():
    model = MutatesAfterMerge().double().eval()
    co = cofx.convert(model, stream())
    x = stream(11)
    assert_equivalent(co, model, x)
    assert_steps_match_forward(co, x)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_layers(), st.lists(st.sampled_from(["frame", "frame", "frame", "chunk", "save", "peek"]),
                               min_size=8, max_size=30))
def test_single_frame_ring_buffers_survive_any_interleaving(layer, moves):
    """Steps of one frame run on a ring buffer; chunks, peeks and saved states read it in order."""
    conv, channels, nd, min_len = layer
    model = conv.double().eval()
    stream = torch.randn(2, channels, len(moves) * 4 + max(min_len, 1), *(5,) * (nd - 1), dtype=D)
    co = cofx.convert(model, stream.narrow(2, 0, max(min_len, 1) + 2))
    with torch.no_grad():
        co.clean_state()
        want = co.forward_steps(stream, pad_end=True)
        outs, at = [], 0
        for move in moves:
            if move == "save":
                co.set_state(co.get_state())
                continue
            n = 1 if move in ("frame", "peek") else 3
            chunk = stream.narrow(2, at, n)
            if move == "peek":
                co.forward_steps(chunk, update_state=False)
                co.forward_steps(chunk, pad_end=True, update_state=False)
            y = co.forward_steps(chunk)
            at += n
            if y is not None:
                outs.append(y)
        tail = co.forward_steps(stream.narrow(2, at, stream.shape[2] - at), pad_end=True)
        got = torch.cat(outs + ([tail] if tail is not None else []), 2)
    assert got.shape == want.shape and max_err(got, want) <= tolerance(want)


def test_steps_read_parametrized_and_replaced_weights_at_call_time():
    """A TCN with weight normalisation, its weights changed after conversion: the steps follow."""
    torch.manual_seed(0)
    from torch.nn.utils.parametrizations import weight_norm
    model = nn.Sequential(weight_norm(nn.Conv1d(3, 4, 3, padding=2)), nn.ReLU(), nn.Conv1d(4, 2, 1)).double().eval()
    x = torch.randn(2, 3, 9, dtype=D)
    co = cofx.convert(model, x)
    assert_steps_match_forward(co, x)
    with torch.no_grad():
        co.get_submodule("0").parametrizations.weight.original0.mul_(2)   # the norm g, in place
    co.get_submodule("2").weight = nn.Parameter(torch.randn(2, 4, 1, dtype=D))   # replaced
    assert_steps_match_forward(co, x)
    assert max_err(steps_frame_by_frame(co, x), model(x)) <= tolerance(model(x))


def test_hooks_on_the_models_modules_run_in_steps():
    model = conv_bn_net()
    calls = []
    model[2].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    co = cofx.convert(model, stream())
    calls.clear()
    with torch.no_grad():
        co.forward_step(stream()[:, :, 0])
    assert calls


def test_derived_weights_are_rebuilt_when_their_sources_change():
    from cofx.derived import Derived
    calls = []
    double = Derived(lambda t, u: calls.append(1) or t * 2 + (0 if u is None else u))
    a = torch.ones(3)
    assert torch.equal(double((a, None)), torch.full((3,), 2.0))
    assert torch.equal(double((a, None)), torch.full((3,), 2.0)) and len(calls) == 1   # cached
    a.add_(1)                                       # written in place
    assert torch.equal(double((a, None)), torch.full((3,), 4.0))
    a.data = torch.zeros(3)                         # other memory, same object
    assert torch.equal(double((a, None)), torch.zeros(3))
    del a                                           # a new tensor where the old one was: still rebuilt
    b = torch.zeros(3)
    assert torch.equal(double((b, torch.ones(3))), torch.ones(3)) and len(calls) == 4


class ViewsAcrossChannelsAndTime(nn.Module):
    """Frame-by-frame code that views its input across channels and time (valid on the default layout)."""
    def forward(self, x):
        b, c, t, h, w = x.shape
        return x.view(b, c * t, h, w).view(b, c, t, h, w) * 2


@pytest.mark.parametrize("impl", ["conv3d_cl", "fold2d", "taps2d", "matmul"])
def test_fast_layouts_never_leak_to_the_models_code(impl, monkeypatch):
    import importlib
    sk = importlib.import_module("cofx.passes.select_kernels")
    monkeypatch.setattr(sk, "_fastest", lambda candidates: impl if impl in candidates else next(iter(candidates)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), ViewsAcrossChannelsAndTime(),
                          nn.Conv3d(4, 4, 1), ViewsAcrossChannelsAndTime()).eval()
    x = stream(10).float()   # float32: the layouts are oneDNN's, which has no float64 kernels
    co = cofx.convert(model, x, leaf_modules=[ViewsAcrossChannelsAndTime])
    assert impl in {n.meta.get("cofx_impl") for n in co.graph.nodes}
    assert_equivalent(co, model, x)
    assert_steps_match_forward(co, x)


@pytest.mark.parametrize("change", ["training forward", "eps"])
def test_folded_batchnorm_follows_statistics_a_training_forward_updates(change):
    """BatchNorm re-calibration (forwards in training mode, no optimizer) and a changed epsilon reach the
    folded weights of steps: the running statistics change without a version of their own."""
    model = conv_bn_net().double().eval()
    clip = torch.randn(1, 3, 6, 5, 5, dtype=D)
    co = cofx.convert(model, clip)
    with torch.no_grad():
        co.forward_steps(clip, pad_end=True)   # folds cached
        if change == "eps":
            model[1].eps = 0.5
        else:
            co.train()
            for _ in range(2):
                co(torch.randn(2, 3, 6, 5, 5, dtype=D))
            co.eval()
        co.clean_state()
        got, want = co.forward_steps(clip, pad_end=True), model(clip)
        frames = [co.forward_step(clip[:, :, i]) for i in range(6)]
    assert max_err(got, want) <= tolerance(want)
    stepped = torch.stack([f for f in frames if f is not None], 2)   # frame by frame: the ring's rolled weights
    assert max_err(stepped, want[:, :, :stepped.shape[2]]) <= tolerance(want)
