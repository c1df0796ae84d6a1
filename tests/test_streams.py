"""Streams of one batch that start at different times (issue 6): co.clean_state(streams=...) in PyTorch.

Each stream of a batch must give exactly what it gives alone (float64: equal to
rounding), whatever the other rows do and whenever it was restarted.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import cofx
from cofx.masked_step import MaskedStep
from random_nets import CausalTCN, random_nets, shortest_clip

D = torch.float64


def tcn():
    torch.manual_seed(0)
    model = CausalTCN().double().eval()
    return model, cofx.convert(model, torch.randn(1, 2, 10, dtype=D))


def alone(co, stream):
    """forward_step outputs of one stream (C, T, ...) from a clean state: one (K...) or None per frame."""
    co.clean_state()
    with torch.no_grad():
        outs = [co.forward_step(stream.select(1, i).unsqueeze(0)) for i in range(stream.shape[1])]
    co.clean_state()
    return [None if y is None else y[0] for y in outs]


def _ready_from_output(co, y, batch):
    """Which rows have an output, read from the output alone (None: none; NaN rows: not ready)."""
    return torch.zeros(batch, dtype=torch.bool) if y is None else ~torch.isnan(y).flatten(1).all(1)


def step_batch(co, frames, restarts, ready=lambda co, y, batch: co.ready.clone()):
    """forward_step over a batch (B, C, T, ...), restarting rows {step: rows}; [(output or None, ready)]."""
    co.clean_state()
    got = []
    with torch.no_grad():
        for i in range(frames.shape[2]):
            if i in restarts:
                co.clean_state(streams=restarts[i])
            y = co.forward_step(frames.select(2, i))
            got.append((y, ready(co, y, frames.shape[0])))
    return got


def expected_per_row(co, frames, restarts):
    """What each row gives alone, restarted where `restarts` says."""
    rows = []
    for b in range(frames.shape[0]):
        starts = [0] + [i for i, r in sorted(restarts.items()) if b in r]
        outs = []
        for s, e in zip(starts, starts[1:] + [frames.shape[2]]):
            outs += alone(co, frames[b, :, s:e])
        rows.append(outs)
    return rows


def assert_rows(got, expected, tol=1e-12):
    for i, (y, ready) in enumerate(got):
        for b, outs in enumerate(expected):
            want = outs[i]
            assert bool(ready[b]) == (want is not None), f"step {i}, stream {b}"
            if want is None:
                assert y is None or torch.isnan(y[b]).all(), f"step {i}, stream {b}: a value without an output"
            else:
                scale = max(float(want.abs().max()), 1e-30)
                assert float((y[b] - want).abs().max()) <= tol * scale, f"step {i}, stream {b}"


def test_three_streams_one_restarted_halfway():
    _, co = tcn()
    frames = torch.randn(3, 2, 3 * co.receptive_field, dtype=D)
    restarts = {frames.shape[2] // 2 + 1: [1]}
    got = step_batch(co, frames, restarts)
    assert_rows(got, expected_per_row(co, frames, restarts))
    # while stream 1 starts up again, the others keep their outputs: forward_step does not return None
    half = frames.shape[2] // 2 + 1
    assert any(y is not None and torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
               for y, _ in got[half:half + co.delay])


def test_streams_that_start_at_different_times_share_a_batch():
    _, co = tcn()
    frames = torch.randn(4, 2, 60, dtype=D)
    restarts = {3: [1], 8: [2, 3], 9: [3], 30: torch.tensor([True, False, False, True])}
    restarts_rows = {k: (torch.nonzero(v).flatten().tolist() if isinstance(v, torch.Tensor) else v)
                     for k, v in restarts.items()}
    got = step_batch(co, frames, restarts)
    assert_rows(got, expected_per_row(co, frames, restarts_rows))


def test_no_stream_leaks_into_another():
    _, co = tcn()
    frames = torch.randn(3, 2, 40, dtype=D)
    poisoned = frames.clone()
    poisoned[0, :, 5:9] = float("nan")
    poisoned[2, :, 12] = float("inf")
    restarts = {7: [1]}
    clean = step_batch(co, frames, restarts)
    dirty = step_batch(co, poisoned, restarts)
    for (a, ra), (b, rb) in zip(clean, dirty):
        assert torch.equal(ra, rb)
        if a is not None:
            assert torch.equal(a[1], b[1]) or (torch.isnan(a[1]).all() and torch.isnan(b[1]).all())


def test_state_functions_while_out_of_phase():
    _, co = tcn()
    frames = torch.randn(2, 2, 50, dtype=D)
    with torch.no_grad():
        for i in range(20):
            co.forward_step(frames[:, :, i])
        co.clean_state(streams=[0])
        for i in range(20, 30):
            co.forward_step(frames[:, :, i])
        assert co.cofx_streams.active
        saved = co.get_state()
        peek = co.forward_step(frames[:, :, 30], update_state=False)
        rest = [co.forward_step(frames[:, :, i]) for i in range(30, 50)]
        assert (peek is None) == (rest[0] is None)
        assert peek is None or torch.allclose(peek, rest[0], equal_nan=True)
        co.clean_state()
        assert not co.cofx_streams.active
        co.set_state(saved)
        again = [co.forward_step(frames[:, :, i]) for i in range(30, 50)]
        for a, b in zip(rest, again):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, equal_nan=True))
        assert co.state_bytes > 0
        # chunks and the end flush need streams in phase
        with pytest.raises(cofx.StreamError, match="out of phase"):
            co.forward_steps(frames[:, :, :3])
        with pytest.raises(cofx.StreamError, match="out of phase"):
            co.forward_steps(frames[:, :, :1], pad_end=True)
        assert co.forward_steps(frames[:, :, :0]) is None
        # a batch of another size is refused as before
        with pytest.raises(cofx.StreamError, match="batch size changed"):
            co.forward_step(frames[:1, :, 0])
        # clean_state() returns to the in-phase kernels: chunks work again
        co.clean_state()
        whole = co.forward_steps(frames, pad_end=True)
        assert whole is not None and bool(co.ready.all())


def test_restart_arguments():
    _, co = tcn()
    frames = torch.randn(3, 2, 20, dtype=D)
    co.clean_state(streams=[1])            # nothing running yet: nothing to do
    assert "cofx_streams" not in dict(co.named_children())
    with torch.no_grad():
        co.forward_steps(frames[:, :, :12])
        before = co.get_state()
        co.clean_state(streams=[])         # no row: nothing changes
        assert co.get_state().keys() == before.keys()
        with pytest.raises(cofx.StreamError, match="outside the batch"):
            co.clean_state(streams=[3])
        with pytest.raises(cofx.StreamError, match="one entry per stream"):
            co.clean_state(streams=torch.tensor([True, False]))
        co.clean_state(streams=[0, 1, 2])   # every row: the same as clean_state()
        assert co.get_state()["_stream_batch"] is None
        co.forward_steps(frames[:, :, :12])
        co.clean_state(streams=-1)          # the last row, like indexing
        y = co.forward_step(frames[:, :, 12])
        assert y is None or torch.isnan(y[2]).all()
        assert co.ready.tolist()[:2] == [bool(y is not None)] * 2 and not bool(co.ready[2])


def test_ready_in_phase():
    _, co = tcn()
    frames = torch.randn(2, 2, co.delay + 1, dtype=D)
    with torch.no_grad():
        for i in range(co.delay):
            assert co.forward_step(frames[:, :, i]) is None and not bool(co.ready.any())
        assert co.forward_step(frames[:, :, co.delay]) is not None and bool(co.ready.all())


def test_out_of_phase_x3d_like_model():
    """Squeeze-and-excitation windows, residual merges with delay buffers, a clip-wide head."""
    from pytorchvideo.models.x3d import create_x3d
    torch.manual_seed(0)
    model = create_x3d(input_clip_length=4, input_crop_size=32, model_num_class=5, depth_factor=0.5,
                       width_factor=1.0, head_activation=None).eval()
    co = cofx.convert(model, torch.randn(1, 3, 4, 32, 32))
    frames = torch.randn(2, 3, co.delay + 12, 32, 32)
    restarts = {5: [0]}
    got = step_batch(co, frames, restarts)
    assert_rows(got, expected_per_row(co, frames, restarts), tol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(), st.data())
def test_random_nets_restart_anywhere(net, data):
    model, nd = net
    clip = shortest_clip(model, nd, 0)
    co = cofx.convert(model, clip)
    steps = 2 * (co.receptive_field + co.delay) + 4
    frames = torch.randn(3, 2, steps, *clip.shape[3:], dtype=D)
    at = sorted(data.draw(st.lists(st.integers(1, steps - 1), min_size=1, max_size=3, unique=True)))
    restarts = {i: [data.draw(st.integers(0, 2))] for i in at}
    got = step_batch(co, frames, restarts)
    assert_rows(got, expected_per_row(co, frames, restarts))


def test_masked_step_is_forward_step_in_phase():
    """The fixed-shape step (the one ONNX gets) against the stream kernels, from the first frame."""
    model, co = tcn()
    step = MaskedStep(co, D, "cpu")
    frames = torch.randn(2, 2, 40, dtype=D)
    state = step.initial_state(2)
    co.clean_state()
    for i in range(frames.shape[2]):
        out, ready, state = step.step(frames[:, :, i:i + 1], None, state)
        y = co.forward_step(frames[:, :, i])
        assert bool(ready.any()) == (y is not None) == bool(ready.all())
        if y is not None:
            assert torch.equal(out.squeeze(2), y)


def test_in_place_ops_after_a_crop_do_not_reach_the_state():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 2, 3, padding=1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.c(self.act(x[:, :, 2:]))   # a crop (the kernel returns a view of its frames), in place
    torch.manual_seed(0)
    model = Net().double().eval()
    co = cofx.convert(model, torch.randn(1, 2, 8, dtype=D))
    frames = torch.randn(2, 2, 30, dtype=D)
    restarts = {4: [0], 11: [1]}
    assert_rows(step_batch(co, frames, restarts), expected_per_row(co, frames, restarts))


def test_a_model_with_its_own_ready_keeps_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ready = nn.Conv1d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.ready(x)
    torch.manual_seed(0)
    co = cofx.convert(Net().double().eval(), torch.randn(1, 2, 8, dtype=D))
    frames = torch.randn(2, 2, 12, dtype=D)
    restarts = {5: [1]}
    assert_rows(step_batch(co, frames, restarts, _ready_from_output), expected_per_row(co, frames, restarts))
    assert isinstance(co.ready, nn.Conv1d)


def test_a_state_saved_before_a_partial_restart_still_restores():
    _, co = tcn()
    frames = torch.randn(2, 2, 3 * co.warmup_frames, dtype=torch.float64)
    half = frames.shape[2] // 2
    co.forward_steps(frames[:, :, :half])
    saved = co.get_state()
    expected = co.forward_steps(frames[:, :, half:], update_state=False)
    co.clean_state(streams=[0])            # adds the out-of-phase state
    co.set_state(saved)                    # a state from before it: in phase again
    assert expected is not None and torch.equal(co.forward_steps(frames[:, :, half:]), expected)


class ConvGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gru, self.head = nn.Conv1d(2, 4, 3, padding=1), nn.GRU(4, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        y, _ = self.gru(self.conv(x).relu().transpose(1, 2))
        return self.head(y).transpose(1, 2)


@pytest.mark.parametrize("after", [0, 1, 3])
def test_a_state_read_right_after_a_restart_resumes_exactly(after):
    """A restarted row whose recurrent layer has seen no frame yet (the conv before it delays them) is a state
    of this model: set_state takes what get_state gave, and the streams continue as they would have."""
    torch.manual_seed(0)
    model = ConvGRU().double().eval()
    co = cofx.convert(model, torch.randn(1, 2, 10, dtype=D))
    frames = torch.randn(2, 2, 16, dtype=D)
    with torch.no_grad():
        for i in range(5):
            co.forward_step(frames[:, :, i])
        co.clean_state(streams=[1])
        for i in range(5, 5 + after):
            co.forward_step(frames[:, :, i])
        state = co.get_state()
        first = [co.forward_step(frames[:, :, i]) for i in range(5 + after, 16)]
        co.set_state(state)
        again = [co.forward_step(frames[:, :, i]) for i in range(5 + after, 16)]
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(first, again))
    alone_1 = cofx.convert(model, torch.randn(1, 2, 10, dtype=D))   # row 1 as a stream of its own from frame 5
    with torch.no_grad():
        own = {i: alone_1.forward_step(frames[1:, :, i]) for i in range(5, 16)}
    for j, y in enumerate(again):
        want = own[5 + after + j]
        assert torch.isnan(y[1]).all() if want is None else torch.allclose(y[1], want[0], rtol=0, atol=1e-12)


class FramesAndPooled(torch.nn.Module):
    """Per-frame features and a pool over the clip, as a dict: the pool has no frame for the first steps."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return {"frames": y, "pooled": y.mean(2)}


