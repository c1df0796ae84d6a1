"""Compiled steps compute what eager steps compute, through any mix of calls, and follow the weights."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from torch import nn

import cofx
from cofx.kernels import Sliding
from guarantees import clip_output, max_err, steps_frame_by_frame, tolerance
from random_nets import CausalTCN, random_nets, shortest_clip
from test_step_fast_paths import conv_bn_net

D = torch.float64
MOVES = ["frame", "frame", "frame", "frame", "chunk", "save", "peek", "view", "one"]


def compiled_and_eager(model, clip, backend="eager", chunks=(), tune=True):
    return cofx.convert(model, clip, tune=tune).compile_steps(backend, batch=clip.shape[0], chunks=chunks), \
        cofx.convert(model, clip, tune=tune)


def same(a, b, tol_of=None):
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and max_err(a, b) <= tolerance(b if tol_of is None else tol_of)


def run(co, stream, moves, at=0):
    """Feed `stream` to `co` by `moves`; returns the outputs of every call (None where there was none)."""
    t = co.options["time_dim"]
    outs = []
    for move in moves:
        if move == "save":
            co.set_state(co.get_state())
            continue
        n = 3 if move == "chunk" else 1
        chunk = stream.narrow(t, at, n)
        if move == "peek":
            outs.append(co.forward_steps(chunk, update_state=False))
        if move == "view":        # a frame that is a view of a longer tensor
            outs.append(co.forward_step(stream.select(t, at)))
        elif move == "one":       # a chunk of one frame: the frame's program, time axes put back
            outs.append(co.forward_steps(chunk))
        elif n == 1:
            outs.append(co.forward_step(chunk.squeeze(t).clone()))
        else:
            outs.append(co.forward_steps(chunk))
        at += n
    outs.append(co.forward_steps(stream.narrow(t, at, 0), pad_end=True))
    return outs


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(), st.lists(st.sampled_from(MOVES), min_size=6, max_size=16))
def test_compiled_steps_equal_eager_steps_on_random_nets(net, moves):
    """Past the warm-up, every phase of every net runs compiled, frames and chunks of 3 (`chunks=(3,)`), mixed
    with peeks and saved states."""
    model, nd = net
    clip = shortest_clip(model, nd, extra=2)
    co, ref = compiled_and_eager(model, clip, chunks=(3,))
    warm = co.warmup_frames + co.period
    stream = torch.randn(*clip.shape[:2], warm + 3 * len(moves), *clip.shape[3:], dtype=D)
    with torch.no_grad():
        head = ["frame"] * warm
        got, want = run(co, stream, head + moves), run(ref, stream, head + moves)
    assert all(same(a, b) for a, b in zip(got, want))
    assert co.compiled_stats.runs >= moves.count("frame") + moves.count("view") + moves.count("chunk") + moves.count("one") - 1


def test_strided_nets_compile_every_phase_and_skip_frames_as_eager():
    torch.manual_seed(0)
    model = CausalTCN().double().eval()
    clip = torch.randn(2, 2, 12, dtype=D)
    co, ref = compiled_and_eager(model, clip)
    assert co.period == 2 and len(co.compiled_stats.phases) == 2
    stream = torch.randn(2, 2, co.warmup_frames + 20, dtype=D)
    runs = co.compiled_stats.runs
    with torch.no_grad():
        got, want = [], []
        for i in range(stream.shape[2]):
            got.append(co.forward_step(stream[:, :, i]))
            want.append(ref.forward_step(stream[:, :, i]))
            assert torch.equal(co.ready, ref.ready)
    assert [g is None for g in got] == [w is None for w in want]
    assert all(same(a, b) for a, b in zip(got, want))
    # compiled from the frame the steps start repeating, long before every buffer holds stream frames only
    start = co.compiled_stats.start
    assert co.delay <= start < co.warmup_frames - 20
    assert co.compiled_stats.runs - runs == stream.shape[2] - start


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_layers_compile_with_their_hidden_state(cell):
    from test_model_styles import SensorLSTM
    torch.manual_seed(0)
    model = SensorLSTM(cell).double().eval()
    clip = torch.randn(2, 3, 7, dtype=D)
    co, ref = compiled_and_eager(model, clip)
    stream = torch.randn(2, 3, co.warmup_frames + 10, dtype=D)
    runs = co.compiled_stats.runs
    with torch.no_grad():
        got = run(co, stream, ["frame"] * (stream.shape[2] - 4) + ["chunk", "frame"])
        want = run(ref, stream, ["frame"] * (stream.shape[2] - 4) + ["chunk", "frame"])
    assert all(same(a, b) for a, b in zip(got, want))
    steady = stream.shape[2] - 4 - co.compiled_stats.start
    assert co.compiled_stats.runs - runs == steady + 1   # the steady frames, not the chunk


def steady_steps(co, ref, stream):
    with torch.no_grad():
        return all(same(co.forward_step(stream[:, :, i]), ref.forward_step(stream[:, :, i]))
                   for i in range(stream.shape[2]))


def test_compiled_steps_follow_changed_weights():
    """Weights are baked into the compiled program: any change to them records it again."""
    model = conv_bn_net()
    clip = torch.randn(1, 3, 5, 3, 3, dtype=D)
    co, ref = compiled_and_eager(model, clip)
    ref.load_state_dict(co.state_dict())
    stream = torch.randn(1, 3, co.warmup_frames + 4, 3, 3, dtype=D)

    def change(fn):
        with torch.no_grad():
            fn(co)
            fn(ref)
        before = co.compiled_stats
        assert steady_steps(co, ref, stream)
        after = co.compiled_stats
        assert after.runs > before.runs and after.recordings > before.recordings   # recorded again
    assert steady_steps(co, ref, stream)
    change(lambda m: m.get_submodule("0").weight.add_(0.5))              # in place (an optimizer step)
    change(lambda m: m.get_submodule("1").running_var.mul_(3))          # a BatchNorm statistic
    change(lambda m: setattr(m.get_submodule("3"), "bias", nn.Parameter(torch.ones(4, dtype=D))))   # added
    change(lambda m: setattr(m.get_submodule("0"), "bias", nn.Parameter(torch.ones(4, dtype=D))))   # replaced
    change(lambda m: setattr(m.get_submodule("0").weight, "data", torch.rand_like(m.get_submodule("0").weight)))
    change(lambda m: m.get_submodule("4").weight.add_(1))
    # a write through `.data` bypasses version counting: compiling again takes it in
    with torch.no_grad():
        for m in (co, ref):
            m.get_submodule("4").weight.data.copy_(torch.rand(4, dtype=D))
    co.compile_steps("eager")
    assert steady_steps(co, ref, stream)


def test_frozen_weights_are_not_checked_until_compiled_again():
    """`check_weights=False` says the weights stay frozen: a change is not looked for (the step keeps what it
    baked, here a BatchNorm fold) until `compile_steps` runs again."""
    import copy
    model = conv_bn_net()
    clip = torch.randn(1, 3, 5, 3, 3, dtype=D)
    co = cofx.convert(model, clip).compile_steps("eager", check_weights=False)
    ref = cofx.convert(copy.deepcopy(model), clip)   # weights of its own
    stream = torch.randn(1, 3, co.warmup_frames + 12, 3, 3, dtype=D)
    recorded, warm = co.compiled_stats.recordings, co.warmup_frames + 2
    assert steady_steps(co, ref, stream[:, :, :warm])
    with torch.no_grad():
        co.get_submodule("1").running_var.mul_(3)
    assert steady_steps(co, ref, stream[:, :, warm:warm + 4]) and co.compiled_stats.recordings == recorded
    with torch.no_grad():
        ref.get_submodule("1").running_var.mul_(3)
    co.compile_steps("eager", check_weights=False)
    assert steady_steps(co, ref, stream[:, :, warm + 4:])


def test_gradients_and_single_calls_run_eagerly_from_the_same_state():
    model = conv_bn_net()
    clip = torch.randn(1, 3, 5, 3, 3, dtype=D)
    co, ref = compiled_and_eager(model, clip)
    stream = torch.randn(1, 3, co.warmup_frames + 6, 3, 3, dtype=D)
    with torch.no_grad():
        co.forward_steps(stream[:, :, :-6])
        ref.forward_steps(stream[:, :, :-6])
        assert same(co.forward_step(stream[:, :, -6]), ref.forward_step(stream[:, :, -6]))
    runs = co.compiled_stats.runs
    y = co.forward_step(stream[:, :, -5])           # gradients on: eager, and differentiable
    assert y.requires_grad and co.compiled_stats.runs == runs
    with torch.no_grad():
        assert same(y, ref.forward_step(stream[:, :, -5]))
        assert same(co.forward_step(stream[:, :, -4], update_state=False),
                    ref.forward_step(stream[:, :, -4], update_state=False))
        assert co.compiled_stats.runs == runs
        assert same(co.forward_steps(stream[:, :, -4:], pad_end=True), ref.forward_steps(stream[:, :, -4:],
                                                                                           pad_end=True))


def test_other_batch_sizes_are_recorded_when_met_and_nothing_recompiles_behind_the_scenes():
    torch._dynamo.utils.counters.clear()
    model = conv_bn_net()
    clip = torch.randn(1, 3, 5, 3, 3, dtype=D)
    co, ref = compiled_and_eager(model, clip)
    assert len(co.compiled_stats.phases) == 1
    for batch in (1, 3):
        co.clean_state()
        ref.clean_state()
        stream = torch.randn(batch, 3, co.warmup_frames + 8, 3, 3, dtype=D)
        assert steady_steps(co, ref, stream)
        with torch.no_grad():   # eager calls in between hand the compiled program differently laid-out state
            co.forward_steps(stream[:, :, :2])
            ref.forward_steps(stream[:, :, :2])
        assert steady_steps(co, ref, stream)
    assert len(co.compiled_stats.phases) == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compiled_streams_keep_the_guarantees():
    """Equivalence with the clip model, untouched state on peeks, and the stream errors, with steps compiled."""
    model = conv_bn_net()
    clip = torch.randn(2, 3, 5, 3, 3, dtype=D)
    co = cofx.convert(model, clip).compile_steps("eager", batch=2, chunks=(2,))
    stream = torch.randn(2, 3, co.warmup_frames + 6, 3, 3, dtype=D)
    with torch.no_grad():
        got = steps_frame_by_frame(co, stream)
        want = clip_output(co, model(stream))
    assert co.compiled_stats.runs > 6 and got.shape == want.shape and max_err(got, want) <= tolerance(want)
    # chunk invariance: the same stream in chunks of 2 (compiled past the warm-up) and a flush
    co.clean_state()
    runs, t = co.compiled_stats.runs, co.warmup_frames + co.warmup_frames % 2
    with torch.no_grad():
        parts = [co.forward_steps(stream[:, :, :t])]
        parts += [co.forward_steps(stream[:, :, i:i + 2]) for i in range(t, stream.shape[2] - 1, 2)]
        parts.append(co.forward_steps(stream[:, :, stream.shape[2] - (stream.shape[2] - t) % 2:], pad_end=True))
    chunked = torch.cat([y for y in parts if y is not None], 2)
    assert co.compiled_stats.runs - runs >= 2 and chunked.shape == got.shape and max_err(chunked, got) <= tolerance(got)
    with torch.no_grad():
        co.forward_steps(stream[:, :, :-1])
        before = co.get_state()
        co.forward_step(stream[:, :, -1], update_state=False)
        after = co.get_state()
    assert before["_stream_frames"] == after["_stream_frames"] == stream.shape[2] - 1
    leaves = [torch.utils._pytree.tree_leaves(s) for s in (before, after)]
    assert len(leaves[0]) == len(leaves[1]) and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(*leaves))
    with torch.no_grad(), pytest.raises(cofx.StreamError, match="dtype"):
        co.forward_step(stream[:, :, -1].float())
    co.get_submodule("1").train()
    with torch.no_grad(), pytest.raises(cofx.StreamError, match="training mode"):
        co.forward_step(stream[:, :, -1])


def test_hooks_are_refused_and_compiling_can_be_turned_off():
    model = conv_bn_net()
    clip = torch.randn(1, 3, 5, 3, 3, dtype=D)
    co = cofx.convert(model, clip)
    handle = co.get_submodule("2").register_forward_hook(lambda m, i, o: None)
    with pytest.raises(cofx.StreamError, match="forward hook"):
        co.compile_steps("eager")
    handle.remove()
    co.compile_steps("eager")
    assert co.compile_steps(None) is co and co.compiled_stats is None
    with pytest.raises(ValueError, match="batch"):
        co.compile_steps("eager", batch=0)


class GatedBlock(nn.Module):
    """X3D's block in small: a depthwise convolution, a squeeze-and-excitation gate, a skip connection."""

    def __init__(self, c=8):
        super().__init__()
        self.depthwise = nn.Conv3d(c, c, 3, padding=1, groups=c)
        self.squeeze, self.excite = nn.Conv3d(c, 2, 1), nn.Conv3d(2, c, 1)

    def forward(self, x):
        y = self.depthwise(x)
        gate = self.excite(self.squeeze(y.mean((3, 4), keepdim=True)).relu()).sigmoid()
        return x + y * gate


