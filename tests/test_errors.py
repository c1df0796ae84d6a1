"""Guarantee 5: every unsupported op and every bad stream gets an error naming the cause and the fix."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cofx


def clip(c=3, t=8, hw=4, dtype=torch.float32):
    return torch.randn(1, c, t, hw, hw, dtype=dtype)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.conv(x))


@pytest.mark.parametrize("fn,message", [
    (lambda x: F.interpolate(x, scale_factor=(2, 1, 1)), "changes the number of frames"),
    (lambda x: x.flip(2), "does not act frame by frame"),
    (lambda x: x.cumsum(2), "is a cumulative op along time"),
    (lambda x: torch.sort(x, 2)[0], "does not act frame by frame"),
    (lambda x: x.softmax(2), "does not act frame by frame"),
    (lambda x: torch.cat([x, x], 2), "changes the number of frames"),
    (lambda x: x.flatten(2).transpose(1, 2).softmax(1), "time flattened together with other dimensions"),
])
def test_unsupported_ops_are_refused(fn, message):
    with pytest.raises(cofx.ConversionError, match=message) as err:
        cofx.convert(Lambda(fn).eval(), clip())
    text = str(err.value)
    assert "node '" in text and "fix:" in text
    assert "test_errors.py" in text  # the user's source line


class TemporalAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = self.conv(x).transpose(1, 2)
        return self.attn(y, y, y)[0]


def test_per_frame_outputs_of_attention_are_refused_by_name():
    with pytest.raises(cofx.ConversionError, match="per-frame outputs computed over a window") as err:
        cofx.convert(TemporalAttention().eval(), torch.randn(1, 3, 10))
    assert "'attn'" in str(err.value) and "out[:, -1]" in str(err.value).split("fix:")[1]


class SelfMadeAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Conv1d(3, 8, 1)

    def forward(self, x):
        q = self.q(x)
        w = torch.softmax(q.transpose(1, 2) @ q, -1)
        return q @ w


def test_products_over_time_are_named_attention():
    with pytest.raises(cofx.ConversionError, match="attention") as err:
        cofx.convert(SelfMadeAttention().eval(), torch.randn(1, 3, 10))
    assert "matmul" in str(err.value)


class GateFromFlattenedClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8, 4)

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.fc(y.flatten(1)))[:, :, None]
        return y * gate


def test_flattening_time_into_features_mid_network_is_refused():
    with pytest.raises(cofx.ConversionError, match="computed over the whole clip .* combined back with every frame"):
        cofx.convert(GateFromFlattenedClip().eval(), torch.randn(1, 3, 8))


class FirstFrameBaseline(nn.Module):
    def forward(self, x):
        return x - x[:, :, :1]


def test_a_frame_kept_from_a_fixed_position_of_the_clip_and_combined_with_every_frame_is_refused_saying_so():
    with pytest.raises(cofx.ConversionError, match=r"frames kept from fixed positions of the clip") as e:
        cofx.convert(FirstFrameBaseline().eval(), torch.randn(1, 3, 8))
    assert "squeeze-and-excitation gates convert that way" in str(e.value) and "outside the model" in str(e.value)


class Rnn(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True, **kwargs)

    def forward(self, x, h0=None):
        return self.rnn(x.transpose(1, 2))[0] if h0 is None else self.rnn(x.transpose(1, 2), h0)[0]


def test_recurrent_layers_that_need_the_future_or_a_given_state_are_refused():
    with pytest.raises(cofx.ConversionError, match="bidirectional recurrent layer reads future frames"):
        cofx.convert(Rnn(bidirectional=True).eval(), torch.randn(1, 3, 6))

    class GivenState(Rnn):
        def forward(self, x):
            return self.rnn(x.transpose(1, 2), x.new_ones(1, x.shape[0], 4))[0]
    with pytest.raises(cofx.ConversionError, match="given an initial state other than zeros"):
        cofx.convert(GivenState().eval(), torch.randn(1, 3, 6))

    class ZeroState(Rnn):   # zeros are the default: the state starts there
        def forward(self, x):
            return self.rnn(x.transpose(1, 2), x.new_zeros(1, x.shape[0], 4).to(x.dtype))[0]
    model = ZeroState().eval()
    co = cofx.convert(model, torch.randn(1, 3, 6))
    x = torch.randn(2, 3, 9)
    with torch.no_grad():
        assert torch.allclose(co.forward_steps(x), model(x), atol=1e-6)


def test_time_derived_numbers_are_refused():
    class ScaledByClipLength(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return y / y.shape[2]
    with pytest.raises(cofx.ConversionError, match="clip length"):
        cofx.convert(ScaledByClipLength().eval(), torch.randn(1, 3, 6))


def test_models_with_fixed_clip_length_are_refused():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).view(x.shape[0], 4, 8)
    with pytest.raises(cofx.ConversionError, match="fails on clips longer than the example"):
        cofx.convert(Fixed().eval(), torch.randn(1, 3, 8))


def test_bad_arguments():
    model = Lambda(torch.relu).eval()
    with pytest.raises(cofx.ConversionError, match="no time dimension"):
        cofx.convert(model, torch.randn(3, 4))
    with pytest.raises(cofx.ConversionError, match="window= names \\['nope'\\]"):
        cofx.convert(model, clip(), window={"nope": 3})
    with pytest.raises(ValueError, match="init must be one of"):
        cofx.convert(model, clip(), init="mirror")
    with pytest.raises(TypeError, match="takes an nn.Module"):
        cofx.convert(lambda x: x, clip())
    with pytest.raises(cofx.ConversionError, match="clip length is not implied"):
        cofx.convert(model)


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


def test_more_than_one_input():
    with pytest.raises(cofx.ConversionError, match="more than one input"):
        cofx.convert(TwoInputs(), clip())


@pytest.fixture
def co():
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4)).eval()
    return cofx.convert(model, clip())


def test_wrong_frame_shape(co):
    with pytest.raises(cofx.StreamError, match=r"expected input shaped \(B, 3, 4, 4\), got \(1, 3, 5, 5\)"):
        co.forward_step(torch.randn(1, 3, 5, 5))
    with pytest.raises(cofx.StreamError, match="use forward_steps"):
        co.forward_step(clip())
    with pytest.raises(cofx.StreamError, match=r"\(B, 3, T, 4, 4\).*use forward_step"):
        co.forward_steps(torch.randn(1, 3, 4, 4))
    for call, x in ((co.forward_step, torch.randn(3, 4, 4)), (co.forward_steps, torch.randn(3, 5, 4, 4))):
        with pytest.raises(cofx.StreamError, match=r"add the batch dimension of streams \(x.unsqueeze\(0\)"):
            call(x)


def test_a_numpy_time_dim_is_an_int():
    model, x = nn.Conv3d(3, 4, 3, padding=1).eval(), clip()
    co = cofx.convert(model, x, time_dim=np.int64(2))
    assert type(co.options["time_dim"]) is int and torch.equal(co(x), model(x))


def test_wrong_dtype_and_device(co):
    with pytest.raises(cofx.StreamError, match="dtype torch.float64 differs from the model's torch.float32"):
        co.forward_step(torch.randn(1, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(cofx.StreamError, match="input is on meta but the model is on cpu"):
        co.forward_step(torch.randn(1, 3, 4, 4, device="meta"))
    for given in (np.zeros((1, 3, 4, 4)), [[0.0] * 4] * 3, None):   # a StreamError, and a TypeError
        with pytest.raises(cofx.StreamError, match="expected a tensor") as err:
            co.forward_step(given)
        assert isinstance(err.value, TypeError)
    with pytest.raises(cofx.StreamError, match="ndarray; torch.from_numpy"):
        co.forward_steps(np.zeros((1, 3, 2, 4, 4)))


def test_batch_size_changed_mid_stream(co):
    co.forward_step(torch.randn(2, 3, 4, 4))
    with pytest.raises(cofx.StreamError, match="batch size changed mid-stream from 2 to 3.*clean_state"):
        co.forward_step(torch.randn(3, 3, 4, 4))
    co.clean_state()
    co.forward_step(torch.randn(3, 3, 4, 4))


def test_training_mode_batchnorm_while_stepping(co):
    co.train()
    with pytest.raises(cofx.StreamError, match="training mode.*co.eval\\(\\)"):
        co.forward_step(torch.randn(1, 3, 4, 4))
    co.eval()
    assert co.forward_step(torch.randn(1, 3, 4, 4)) is None


def test_state_from_another_model_is_refused(co):
    with pytest.raises(cofx.StreamError, match="state keys do not match"):
        co.set_state({"x": 1})


@pytest.mark.parametrize("call, words", [
    (lambda m: cofx.convert(m, torch.randn(1, 4, 8)), "example_input is torch.float32 but the model's parameters are torch.float64"),
    (lambda m: cofx.convert(m, torch.ones(1, 4, 8, dtype=torch.long)), "pass a floating-point clip"),
    (lambda m: cofx.convert(m, torch.randn(1, 4, 0, dtype=torch.float64)), "is empty"),
    (lambda m: cofx.convert(m, torch.randn(1, 4, 8, dtype=torch.float64), time_dim=0), "dim 0 is the batch"),
    (lambda m: cofx.convert(m, torch.randn(1, 4, 8, dtype=torch.float64), time_dim=-1), "positive int"),
    (lambda m: cofx.convert(m, torch.randn(1, 4, 8, dtype=torch.float64), leaf_modules=[3]), "leaf_modules holds 3"),
    (lambda m: cofx.convert(m, torch.randn(1, 4, 8, dtype=torch.float64), leaf_modules=["nope"]),
     "not a submodule"),
    (lambda m: cofx.convert(m, torch.randn(1, 4, 8, dtype=torch.float64), leaf_modules=None),
     "leaf_modules is None, not a list\n  fix: pass leaf_modules=() for none"),
    (lambda m: cofx.convert(m, torch.randn(1, 4, 8, dtype=torch.float64), leaf_modules=3),
     "leaf_modules is 3 (int), not a list"),
    (lambda m: cofx.convert(m, torch.randn(1, 4, 8, dtype=torch.float64), leaf_modules="nope"),
     "leaf_modules names 'nope', which is not a submodule"),   # the name, not its letters
])
def test_bad_convert_arguments_are_conversion_errors_with_the_fix(call, words):
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3, padding=1)).double()
    with pytest.raises(cofx.ConversionError) as e:
        call(model)
    assert words in str(e.value) and "fix:" in str(e.value)


@pytest.mark.parametrize("window, shown", [
    ({"0": 1.5}, "window holds '0': 1.5 (float)"),
    ({"0": "3"}, "window holds '0': '3' (str)"),
    ({"0": -2}, "window holds '0': -2 (int)"),
    ({"0": 0}, "window holds '0': 0 (int)"),
    ({"0": True}, "window holds '0': True (bool)"),
    ({0: 3}, "window holds 0: 3 (int)"),
    (3, "window is 3 (int), not a dict"),
])
@pytest.mark.parametrize("validate", [True, False])
def test_bad_windows_are_refused_showing_the_entry_and_the_form(window, shown, validate):
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.AdaptiveAvgPool1d(1)).double().eval()
    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(model, torch.randn(1, 4, 8, dtype=torch.float64), window=window, validate=validate)
    assert str(e.value) == (f"cannot convert: {shown}; a window is a pattern and a positive whole number of frames"
                            if "holds" in shown else f"cannot convert: {shown}") + (
        '\n  fix: pass a dict of glob patterns to frames, e.g. window={"blocks.5.pool.pool": 64} (1 for per-frame '
        'gates), or leave window= out for the clip length')


def test_one_leaf_module_needs_no_list():
    """A module, type or name given alone is that one leaf: a Sequential is not taken apart into its children,
    nor a name into its letters."""
    from collections import OrderedDict
    model = nn.Sequential(OrderedDict(block=nn.Sequential(nn.Conv1d(4, 4, 1), nn.ReLU()),
                                      head=nn.Conv1d(4, 2, 3, padding=1))).double().eval()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    for leaf in (model.block, "block", [model.block]):
        co = cofx.convert(model, x, leaf_modules=leaf)
        assert [r.op for r in co.report][1:] == ["block", "head"]
    co = cofx.convert(model, x, leaf_modules=nn.ReLU)
    assert [r.op for r in co.report][1:] == ["block.0", "block.1", "head"] and co.options["leaf_modules"] == (nn.ReLU,)


class Defaults(nn.Module):
    """Optional arguments that torch.fx cannot write into the code it generates (a tuple, a dict, a tensor, a
    function), read and not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x, dims=(2,), keep=[0, 1], scale={"k": 2.0}, bias=torch.ones(1), act=F.relu, unused=(1, 2)):
        h = act(self.conv(x)) * scale["k"] + bias
        return {"pooled": h.mean(dims), "kept": h[:, keep]}


