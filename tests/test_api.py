"""The converted model's contract: same weights and forward, call modes, options, readable code."""
import pytest
import torch
from torch import nn

import cofx
from cofx.bench import bench
from guarantees import assert_equivalent, max_err

D = torch.float64


class ClipPool(nn.Module):
    """An X3D-like head: a temporal conv, a pool spanning the clip, a classifier."""
    def __init__(self, clip=6):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.pool = nn.AvgPool3d((clip, 4, 4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(y.flatten(1))


def model_and_clip(clip=6):
    torch.manual_seed(0)
    model = ClipPool(clip).double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 3, clip, 4, 4, dtype=D)


def test_same_weights_state_dict_and_forward():
    model, clip = model_and_clip()
    co = cofx.convert(model, clip)
    assert list(co.state_dict()) == list(model.state_dict())
    for (k, a), b in zip(co.state_dict().items(), model.state_dict().values()):
        assert a is b or torch.equal(a, b), k
    assert co.conv.weight is model.conv.weight
    assert torch.equal(co(clip), model(clip))
    co.load_state_dict(model.state_dict())   # strict: same keys


def test_clip_length_is_implied_by_the_pool():
    model, clip = model_and_clip(5)
    co = cofx.convert(model)
    assert co.clip_shape == (1, 3, 5, 4, 4)
    assert co.delay == 5 and co.receptive_field == 7
    assert_equivalent(co, model, torch.randn(1, 3, 5, 4, 4, dtype=D))


def test_call_modes():
    model, clip = model_and_clip()
    co = cofx.convert(model, clip)
    frames = [clip[:, :, i] for i in range(clip.shape[2])]
    expected = [co.forward_step(f) for f in frames]
    co.clean_state()
    co.call_mode = "forward_step"
    got = [co(f) for f in frames]
    assert [g is None for g in got] == [e is None for e in expected]
    assert all(torch.equal(g, e) for g, e in zip(got, expected) if e is not None)
    co.call_mode = "forward"
    co.clean_state()
    with cofx.call_mode("forward_steps"):
        steps = co(torch.cat([clip, clip], 2))
    co.clean_state()
    assert torch.equal(steps, co.forward_steps(torch.cat([clip, clip], 2)))
    assert torch.equal(co(clip), model(clip))
    with pytest.raises(ValueError, match="call_mode must be one of"):
        co.call_mode = "backward"


def test_window_of_the_clip_pool_can_be_extended():
    """The X3D option: pool over more frames than the trained clip (a sliding window, reported)."""
    model, clip = model_and_clip(4)
    co = cofx.convert(model, clip, window={"pool": 9})
    assert not co.is_exact
    row = next(r for r in co.report if r.name == "pool")
    assert row.kind == "windowed" and row.kernel == 9
    longer = ClipPool(9).double().eval()
    longer.load_state_dict(model.state_dict())
    stream = torch.randn(1, 3, 9, 4, 4, dtype=D)
    out = co.forward_steps(stream, pad_end=True)
    assert max_err(out[..., -1], longer(stream)) < 1e-12
    with pytest.raises(cofx.ConversionError, match="strict=True refuses windowed approximations: pool"):
        cofx.convert(model, clip, window={"pool": 9}, strict=True)


def test_window_patterns_a_default_and_an_override_and_a_typo():
    """A catch-all pattern beside a more specific one is a default (no typo); a pattern matching no reduction
    is refused naming it."""
    model, clip = model_and_clip(4)
    for windows, frames in (({"pool": 9, "*": 5}, 9), ({"*": 5}, 5)):
        row = next(r for r in cofx.convert(model, clip, window=windows).report if r.name == "pool")
        assert row.kernel == frames
    with pytest.raises(cofx.ConversionError, match=r"window= names \['poll'\], which are not global temporal"):
        cofx.convert(model, clip, window={"poll": 9})


def test_replicate_init_has_no_transient_on_a_still_scene():
    model, clip = model_and_clip()
    still = torch.randn(1, 3, 1, 4, 4, dtype=D).expand(1, 3, 20, 4, 4)
    co_zero = cofx.convert(model, clip)
    co_rep = cofx.convert(model, clip, init="replicate")
    assert co_zero.is_exact and not co_rep.is_exact
    z = co_zero.forward_steps(still)
    r = co_rep.forward_steps(still)
    assert z.shape == r.shape
    steady = r[..., -1:]
    assert max_err(r, steady.expand_as(r)) < 1e-12        # constant from the first output
    assert max_err(z[..., :1], steady) > 1e-6              # zero padding shows at the start
    with pytest.raises(cofx.ConversionError, match="init='replicate' is not exact"):
        cofx.convert(model, clip, init="replicate", strict=True)


def test_step_code_is_readable_python():
    model, clip = model_and_clip()
    co = cofx.convert(model, clip)
    code = co.step_code
    assert "self.co_conv_bn(conv_weight, conv_bias)" in code   # the BatchNorm folded into the conv
    assert "self.co_conv(x, getitem, getitem_1)" in code
    assert "self.bn(" not in code and "<" not in code
    assert "def forward(self, x)" in co.code


def test_report_rows_and_table():
    model, clip = model_and_clip()
    co = cofx.convert(model, clip)
    rows = {r.name: r for r in co.report}
    assert rows["conv"].kind == "sliding" and rows["conv"].kernel == 3 and rows["conv"].padding == (1, 1)
    assert rows["conv"].delay == 1 and rows["conv"].receptive_field == 3
    assert rows["conv"].state_bytes == 2 * 3 * 4 * 4 * 8     # two frames of (3, 4, 4) float64
    assert rows["pool"].kind == "reduction" and rows["pool"].delay == 6
    assert rows["fc"].kind == "pointwise" and rows["fc"].exact
    table = str(co.report)
    assert table.splitlines()[0].split()[:3] == ["node", "op", "kind"]
    assert len(co.report.to_dicts()) == len(co.report)


def test_training_mode_conversion_restores_mode():
    model, clip = model_and_clip()
    model.train()
    co = cofx.convert(model, clip)
    assert model.training and co.training
    co.eval()
    assert_equivalent(co, model.eval(), clip)


def test_streams_in_a_batch_are_independent():
    model, clip = model_and_clip()
    co = cofx.convert(model, clip)
    stream = torch.randn(3, 3, 15, 4, 4, dtype=D)
    together = co.forward_steps(stream, pad_end=True)
    for b in range(3):
        alone = co.forward_steps(stream[b:b + 1], pad_end=True)
        assert torch.allclose(alone, together[b:b + 1], atol=1e-12)


def test_float32_within_rounding():
    model, clip = model_and_clip()
    model = model.float()
    co = cofx.convert(model, clip.float())
    assert_equivalent(co, model, clip.float())


def test_a_counter_updated_in_training_mode_only_converts_and_convert_leaves_counters_as_they_were():
    """Tracing the training graph runs ``self.n += 1`` on a proxy; a Python call counter counts convert's own
    runs: both are put back, and the eval graph (which updates nothing) converts."""
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3, padding=1)
            self.register_buffer("n", torch.zeros(()))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.training:
                self.n += 1
            return self.conv(x)
    for training in (False, True):
        model = Counting().double().train(training)
        buffer = model.n
        co = cofx.convert(model, torch.randn(1, 4, 12, dtype=torch.float64))
        assert co.is_exact and model.n is buffer and float(model.n) == 0.0 and model.calls == 0
        assert model.training == training


