"""set_state refuses a state this model's own stream could not be in, and takes back every state it gave.

A foreign state (another kernel size, frame size, dtype, device, batch) or a
tampered one (counters negative, beyond the window, inconsistent with each other
or with the frames counted) is refused with a StreamError naming the kernel, the
entry, what was expected, what was given and the fix; the current state is kept.
A state from any point of the model's own stream (clean, mid-warm-up, steady,
out of phase after clean_state(streams=...)) round-trips exactly.
"""
import copy

import pytest
import torch
from torch import nn

import cofx

D = torch.float64


def _conv(nd, cin, cout, k, s=1, p=0, d=1):
    extra = nd - 1
    return getattr(nn, f"Conv{nd}d")(cin, cout, (k,) + (3,) * extra, stride=(s,) + (1,) * extra,
                                     padding=(p,) + (1,) * extra, dilation=(d,) + (1,) * extra)


class Residual(nn.Module):
    def __init__(self, nd, k, d):
        super().__init__()
        self.a = _conv(nd, 3, 3, k, p=d * (k - 1) // 2, d=d)
        self.b = _conv(nd, 3, 3, 1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Cropped(nn.Module):
    """An unpadded conv with its skip cropped to match: an Align with delay buffers."""

    def __init__(self, nd, k):
        super().__init__()
        self.a = _conv(nd, 3, 3, k)
        self.k = k

    def forward(self, x):
        return self.a(x) + x[:, :, self.k - 1:]


def models():
    """(name, model, clip) of several small continual models (conv1d/3d, kernel/stride/dilation, pools,
    residuals, merges with delay buffers)."""
    torch.manual_seed(0)
    out = []

    def add(name, model, clip):
        out.append((name, model.double().eval(), clip))
    add("conv1d_k3", nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv1d(3, 3, 5, stride=2)),
        torch.randn(1, 2, 16, dtype=D))
    add("conv1d_dil_pool", nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2, padding=2), nn.MaxPool1d(2),
                                         nn.Conv1d(3, 3, 2, stride=1), nn.AvgPool1d(3, 1, 1)),
        torch.randn(1, 2, 16, dtype=D))
    add("conv3d_stride", nn.Sequential(_conv(3, 2, 3, 3, s=2, p=1), nn.ReLU(), _conv(3, 3, 3, 2, d=2)),
        torch.randn(1, 2, 12, 4, 4, dtype=D))
    add("residual3d", nn.Sequential(_conv(3, 2, 3, 1), Residual(3, 3, 1), Residual(3, 3, 2)),
        torch.randn(1, 2, 10, 4, 4, dtype=D))
    add("cropped1d", nn.Sequential(nn.Conv1d(2, 3, 1), Cropped(1, 3), nn.AvgPool1d(2, 2)),
        torch.randn(1, 2, 12, dtype=D))
    return out


def convert(model, clip):
    return cofx.convert(model, clip)


def outputs(co, frames):
    """forward_step outputs (None kept) over the frames (B, C, T, ...)."""
    with torch.no_grad():
        return [co.forward_step(frames.select(2, i)) for i in range(frames.shape[2])]