@pytest.mark.slow
def test_inductor_compiles_a_conv_net_to_the_eager_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                          GatedBlock(), nn.SiLU(), nn.Conv3d(8, 4, 1)).eval()
    clip = torch.randn(1, 3, 6, 8, 8)
    co, ref = compiled_and_eager(model, clip, backend="inductor", chunks=(3,))
    stream = torch.randn(1, 3, co.warmup_frames + 12, 8, 8)
    runs = co.compiled_stats.runs
    with torch.no_grad():
        got = [co.forward_step(stream[:, :, i]) for i in range(stream.shape[2] - 6)]
        want = [ref.forward_step(stream[:, :, i]) for i in range(stream.shape[2] - 6)]
        for at in (stream.shape[2] - 6, stream.shape[2] - 3):   # chunks of 3 frames, compiled too
            got.append(co.forward_steps(stream[:, :, at:at + 3]))
            want.append(ref.forward_steps(stream[:, :, at:at + 3]))
    assert co.compiled_stats.runs - runs == stream.shape[2] - 6 - co.compiled_stats.start + 2
    assert all(same(a, b) for a, b in zip(got, want))
    # the compiled library hands back its state in the layouts it takes: no copies between steps
    assert co.compiled_stats.keeps_layouts


def dense(t: torch.Tensor) -> bool:
    """Whether the elements of `t` fill one block of memory (in any order of dims)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride != expected:
            return False
        expected *= size
    return True


@pytest.mark.parametrize("shape, t, layout", [
    ((1, 4, 7), 2, None), ((1, 7, 4), 1, None), ((7, 1, 4), 0, None), ((2, 3, 7, 5, 6), 2, None),
    ((1, 3, 5, 7, 6), 3, None), ((1, 3, 7, 5), 2, torch.channels_last),
    ((1, 3, 7, 5, 6), 2, torch.channels_last_3d), ((2, 3, 7, 5, 6), 2, torch.channels_last_3d)])
def test_double_rings_hold_the_last_frames_in_order(shape, t, layout):
    """The window a compiled step reads is the last `span` frames in order, across several turns of the ring
    (one dense block for one stream in channels-last frames); leaving the ring gives the ordered frames."""
    from cofx.frame_window import FrameWindow
    span = 3
    store = FrameWindow(t, span, span - 1, 0.0, layout)
    stream = torch.randn(shape)
    store.set_ordered(stream.narrow(t, 0, 2))   # eager frames first: the ring starts from them
    for n in range(2, shape[t]):
        window = store.write_double(store.double_views(layout), stream.narrow(t, n, 1))
        assert store.form == "double" and torch.equal(window, stream.narrow(t, n - span + 1, span))
        assert torch.equal(store.ordered(), stream.narrow(t, n - span + 2, span - 1))   # read, not left
        outer = shape[:1] if layout is not None else shape[:t]   # the dims laid out outside time
        assert dense(window) == all(size == 1 for size in outer)
    assert store.form == "double"
    assert torch.equal(store.to_ordered(), stream.narrow(t, shape[t] - span + 1, span - 1))
    assert store.form == "ordered"


def test_compiled_steps_write_each_frame_into_its_ring_in_place():
    """A temporal convolution's window is never concatenated or shifted: the compiled step writes the new frame
    into the same ring memory, step after step, and computes what eager steps compute."""
    model = conv_bn_net()
    clip = torch.randn(1, 3, 6, 5, 5, dtype=D)
    # untuned: a convolution timed faster on channels-last frames keeps a double ring instead (one dense block)
    co, ref = compiled_and_eager(model, clip, tune=False)
    stream = torch.randn(1, 3, co.warmup_frames + 8, 5, 5, dtype=D)
    runs = co.compiled_stats.runs
    with torch.no_grad():
        warm = co.warmup_frames + 1
        for i in range(warm):
            assert same(co.forward_step(stream[:, :, i]), ref.forward_step(stream[:, :, i]))
        stats = co.compiled_stats
        # both convolutions' frames live in rings, rolled: contiguous frames of several channels would give a
        # double ring no dense window
        assert list(stats.rings.values()) == [("rolled", "rolled")] and list(stats.tensors.values()) == [0]
        convs = [k for k in co.modules() if isinstance(k, Sliding) and k.span > 1]
        memory = [t.data_ptr() for k in convs for t in k.state_tensors()]
        assert len(memory) == 2
        for i in range(warm, stream.shape[2]):
            assert same(co.forward_step(stream[:, :, i]), ref.forward_step(stream[:, :, i]))
            assert [t.data_ptr() for k in convs for t in k.state_tensors()] == memory
    assert co.compiled_stats.runs - runs == stream.shape[2] - co.compiled_stats.start


class PixelGate(nn.Module):
    """A squeeze-and-excitation gate over each frame's pooled pixel (1x1x1 convolutions of one pixel)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv3d(6, 2, 1), nn.Conv3d(2, 6, 1, bias=False)

    def forward(self, x):
        x = self.conv(x)
        gate = self.fc2(self.fc1(x.mean((3, 4), keepdim=True)).relu()).sigmoid()
        return x * gate