def test_forward_defaults_of_any_kind_are_bound():
    torch.manual_seed(0)
    model, x = Defaults().double().eval(), torch.randn(1, 4, 12, dtype=torch.float64)
    co = cofx.convert(model, x)   # validated against the model: the defaults are the ones it ran on
    assert co.is_exact and [r.name for r in co.report if r.op == "placeholder"] == ["x"]
    assert set(co.forward_steps(x)) == {"pooled", "kept"}


def test_an_argument_without_default_is_a_second_input_even_unread():
    class Lengths(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3, padding=1)

        def forward(self, x, lengths):
            return self.conv(x)

    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(Lengths().eval(), torch.randn(1, 4, 8))
    assert str(e.value) == ("cannot convert node 'lengths' (placeholder 'lengths'): the model takes more than one "
                            "input\n  fix: wrap the model so that forward takes the clip only")


def test_a_module_default_called_in_forward_is_named():
    class Act(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3, padding=1)

        def forward(self, x, act=nn.ReLU()):
            return act(self.conv(x))

    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(Act().eval(), torch.randn(1, 4, 8))
    assert str(e.value) == ("cannot convert: forward's argument 'act' defaults to a module that the model does not "
                            "hold, which torch.fx cannot call\n  fix: make it a submodule (self.act = ...) or wrap "
                            "the model so that forward takes the clip only")