def same(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert (u is None) == (v is None), f"frame {i}"
        if u is not None:
            assert torch.equal(u, v) or (torch.isnan(u) == torch.isnan(v)).all() and \
                torch.equal(u.nan_to_num(), v.nan_to_num()), f"frame {i}"


def state_equal(a, b):
    assert a.keys() == b.keys()
    for n in a:
        x, y = a[n], b[n]
        if isinstance(x, dict):
            state_equal(x, y)
        elif isinstance(x, (list, tuple)):
            assert type(x) is type(y) and len(x) == len(y)
            for u, v in zip(x, y):
                assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y, n


@pytest.fixture(scope="module")
def zoo():
    return [(name, convert(model, clip), clip) for name, model, clip in models()]


# ---- a valid state round-trips exactly ------------------------------------------------------------------

@pytest.mark.parametrize("index", range(5))
def test_every_point_of_a_stream_round_trips(zoo, index):
    """At every frame (0, mid-warm-up, steady, in chunks or frame by frame) the saved state resumes exactly:
    the outputs after set_state equal those of the uninterrupted stream, on this model and on another
    conversion of the same model."""
    name, co, clip = zoo[index]
    twin = convert(co.clip_model(), clip)
    total = co.warmup_frames + 3 * co.stride + 4
    frames = torch.randn(2, *clip.shape[1:2], total, *clip.shape[3:], dtype=D)
    co.clean_state()
    whole = outputs(co, frames)
    for at in sorted({*range(0, total, max(1, total // 8)), co.delay, co.warmup_frames - 1, total - 1}):
        co.clean_state()
        with torch.no_grad():
            if at:
                co.forward_steps(frames[:, :, :at])
        saved = co.get_state()
        uninterrupted = outputs(co, frames[:, :, at:])
        for u, v in zip(uninterrupted, whole[at:]):   # (chunks and single frames differ by rounding only)
            assert (u is None) == (v is None) and (u is None or torch.allclose(u, v, rtol=1e-9, atol=1e-12))
        co.clean_state()
        co.forward_steps(torch.randn_like(frames[:, :, :3]))   # something else in between
        co.set_state(saved)
        state_equal(co.get_state(), saved)
        same(outputs(co, frames[:, :, at:]), uninterrupted)
        twin.set_state(saved)
        same(outputs(twin, frames[:, :, at:]), uninterrupted)


def test_clean_and_primed_states_round_trip(zoo):
    name, co, clip = zoo[0]
    co.clean_state()
    co.set_state(co.get_state())
    assert co.get_state()["_stream_batch"] is None and all(v is None for v in co.get_state()["co__0"].values())
    frames = torch.randn(2, 2, 12, dtype=D)
    co.forward_steps(frames[:, :, :0])      # primed by an empty chunk
    saved = co.get_state()
    expected = outputs(co, frames)
    co.clean_state()
    co.set_state(saved)
    same(outputs(co, frames), expected)


def test_states_after_a_partial_restart_round_trip(zoo):
    name, co, clip = zoo[3]
    frames = torch.randn(3, 2, 30, 4, 4, dtype=D)
    for restart_at in (1, 5, 11):
        co.clean_state()
        with torch.no_grad():
            co.forward_steps(frames[:, :, :restart_at])
            co.clean_state(streams=[1])
            for i in range(restart_at, restart_at + 4):
                co.forward_step(frames[:, :, i])
        saved = co.get_state()
        assert saved["cofx_streams"]["state"] is not None
        rest = outputs(co, frames[:, :, restart_at + 4:])
        co.clean_state()
        co.set_state(saved)
        same(outputs(co, frames[:, :, restart_at + 4:]), rest)
        twin = convert(co.clip_model(), clip)     # a fresh conversion has no out-of-phase kernel yet
        twin.set_state(saved)
        same(outputs(twin, frames[:, :, restart_at + 4:]), rest)


def test_a_state_stored_in_a_ring_is_accepted():
    """States read while kernels keep their window in a ring (single-frame steps of a convolution) or after
    chunks (ordered frames) are the same state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 4, padding=3), nn.Conv1d(3, 3, 3)).double().eval()
    co = convert(model, torch.randn(1, 2, 12, dtype=D))
    frames = torch.randn(1, 2, 20, dtype=D)
    with torch.no_grad():
        for i in range(9):
            co.forward_step(frames[:, :, i])
    ring = co.get_state()
    rest = outputs(co, frames[:, :, 9:])
    co.clean_state()
    co.forward_steps(frames[:, :, :9])
    chunked = co.get_state()   # the same state, to rounding
    assert all(torch.allclose(chunked[n]["buf"], ring[n]["buf"]) for n in ("co__0", "co__1"))
    co.set_state(chunked)
    co.clean_state()
    co.set_state(ring)
    same(outputs(co, frames[:, :, 9:]), rest)


# ---- foreign and tampered states are refused ------------------------------------------------------------

def _running(co, clip, frames=None, batch=2):
    co.clean_state()
    n = frames or co.warmup_frames + 2
    with torch.no_grad():
        co.forward_steps(torch.randn(batch, *clip.shape[1:2], n, *clip.shape[3:], dtype=D))
    return co.get_state()


def _refused(co, state, *words):
    before = co.get_state()
    with pytest.raises(cofx.StreamError) as info:
        co.set_state(state)
    message = str(info.value)
    for w in words:
        assert w in message, (w, message)
    assert "fix:" in message
    state_equal(co.get_state(), before)   # the current state is kept
    return message


def _first_sliding(co):
    return next(n for n, k in co.named_modules() if type(k).__name__ == "Sliding")


def test_a_state_of_a_model_with_another_kernel_size_is_refused():
    torch.manual_seed(0)
    a = convert(nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d(3, 3, 3)).double().eval(),
                torch.randn(1, 2, 12, dtype=D))
    b = convert(nn.Sequential(nn.Conv1d(2, 3, 5, padding=1), nn.Conv1d(3, 3, 3)).double().eval(),
                torch.randn(1, 2, 12, dtype=D))
    clip = torch.randn(1, 2, 12, dtype=D)
    foreign = _running(b, clip)
    a.clean_state()
    message = _refused(a, foreign, "kernel 'co__0'", "entry 'buf'", "expected shape (2, 2, 2)", "got shape (2, 2, 4)",
                       "other kernel sizes")
    assert "span=3" in message
    # another padding only (same buffer): the counters give it away
    c = convert(nn.Sequential(nn.Conv1d(2, 3, 3, padding=2), nn.Conv1d(3, 3, 3)).double().eval(), clip)
    d = convert(nn.Sequential(nn.Conv1d(2, 3, 3, padding=0), nn.Conv1d(3, 3, 3)).double().eval(), clip)
    _refused(d, _running(c, clip, 7), "kernel 'co__0'")


def test_a_state_of_another_frame_size_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(_conv(3, 2, 3, 3, p=1)).double().eval()
    small = convert(model, torch.randn(1, 2, 8, 4, 4, dtype=D))
    large = convert(model, torch.randn(1, 2, 8, 6, 6, dtype=D))
    foreign = _running(large, torch.randn(1, 2, 8, 6, 6, dtype=D))
    _refused(small, foreign, "entry 'buf'", "expected shape (2, 2, 2, 4, 4)", "got shape (2, 2, 2, 6, 6)")


def test_a_buffer_of_another_window_length_is_refused(zoo):
    for name, co, clip in zoo:
        state = _running(co, clip)
        n = _first_sliding(co)
        k = co.get_submodule(n)
        bad = copy.deepcopy(state)
        buf = bad[n]["buf"]
        bad[n]["buf"] = torch.cat([buf, buf.narrow(k.t, 0, 1)], k.t)
        _refused(co, bad, f"kernel '{n}'", "entry 'buf'", f"the last {k.keep} padded frames at dim {k.t}",
                 f"got shape {tuple(bad[n]['buf'].shape)}")


@pytest.mark.parametrize("entry, value, words", [
    ("m", -1, ["entry 'm'", "at least", "got -1"]),
    ("m", 10 ** 9, ["entry 'next_j'"]),
    ("next_j", -1, ["entry 'next_j'", "got -1"]),
    ("next_j", 10 ** 9, ["entry 'next_j'", f"got {10 ** 9}"]),
    ("m", 2.0, ["entry 'm'", "an int"]),
    ("m", None, ["all None", "or all set"]),
])
def test_a_tampered_counter_is_refused(zoo, entry, value, words):
    name, co, clip = zoo[0]
    state = _running(co, clip)
    bad = copy.deepcopy(state)
    bad["co__2"][entry] = value
    _refused(co, bad, "kernel 'co__2'", *words)


def test_counters_inconsistent_with_each_other_are_refused(zoo):
    name, co, clip = zoo[0]
    state = _running(co, clip, 9)
    k = co.co__2
    # both counters of one kernel moved on together: consistent locally, not with the other kernels
    bad = copy.deepcopy(state)
    m = bad["co__2"]["m"] + k.stride
    bad["co__2"].update(m=m, next_j=max(0, (m - k.span) // k.stride + 1))
    _refused(co, bad, "kernel 'co__2'", "(m, next_j)", "after the 9 frames '_stream_frames' counts")
    # the frame count changed alone
    bad = copy.deepcopy(state)
    bad["_stream_frames"] = 11
    _refused(co, bad, "after the 11 frames '_stream_frames' counts", "they are the counters after 9 frames")
    bad["_stream_frames"] = 10 ** 6
    _refused(co, bad, "'_stream_frames'")
    bad["_stream_frames"] = -1
    _refused(co, bad, "entry '_stream_frames'", "got -1")
    # without a frame count (a state of an earlier cofx): the counters must still be those of one stream
    bad = copy.deepcopy(state)
    del bad["_stream_frames"]
    co.set_state(bad)
    bad["co__2"].update(m=m, next_j=max(0, (m - k.span) // k.stride + 1))
    _refused(co, bad, "kernel 'co__2'", "no point of a stream of this model")


def test_a_long_stream_is_checked_exactly(zoo):
    """Far beyond the warm-up the expected counters are extrapolated: exact, not a bound."""
    name, co, clip = zoo[2]
    state = _running(co, clip, 97, batch=1)
    co.set_state(state)
    bad = copy.deepcopy(state)
    bad["_stream_frames"] = 97 + 2 * co.stride * 8
    _refused(co, bad, "'_stream_frames' counts")


def test_a_tampered_merge_buffer_is_refused(zoo):
    name, co, clip = zoo[3]
    state = _running(co, clip, 9)
    n = next(n for n, k in co.named_modules() if type(k).__name__ == "Align")
    k = co.get_submodule(n)
    bad = copy.deepcopy(state)
    held = [p.shape[a] for p, a in zip(bad[n]["pending"], k.axes)]
    i = held.index(max(held))
    extra = bad[n]["pending"][i]
    bad[n]["pending"][i] = torch.cat([extra, extra.narrow(k.axes[i], 0, 1)], k.axes[i])
    _refused(co, bad, f"kernel '{n}'")
    bad = copy.deepcopy(state)
    bad[n]["pending"] = [p.narrow(a, 0, 0).clone() if j != i else p
                         for j, (p, a) in enumerate(zip(bad[n]["pending"], k.axes))]
    bad[n]["pending"] = [torch.cat([p, p.narrow(a, 0, 1)], a) if p.shape[a] else p
                         for p, a in zip(bad[n]["pending"], k.axes)]
    _refused(co, bad, f"kernel '{n}'")
    bad = copy.deepcopy(state)
    bad[n]["pending"] = bad[n]["pending"][:1]
    _refused(co, bad, f"kernel '{n}'", "entry 'pending'", "a list of 2 tensors")


def test_wrong_dtype_device_and_batch_are_refused(zoo):
    name, co, clip = zoo[0]
    state = _running(co, clip)
    bad = copy.deepcopy(state)
    bad["co__0"]["buf"] = bad["co__0"]["buf"].float()
    _refused(co, bad, "kernel 'co__0'", "entry 'buf'", "expected torch.float64", "got torch.float32",
             "convert the state's tensors to torch.float64")
    bad = copy.deepcopy(state)
    bad["co__0"]["buf"] = torch.empty(bad["co__0"]["buf"].shape, dtype=D, device="meta")
    _refused(co, bad, "entry 'buf'", "on cpu", "on meta")
    # one kernel's state of another batch
    other = _running(co, clip, batch=3)
    mixed = copy.deepcopy(state)
    mixed["co__2"] = other["co__2"]
    _refused(co, mixed, "kernel 'co__2'", "for a batch of 2", "the state of 3 streams", "'_stream_batch' says 2")
    bad = copy.deepcopy(state)
    bad["_stream_batch"] = None
    _refused(co, bad, "'_stream_batch'", "got None")
    bad["_stream_batch"] = 0
    _refused(co, bad, "'_stream_batch'", "got 0")


def test_tampered_out_of_phase_states_are_refused(zoo):
    name, co, clip = zoo[0]
    frames = torch.randn(2, 2, 20, dtype=D)
    with torch.no_grad():
        co.clean_state()
        co.forward_steps(frames[:, :, :8])
        co.clean_state(streams=[0])
        for i in range(8, 11):
            co.forward_step(frames[:, :, i])
    state = co.get_state()
    names = co.cofx_streams.masked(D, "cpu").state_names
    pos = 1 + names.index("co__2.pos")
    for value, words in ((-5, ["co__2.pos", "stream 0"]), (10 ** 6, ["co__2.pos"])):
        bad = copy.deepcopy(state)
        bad["cofx_streams"]["state"][pos][0, 0] = value
        _refused(co, bad, "kernel 'cofx_streams'", *words)
    bad = copy.deepcopy(state)   # consistent for the kernel, not with the others of that stream
    k = co.co__2
    m = int(bad["cofx_streams"]["state"][pos][1, 0]) + 2 * k.stride
    bad["cofx_streams"]["state"][pos][1] = torch.tensor([m, max(0, (m - k.span) // k.stride + 1)])
    _refused(co, bad, "the state of stream 1", "kernel 'co__2'")
    bad = copy.deepcopy(state)
    buf = 1 + names.index("co__0.buf")
    bad["cofx_streams"]["state"][buf] = bad["cofx_streams"]["state"][buf][:, :, :1]
    _refused(co, bad, "co__0.buf", "shape (2, 2, 2)")
    bad = copy.deepcopy(state)
    bad["cofx_streams"]["state"][0] = bad["cofx_streams"]["state"][0].float()
    _refused(co, bad, "state[0]", "torch.float64")
    bad = copy.deepcopy(state)
    bad["co__0"] = _running(co, clip)["co__0"]
    co.set_state(state)
    _refused(co, bad, "kernel 'co__0'", "out of phase")


def test_wrong_keys_are_refused(zoo):
    name, co, clip = zoo[0]
    state = _running(co, clip)
    _refused(co, {"x": 1}, "state keys do not match")
    bad = copy.deepcopy(state)
    del bad["co__0"]
    _refused(co, bad, "missing ['co__0']")
    bad = copy.deepcopy(state)
    bad["co__0"]["extra"] = 1
    _refused(co, bad, "kernel 'co__0'", "the entries")
    with pytest.raises(cofx.StreamError, match="takes the dict"):
        co.set_state([1])


# ---- clean_state(streams=...) arguments --------------------------------------------------------------------

@pytest.mark.parametrize("streams, words", [
    ([1.5], ["1.5 (float) is not a row index", "fix: pass row indices"]),
    (1.5, ["rows are ints", "fix:"]),
    (torch.tensor([0.0, 1.0]), ["rows are ints", "fix:"]),
    ([3], ["outside the batch of 3 streams", "rows are 0 ... 2"]),
    ([-4], ["outside the batch of 3 streams", "-3 ... -1"]),
    (torch.tensor([True, False]), ["one entry per stream (3)", "got shape (2,)", "3 bools"]),
    ([True, False, True, False], ["one entry per stream (3)", "3 bools"]),
    ("0", ["not row indices nor a mask"]),
    ([[0, 1]], ["is not a row index"]),
    (True, ["a single bool"]),
    ([True, 1], ["mixes bools and row indices"]),
])
def test_restart_arguments_are_checked(zoo, streams, words):
    name, co, clip = zoo[0]
    _running(co, clip, batch=3)
    before = co.get_state()
    with pytest.raises(cofx.StreamError) as info:
        co.clean_state(streams=streams)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    state_equal(co.get_state(), before)


def test_malformed_restart_arguments_are_refused_before_a_stream_starts(zoo):
    name, co, clip = zoo[0]
    co.clean_state()
    with pytest.raises(cofx.StreamError, match="not a row index"):
        co.clean_state(streams=[1.5])
    co.clean_state(streams=[7])   # no batch running: any row is fine, nothing to restart


def test_a_long_out_of_phase_stream_of_stacked_frames_resumes_from_its_state():
    """Groups of 4 frames stacked (four crops of stride 4): the counters repeat every 4 frames, not 4 ** 4, so a
    row 30 frames into its stream is placed exactly (was refused as no point of a stream)."""
    class Groups(nn.Module):
        def forward(self, x):
            b, c, t = x.shape
            return x.reshape(b, c, t // 4, 4).amin(3)

    co = cofx.convert(Groups().eval(), torch.randn(1, 2, 12, dtype=torch.float64))
    x = torch.randn(3, 2, 40, dtype=torch.float64)
    with torch.no_grad():
        for j in range(40):
            if j == 5:
                co.clean_state(streams=[1])
            if j == 30:
                state = co.get_state()
                after = [co.forward_step(x[:, :, i]) for i in range(30, 40)]
                co.set_state(state)
                again = [co.forward_step(x[:, :, i]) for i in range(30, 40)]
                break
            co.forward_step(x[:, :, j])
    assert [a is None for a in after] == [b is None for b in again]
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(after, again) if a is not None)
    names = co.cofx_streams.masked(torch.float64, "cpu").state_names
    pos = 1 + names.index(next(n for n in names if n.endswith(".pos")))
    bad = copy.deepcopy(state)   # one kernel a frame ahead of the others of row 0
    bad["cofx_streams"]["state"][pos][0] += torch.tensor([1, 0])
    _refused(co, bad, "the state of stream 0")


class ReplicatePadThenShift(nn.Module):
    """Replicate padding at the start, then frame differences keeping the first frame: a branch that waits for
    the first frame merged with one that does not."""

    def forward(self, x):
        y = nn.functional.pad(x, (2, 0), mode="replicate")
        return torch.cat([y[..., :1], y[..., 1:] - y[..., :-1]], -1)


def test_a_state_of_branches_that_start_apart_sets_and_resumes():
    """The reference states are checked against start from a clean state (an empty chunk runs nothing): running
    an empty chunk through the kernels made the two branches' start lengths differ (a raw size mismatch)."""
    co = cofx.convert(ReplicatePadThenShift().double().eval(), torch.randn(1, 4, 8, dtype=torch.float64))
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    with torch.no_grad():
        whole = co.forward_steps(x, pad_end=True)
        co.clean_state()
        first = co.forward_steps(x[..., :4])
        state = co.get_state()
        co.clean_state()
        co.set_state(state)
        rest = co.forward_steps(x[..., 4:], pad_end=True)
    torch.testing.assert_close(torch.cat([first, rest], -1), whole, rtol=0, atol=0)
