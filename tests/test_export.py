"""ONNX export of one step with explicit state (issue 6): exact from the first frame, many streams per batch.

Every test runs the exported file in ONNX Runtime and compares each output and
each `ready` flag with `forward_step` (float32: within 1e-5 of the output's
magnitude). The real-model suites are marked slow.
"""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import nn

import cofx
from cofx.masked_step import MaskedStep, NotSteppable
from random_nets import CausalTCN, random_nets, shortest_clip

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", category=UserWarning)

_NP = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(bool)": bool}


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1   # no spinning thread pool competing with PyTorch on a small machine
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess, frames, t=2, resets=None):
    """Step `frames` (B, C, T, ...) through the ONNX step; resets: {step: rows restarted before it}.

    Starts every stream the documented way: zeros for every state and reset=True.
    Returns [(output, ready)] per step.
    """
    inputs = sess.get_inputs()
    batch = frames.shape[0]
    state = [np.zeros([batch, *i.shape[1:]], _NP[i.type]) for i in inputs[2:]]
    reset = np.ones(batch, bool)
    results = []
    for i in range(frames.shape[t]):
        for row in (resets or {}).get(i, ()):
            reset[row] = True
        feed = {"frame": frames.select(t, i).numpy(), "reset": reset}
        feed.update({info.name: s for info, s in zip(inputs[2:], state)})
        out, ready, *state = sess.run(None, feed)
        results.append((out, ready))
        reset = np.zeros(batch, bool)
    return results


def run_alone(co, stream, t=2):
    """forward_step on one stream (batch 1) from a clean state: [output (K...) or None] per step."""
    co.clean_state()
    outs = []
    with torch.no_grad():
        for i in range(stream.shape[t - 1]):
            y = co.forward_step(stream.select(t - 1, i).unsqueeze(0))
            outs.append(None if y is None else y[0].numpy())
    co.clean_state()
    return outs


def assert_matches(results, expected, rows=None):
    """Each step's ready flag and output row equal what forward_step gave for that stream."""
    rows = range(len(expected)) if rows is None else rows
    scale = max((np.abs(e).max() for exp in expected for e in exp if e is not None), default=1.0)
    worst = 0.0
    for i, (out, ready) in enumerate(results):
        for b in rows:
            want = expected[b][i]
            assert bool(ready[b]) == (want is not None), f"step {i}, stream {b}: ready={ready[b]}"
            if want is not None:
                worst = max(worst, float(np.abs(out[b] - want).max()))
    assert worst <= 1e-5 * max(scale, 1e-30), (worst, scale)
    return worst


def export_and_compare(co, tmp_path, frames, name="model", restart=None):
    """Export, run `frames` through ONNX Runtime and compare with each stream run alone by forward_step.

    `restart` = (step, row): that stream restarts at that step (in ONNX with reset, alone from a clean state).
    """
    path = tmp_path / f"{name}.onnx"
    info = cofx.export_onnx(co, path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    resets = {restart[0]: [restart[1]]} if restart else None
    results = run_onnx(session(path), frames, resets=resets)
    expected = []
    for b in range(frames.shape[0]):
        if restart and b == restart[1]:
            at = restart[0]
            expected.append(run_alone(co, frames[b, :, :at]) + run_alone(co, frames[b, :, at:]))
        else:
            expected.append(run_alone(co, frames[b]))
    assert_matches(results, expected)
    return info, model, results, expected


# ---- small nets -------------------------------------------------------------------------------------


def _seeded(model):
    torch.manual_seed(0)
    return model.eval()


def test_strided_causal_net_is_exact_from_the_first_frame(tmp_path):
    co = cofx.convert(_seeded(CausalTCN()), torch.randn(1, 2, 10))
    assert co.stride == 2
    frames = torch.randn(3, 2, 3 * co.receptive_field)
    info, model, results, expected = export_and_compare(co, tmp_path, frames)
    readies = [bool(r[0]) for _, r in results]
    assert readies[:co.delay] == [False] * co.delay and readies[co.delay]
    assert readies[co.delay:co.delay + 6] == [True, False] * 3      # the stride skips every other frame
    # the interface: names, dtypes, shapes (batch dynamic, everything else static and in the file)
    assert info["inputs"][:2] == ["frame", "reset"] and info["outputs"][:2] == ["output", "ready"]
    n = len(info["state_names"])
    assert info["inputs"][2:] == [f"state_{i}" for i in range(n)]
    assert info["outputs"][2:] == [f"next_state_{i}" for i in range(n)]
    graph = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for name in info["inputs"] + info["outputs"]:
        dims = graph[name].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch", name
        assert all(d.HasField("dim_value") for d in dims[1:]), name
    for i in range(n):
        assert info["shapes"][f"state_{i}"] == info["shapes"][f"next_state_{i}"]
        assert info["dtypes"][f"state_{i}"] == info["dtypes"][f"next_state_{i}"]
    assert info["shapes"]["output"] == ["batch", 4] and info["dtypes"]["reset"] == "bool"
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["cofx.state_names"]) == info["state_names"]
    assert int(meta["cofx.delay"]) == co.delay and int(meta["cofx.stride"]) == co.stride