class Scripted(nn.Module):
    """A model holding a TorchScript submodule (fx cannot see into it)."""

    def __init__(self, k):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.head = torch.jit.script(nn.Conv1d(4, 2, k, padding=k // 2))

    def forward(self, x):
        return self.head(self.conv(x).relu())


def test_a_scripted_pointwise_submodule_converts_exactly_and_a_temporal_one_is_refused_saying_why():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 10, dtype=torch.float64)
    model = Scripted(1).double().eval()
    co = cofx.convert(model, x)
    assert torch.allclose(co.forward_steps(x, pad_end=True), model(x), rtol=0, atol=1e-12)
    model = Scripted(3).double().eval()
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(cofx.ConversionError, match="(?s)module 'head'.*TorchScript module: give cofx the module before"):
        cofx.convert(model, x)
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())   # given back as it came


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 4, 3, padding=1), nn.Conv1d(2, 4, 3, padding=1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


@pytest.mark.parametrize("example", [(torch.randn(1, 3, 8), torch.randn(1, 2, 8)), [torch.randn(1, 3, 8)]])
def test_an_example_of_several_tensors_is_refused_with_the_fix(example):
    with pytest.raises(cofx.ConversionError, match=f"(?s)example_input is a {type(example).__name__} of "
                                                   f"{len(example)}.*fix: wrap the model"):
        cofx.convert(TwoInputs().eval(), example)


def test_a_namedtuple_inside_a_container_is_refused_with_the_forms_that_stream():
    from collections import namedtuple
    Out = namedtuple("Out", "frames pooled")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)

        def forward(self, x):
            h = self.conv(x)
            return {"out": Out(h, h.mean(2)), "last": h[:, :, -1]}

    with pytest.raises(cofx.ConversionError, match=r"(?s)namedtuple Out\('frames', 'pooled'\).*returns it inside a "
                                                   r"container.*fix: pass a tuple or a dict \(dict\(frames=\.\.\., "
                                                   r"pooled=\.\.\.\)\)"):
        cofx.convert(Model().eval(), torch.randn(1, 3, 8))