def test_pixel_convolutions_compile_as_sums_to_the_eager_results():
    import cofx.compiled_step as compiled_step
    rewritten = []
    original = compiled_step.pixel_convs_as_sums
    compiled_step.pixel_convs_as_sums = lambda gm: rewritten.append(original(gm))
    try:
        torch.manual_seed(0)
        model = PixelGate().double().eval()
        co, ref = compiled_and_eager(model, torch.randn(1, 3, 4, 5, 5, dtype=D))
        stream = torch.randn(1, 3, co.warmup_frames + 5, 5, 5, dtype=D)
        with torch.no_grad():
            got, want = run(co, stream, ["frame"] * stream.shape[2]), run(ref, stream, ["frame"] * stream.shape[2])
    finally:
        compiled_step.pixel_convs_as_sums = original
    assert rewritten == [2] and co.compiled_stats.runs > 0
    assert all(same(a, b) for a, b in zip(got, want))


def test_a_compiler_that_fails_on_rolled_rings_gets_double_rings():
    """Rolled rings give the compiler a slot index and a weight as inputs; if it cannot compile that (as
    AOTInductor 2.14 could not for X3D-S at batch 8), the phase is recorded with double rings instead."""
    failed = []

    def picky(gm, example_inputs):
        if any("index_copy" in str(node.target) for node in gm.graph.nodes):
            failed.append(True)
            raise RuntimeError("cannot compile a written slot index")
        return gm.forward

    model, clip = conv_bn_net(), torch.randn(1, 3, 6, 5, 5, dtype=D)
    # untuned: a tuned channels-last kernel keeps a dense double ring, and then nothing is rolled
    co, ref = compiled_and_eager(model, clip, backend=picky, tune=False)
    stream = torch.randn(1, 3, co.warmup_frames + 5, 5, 5, dtype=D)
    with torch.no_grad():
        got, want = run(co, stream, ["frame"] * stream.shape[2]), run(ref, stream, ["frame"] * stream.shape[2])
    assert failed and list(co.compiled_stats.rings.values()) == [("double", "double")]
    assert all(same(a, b) for a, b in zip(got, want))


