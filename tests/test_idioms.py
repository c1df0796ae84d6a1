"""Models written the way people write them: each converts exactly or is refused with a ConversionError.

The converter's rules were built from layer patterns; these are idioms (tables
sliced by the clip length, length-scaled ops, tuple and dict outputs, optional
arguments, 1-d adaptive heads, training branches, counters, data-dependent
leaves). `convert` validates what it built, so an idiom a rule misses is refused,
never stepped wrong. A random mix of idioms and layers asserts the same.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

import cofx
from cofx.verify import as_steps, by_frame, max_error, output_tolerance, verify
from random_nets import Block

D = torch.float64
C = 4


def conv(nd=1, k=3):
    return (nn.Conv1d if nd == 1 else nn.Conv2d)(C, C, k if nd == 1 else (k, 1), padding=k // 2 if nd == 1 else (k // 2, 0))


class Head(nn.Module):
    """A temporal conv followed by the head under test."""
    def __init__(self, head, nd=1):
        super().__init__()
        self.c, self.head, self.fc = conv(nd), head, nn.Linear(C, 3)
        self.pos = nn.Parameter(torch.randn(1, C, 32))
        self.w = nn.Parameter(torch.randn(32))

    def forward(self, x):
        return self.head(self, self.c(x))


EXACT = {   # idiom -> head; each must convert and step exactly
    "tuple of frames and pooled": lambda m, h: (h, h.mean(2)),
    "dict of frames and pooled": lambda m, h: {"frames": h, "pooled": m.fc(h.mean(2))},
    "AdaptiveAvgPool1d(1)": lambda m, h: nn.functional.adaptive_avg_pool1d(h, 1).flatten(1),
    "adaptive max pool": lambda m, h: F.adaptive_max_pool1d(h, 1).squeeze(-1),
    "max(2).values": lambda m, h: h.max(2).values,
    "reshape + amax": lambda m, h: h.reshape(h.shape[0], h.shape[1], -1).amax(2),
    "per-frame linear head": lambda m, h: m.fc(h.transpose(1, 2)).transpose(1, 2),
    "avg_pool1d with the kernel read off the clip": lambda m, h: F.avg_pool1d(h, h.size()[2:]).flatten(1),
    "max_pool1d with the kernel read off the clip": lambda m, h: F.max_pool1d(h, h.shape[2]).squeeze(-1),
    "time flattened into a classifier by reshape": lambda m, h: F.linear(h.reshape(h.shape[0], -1),
                                                                          torch.ones(3, C * 8, dtype=h.dtype)),
    "time flattened into a classifier by view": lambda m, h: F.linear(h.contiguous().view(h.size(0), -1),
                                                                       torch.ones(3, C * 8, dtype=h.dtype)),
    # a window of the clip length, run as the model runs a clip: one answer per window
    "softmax weights sliced by T": lambda m, h: (h * m.w[:h.shape[2]].softmax(0)).sum(2),
    "pooled, scaled by a table sliced by T": lambda m, h: h.mean(2) * m.w[:h.shape[2]].sum(),
    "positional table sliced by T, pooled": lambda m, h: (h + m.pos[:, :, :h.shape[2]]).mean(2),
    "arange(T) weights, pooled": lambda m, h: (h * torch.arange(h.shape[2], dtype=h.dtype)).sum(2) / h.shape[2],
    "self-attention over frames, last frame": lambda m, h: _self_attention(h)[:, :, -1],
    "class token along time, read back": lambda m, h: _self_attention(torch.cat(
        [m.pos[:, :, :1].expand(h.shape[0], -1, -1), h], 2))[:, :, 0],
    # per-frame outputs of a window (nothing mixes frames there): each frame at its place in the last window
    "positional table sliced by T": lambda m, h: h + m.pos[:, :, :h.shape[2]],
    "table entry picked at T - 1": lambda m, h: h + m.pos[:, :, h.shape[2] - 1:h.shape[2]],
    "arange(T) added": lambda m, h: h + torch.arange(h.shape[2], dtype=h.dtype),
    "causal self-attention, every frame": lambda m, h: _self_attention(h, causal=True),
}
REFUSED = {   # idiom -> (head, words the message must hold)
    "h / sqrt(T)": (lambda m, h: h / math.sqrt(h.shape[2]), "truediv"),
    "h * T ** -0.5": (lambda m, h: h * h.shape[2] ** -0.5, "mul"),
    "h * (T // 100 + 1)": (lambda m, h: h * (h.shape[2] // 100 + 1), "mul"),
    "self-attention over frames, every frame": (lambda m, h: _self_attention(h), "scaled_dot_product_attention"),
    "full_like(h, T)": (lambda m, h: h * torch.full_like(h, h.shape[2]), "full_like"),
    "the clip length returned": (lambda m, h: (h, h.shape[2]), "output"),
}


def _self_attention(h, causal=False):
    """Attention over the frames of (B, C, T), back to (B, C, T)."""
    tokens = h.transpose(1, 2)
    return F.scaled_dot_product_attention(tokens, tokens, tokens, is_causal=causal).transpose(1, 2)


def clip(nd=1, t=8, batch=1):
    return torch.randn((batch, C, t) if nd == 1 else (batch, C, t, 5), dtype=D)


def assert_exact(model, x):
    co = cofx.convert(model, x)
    assert co.is_exact
    report = verify(co, model)
    assert report.ok, str(report)
    return co


@pytest.mark.parametrize("idiom", sorted(EXACT))
def test_idiom_converts_exactly(idiom):
    torch.manual_seed(0)
    assert_exact(Head(EXACT[idiom]).to(D).eval(), clip())


@pytest.mark.parametrize("idiom", sorted(REFUSED))
def test_idiom_is_refused_naming_its_node(idiom):
    torch.manual_seed(0)
    head, node = REFUSED[idiom]
    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(Head(head).to(D).eval(), clip())
    assert f"node '{node}" in str(e.value), str(e.value)
    assert "test_idioms.py" in str(e.value)   # the user's line


def test_several_outputs_keep_their_own_frames():
    """Per-frame outputs keep every frame, a reduction gives its window; forward_step gives None for an
    output without a frame at that step."""
    model = Head(EXACT["tuple of frames and pooled"]).to(D).eval()
    x = clip(t=8)
    co = assert_exact(model, x)
    frames, pooled = co.forward_steps(x, pad_end=True)
    ref_frames, ref_pooled = model(x)
    assert frames.shape == ref_frames.shape and torch.allclose(frames, ref_frames, atol=1e-12)
    assert torch.allclose(pooled[..., 0], ref_pooled, atol=1e-12)
    outs = [co.forward_step(x[:, :, i]) for i in range(8)]
    assert outs[0] is None   # the conv's delay
    assert all(o[1] is None for o in outs[1:])   # the pooled window is not complete before the end
    assert all(o[0].shape == (1, C) for o in outs[1:])


def test_optional_argument_is_bound_to_its_default():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = conv()

        def forward(self, x, mask=None, scale: float = 2.0):
            h = self.c(x) * scale
            return h if mask is None else h * mask

    assert_exact(Masked().to(D).eval(), clip())


class SizePool(nn.Module):
    """A graph-convolution skeleton head: a pool over (frames, joints) with its kernel read off the tensor."""
    def __init__(self):
        super().__init__()
        self.c = conv(nd=2)

    def forward(self, x):
        h = self.c(x)
        return F.avg_pool2d(h, h.size()[2:]).flatten(1)


def test_kernel_read_off_the_clip_is_a_global_pool():
    co = assert_exact(SizePool().to(D).eval(), clip(nd=2))
    assert co.receptive_field == 8 + 2   # the pool takes the clip's 8 frames of the conv's 3-frame output


def test_kernel_read_off_the_clip_refuses_another_window():
    with pytest.raises(cofx.ConversionError, match="kernel is read off the clip"):
        cofx.convert(SizePool().to(D).eval(), clip(nd=2), window={"avg_pool2d": 4})


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = conv()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.c(x)


def test_buffer_updated_in_forward_is_refused_and_left_as_it_was():
    model = Counting().to(D).eval()
    with pytest.raises(cofx.ConversionError, match="changes its buffer 'calls'"):
        cofx.convert(model, clip())
    assert model.calls.item() == 0


def test_convert_leaves_the_model_as_it_found_it():
    model = nn.Sequential(nn.Conv1d(C, C, 3, padding=1), nn.BatchNorm1d(C), nn.ReLU(), nn.Conv1d(C, C, 3)).to(D)
    model.train()
    model[1].eval()   # a frozen BatchNorm while the rest trains
    before = {k: v.clone() for k, v in model.state_dict().items()}
    co = cofx.convert(model, clip())
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert co.training and not co[1].training if hasattr(co, "__getitem__") else co.training


class DataLeaf(nn.Module):
    """Acts on the whole clip's statistics: frame by frame only for some inputs."""
    def forward(self, x):
        return x * 0 if x.abs().mean() > 1.5 else x