def test_outputs_at_different_temporal_strides_are_refused_as_outputs():
    class TwoRates(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(3, 4, 3, padding=1), nn.Conv1d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            h = self.a(x)
            return h, self.b(h)

    with pytest.raises(cofx.ConversionError, match=r"(?s)outputs have different temporal strides \[1, 2\].*fix: "
                                                   "return outputs of one temporal stride"):
        cofx.convert(TwoRates().eval(), torch.randn(1, 3, 12))


def test_a_constant_built_for_the_clip_length_before_a_look_ahead_says_how_to_build_it_per_frame():
    class BiasChannel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3, padding=1)

        def forward(self, x):
            b, _, t = x.shape
            return self.conv(torch.cat([x[:, :3], torch.ones(b, 1, t)], 1))

    with pytest.raises(cofx.ConversionError, match=r"(?s)a convolution or pool padded at the end.*"
                                                   r"torch.ones_like\(x\[:, :1\]\)"):
        cofx.convert(BiasChannel().eval(), torch.randn(1, 4, 12))


def test_an_integer_chunk_is_told_to_become_the_models_dtype_only():
    co = cofx.convert(nn.Conv1d(3, 3, 3).eval(), torch.randn(1, 3, 8))
    with pytest.raises(cofx.StreamError, match=r"convert the input \(x.to\(torch.float32\)\)$"):
        co.forward_step(torch.zeros(1, 3, dtype=torch.int64))