class Residual(nn.Module):
    """A depthwise temporal convolution with a skip connection: the skip's frames wait in a delay buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        return self.conv(x).relu() + x


def test_delay_buffers_take_the_layout_of_channels_last_convolutions():
    """Inductor computes the feature maps around a channels-last convolution channels-last: the delay buffer
    of its skip connection is taken and returned in that layout (no transposes in and out at every step)."""
    from cofx.kernels import Align
    torch.manual_seed(0)
    clip = torch.randn(1, 4, 5, 3, 3, dtype=D)
    model = Residual().double().eval()
    co, ref = cofx.convert(model, clip), cofx.convert(model, clip)
    conv, = [k for k in co.modules() if isinstance(k, Sliding)]
    conv.__dict__["layout"] = torch.channels_last_3d   # as select_kernels sets it where that runs fastest
    co.compile_steps("eager")
    align, = [k for k in co.modules() if isinstance(k, Align)]
    stream = torch.randn(1, 4, co.warmup_frames + 6, 3, 3, dtype=D)
    runs = co.compiled_stats.runs
    with torch.no_grad():
        for i in range(stream.shape[2]):
            assert same(co.forward_step(stream[:, :, i]), ref.forward_step(stream[:, :, i]))
        held = [p for p in align.pending if p.numel()]
        assert held and all(p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
                            for p in held)
        assert len(co.compiled_stats.phases) == 1 and co.compiled_stats.keeps_layouts and co.compiled_stats.runs - runs == stream.shape[2] - co.compiled_stats.start


def test_depthwise_convolutions_keep_channels_last_rings_in_compiled_steps():
    """A convolution with one input channel per group runs channels-last in compiled steps, whatever eager steps
    chose (X3D's temporal stem): its double ring is channels-last, and leaving and re-entering it for eager
    calls keeps every result equal to eager steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1)),
                          nn.Conv3d(4, 4, (5, 1, 1), padding=(2, 0, 0), groups=4), nn.ReLU(),
                          nn.Conv3d(4, 6, (3, 1, 1), padding=(1, 0, 0))).double().eval()
    clip = torch.randn(1, 3, 6, 4, 4, dtype=D)
    # no timing at conversion: each convolution's eager layout is the default one, whatever is fastest here
    co = cofx.convert(model, clip, tune=False).compile_steps("eager")
    ref = cofx.convert(model, clip, tune=False)
    stream = torch.randn(1, 3, co.warmup_frames + 12, 4, 4, dtype=D)
    with torch.no_grad():
        got = run(co, stream, ["frame"] * (co.warmup_frames + 4) + ["chunk", "save", "frame", "frame", "peek"])
        want = run(ref, stream, ["frame"] * (ref.warmup_frames + 4) + ["chunk", "save", "frame", "frame", "peek"])
        assert all(same(a, b) for a, b in zip(got, want)) and co.compiled_stats.runs > 0
        depthwise, dense = [k for k in co.modules() if isinstance(k, Sliding) and k.span > 1]
        assert depthwise.layout is None and dense.layout is None
        assert depthwise.program_layout == torch.channels_last_3d and dense.program_layout is None
        for i in range(co.warmup_frames + 2):
            co.forward_step(stream[:, :, i])
        ring, = depthwise.state_tensors()   # the double ring compiled steps keep its frames in
        assert depthwise.store.form == "double" and ring.is_contiguous(memory_format=torch.channels_last_3d)