def test_data_dependent_leaf_is_refused():
    model = nn.Sequential(nn.Conv1d(C, C, 3, padding=1), DataLeaf()).to(D).eval()
    with pytest.raises(cofx.ConversionError, match="does not match the clip model"):
        cofx.convert(model, clip(), leaf_modules=[DataLeaf])


def test_validate_false_skips_the_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(C, C, 3, padding=1), DataLeaf()).to(D).eval()
    co = cofx.convert(model, clip(), leaf_modules=[DataLeaf], validate=False)
    x = clip()
    x[:, :, :4] *= 100   # what the check would have refused: loud frames gate the whole clip, not a frame alone
    assert (by_frame(co, x) - model(x)).abs().max() > 0.1


def test_diagnosis_names_the_first_node_that_differs():
    """A model built to diverge at a known node: a leaf acting on the statistics of what it is given, between
    exact convs (the rules cannot see into a leaf; the example alone does not show it)."""
    class Diverges(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gate, self.b = conv(), DataLeaf(), conv()

        def forward(self, x):
            h = torch.relu(self.a(x))
            gated = self.gate(h)
            return self.b(gated)

    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(Diverges().to(D).eval(), clip(), leaf_modules=[DataLeaf])
    msg = str(e.value)
    assert "node 'gate'" in msg and "the first node that differs" in msg and "gated = self.gate(h)" in msg


# -- a random mix of idioms and layers --------------------------------------------------------------
class FrameLeaf(nn.Module):
    """A leaf that does act frame by frame."""
    def forward(self, x):
        return torch.tanh(x) * 2


MIDDLE = {   # idioms inside the network: (B, C, T) -> (B, C, T), exact or to be refused
    "relu": lambda m, h: torch.relu(h),
    "gate": lambda m, h: h * torch.sigmoid(h),
    "length-scaled": lambda m, h: h * h.shape[2] ** -0.5,
    "length-divided": lambda m, h: h / math.sqrt(h.size(2)),
    "table sliced by T": lambda m, h: h + m.pos[:, :, :h.shape[2]],
    "table of the clip length": lambda m, h: h + m.pos[:, :, :8],
    "dropout": lambda m, h: F.dropout(h, 0.5, training=m.training),
    "training branch": lambda m, h: h * 2 if m.training else h,
    "cumsum": lambda m, h: h.cumsum(2),
    "softmax over time": lambda m, h: h.softmax(2),
    "frame leaf": lambda m, h: m.frame_leaf(h),
    "data leaf": lambda m, h: m.data_leaf(h),
    "centred by the clip mean": lambda m, h: h - h.mean(2, keepdim=True),
    "view": lambda m, h: h.view(h.shape[0], h.shape[1], -1),
    "crop": lambda m, h: h[:, :, 1:],
    "arange": lambda m, h: h + torch.arange(h.shape[2], dtype=h.dtype),
    "counter": lambda m, h: m.count(h),
    "self-attention residual": lambda m, h: h + _self_attention(h),
    "class token along time, dropped": lambda m, h: torch.cat([m.pos[:, :, :1].expand(h.shape[0], -1, -1), h],
                                                              2)[:, :, 1:],
}
HEADS = {**EXACT, **{k: v for k, (v, _) in REFUSED.items()}, "stream": lambda m, h: h,
         "tuple of a stream and the batch size": lambda m, h: (h, h.shape[0])}


class IdiomNet(nn.Module):
    """Random blocks of the property tests with idioms between them, an optional argument and a random head."""
    def __init__(self, rng: random.Random):
        super().__init__()
        kinds = ["residual", "cropped", "concat", "gate", "strided", "pool"]
        self.stem = nn.Conv1d(C, C, 1)
        self.blocks = nn.ModuleList(Block(1, rng.choice(kinds), rng.choice([1, 3]), rng.randint(1, 2),
                                          rng.randint(0, 9), rng.choice([1, 2])) for _ in range(rng.randint(1, 3)))
        self.middle = [rng.choice(sorted(MIDDLE)) if rng.random() < 0.6 else None for _ in self.blocks]
        self.head_name = rng.choice(sorted(HEADS))
        self.frame_leaf, self.data_leaf, self.fc = FrameLeaf(), DataLeaf(), nn.Linear(C, 3)
        self.pos = nn.Parameter(torch.randn(1, C, 32))
        self.w = nn.Parameter(torch.randn(32))
        self.register_buffer("calls", torch.zeros(()))

    def count(self, h):
        self.calls += 1
        return h

    def forward(self, x, mask=None, gain: float = 1.0):
        h = self.stem(x) * gain
        if mask is not None:
            h = h * mask
        for block, idiom in zip(self.blocks, self.middle):
            h = block(h)
            if idiom is not None:
                h = MIDDLE[idiom](self, h)
        return HEADS[self.head_name](self, h)


def random_idiom_model(rng: random.Random):
    return IdiomNet(rng).to(D).eval()


@pytest.mark.parametrize("seed", range(12))
def test_random_idioms_exact_or_refused(seed):
    _exact_or_refused(random_idiom_model(random.Random(seed)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12, 312))
def test_random_idioms_exact_or_refused_many(seed):
    _exact_or_refused(random_idiom_model(random.Random(seed)))


def _shapes(value) -> list:
    return [tuple(v.shape) for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _exact_or_refused(model):
    """Converted and exact (the clip, a longer clip, chunkings: float64, 1e-9) or chunk invariant where not
    exact, or refused with a ConversionError; never another exception."""
    torch.manual_seed(0)
    x = clip(t=12)
    try:
        model(x)
    except Exception:
        pytest.skip("the generated model does not run on its clip")
    try:
        co = cofx.convert(model, x, leaf_modules=[FrameLeaf, DataLeaf])
    except cofx.ConversionError:
        return
    report = verify(co, model, seed=1)
    if co.is_exact:
        assert report.ok, str(report)
        if any(r.kind in ("window", "attention") for r in co.report):
            return   # a window over the clip answers for the last 12 frames, not for a longer clip
        longer = clip(t=30)
        try:
            want = model(longer)
        except Exception:
            return   # a model bound to its clip length (a head sized for it)
        got = co.forward_steps(longer, pad_end=True)
        wanted = as_steps(want, got)
        if _shapes(wanted) == _shapes(got):   # outputs that keep time (a reduction gives one value per window)
            assert max_error(got, wanted) <= output_tolerance(wanted)
    else:
        assert all(c.passed for c in report.checks if c.name != "deviation from the original"), str(report)


class TrainingBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = conv()

    def forward(self, x):
        h = self.c(x)
        if self.training:
            h = h * 2
        return F.dropout(h, 0.5, training=self.training)


def test_forward_in_training_mode_is_the_models_own():
    model = TrainingBranches().to(D)
    x = clip()
    co = cofx.convert(model, x)
    for call in (co, co.forward):
        torch.manual_seed(0)
        got = call(x)
        torch.manual_seed(0)
        assert torch.equal(got, model(x))
    assert (got == 0).any()   # dropout ran
    with pytest.raises(cofx.StreamError, match="training mode"):
        co.forward_steps(x)
    co.eval()
    model.eval()
    assert torch.equal(co(x), model(x))
    assert co.forward_steps(x, pad_end=True).shape == model(x).shape


def test_report_says_which_nodes_were_checked_only_on_examples():
    class Scale(nn.Module):   # a leaf: cofx does not see its code
        def forward(self, x):
            return x * 2

    co = cofx.convert(nn.Sequential(conv(), Scale(), nn.ReLU()).to(D).eval(), clip(), leaf_modules=[Scale])
    assert [r.name for r in co.report.checked_on_examples] == ["_1"]
    assert {r.checked for r in co.report if r.name != "_1"} == {"rule"}
    assert "examples" in str(co.report) and co.report.to_dicts()[2]["checked"] == "examples"