def test_a_leaf_that_acts_otherwise_on_single_frames_is_refused_by_validation():
    class OneFrameOdd(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[2] == 1 else x
    model = torch.nn.Sequential(OneFrameOdd(), torch.nn.Conv1d(4, 4, 3, padding=1)).double().eval()
    with pytest.raises(cofx.ConversionError, match="does not match the clip model"):
        cofx.convert(model, torch.randn(1, 4, 12, dtype=torch.float64), leaf_modules=[OneFrameOdd])


def test_verify_and_bench_leave_every_submodule_mode_and_the_stream_as_they_were():
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3, padding=1), torch.nn.BatchNorm1d(4),
                                torch.nn.ReLU()).double()
    model.train()
    model[1].eval()   # a frozen BatchNorm in a model that trains
    co = cofx.convert(model, torch.randn(1, 4, 8, dtype=torch.float64))
    co.eval()
    x = torch.randn(1, 4, 12, dtype=torch.float64)
    with torch.no_grad():
        head = co.forward_steps(x[:, :, :5])
        co.train()
        model[1].eval()
        cofx.verify(co, model)
        bench(co, rounds=1)
        assert [m.training for m in model.modules()] == [True, True, False, True]
        co.eval()
        tail = co.forward_steps(x[:, :, 5:], pad_end=True)
        assert torch.allclose(torch.cat([head, tail], 2), model(x), atol=1e-12)


def test_a_batch_of_no_stream_is_refused():
    co = cofx.convert(torch.nn.Conv1d(2, 3, 3, padding=1).eval(), torch.randn(1, 2, 8))
    with pytest.raises(cofx.StreamError, match="a batch of 0"):
        co.forward_steps(torch.randn(0, 2, 5))
    with pytest.raises(cofx.StreamError, match="a batch of 0"):
        co.forward_step(torch.randn(0, 2))