def test_a_layer_taking_the_input_time_dim_whole_warns_about_time_dim():
    """(B, T, C) given without time_dim=1: the first Linear takes what cofx was told is time whole."""
    model = nn.Sequential(nn.Linear(4, 8)).eval()
    with pytest.warns(UserWarning, match=r"layer '0' takes the input's last dim.*convert with time_dim=1"):
        co = cofx.convert(model, torch.randn(1, 10, 4))
    assert any(r.kind == "window" for r in co.report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cofx.convert(model, torch.randn(1, 10, 4), time_dim=1)   # told right: a per-frame layer, no warning


class StarUnpackedShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 3, 1)

    def forward(self, x):
        b, c = x.shape[:2]
        return self.conv(x.view(b, c, *x.shape[2:]))


def test_a_star_unpacked_shape_names_the_line_and_the_fix():
    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(StarUnpackedShape().eval(), torch.randn(1, 3, 4, 5, 5))
    msg = str(e.value)
    assert "cannot be iterated" in msg and "name the sizes" in msg
    assert "test_errors.py" in msg and "x.view(b, c, *x.shape[2:])" in msg   # the user's line


class SamePool(nn.MaxPool3d):
    """I3D's "same" max pool: a MaxPool3d whose forward pads by a branch on the input's shape (untraceable)."""

    def forward(self, x):
        t = x.size(2)
        pad = 2 if t % self.stride[0] == 0 else 0
        return super().forward(F.pad(x, (1, 1, 1, 1, pad // 2, pad - pad // 2)))


class InceptionWithSamePool(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.pool = nn.Conv3d(3, 2, 1), SamePool((3, 3, 3), (1, 1, 1))

    def forward(self, x):
        return torch.cat([self.a(x), self.pool(x)], 1)


@pytest.mark.parametrize("validate", [True, False])
def test_a_torch_layer_subclass_with_its_own_forward_kept_whole_is_not_read_as_the_layer(validate):
    """Kept whole (torch.fx cannot trace its branch), it is not the stock MaxPool3d its attributes describe (no
    padding): it is checked frame by frame like any module cofx does not know, and refused naming it."""
    with pytest.raises(cofx.ConversionError) as err:
        cofx.convert(InceptionWithSamePool().eval(), torch.randn(1, 3, 8, 4, 4), validate=validate)
    msg = str(err.value)
    assert "node 'pool'" in msg and "torch.fx could not trace into it" in msg, msg


def test_a_path_fixed_at_tracing_that_the_model_does_not_take_is_named():
    """SpeechBrain's ``try: layer(x, lengths=lens) except TypeError: layer(x)``: the trace takes the first path,
    which the model itself leaves; the refusal says so rather than blaming the example's shape."""
    class Tries(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 2, 3, padding=1)

        def forward(self, x):
            try:
                return self.c(x, lengths=None)
            except TypeError:
                return self.c(x)

    model = Tries().eval()
    assert model(torch.randn(1, 2, 8)).shape == (1, 2, 8)
    with pytest.raises(cofx.ConversionError, match="which the model itself takes: torch.fx fixed at tracing") as e:
        cofx.convert(model, torch.randn(1, 2, 8))
    assert "try/except around a call" in str(e.value) and "check the example input's shape" not in str(e.value)


class StridedBranches(nn.Module):
    """Two branches of stride 2 that end at different frames on an odd clip: the model takes even lengths only."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv1d(2, 2, 2, stride=2), nn.MaxPool1d(3, 2, 1)

    def forward(self, x):
        return torch.cat([self.conv(x), self.pool(x)], 1)


def test_a_stream_ended_at_a_length_the_model_does_not_take_says_so():
    model, clip = StridedBranches().eval(), torch.randn(1, 2, 8)
    co = cofx.convert(model, clip)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 2, 9))
    co.forward_steps(torch.randn(1, 2, 9))
    with pytest.raises(cofx.StreamError, match="ended after 9 frames, a length the model itself does not take"):
        co.forward_steps(torch.randn(1, 2, 0), pad_end=True)
    torch.testing.assert_close(co.forward_steps(clip, pad_end=True), model(clip))   # cleaned: a new stream works


@pytest.mark.parametrize("wrap,message,fix", [
    (lambda m: torch.jit.script(m), "TorchScript RecursiveScriptModule as a whole", "before torch.jit.script"),
    (lambda m: nn.DataParallel(m), "wrapped in DataParallel", "convert model.module"),
    (lambda m: m.to("meta"), "tensor '0.weight' is on the meta device", "to_empty"),
])
def test_wrapped_or_valueless_models_are_refused_with_the_module_to_pass(wrap, message, fix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit.script's deprecation
        model = wrap(nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU()).eval())
        with pytest.raises(cofx.ConversionError, match=message) as err:
            cofx.convert(model, torch.randn(1, 3, 8))
    assert fix in str(err.value)
    with pytest.raises(cofx.ConversionError, match="example_input is on the meta device"):
        cofx.convert(nn.Conv1d(3, 4, 3).eval(), torch.randn(1, 3, 8, device="meta"))


def test_a_scripted_submodule_holding_the_first_parameter_steps():
    """The dtype check of every step reads the first parameter, here inside a TorchScript module."""
    class PerFrame(nn.Module):
        def __init__(self):
            super().__init__()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.cnn = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
            self.tconv = nn.Conv1d(4, 4, 3, padding=1)

        def forward(self, x):
            b, c, t, h, w = x.shape
            f = self.cnn(x.transpose(1, 2).reshape(b * t, c, h, w)).mean((-1, -2))
            return self.tconv(f.reshape(b, t, -1).transpose(1, 2))

    torch.manual_seed(0)
    model, x = PerFrame().eval(), torch.randn(1, 3, 8, 6, 6)
    co = cofx.convert(model, x)
    with torch.no_grad():
        outs = [co.forward_step(x[:, :, i]) for i in range(8)]
        tail = co.forward_steps(x[:, :, :0], pad_end=True)
        want = model(x)
    got = torch.cat([o.unsqueeze(2) for o in outs if o is not None] + [tail], 2)
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(cofx.StreamError, match="input dtype torch.float64 differs"):
        co.forward_step(x[:, :, 0].double())


def test_a_pool_over_a_time_axis_of_one_frame_on_the_example_asks_for_a_longer_clip():
    """Time pooled to one frame by strides, then a pool whose kernel is read off the tensor: on the example the
    time axis cannot be told apart (was a raw TypeError); a longer example converts exactly."""
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.c = nn.AvgPool2d((4, 2), (3, 2)), nn.Conv2d(1, 3, (2, 1))

        def forward(self, x):
            h = self.c(self.p(x))
            return F.max_pool2d(h, (h.shape[2], 1)).flatten(1)

    torch.manual_seed(0)
    model = Strided().double().eval()
    with pytest.raises(cofx.ConversionError, match="time axis cannot be told apart .*\n.*\n  fix: convert with a "
                                                   "longer example clip"):
        cofx.convert(model, torch.randn(1, 1, 8, 6, dtype=torch.float64))
    clip = torch.randn(1, 1, 20, 6, dtype=torch.float64)
    co = cofx.convert(model, clip)
    assert co.is_exact
    with torch.no_grad():
        assert torch.allclose(co.forward_steps(clip, pad_end=True)[..., -1], model(clip), atol=1e-12)


def test_a_dtype_read_off_a_traced_tensor_says_to_name_it():
    """transformers writes masks with torch.finfo(scores.dtype).min: fx cannot give a traced tensor's dtype."""
    model = Lambda(lambda x: x.masked_fill(x > 0, torch.finfo(x.dtype).min)).eval()
    with pytest.raises(cofx.ConversionError, match=r"(?s)could not trace the model.*finfo.*fix: name the dtype instead "
                                                   r"of reading it off a tensor.*torch.finfo\(torch.float32\)"):
        cofx.convert(model, clip())


@pytest.mark.parametrize("change", ["transpose_", "unsqueeze_"])
def test_an_input_reshaped_in_place_is_refused_with_the_out_of_place_form(change):
    class InPlace(nn.Module):
        def forward(self, x):   # (B, C, T)
            if change == "transpose_":
                x.transpose_(1, 2)
                return x * 2
            x.unsqueeze_(1)
            b, o, c, t = x.shape
            return x.reshape(b, c, t) * 2

    with pytest.raises(cofx.ConversionError, match=rf"(?s)changes the shape of its input in place \(.{change}\(\)\).*"
                                                   rf"fix: assign the result instead: x = x.{change[:-1]}"):
        cofx.convert(InPlace().eval(), torch.randn(1, 3, 8))