def test_a_batch_of_three_with_one_stream_reset_halfway(tmp_path):
    co = cofx.convert(_seeded(CausalTCN()), torch.randn(1, 2, 10))
    path = tmp_path / "tcn.onnx"
    cofx.export_onnx(co, path)
    steps = 3 * co.receptive_field
    half = steps // 2 + 1          # odd: the restarted stream is out of stride phase with the others
    frames = torch.randn(3, 2, steps)
    results = run_onnx(session(path), frames, resets={half: [1]})
    expected = [run_alone(co, frames[b]) for b in range(3)]
    expected[1] = expected[1][:half] + run_alone(co, frames[1, :, half:])
    assert_matches(results, expected)
    readies = np.array([r for _, r in results])
    assert not readies[half:half + co.delay, 1].any() and readies[half + co.delay, 1]
    assert (readies[:, 0] == readies[:, 2]).all() and (readies[half:, 0] != readies[half:, 1]).any()


def test_batch_size_is_free_at_run_time(tmp_path):
    co = cofx.convert(_seeded(CausalTCN()), torch.randn(1, 2, 10))
    path = tmp_path / "tcn.onnx"
    cofx.export_onnx(co, path)
    sess = session(path)
    for batch in (1, 5):
        frames = torch.randn(batch, 2, co.delay + 6)
        assert_matches(run_onnx(sess, frames), [run_alone(co, frames[b]) for b in range(batch)])


def test_reset_ignores_whatever_the_state_inputs_hold(tmp_path):
    co = cofx.convert(_seeded(CausalTCN()), torch.randn(1, 2, 10))
    path = tmp_path / "tcn.onnx"
    cofx.export_onnx(co, path)
    sess = session(path)
    inputs = sess.get_inputs()
    frames = torch.randn(2, 2, co.delay + 4)
    rng = np.random.default_rng(0)
    state = [(rng.normal(size=[2, *i.shape[1:]]) * 100).astype(_NP[i.type]) for i in inputs[2:]]
    reset = np.ones(2, bool)
    results = []
    for i in range(frames.shape[2]):
        out, ready, *state = sess.run(None, {"frame": frames[:, :, i].numpy(), "reset": reset,
                                             **{s.name: v for s, v in zip(inputs[2:], state)}})
        reset = np.zeros(2, bool)
        results.append((out, ready))
    assert_matches(results, [run_alone(co, frames[b]) for b in range(2)])


def test_export_leaves_the_model_as_it_found_it(tmp_path):
    co = cofx.convert(_seeded(CausalTCN()), torch.randn(1, 2, 10))
    stream = torch.randn(2, 2, 9)
    with torch.no_grad():
        co.forward_steps(stream)
        co.train()
        before, ready = co.get_state(), co.ready
        cofx.export_onnx(co, tmp_path / "tcn.onnx")
        assert co.training and all(m.training for m in co.modules())
        assert co.ready is ready
        after = co.get_state()
        assert before.keys() == after.keys()
        for name in before:
            if name in ("_stream_batch", "_stream_frames"):
                assert before[name] == after[name]
                continue
            for field, value in before[name].items():
                other = after[name][field]
                assert type(value) is type(other)
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other)
                elif isinstance(value, list):
                    assert all(torch.equal(a, b) for a, b in zip(value, other))
                else:
                    assert value == other