def test_compiled_chunks_continue_any_stream_exactly():
    """Chunks of a length given to `compile_steps(chunks=...)` run compiled in every phase a stream meets (here
    of a net with temporal stride 2), between single frames, peeks and saved states, equal to eager calls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                          nn.Conv3d(4, 4, 3, stride=(2, 1, 1), padding=1, groups=4), nn.SiLU()).double().eval()
    clip = torch.randn(1, 3, 6, 4, 4, dtype=D)
    co, ref = compiled_and_eager(model, clip, chunks=(3,))
    assert {key[:2] for key in co.compiled_stats.phases} == {(0, 1), (1, 1), (0, 3), (1, 3)}
    moves = ["frame"] * co.warmup_frames + ["chunk", "frame", "chunk", "chunk", "save", "chunk", "peek", "frame"]
    stream = torch.randn(1, 3, co.warmup_frames + 20, 4, 4, dtype=D)
    runs = co.compiled_stats.runs
    with torch.no_grad():
        got, want = run(co, stream, moves), run(ref, stream, moves)
    assert all(same(a, b) for a, b in zip(got, want))
    assert co.compiled_stats.runs - runs >= 5


@pytest.mark.parametrize("chunks", [(1,), (0,), (2.5,), ("16",)])
def test_chunk_lengths_are_checked(chunks):
    co = cofx.convert(conv_bn_net(), torch.randn(1, 3, 5, 3, 3, dtype=D))
    with pytest.raises(ValueError, match="chunks must be chunk lengths of at least 2 frames"):
        co.compile_steps("eager", chunks=chunks)


def test_phases_recorded_mid_stream_take_the_stream_batch_not_the_last_prepared_one():
    """`compile_steps(batch=2)` prepares on a stream of 2 (and leaves the module's stream as it was): a stream of
    1 then records its phases mid-stream, every one of them for its own batch."""
    torch.manual_seed(0)
    model = CausalTCN().double().eval()
    clip = torch.randn(1, 2, 12, dtype=D)
    co, ref = cofx.convert(model, clip), cofx.convert(model, clip)
    stream = torch.randn(1, 2, co.warmup_frames + 10, dtype=D)
    with torch.no_grad():
        for c in (co, ref):
            c.forward_steps(stream[:, :, :co.warmup_frames])
        co.compile_steps("eager", batch=2)
        assert {key[2] for key in co.compiled_stats.phases} == {2}
        for i in range(co.warmup_frames, stream.shape[2]):
            assert same(co.forward_step(stream[:, :, i]), ref.forward_step(stream[:, :, i]))
            assert torch.equal(co.ready, ref.ready)
    assert {key[2] for key in co.compiled_stats.phases} == {1, 2} and co.compiled_stats.runs >= 10


def test_last_step_compiled_says_which_kind_of_step_ran():
    """False before compile_steps, during the warm-up and for the calls the compiled program does not serve (a
    chunk of another length, a flush, a peek, gradients on); True once it serves a steady-state step."""
    model = conv_bn_net()
    clip = torch.randn(1, 3, 5, 3, 3, dtype=D)
    co = cofx.convert(model, clip)
    stream = torch.randn(1, 3, co.warmup_frames + 8, 3, 3, dtype=D)
    with torch.no_grad():
        co.forward_steps(stream[:, :, :co.warmup_frames])
        co.forward_step(stream[:, :, co.warmup_frames])
        assert not co.last_step_compiled
        co.clean_state()
        co.compile_steps("eager", chunks=(3,))
        assert not co.last_step_compiled   # the steps compile_steps took on zeros are not the stream's
        ran = []
        for i in range(co.warmup_frames + 2):
            co.forward_step(stream[:, :, i])
            ran.append(co.last_step_compiled)
        assert ran == [i >= co.compiled_stats.start for i in range(co.warmup_frames + 2)]
        assert 0 < co.compiled_stats.start < co.warmup_frames
        at = co.warmup_frames + 2
        calls = [lambda: co.forward_steps(stream[:, :, at:at + 3]),                    # a compiled chunk length
                 lambda: co.forward_steps(stream[:, :, at:at + 2]),                    # another length
                 lambda: co.forward_step(stream[:, :, at], update_state=False),        # a peek
                 lambda: co.forward_step(stream[:, :, at]),
                 lambda: co.forward_steps(stream[:, :, at:at]),                        # a chunk of no frames
                 lambda: co.forward_step(stream[:, :, at]),
                 lambda: co.clean_state()]
        ran = []
        for call in calls:
            call()
            ran.append(co.last_step_compiled)
        assert ran == [True, False, False, True, False, True, False]
    co.forward_steps(stream[:, :, :co.warmup_frames])
    co.forward_step(stream[:, :, co.warmup_frames])   # gradients on
    assert not co.last_step_compiled
    with torch.no_grad():
        co.forward_steps(stream[:, :, :2], pad_end=True)
        assert not co.last_step_compiled


class StartUpNet(nn.Module):
    """Ops whose first steps differ from their later ones: padded, strided and ceil-mode windows, averages that
    do not count their padding, a residual merge of two delays, and a head that pools a window of the clip or
    runs a recurrent layer over it."""

    def __init__(self, layers, head, residual):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Conv1d(4, 4, k, s, p, d) if kind == "conv" else
            nn.AvgPool1d(k, s, min(p, k // 2), ceil_mode=c, count_include_pad=False) if kind == "avg" else
            nn.MaxPool1d(k, s, min(p, k // 2), d, ceil_mode=c)
            for kind, k, s, p, d, c in layers)
        self.head, self.residual = head, residual
        self.gru = nn.GRU(4, 4, batch_first=True)

    def forward(self, x):
        h = x
        for layer in self.layers:
            h = torch.tanh(layer(h))
        if self.residual:
            h = h + nn.functional.avg_pool1d(h, 3, 1, 1, count_include_pad=False)
        if self.head == "mean":
            return h.mean(2)
        if self.head == "gru":
            return self.gru(h.transpose(1, 2))[0][:, -1]
        return h


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["conv", "avg", "max"]), st.integers(1, 4), st.integers(1, 3),
                          st.integers(0, 3), st.integers(1, 2), st.booleans()), min_size=1, max_size=3),
       st.sampled_from(["stream", "mean", "gru"]), st.booleans())
@example([("avg", 4, 1, 2, 1, False)], "stream", False)            # windows 0 and 1 count 2 and 3 frames
@example([("conv", 3, 2, 1, 1, False), ("avg", 4, 2, 2, 1, True)], "mean", True)
@example([("conv", 1, 2, 0, 1, False), ("avg", 3, 3, 0, 1, True)], "stream", False)  # ceil window > clip
def test_compiled_steps_from_the_frame_the_steps_repeat_equal_eager_steps(layers, head, residual):
    """Programs serve a stream from the first frame its steps repeat (`compiled_stats.start`), before every
    buffer holds stream frames only; each output from the first frame on equals the eager step's."""
    torch.manual_seed(0)
    model = StartUpNet(layers, head, residual).double().eval()
    with torch.no_grad():
        taken = [t for t in range(1, 40) if _takes(model, torch.zeros(1, 4, t, dtype=D))]
    assume(taken)
    clip = torch.randn(2, 4, taken[0] + 3, dtype=D)
    co, ref = compiled_and_eager(model, clip)
    start = co.compiled_stats.start
    assert start <= co.warmup_frames
    stream = torch.randn(2, 4, co.warmup_frames + 3 * co.period + 2, dtype=D)
    with torch.no_grad():
        for i in range(stream.shape[2]):
            got, want = co.forward_steps(stream[:, :, i:i + 1]), ref.forward_steps(stream[:, :, i:i + 1])
            assert co.last_step_compiled == (i >= start)
            assert same(got, want)


def _takes(model, x) -> bool:
    try:
        return model(x).numel() > 0
    except RuntimeError:
        return False


def test_outputs_of_one_stride_on_different_frames_compile_frames_and_one_frame_chunks():
    """Two outputs at stride 2 that come out on alternate frames: each program gives the one that has a frame
    (`forward_step`: None for the other), and a chunk of one frame keeps every output's time axis."""
    class TwoPhases(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(2, 2, 1, stride=2), nn.Conv1d(2, 3, 2, stride=2)

        def forward(self, x):
            return self.a(x), self.b(x)

    torch.manual_seed(0)
    model, clip = TwoPhases().double().eval(), torch.randn(1, 2, 12, dtype=D)
    co, ref = compiled_and_eager(model, clip)
    stream = torch.randn(1, 2, 30, dtype=D)
    with torch.no_grad():
        for i in range(30):
            one = i % 3 == 0
            call = (lambda c: c.forward_steps(stream[:, :, i:i + 1])) if one else \
                (lambda c: c.forward_step(stream[:, :, i]))
            got, want = call(co), call(ref)
            assert co.last_step_compiled == (i >= co.compiled_stats.start)
            assert all(same(g, w) for g, w in zip(got, want))


def test_a_step_reading_a_value_out_of_a_tensor_is_not_compiled_and_steps_eagerly():
    class OneHot(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(3, 4, 3, padding=1)

        def forward(self, x):
            h = self.c(x)
            return h + F.one_hot(h.argmax(1), 4).transpose(1, 2).to(h.dtype)

    torch.manual_seed(0)
    model, x = OneHot().double().eval(), torch.randn(1, 3, 10, dtype=D)
    co = cofx.convert(model, x)
    with pytest.raises(cofx.StreamError, match="cannot record the step as one program .* reads a value out of a "
                                               "tensor .* the model steps eagerly"):
        co.compile_steps("eager")
    assert co.compiled_stats is None
    with torch.no_grad():
        assert torch.allclose(co.forward_steps(x, pad_end=True), model(x), atol=1e-12)
    assert not co.last_step_compiled