def test_ready_says_whether_every_output_has_its_frame_in_phase_and_out():
    co = cofx.convert(FramesAndPooled().double().eval(), torch.randn(1, 2, 4, dtype=torch.float64))
    x = torch.randn(2, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        y = co.forward_step(x[:, :, 0])
        assert y["pooled"] is None and not co.ready.any()   # in phase: one output has no frame yet
        for i in range(1, 4):
            y = co.forward_step(x[:, :, i])
        assert y["pooled"] is not None and co.ready.all()
        co.clean_state(streams=[1])
        y = co.forward_step(x[:, :, 4])
        assert type(y) is dict and co.ready.tolist() == [True, False]   # a plain dict out of phase too
        y["extra"] = y["pooled"]


def test_ready_says_nothing_before_a_step_and_nothing_stale_after_a_restart():
    model, co = tcn()
    assert co.ready is None
    with torch.no_grad():
        for _ in range(co.delay + 1):
            co.forward_step(torch.randn(2, 2, dtype=D))
        assert co.ready.tolist() == [True, True]
        co.clean_state(streams=[0])
        assert co.ready.tolist() == [False, True]
        seen = []
        for _ in range(co.stride):   # (row 1 gives an output every `stride` frames; row 0 waits `delay` frames)
            co.forward_step(torch.randn(2, 2, dtype=D))
            seen.append(co.ready.tolist())
        assert co.delay >= co.stride and [False, True] in seen and all(not row0 for row0, _ in seen)
    co.clean_state()
    assert co.ready is None


def test_every_leaf_of_a_nested_output_is_nan_in_rows_without_a_frame():
    """A module kept whole returning (frames, [frames, {"z": frames}]) after a stride: out of phase, each row
    without its frame is NaN in every leaf, the dict's included, and each row with one is that row alone."""
    class Leaf(nn.Module):
        def forward(self, x):   # a branch on dim(): torch.fx keeps the module whole
            y = x * 2 if x.dim() > 2 else x
            return y, [x.abs(), {"z": -x}]

    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.u = nn.Conv1d(2, 3, 2, stride=2), Leaf()

        def forward(self, x):
            return self.u(self.c(x))

    torch.manual_seed(0)
    co = cofx.convert(Strided().double().eval(), torch.randn(1, 2, 8, dtype=D))
    frames = torch.randn(3, 2, 9, dtype=D)
    got = step_batch(co, frames, {1: [1]})
    for part in (lambda y: y[0], lambda y: y[1][0], lambda y: y[1][1]["z"]):
        expected = []
        for b, start in enumerate((0, 1, 0)):
            co.clean_state()
            with torch.no_grad():
                outs = [co.forward_step(frames[b:b + 1, :, i]) for i in range(start, 9)]
            expected.append([None] * start + [None if o is None else part(o)[0] for o in outs])
        co.clean_state()
        assert_rows([(None if y is None else part(y), ready) for y, ready in got], expected)


class DeltasIntoLSTM(nn.Module):
    """Frame differences with a zero first frame (start padding) into an LSTM, pooled over the clip: the padding
    frame reaches the recurrent state, not the output."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 4, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        d = nn.functional.pad(x[:, :, 1:] - x[:, :, :-1], (1, 0))
        return self.fc(self.lstm(d.transpose(1, 2))[0].mean(1))


def test_start_padding_into_a_recurrent_layer_restarts_as_a_stream_alone():
    """The fixed-shape step starts each recurrent layer from its state after the priming (the padding frame
    run through it), not from zeros."""
    torch.manual_seed(0)
    co = cofx.convert(DeltasIntoLSTM().double().eval(), torch.randn(1, 2, 6, dtype=D))
    frames = torch.randn(3, 2, 20, dtype=D)
    restarts = {4: [1], 9: [0, 2]}
    assert_rows(step_batch(co, frames, restarts), expected_per_row(co, frames, restarts))


class PreviousFrameQueries(nn.Module):
    """Causal attention whose queries are the previous frame's (a shift written with torch.cat)."""

    def __init__(self):
        super().__init__()
        self.inp, self.q = nn.Linear(4, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.inp(x)
        t = h.shape[1]
        q = self.q(torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1))
        s = (q @ h.transpose(1, 2)).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ h


@pytest.mark.parametrize("shifted,why", [("keys", r"gives an output .* at frame"), ("queries", r"cannot start it")])
def test_a_fixed_shape_step_that_cannot_follow_the_steps_is_refused(shifted, why):
    """Start padding that runs one branch a frame ahead of the other into a window over the clip (keys or queries
    from the previous frame, shifted with torch.cat) cannot be paired one frame per step: refused, neither
    stepped wrong nor crashed, and the batch steps on in phase."""
    from test_attention import PreviousFrameKeys
    torch.manual_seed(0)
    model = PreviousFrameKeys() if shifted == "keys" else PreviousFrameQueries()
    co = cofx.convert(model.double().eval(), torch.randn(1, 8, 4, dtype=D), time_dim=1)
    with torch.no_grad():
        co.forward_step(torch.randn(2, 4, dtype=D))
        with pytest.raises(cofx.masked_step.NotSteppable, match=r"fixed-shape step of this model \(ONNX export, "
                                                                r"streams out of phase\) " + why):
            co.clean_state(streams=[1])
        assert not co.forward_step(torch.randn(2, 4, dtype=D)).isnan().any()


class SmallDifference(nn.Module):
    """An output that is a small difference of two large convolutions: float32 rounds it coarsely."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(16, 16, 3), nn.Conv1d(16, 16, 3)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight + 1e-5 * torch.randn_like(self.a.weight))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return self.a(x) - self.b(x)


def test_the_fixed_shape_steps_self_check_allows_float32_rounding():
    """Its plain ops round otherwise than the timed ones: the check looks for errors the size of the outputs."""
    torch.manual_seed(0)
    co = cofx.convert(SmallDifference().eval(), torch.randn(1, 16, 8))
    frames = torch.randn(3, 16, 12)
    restarts = {5: [1]}
    got, expected = step_batch(co, frames, restarts), expected_per_row(co, frames, restarts)
    for i, (y, _) in enumerate(got):   # rounding of the large convolutions, not of the small output
        for b, outs in enumerate(expected):
            if outs[i] is not None:
                torch.testing.assert_close(y[b], outs[i], rtol=0, atol=1e-5)