def test_priming_lets_every_frame_complete_at_most_one_window():
    """The claim the fixed-shape step rests on: after a 0-frame chunk from a clean state, one input frame
    completes at most one window of every kernel, and the masked step's ready flags equal forward_step's
    timing exactly (float64: equal outputs). (The priming runs the kernels on the empty chunk; a user's empty
    chunk before the first frame runs nothing.)"""
    model = _seeded(CausalTCN()).double()
    co = cofx.convert(model, torch.randn(1, 2, 10, dtype=torch.float64))
    co.clean_state()
    co._primed(torch.zeros(1, 2, 0, dtype=torch.float64))
    kernels = [k for k in co.children() if isinstance(k, cofx.kernels.Sliding)]
    for _ in range(40):   # windows completed by a kernel = how far its next window index moved
        before = [k.next_j for k in kernels]
        co.forward_steps(torch.randn(1, 2, 1, dtype=torch.float64))
        assert max(k.next_j - j for k, j in zip(kernels, before)) <= 1
    step = MaskedStep(co, torch.float64, "cpu")
    frames = torch.randn(2, 2, 40, dtype=torch.float64)
    state = step.initial_state(2)
    co.clean_state()
    for i in range(frames.shape[2]):
        out, ready, state = step.step(frames[:, :, i:i + 1], None, state)
        y = co.forward_step(frames[:, :, i])
        assert bool(ready.all()) == (y is not None) and bool(ready.any()) == (y is not None)
        if y is not None:
            assert torch.equal(out.squeeze(2), y)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(random_nets())
def test_random_nets(tmp_path, net):
    model, nd = net
    model = model.float()
    clip = shortest_clip(model, nd, 1).float()
    co = cofx.convert(model, clip)
    frames = torch.randn(2, 2, 3 * co.receptive_field + co.stride, *clip.shape[3:])
    export_and_compare(co, tmp_path, frames)


@pytest.mark.parametrize("impl", ["conv3d_cl", "fold2d", "taps2d", "matmul"])
def test_every_step_implementation_exports(tmp_path, impl, monkeypatch):
    """Whatever the timing picks, the exported step computes the same."""
    import importlib
    sk = importlib.import_module("cofx.passes.select_kernels")
    monkeypatch.setattr(sk, "_fastest", lambda candidates: impl if impl in candidates else next(iter(candidates)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                          nn.Conv3d(4, 4, (3, 3, 3), padding=(1, 1, 1), groups=4), nn.Conv3d(4, 2, 1)).eval()
    co = cofx.convert(model, torch.randn(1, 3, 6, 5, 5))
    assert impl in {n.meta.get("cofx_impl") for n in co.graph.nodes}
    export_and_compare(co, tmp_path, torch.randn(2, 3, 12, 5, 5))


def test_replicate_init(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv3d(2, 3, (3, 3, 3), padding=1)
            self.b = nn.Conv3d(3, 3, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0), padding_mode="replicate")

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).mean((2, 3, 4))
    co = cofx.convert(_seeded(Net()), torch.randn(1, 2, 6, 4, 4), init="replicate")
    export_and_compare(co, tmp_path, torch.randn(2, 2, 3 * co.receptive_field, 4, 4))


def test_replicated_start_padding_that_bursts_is_refused(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 2, 3)

        def forward(self, x):
            return self.c(F.pad(x, (2, 0), mode="replicate"))
    co = cofx.convert(_seeded(Net()), torch.randn(1, 2, 8))
    with pytest.raises(NotSteppable, match="completes 3 windows at once"):
        cofx.export_onnx(co, tmp_path / "x.onnx")


# ---- real models ------------------------------------------------------------------------------------