def test_a_recurrent_state_made_in_inference_mode_continues_with_gradients():
    class GRUHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(4, 5, batch_first=True)

        def forward(self, x):
            return self.gru(x)[0]
    model = GRUHead().eval()
    co = cofx.convert(model, torch.randn(1, 6, 4), time_dim=1)
    x = torch.randn(1, 3, 4)
    with torch.inference_mode():
        co.forward_step(x[:, 0])
    y = co.forward_steps(x[:, 1:])
    y.sum().backward()   # gradients through the steps made with them
    with torch.no_grad():
        assert torch.allclose(y, model(x)[:, 1:], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_convert_and_step_as_their_clip_model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv1d(8, 4, 3, padding=2, dilation=2)).to(dtype).eval()
    co = cofx.convert(model, torch.randn(1, 4, 12, dtype=dtype))
    x = torch.randn(2, 4, 16, dtype=dtype)
    with torch.no_grad():
        got, want = co.forward_steps(x, pad_end=True), model(x)
    assert got.dtype == dtype
    assert float((got - want).abs().max()) <= 8 * torch.finfo(dtype).eps * float(want.abs().max())


def test_a_frozen_backbone_under_no_grad_in_forward_gets_no_gradients_in_forward_or_steps():
    class FrozenBackbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.Conv1d(8, 3, 3, padding=1)

        def forward(self, x):
            with torch.no_grad():
                features = torch.relu(self.backbone(x))
            return self.head(features)
    model = FrozenBackbone().double().eval()
    x = torch.randn(2, 4, 10, dtype=torch.float64)
    with torch.no_grad():   # converted with gradients off: the block still shows
        co = cofx.convert(model, x[:1])
    for run in (lambda: co(x), lambda: co.forward_steps(x, pad_end=True)):
        model.zero_grad(set_to_none=True)
        co.clean_state()
        run().sum().backward()
        assert model.backbone.weight.grad is None and model.head.weight.grad is not None
    assert torch.is_grad_enabled()
    with torch.no_grad():
        co.clean_state()
        assert torch.allclose(co.forward_steps(x, pad_end=True), model(x), atol=1e-12)


@pytest.mark.parametrize("restart", [False, True], ids=["in phase", "a stream restarted"])
def test_a_stream_begun_under_inference_mode_goes_on_outside_it(restart):
    """State written under torch.inference_mode() is made of inference tensors, which a step outside that mode
    cannot update in place: the stream goes on, with the outputs of one stepped without the mode at all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 3, padding=1)).double().eval()
    co = cofx.convert(model, torch.randn(1, 3, 8, dtype=torch.float64))
    x = torch.randn(2, 3, 12, dtype=torch.float64)

    def run(first_mode):
        co.clean_state()
        outs = []
        with first_mode():
            for t in range(5):
                if restart and t == 2:
                    co.clean_state(streams=[1])
                outs.append(co.forward_step(x[:, :, t]))
        with torch.no_grad():
            outs += [co.forward_step(x[:, :, t]) for t in range(5, 12)]
        return outs

    want, got = run(torch.no_grad), run(torch.inference_mode)
    assert len(got) == len(want) and all(
        (a is None and b is None) or torch.allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)
        for a, b in zip(got, want))   # (the state handed over leaves the ring its kernels kept: other rounding)
    assert sum(a is not None for a in want) >= 6


def test_verify_gives_the_model_contiguous_clips_as_a_model_that_views_its_input_needs():
    """(B, T, C, H, W) frames folded into the batch by ``x.view``: verify's clip is not a strided slice."""
    class FrameCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            b, t, c, h, w = x.size()
            return self.conv(x.view(-1, c, h, w)).mean((2, 3)).view(b, t, -1).mean(1)

    torch.manual_seed(0)
    model = FrameCNN().eval()
    co = cofx.convert(model, torch.randn(1, 8, 3, 6, 6), time_dim=1)
    for reference in (model, None):
        report = cofx.verify(co, reference)
        assert report.ok and report.checks[0].max_error <= 1e-6, str(report)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_strided_half_precision_example_converts_as_a_dense_one(dtype):
    """A sliced example (x[:, ::2]): the checks copy it dense, and half-precision matmuls round dense and strided
    inputs apart; convert takes the example dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 5)).eval().to(dtype)
    x = torch.randn(1, 16, 3).to(dtype)[:, ::2]
    co = cofx.convert(model, x, time_dim=1)
    assert co.is_exact
    with torch.no_grad():
        assert torch.equal(co.forward_steps(x.contiguous()), model(x.contiguous()))