def _real(build):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.slow
def test_x3d_xs(tmp_path):
    from pytorchvideo.models.x3d import create_x3d
    model = _real(lambda: create_x3d(input_clip_length=4, input_crop_size=64, model_num_class=10,
                                     head_activation=None))
    co = cofx.convert(model, torch.randn(1, 3, 4, 64, 64))
    steps = 3 * co.receptive_field
    export_and_compare(co, tmp_path, torch.randn(3, 3, steps, 64, 64), "x3d", restart=(steps // 2, 1))


@pytest.mark.slow
def test_r2plus1d_18(tmp_path):
    tvm = pytest.importorskip("torchvision.models.video")
    co = cofx.convert(_real(lambda: tvm.r2plus1d_18(num_classes=10)), torch.randn(1, 3, 8, 32, 32))
    assert co.stride == 8
    steps = 3 * co.receptive_field
    export_and_compare(co, tmp_path, torch.randn(2, 3, steps, 32, 32), "r2plus1d", restart=(steps // 2 + 3, 1))


@pytest.mark.slow
def test_slow_r50_structure(tmp_path):
    from pytorchvideo.models.resnet import create_resnet
    model = _real(lambda: create_resnet(stem_conv_kernel_size=(1, 7, 7), head_pool_kernel_size=(8, 2, 2),
                                        model_depth=50, model_num_class=10, stem_dim_out=16))
    co = cofx.convert(model, torch.randn(1, 3, 8, 64, 64))
    steps = 3 * co.receptive_field
    export_and_compare(co, tmp_path, torch.randn(2, 3, steps, 64, 64), "slow_r50", restart=(steps // 2, 0))


def test_command_line_convert_writes_onnx(tmp_path, capsys):
    from cofx.cli import main
    out = tmp_path / "tiny.onnx"
    assert main(["convert", "cli_models:tiny", "-o", str(tmp_path / "tiny.continual.pt"), "--onnx", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)))
    co = cofx.load(tmp_path / "tiny.continual.pt", source="cli_models:tiny")
    frames = torch.randn(2, 3, 20, 8, 8)
    assert_matches(run_onnx(session(out), frames), [run_alone(co, frames[b]) for b in range(2)])


# ---- recurrent layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("cell,batch_first", [(nn.LSTM, True), (nn.GRU, False), (nn.RNN, True)])
def test_recurrent_models_export_exactly_with_streams_restarted(tmp_path, cell, batch_first):
    """The hidden state is part of the step's state: ONNX matches forward_step from frame 0, a row restarted
    with reset runs as if alone, and what the model reads from the final state is ready from the clip length."""
    from test_model_styles import SensorLSTM
    co = cofx.convert(_seeded(SensorLSTM(cell, batch_first)), torch.randn(1, 3, 7))
    info, _, results, expected = export_and_compare(co, tmp_path, torch.randn(3, 3, 20), restart=(9, 1))
    readies = [bool(r[0]) for _, r in results]
    assert co.delay == 7 and readies == [False] * 7 + [True] * 13   # the head reads the state after 7 frames
    assert any(name.endswith(".c") for name in info["state_names"]) == (cell is nn.LSTM)


def test_recurrent_streams_run_out_of_phase_in_pytorch():
    from test_model_styles import PerFrameGRU
    co = cofx.convert(_seeded(PerFrameGRU()), torch.randn(1, 3, 6))
    frames = torch.randn(2, 3, 12)
    co.clean_state()
    with torch.no_grad():
        outs = []
        for i in range(12):
            if i == 5:
                co.clean_state(streams=[1])
            outs.append(co.forward_step(frames[:, :, i]).numpy())
    alone = [run_alone(co, frames[0]), run_alone(co, frames[1, :, :5]) + run_alone(co, frames[1, :, 5:])]
    for i, out in enumerate(outs):
        for b in (0, 1):
            assert np.abs(out[b] - alone[b][i]).max() <= 1e-6


class PaddedThenPooled(nn.Module):
    """A pad of the channels (not of time) before a pool over time: the window's input has static sizes too."""

    def forward(self, x):
        return F.pad(x, (0, 0, 0, 2)).mean(2)


def test_a_pad_of_the_channels_before_a_pool_over_time_exports(tmp_path):
    co = cofx.convert(_seeded(PaddedThenPooled()), torch.randn(1, 4, 8))
    export_and_compare(co, tmp_path, torch.randn(2, 4, 14), restart=(5, 1))


def test_a_transposed_convolution_at_temporal_stride_1_exports(tmp_path):
    """A speech enhancer's decoder (CRN): a transposed convolution of temporal kernel 2, stride 2 in frequency."""
    model = _seeded(torch.nn.Sequential(torch.nn.Conv2d(2, 4, (2, 3), stride=(1, 2)), torch.nn.ELU(),
                                        torch.nn.ConvTranspose2d(4, 2, (2, 3), stride=(1, 2))))
    co = cofx.convert(model, torch.randn(1, 2, 10, 9))
    assert co.is_exact and co.delay == 1
    export_and_compare(co, tmp_path, torch.randn(2, 2, 12, 9))


def test_an_op_torch_onnx_cannot_export_is_refused_saying_the_model_still_steps(tmp_path):
    """An adaptive pool into bins that do not divide the clip has no ONNX form: a cofx error, not torch.onnx's."""
    class Bins(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv1d(6, 8, 3), nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool1d(F.relu(self.conv(x)), 4).flatten(1))

    co = cofx.convert(Bins().eval(), torch.randn(1, 6, 17))
    with pytest.raises(NotSteppable, match="torch.onnx cannot export an op of its step .*adaptive_avg_pool1d.*still "
                                           "steps in PyTorch"):
        cofx.export_onnx(co, tmp_path / "bins.onnx")


def test_an_export_failing_in_a_symbolic_is_refused_without_torch_onnx_graph_dump(tmp_path, capfd):
    """torch.onnx's symbolics raise plain errors (a float64 attention mask: ValueError) and write the whole
    graph to stdout from C++; the user gets the cofx error alone."""
    class CausalSdpa(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.head = nn.Linear(3, 24), nn.Linear(8, 2)

        def forward(self, x):
            t = x.shape[1]
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            mask = torch.full((t, t), float("-inf"), dtype=x.dtype).triu(1)
            return self.head(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).squeeze(1))

    co = cofx.convert(CausalSdpa().double().eval(), torch.randn(1, 10, 3, dtype=torch.float64), time_dim=1)
    capfd.readouterr()
    with pytest.raises(NotSteppable, match="torch.onnx cannot export an op of its step \\(ValueError: .*attn_mask"):
        cofx.export_onnx(co, tmp_path / "sdpa.onnx")
    assert "Torch IR graph" not in capfd.readouterr().out


def test_a_linear_over_channels_by_movedim_exports(tmp_path):
    """torch.onnx writes movedim(-1, 1) as a Transpose counting from the end, which onnx.checker refuses; the
    export mends it, and ONNX Runtime steps as forward_step does."""
    class ChannelsLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.l = nn.Conv2d(2, 4, (3, 1), padding=(1, 0)), nn.Linear(4, 3)

        def forward(self, x):
            return self.l(self.c(x).movedim(1, -1)).movedim(-1, 1)

    torch.manual_seed(0)
    co = cofx.convert(ChannelsLinear().eval(), torch.randn(1, 2, 8, 4))
    export_and_compare(co, tmp_path, torch.randn(2, 2, 10, 4), restart=(4, 1))


def test_a_start_padding_of_the_models_own_that_bursts_says_to_pad_with_zeros_there(tmp_path):
    """Several repeated first frames at the start cannot be one frame per step; the model pads so itself
    (``F.pad(x, (2, 0), mode='replicate')``), so ``init`` is not the fix."""
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)

        def forward(self, x):
            return self.conv(F.pad(x, (2, 0), mode="replicate"))

    co = cofx.convert(Padded().eval(), torch.randn(1, 2, 8))
    with pytest.raises(NotSteppable, match="repeating its first frame 2 times.*its padding is the model's: pad with "
                                           "zeros or a constant there"):
        cofx.export_onnx(co, tmp_path / "padded.onnx")


def test_onnx_step_of_start_padding_into_a_recurrent_layer_matches_forward_step(tmp_path):
    """The exported step starts its LSTM from the state after the priming (the padding frame run through it)."""
    from test_streams import DeltasIntoLSTM
    torch.manual_seed(0)
    co = cofx.convert(DeltasIntoLSTM().eval(), torch.randn(1, 2, 6))   # (ONNX Runtime has no float64 LSTM)
    cofx.export_onnx(co, tmp_path / "step.onnx")
    frames = torch.randn(2, 2, 16)
    results = run_onnx(session(tmp_path / "step.onnx"), frames, resets={7: [1]})
    assert_matches(results, [run_alone(co, frames[0]), run_alone(co, frames[1, :, :7]) + run_alone(co, frames[1, :, 7:])])


def test_a_file_onnx_runtime_computes_otherwise_is_removed_and_refused(tmp_path, monkeypatch):
    """export_onnx runs what it wrote in ONNX Runtime beside the step it traced: a wrong file (here a weight
    written wrong, as an exporter bug would) never stays on disk."""
    from cofx import onnx_export
    mend = onnx_export._transpose_perms_positive

    def corrupt(model):
        mend(model)
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 3:   # a conv's weight
                values = onnx.numpy_helper.to_array(init) + 0.5
                init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
                return
    monkeypatch.setattr(onnx_export, "_transpose_perms_positive", corrupt)
    co = cofx.convert(_seeded(CausalTCN()), torch.randn(1, 2, 10))   # (ONNX Runtime has no float64 Conv)
    with pytest.raises(NotSteppable, match=r"the file torch.onnx wrote computes an output otherwise than the model's "
                                           r"step \(max error .*\), run by ONNX Runtime"):
        cofx.export_onnx(co, tmp_path / "step.onnx")
    assert not (tmp_path / "step.onnx").exists()
