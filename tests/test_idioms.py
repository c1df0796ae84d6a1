"""Models written the way people write them: each converts exactly or is refused with a ConversionError.

The converter's rules were built from layer patterns; these are idioms (tables
sliced by the clip length, length-scaled ops, tuple and dict outputs, optional
arguments, 1-d adaptive heads, training branches, counters, data-dependent
leaves). `convert` validates what it built, so an idiom a rule misses is refused,
never stepped wrong. A random mix of idioms and layers, each model built for the clip length it draws,
asserts the same; a fraction is converted or run in training mode and keeps the training-mode contract.
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
JOINTS = 3


def conv(nd=1, k=3):
    return (nn.Conv1d if nd == 1 else nn.Conv2d)(C, C, k if nd == 1 else (k, 1), padding=k // 2 if nd == 1 else (k // 2, 0))


class Heads(nn.Module):
    """What the heads read: a classifier, tables, 1-d adaptive pools, a joint axis and its 1x1 classifier, and
    `frames`, the number of frames the head is given on the clip the model is built for (a classifier over
    time flattened is sized by it)."""
    def _heads(self, frames: int):
        self.frames = frames
        self.fc = nn.Linear(C, 3)
        self.pos = nn.Parameter(torch.randn(1, C, 64))
        self.w = nn.Parameter(torch.randn(64))
        self.avgpool, self.maxpool = nn.AdaptiveAvgPool1d(1), nn.AdaptiveMaxPool1d(1)
        self.joint_w = nn.Parameter(torch.randn(JOINTS))
        self.fcn = nn.Conv2d(C, 3, 1)
        self.flat_fc = nn.Linear(C * frames, 3)


class Head(Heads):
    """A temporal conv followed by the head under test, built for a clip of `frames` frames."""
    def __init__(self, head, nd=1, frames=8):
        super().__init__()
        self.c, self.head = conv(nd), head
        self._heads(frames)

    def forward(self, x):
        return self.head(self, self.c(x))


def _gcn_head(m, h):
    """A skeleton GCN's head: (B, C, T, joints) pooled over frames and joints by a kernel read off the tensor,
    then a 1x1 classifier."""
    x = h.unsqueeze(-1) * m.joint_w
    x = F.avg_pool2d(x, x.size()[2:])
    return m.fcn(x).view(x.size(0), -1)


EXACT = {   # idiom -> head; each must convert and step exactly
    "tuple of frames and pooled": lambda m, h: (h, h.mean(2)),
    "dict of frames and pooled": lambda m, h: {"frames": h, "pooled": m.fc(h.mean(2))},
    "adaptive_avg_pool1d(h, 1)": lambda m, h: nn.functional.adaptive_avg_pool1d(h, 1).flatten(1),
    "adaptive max pool": lambda m, h: F.adaptive_max_pool1d(h, 1).squeeze(-1),
    "nn.AdaptiveAvgPool1d(1) module, classifier": lambda m, h: m.fc(m.avgpool(h).flatten(1)),
    "nn.AdaptiveMaxPool1d(1) module": lambda m, h: m.maxpool(h).squeeze(-1),
    "max(2).values": lambda m, h: h.max(2).values,
    "reshape + amax": lambda m, h: h.reshape(h.shape[0], h.shape[1], -1).amax(2),
    "per-frame linear head": lambda m, h: m.fc(h.transpose(1, 2)).transpose(1, 2),
    "avg_pool1d with the kernel read off the clip": lambda m, h: F.avg_pool1d(h, h.size()[2:]).flatten(1),
    "max_pool1d with the kernel read off the clip": lambda m, h: F.max_pool1d(h, h.shape[2]).squeeze(-1),
    "sum over time / T (a mean written out)": lambda m, h: m.fc(h.sum(2) / h.shape[2]),
    "the centre frame h[:, :, T // 2]": lambda m, h: m.fc(h[:, :, h.shape[2] // 2]),
    "sum over time / T with the batch read off": lambda m, h: (h.sum(2) / h.size(2)).view(h.shape[0], -1),
    "avg_pool2d with the kernel read off (frames, joints)": _gcn_head,
    # a classifier sized for the clip's frames: a window of the clip length
    "time flattened into a classifier by reshape": lambda m, h: F.linear(h.reshape(h.shape[0], -1),
                                                                          torch.ones(3, C * m.frames, dtype=h.dtype)),
    "time flattened into a classifier by view": lambda m, h: F.linear(h.contiguous().view(h.size(0), -1),
                                                                       torch.ones(3, C * m.frames, dtype=h.dtype)),
    "time flattened into an nn.Linear by flatten": lambda m, h: m.flat_fc(h.flatten(1)),
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
    # one op returning the outputs in a container: each streams on its own
    "h.chunk(2, 1) returned": lambda m, h: h.chunk(2, 1),
    "the pooled frames split in two, returned": lambda m, h: h.mean(2).split(C // 2, 1),
    # consecutive frames stacked by a view (after a cut to whole pairs, so that any length is taken)
    "pairs of frames pooled by view + amax": lambda m, h: _pairs(h[:, :, :h.shape[2] - h.shape[2] % 2]).amax(-1),
    "pairs of frames stacked into channels (time reduction)": lambda m, h: _stacked_pairs(h.transpose(1, 2)),
}


def _pairs(h):
    return h.view(h.shape[0], C, h.shape[2] // 2, 2)


def _stacked_pairs(frames):
    """(B, T, C) frames cut to whole pairs, each pair stacked into one frame's channels, back to (B, 2C, T/2)."""
    frames = frames[:, :frames.shape[1] - frames.shape[1] % 2]
    return frames.reshape(frames.shape[0], frames.shape[1] // 2, 2 * C).transpose(1, 2)
REFUSED = {   # idiom -> (head, words the message must hold)
    "h / sqrt(T)": (lambda m, h: h / math.sqrt(h.shape[2]), "truediv"),
    "h * T ** -0.5": (lambda m, h: h * h.shape[2] ** -0.5, "mul"),
    "h * (T // 100 + 1)": (lambda m, h: h * (h.shape[2] // 100 + 1), "mul"),
    "self-attention over frames, every frame": (lambda m, h: _self_attention(h), "scaled_dot_product_attention"),
    "full_like(h, T)": (lambda m, h: h * torch.full_like(h, h.shape[2]), "full_like"),
    "the clip length returned": (lambda m, h: (h, h.shape[2]), "output"),
    # the length's residue: the same on the example and on a longer clip of whole multiples, other elsewhere
    "frames cropped to a multiple of 4": (lambda m, h: h[:, :, :h.shape[2] - h.shape[2] % 4], "getitem"),
    "frames padded to a multiple of 4": (lambda m, h: F.pad(h, (0, (4 - h.shape[2] % 4) % 4)), "pad"),
}


def test_frames_paired_half_a_clip_apart_by_a_view_are_refused():
    """``h.view(b, c, 2, T // 2)`` splits time into halves, not into groups of neighbours."""
    head = lambda m, h: h.view(h.shape[0], C, 2, h.shape[2] // 2).amax(2)   # noqa: E731
    with pytest.raises(cofx.ConversionError, match="node 'view"):
        cofx.convert(Head(head).to(D).eval(), clip(t=8))


def _paired(m, h):
    """Odd frames added to the even ones before them: the even frames cropped to as many as there are odd."""
    odd = h[:, :, 1::2]
    return odd + h[:, :, ::2][:, :, :odd.shape[2]]


def test_frames_paired_by_a_crop_read_off_the_clip_are_exact_where_the_crop_is_none_and_refused_elsewhere():
    """On an even clip the crop takes nothing and the steps pair frames as the model does at every length; on
    an odd clip it takes one frame, which on an even clip it would not: refused, naming the crop."""
    torch.manual_seed(0)
    assert_exact(Head(_paired).to(D).eval(), clip(t=8))
    with pytest.raises(cofx.ConversionError,
                       match=r"node 'getitem_3'.*\n  at .*test_idioms.py.*h\[:, :, ::2\]\[:, :, :odd.shape\[2\]\]"):
        cofx.convert(Head(_paired).to(D).eval(), clip(t=9))


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


def test_star_args_and_keyword_args_are_empty_as_a_step_calls_forward():
    class Options(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = conv()

        def forward(self, x, *args, **kwargs):
            h = self.c(x) * kwargs.get("scale", 2.0)
            return h + args[0] if args else h

    assert_exact(Options().to(D).eval(), clip())


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


class MovesItsTable(nn.Module):
    """MS-G3D's and 2s-AGCN's graph convolutions keep their adjacency as a plain attribute and move it to the
    input's device in forward (``self.A = self.A.to(x.device)``): tracing assigns a proxy there."""
    def __init__(self, then=lambda h: h):
        super().__init__()
        self.A, self.then = torch.rand(C, C, dtype=D), then
        self.c = nn.Conv1d(C, C, 3, padding=1).to(D)

    def forward(self, x):
        self.A = self.A.to(x.device)
        return self.then(self.c(torch.einsum("dc,nct->ndt", self.A, x)))


@pytest.mark.parametrize("then", [lambda h: h, lambda h: h.cumsum(2)], ids=["exact", "refused"])
def test_an_attribute_written_in_forward_is_given_back_as_it_was(then):
    model = MovesItsTable(then).eval()
    table, x = model.A, clip()
    want = model(x)
    try:
        co = cofx.convert(model, x)
    except cofx.ConversionError:
        co = None
    assert model.A is table and torch.equal(model(x), want)   # the user's model runs as before, converted or not
    if co is not None:
        report = verify(co, model)
        assert report.ok, str(report)


class Voiced(nn.Module):
    """A conv gated by an integer mask of the frames that carry signal, passed through `op` (a voice-activity
    gate: "from the first voiced frame on" is a running maximum along time)."""
    def __init__(self, op):
        super().__init__()
        self.c, self.op = nn.Conv1d(C, C, 3, padding=1), op

    def forward(self, x):
        voiced = (x.abs().sum(1, keepdim=True) > 0).int()
        return self.c(x) * self.op(voiced).to(x.dtype)


MASK_OPS = {"running max": lambda v: v.cummax(2).values, "running count": lambda v: v.cumsum(2),
            "sort": lambda v: v.sort(2).values, "flip": lambda v: v.flip(2), "roll": lambda v: v.roll(1, 2)}


@pytest.mark.parametrize("op", sorted(MASK_OPS))
def test_integer_masks_mixed_along_time_are_refused(op):
    """Random frames never leave a frame silent: the mask is all ones on them, and only the frame-by-frame check
    (integers and flags perturbed as floats are) can see that the op mixes frames."""
    with pytest.raises(cofx.ConversionError, match="node '(cummax|cumsum|sort|flip|roll)'"):
        cofx.convert(Voiced(MASK_OPS[op]).to(D).eval(), clip())


def test_integer_frames_used_as_indices_convert_exactly():
    """Codes read frame by frame (an argmax over channels, then an embedding): perturbed past their range they
    fail the lookup, so the check draws them from their own values."""
    class Codes(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.e = nn.Conv1d(C, C, 3, padding=1), nn.Embedding(C, C)

        def forward(self, x):
            return self.c(x) + self.e(x.argmax(1)).transpose(1, 2)

    torch.manual_seed(0)
    assert_exact(Codes().to(D).eval(), clip())


@pytest.mark.parametrize("features", ["log", "sqrt", "odd-power pool"])
def test_models_of_non_negative_frames_are_validated_on_frames_they_can_take(features):
    """A log-compressed spectrogram: on normal noise the model's outputs are NaN. The validation draws frames of
    the example's sign (and counts NaN on both sides as equal)."""
    first = {"log": lambda x: torch.log(x + 1e-6), "sqrt": torch.sqrt,
             "odd-power pool": lambda x: F.lp_pool1d(x, 3, 3, 1)}[features]

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(C, C, 3, padding=1)

        def forward(self, x):
            return self.c(first(x))

    torch.manual_seed(0)
    co = assert_exact(Features().to(D).eval(), clip().abs())
    assert co.receptive_field >= 3


def test_nan_counts_as_equal_only_where_both_sides_have_it():
    a = torch.tensor([1.0, float("nan"), float("inf")], dtype=D)
    assert max_error(a, a.clone()) == 0.0
    assert max_error(a, torch.tensor([1.0, 2.0, float("inf")], dtype=D)) == float("inf")
    assert max_error(a, torch.tensor([1.5, float("nan"), float("inf")], dtype=D)) == 0.5
    assert output_tolerance(torch.tensor([2.0, float("nan")], dtype=D)) == 2e-9   # of the values there are


class FramesNorm(nn.BatchNorm1d):
    """TSMixer's TimeBatchNorm2d: a BatchNorm over time and channels flattened, reshaped by its own forward."""
    def __init__(self, frames):
        super().__init__(frames * C)
        self.frames = frames

    def forward(self, x):
        return super().forward(x.reshape(x.shape[0], -1, 1)).reshape(x.shape[0], self.frames, C)


@pytest.mark.parametrize("head", ["quantile over the window", "a norm over the window with its own reshape"])
def test_ops_on_windows_that_reject_a_batch_of_no_windows_are_skipped_then(head):
    """A step that completes no window has no rows to run them on (torch.quantile and reshape(-1) raise there)."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.mix, self.norm = nn.Conv1d(C, C, 3, padding=1), nn.Linear(8, 8), FramesNorm(8)

        def forward(self, x):
            h = self.c(x)
            if head.startswith("quantile"):
                return torch.quantile(h, 0.75, dim=-1)
            return self.norm(self.mix(h).transpose(1, 2))   # (TSMixer: an MLP over time, then the norm)

    torch.manual_seed(0)
    model = Head().to(D).eval()
    model.norm.running_mean.uniform_(-1, 1)
    assert_exact(model, clip())
    unchecked = cofx.convert(model, clip(), validate=False)   # (the steps themselves, not the validation's)
    report = verify(unchecked, model)
    assert report.ok, str(report)


class DataLeaf(nn.Module):
    """Acts on the whole clip's statistics: frame by frame only for some inputs."""
    def forward(self, x):
        return x * 0 if x.abs().mean() > 1.5 else x


def test_data_dependent_leaf_is_refused():
    # weights that put the conv's output near the leaf's threshold on random inputs, so that the check's inputs
    # show both branches (README, guarantee 5: a leaf is checked on random inputs; with most weights it never
    # leaves one branch there, and passes as the identity it then is)
    torch.manual_seed(9)
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

    torch.manual_seed(0)
    with pytest.raises(cofx.ConversionError) as e:
        cofx.convert(Diverges().to(D).eval(), clip(), leaf_modules=[DataLeaf])
    msg = str(e.value)
    assert "node 'gate'" in msg and "the first node that differs" in msg and "gated = self.gate(h)" in msg


def test_diagnosis_of_an_input_the_clip_graph_cannot_take_says_so():
    """Diagnosing a clip longer than a table sized for the example: the clip graph itself fails on it, and the
    diagnosis says that rather than raising the graph's error."""
    from cofx.validate import first_divergent_node

    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.table = conv(), nn.Parameter(torch.randn(1, C, 8))

        def forward(self, x):
            return (self.conv(x) + self.table).mean(2)

    torch.manual_seed(0)
    co = cofx.convert(Whole().to(D).eval(), clip())
    node, detail = first_divergent_node(co, torch.randn(1, C, 11, dtype=D))
    assert node is None and detail.startswith("the clip graph itself fails on it (RuntimeError: ")


# -- a random mix of idioms and layers --------------------------------------------------------------
class FrameLeaf(nn.Module):
    """A leaf that does act frame by frame."""
    def forward(self, x):
        return torch.tanh(x) * 2


MIDDLE = {   # idioms inside the network: (B, C, T) -> (B, C, T), exact or to be refused; `i` is the stage
    "relu": lambda m, h, i: torch.relu(h),
    "gate": lambda m, h, i: h * torch.sigmoid(h),
    "length-scaled": lambda m, h, i: h * h.shape[2] ** -0.5,
    "length-divided": lambda m, h, i: h / math.sqrt(h.size(2)),
    "table sliced by T": lambda m, h, i: h + m.pos[:, :, :h.shape[2]],
    "table of the clip length": lambda m, h, i: h + m.pos[:, :, :m.stage_frames[i]],   # a constant: the frames there
    "dropout": lambda m, h, i: F.dropout(h, 0.5, training=m.training),
    "training branch": lambda m, h, i: h * 2 if m.training else h,
    "BatchNorm1d": lambda m, h, i: m.norms[str(i)](h),
    "nn.Dropout": lambda m, h, i: m.drop(h),
    "cumsum": lambda m, h, i: h.cumsum(2),
    "softmax over time": lambda m, h, i: h.softmax(2),
    "frame leaf": lambda m, h, i: m.frame_leaf(h),
    "data leaf": lambda m, h, i: m.data_leaf(h),
    "centred by the clip mean": lambda m, h, i: h - h.mean(2, keepdim=True),
    "view": lambda m, h, i: h.view(h.shape[0], h.shape[1], -1),
    "crop": lambda m, h, i: h[:, :, 1:],
    "arange": lambda m, h, i: h + torch.arange(h.shape[2], dtype=h.dtype),
    "counter": lambda m, h, i: m.count(h),
    "self-attention residual": lambda m, h, i: h + _self_attention(h),
    "class token along time, dropped": lambda m, h, i: torch.cat([m.pos[:, :, :1].expand(h.shape[0], -1, -1), h],
                                                                 2)[:, :, 1:],
}
BRANCHES_ON_TRAINING = {"dropout", "training branch"}   # idioms whose forward reads self.training
HEADS = {**EXACT, **{k: v for k, (v, _) in REFUSED.items()}, "stream": lambda m, h: h,
         "tuple of a stream and the batch size": lambda m, h: (h, h.shape[0])}
MODED = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)   # what a step cannot do in training mode


def _train_over_frozen_norms(model):
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _mc_dropout(model):
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()


TRAINING = {   # how a model is put in training mode before it is converted
    "training": lambda model: model.train(),
    "training over frozen BatchNorms": _train_over_frozen_norms,
    "eval with its Dropout modules on (MC dropout)": _mc_dropout,
}
AFTER = "converted in eval, then co.train()"   # the other training case: the converted model put in training mode


def _stage_frames(clip_frames: int, blocks, middle) -> tuple:
    """The frames after each block on a clip of `clip_frames` frames, and the frames the head gets."""
    frames, n = [], clip_frames
    for block, idiom in zip(blocks, middle):
        n = n - (block.span - 1) if block.kind == "cropped" else (n + 1) // 2 if block.kind == "strided" else n
        frames.append(n)
        n -= idiom == "crop"
    return frames, n


class IdiomNet(Heads):
    """Random blocks of the property tests with idioms between them, an optional argument and a random head,
    built for a clip length it draws (at least two frames at every stage, so a training BatchNorm has
    statistics); a fraction of them is converted in training mode."""
    def __init__(self, rng: random.Random):
        super().__init__()
        kinds = ["residual", "cropped", "concat", "gate", "strided", "pool"]
        self.stem = nn.Conv1d(C, C, 1)
        self.blocks = nn.ModuleList(Block(1, rng.choice(kinds), rng.choice([1, 3]), rng.randint(1, 2),
                                          rng.randint(0, 9), rng.choice([1, 2])) for _ in range(rng.randint(1, 3)))
        self.middle = [rng.choice(sorted(MIDDLE)) if rng.random() < 0.6 else None for _ in self.blocks]
        self.head_name = rng.choice(sorted(HEADS))
        self.clip_frames = rng.choice([8, 12, 16])
        self.stage_frames, frames = _stage_frames(self.clip_frames, self.blocks, self.middle)
        while min(self.stage_frames + [frames]) < 2:   # a clip the blocks and crops leave frames of
            self.clip_frames += 4
            self.stage_frames, frames = _stage_frames(self.clip_frames, self.blocks, self.middle)
        self._heads(frames)
        self.frame_leaf, self.data_leaf = FrameLeaf(), DataLeaf()
        self.norms = nn.ModuleDict({str(i): nn.BatchNorm1d(C) for i, idiom in enumerate(self.middle)
                                    if idiom == "BatchNorm1d"})
        if rng.random() < 0.35:   # a conv-BN stem
            self.norms["stem"] = nn.BatchNorm1d(C)
        if rng.random() < 0.35:   # dropout before the classifier
            self.head_drop = nn.Dropout(0.2)
        for norm in self.norms.values():   # statistics of a trained model, not the identity
            with torch.no_grad():
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.normal_()
                norm.bias.normal_()
        if "nn.Dropout" in self.middle:
            self.drop = nn.Dropout(0.3)
        self.register_buffer("calls", torch.zeros(()))
        self.training_case = rng.choice(sorted(TRAINING) + [AFTER]) if rng.random() < 0.4 else None

    def count(self, h):
        self.calls += 1
        return h

    def forward(self, x, mask=None, gain: float = 1.0):
        h = self.stem(x) * gain
        if "stem" in self.norms:
            h = self.norms["stem"](h)
        if mask is not None:
            h = h * mask
        for i, (block, idiom) in enumerate(zip(self.blocks, self.middle)):
            h = block(h)
            if idiom is not None:
                h = MIDDLE[idiom](self, h, i)
        if hasattr(self, "head_drop"):
            h = self.head_drop(h)
        return HEADS[self.head_name](self, h)


def random_idiom_model(rng: random.Random):
    torch.manual_seed(rng.getrandbits(31))   # the weights too are the seed's
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


def _equal(a, b) -> bool:
    """The same structure and plain values, and bit-equal tensors."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                            else x == y for x, y in zip(la, lb))


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_as_found(model, modes, state):
    """`convert` gives the model back as it found it: every submodule's mode, parameters and buffers."""
    assert [m.training for m in model.modules()] == modes
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Four-channel models: a second intra-op thread only adds hand-offs (on a busy two-core machine it makes
    the slow suite several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _exact_or_refused(model):
    """Converted and exact (the clip, a longer clip, chunkings: float64, 1e-9) or chunk invariant where not
    exact, or refused with a ConversionError; never another exception. The model is converted in the
    training mode it draws, and given back in it; converted, it keeps the training-mode contract."""
    torch.manual_seed(0)
    x = clip(t=model.clip_frames)
    model(x)   # the generator builds a model for its clip
    if model.training_case in TRAINING:
        TRAINING[model.training_case](model)
    modes, state = [m.training for m in model.modules()], _state(model)
    try:
        co = cofx.convert(model, x, leaf_modules=[FrameLeaf, DataLeaf])
    except cofx.ConversionError:
        _assert_as_found(model, modes, state)
        return
    _assert_as_found(model, modes, state)
    assert co.training == model.training
    if model.training_case == AFTER:
        co.train()
        model.train()   # the reference: the model in the mode co.train() gives its submodules
    if model.training_case is not None:
        _training_mode_contract(co, model, x)
        co.eval()
        model.eval()   # (co holds the model's submodules, not the model)
    report = verify(co, model, seed=1)   # after a training-mode forward: the BatchNorm statistics it updated
    if co.is_exact:
        assert report.ok, str(report)
        if any(r.kind in ("window", "attention") for r in co.report):
            return   # a window over the clip answers for its last frames, not for a longer clip
        longer = clip(t=model.clip_frames + 18)
        try:
            want = model(longer)
        except Exception:
            assert model.head_name.startswith("time flattened") or "table of the clip length" in model.middle
            return   # a model bound to its clip length (a head sized for it)
        got = co.forward_steps(longer, pad_end=True)
        wanted = as_steps(want, got)
        if _shapes(wanted) == _shapes(got):   # outputs that keep time (a reduction gives one value per window)
            assert max_error(got, wanted) <= output_tolerance(wanted)
    else:
        assert all(c.passed for c in report.checks if c.name != "deviation from the original"), str(report)


def _training_mode_contract(co, model, x):
    """README: `co.forward` while any module trains is the model's own forward (dropout, `if self.training`
    branches, BatchNorm statistics updated); steps need eval mode only where a BatchNorm or Dropout trains or
    a branch on self.training would differ, and say so with a StreamError."""
    before = _state(model)
    runs = []
    for call in (co, co.forward, model):   # the same random draws from the same seed
        model.load_state_dict(before)
        torch.manual_seed(1)
        runs.append((call(x), _state(model)))
    (want, want_state) = runs[-1]
    for got, got_state in runs[:-1]:
        assert _equal(got, want)
        assert _equal(got_state, want_state)   # the statistics a training BatchNorm updates, and its count
    training = [n for n, m in model.named_modules() if isinstance(m, MODED) and m.training]
    co.clean_state()
    if training or (model.training and any(i in BRANCHES_ON_TRAINING for i in model.middle)):
        for step in (lambda: co.forward_steps(x), lambda: co.forward_step(x[:, :, 0])):
            with pytest.raises(cofx.StreamError, match="training mode") as e:
                step()
            assert "co.eval()" in str(e.value)
            assert all(f"'{n}'" in str(e.value) for n in training[:3]) if len(training) <= 3 else "..." in str(e.value)
        return
    got = co.forward_steps(x, pad_end=True)   # nothing that trains changes a step: steps run in training mode
    co.clean_state()
    if co.is_exact:
        torch.manual_seed(1)
        want = as_steps(model(x), got)
        assert max_error(got, want) <= output_tolerance(want)


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


ONE_FRAME_MIXERS = {"GroupNorm over (C, T)": nn.GroupNorm(1, C), "flip": lambda h: h.flip(2),
                    "sort": lambda h: h.sort(2).values, "normalize along time": lambda h: F.normalize(h, dim=2)}


@pytest.mark.parametrize("op", sorted(ONE_FRAME_MIXERS))
def test_an_op_given_one_frame_by_the_example_is_checked_on_a_longer_clip(op):
    """A valid convolution as long as the example leaves one frame, and one frame cannot show that the next op
    mixes frames: the check runs again on a longer clip (these were reported exact and stepped wrong)."""
    class OneFrame(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.op = nn.Conv1d(C, C, 4), ONE_FRAME_MIXERS[op]

        def forward(self, x):
            return self.op(self.c(x))

    torch.manual_seed(0)
    with pytest.raises(cofx.ConversionError, match="does not act frame by frame"):
        cofx.convert(OneFrame().to(D).eval(), clip(t=4))
    model = OneFrame().to(D).eval()
    model.op = nn.ReLU()   # an op on each value: checked on the longer clip too, and exact
    assert_exact(model, clip(t=4))


@pytest.mark.parametrize("frames", [2, 3, 4])
@pytest.mark.parametrize("op", ["cumsum", "cummax", "flip"])
def test_ops_that_mix_a_few_frames_are_refused(op, frames):
    """Of two frames the middle one is the last, whose change a running sum never shows; of three the middle
    one is the one a flip keeps: a node with few frames is checked at each."""
    mix = {"cumsum": lambda h: h.cumsum(2), "cummax": lambda h: h.cummax(2).values, "flip": lambda h: h.flip(2)}[op]
    model = Head(lambda m, h: mix(h[:, :, 1:])).to(D).eval()
    with pytest.raises(cofx.ConversionError, match=f"node '{op}'"):
        cofx.convert(model, clip(t=frames + 1))


def test_a_layer_made_for_the_clip_after_a_node_of_one_frame_converts():
    """The longer clip that checks a node of one frame fails at a layer sized for the clip after it (nn.Linear
    over time): the node runs before it and is checked all the same."""
    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv1d(C, C, 4), nn.Linear(1, 2)

        def forward(self, x):
            h = self.c(x)
            return self.fc(h + h * h)

    torch.manual_seed(0)
    assert_exact(Sized().to(D).eval(), clip(t=4))


def test_embedded_codes_keep_the_weights_dtype_in_the_state():
    """An embedding of per-frame codes gives floats: the state after it (a conv's window, a delay buffer) holds
    them, from a chunk of no frames too (was int64: a raw error at a flush, set_state refusing its own state)."""
    class Codes(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.c = nn.Embedding(C, C), nn.Conv1d(C, C, 3, padding=1)

        def forward(self, x):
            h = self.e(x.argmax(1)).transpose(1, 2)
            return h + torch.relu(self.c(h))

    torch.manual_seed(0)
    model = Codes().to(D).eval()
    co = assert_exact(model, clip())
    with torch.no_grad():
        assert co.forward_steps(clip(t=0), pad_end=True) is None   # a flush of nothing
        co.forward_steps(clip(t=5))
        state = co.get_state()
        co.set_state(state)
        rest = clip(t=4)
        got = co.forward_steps(rest, pad_end=True)
        co.set_state(state)
        assert torch.equal(co.forward_steps(rest, pad_end=True), got)


class PooledAndLast(nn.Module):
    """A head torch.fx cannot trace (Python on the tensor's rank) that returns two reductions of the clip."""
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(C, 3), nn.Linear(C, 2)

    def forward(self, x):
        last = x[:, :, -1]
        if last.dim() > 2:
            last = last.mean(2)
        return self.fc(x.mean(2)), self.fc2(last)


def test_a_module_kept_whole_that_returns_a_tuple_streams_each_output():
    torch.manual_seed(0)
    model = nn.Sequential(conv(), PooledAndLast()).to(D).eval()
    x = clip(t=10)
    co = assert_exact(model, x)
    pooled, last = co.forward_steps(x, pad_end=True)
    want_pooled, want_last = model(x)
    assert torch.allclose(pooled[..., -1], want_pooled, atol=1e-12) and torch.allclose(last[..., -1], want_last,
                                                                                        atol=1e-12)


def test_an_example_on_which_the_model_is_nan_everywhere_is_refused_saying_so():
    """A fractional power of negative frames is NaN: no change to a frame shows, so mixing cannot be seen (a
    norm over time after it stepped wrong on non-negative frames)."""
    class NormOverTime(nn.Module):
        def forward(self, x):
            return F.normalize(F.lp_pool1d(x, 3, 1).sum(1, keepdim=True), dim=2)

    torch.manual_seed(0)
    with pytest.raises(cofx.ConversionError, match="NaN or infinite in every frame on the example clip.*\n.*\n"
                                                   "  fix: convert with an example on which the model computes"):
        cofx.convert(NormOverTime(), torch.randn(1, 16, 10, dtype=D))
    with pytest.raises(cofx.ConversionError, match="does not act frame by frame"):
        cofx.convert(NormOverTime(), torch.rand(1, 16, 10, dtype=D))


def test_an_infinite_value_in_the_example_is_checked_on_the_numbers_around_it():
    """One inf in the example spreads to frames around it (inf, -inf, NaN after a gelu): the same infinity on
    both sides counts as equal, and the other frames are checked at the scale of the finite values (an inf
    once made the tolerance infinite); an op mixing frames is still refused."""
    class SensorConv(nn.Module):
        def __init__(self, mix):
            super().__init__()
            self.conv, self.lin, self.mix = nn.Conv1d(3, 16, 5, padding=2), nn.Linear(16, 5), mix

        def forward(self, x):
            h = F.gelu(self.conv(x.transpose(1, 2)))
            return self.lin((h + h.roll(1, 2) if self.mix else h).transpose(1, 2))

    torch.manual_seed(0)
    example = torch.randn(1, 8, 3, dtype=D)
    example[0, 1, 0] = float("inf")
    model = SensorConv(False).double().eval()
    co = cofx.convert(model, example, time_dim=1)
    x = torch.randn(1, 12, 3, dtype=D)
    with torch.no_grad():
        assert torch.allclose(co.forward_steps(x, pad_end=True), model(x), atol=1e-12)
    with pytest.raises(cofx.ConversionError, match="does not act frame by frame"):
        cofx.convert(SensorConv(True).double().eval(), example, time_dim=1)


def test_a_group_norm_of_one_value_per_group_steps_one_frame_of_one_stream():
    """Frames folded into the batch, then GroupNorm(C, C): torch refuses it a single row (one frame of one
    stream), though each row is normalised alone."""
    class PerFrameNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.norm = conv(), nn.GroupNorm(C, C)
            nn.init.normal_(self.norm.bias)   # (each group is one value: what it gives is its bias)

        def forward(self, x):
            b, c, t = x.shape
            h = self.c(x).transpose(1, 2).reshape(b * t, c)
            return self.norm(h).reshape(b, t, c).transpose(1, 2)

    torch.manual_seed(0)
    model, x = PerFrameNorm().to(D).eval(), clip(t=8)
    co = assert_exact(model, x)
    co.clean_state()
    frames = [co.forward_step(x[:, :, i]) for i in range(8)]
    frames = [f for f in frames if f is not None] + [co.forward_steps(x[:, :, :0], pad_end=True)]
    assert torch.allclose(torch.cat([f if f.dim() == 3 else f.unsqueeze(2) for f in frames], 2), model(x), atol=1e-12)


class TimeReduction(nn.Module):
    """An RNN-T encoder's time reduction as torchaudio writes it: the clip cut to whole groups of k frames,
    each group stacked into one frame's features."""
    def __init__(self, k):
        super().__init__()
        self.k, self.fc = k, nn.Linear(C * k, 3)

    def forward(self, x):   # (B, T, C)
        b, t, d = x.shape
        n = t - t % self.k
        return self.fc(x[:, :n, :].reshape(b, n // self.k, d * self.k))


class PaddedStacking(TimeReduction):
    """NeMo's stacking subsampling: the clip padded with zeros to whole groups of k frames, then stacked."""
    def forward(self, x):
        b, t, d = x.shape
        pad = (self.k - t % self.k) % self.k
        return self.fc(F.pad(x, (0, 0, 0, pad)).reshape(b, (t + pad) // self.k, d * self.k))


class ReReadStacking(TimeReduction):
    """The clip cut to whole groups, its shape read again after the cut."""
    def forward(self, x):
        t = x.shape[1]
        x = x[:, :t - t % self.k]
        b, t, d = x.shape
        return self.fc(x.reshape(b, t // self.k, self.k * d))


class NarrowedStacking(TimeReduction):
    """The clip cut to whole groups by narrow."""
    def forward(self, x):
        b, t, d = x.shape
        n = t // self.k * self.k
        return self.fc(x.narrow(1, 0, n).reshape(b, n // self.k, self.k * d))


class ChannelsFirstStacking(TimeReduction):
    """(B, T, C) frames transposed to (B, C, T), cut to whole groups there, then transposed back and stacked."""
    def forward(self, x):
        h = x.transpose(1, 2)
        n = h.shape[2] - h.shape[2] % self.k
        frames = h[:, :, :n].transpose(1, 2)
        return self.fc(frames.reshape(x.shape[0], n // self.k, self.k * C))


class NeMoStacking(TimeReduction):
    """NeMo's StackingSubsampling as written: padded to whole groups, the size read again, torch.reshape."""
    def forward(self, x):
        b, t, h = x.size()
        pad = (self.k - t % self.k) % self.k
        x = F.pad(x, (0, 0, 0, pad))
        _, t, _ = x.size()
        return self.fc(torch.reshape(x, (b, t // self.k, h * self.k)))


class SizeReadStacking(TimeReduction):
    """Cut to whole groups, the new length read with x.size(1)."""
    def forward(self, x):
        b, t, d = x.size()
        x = x[:, :t - t % self.k]
        return self.fc(x.reshape(b, x.size(1) // self.k, self.k * d))


@pytest.mark.parametrize("model_type", [TimeReduction, PaddedStacking, ReReadStacking, NarrowedStacking,
                                        ChannelsFirstStacking, NeMoStacking, SizeReadStacking])
@pytest.mark.parametrize("k, frames", [(4, 17), (4, 16), (3, 20)])
def test_a_clip_cut_or_padded_to_whole_groups_then_stacked_steps_exactly_at_every_length(model_type, k, frames):
    torch.manual_seed(0)
    model = model_type(k).to(D).eval()
    co = cofx.convert(model, torch.randn(1, frames, C, dtype=D), time_dim=1)
    assert co.is_exact and co.stride == k
    for length in range(frames, 2 * frames + k):
        x = torch.randn(2, length, C, dtype=D)
        co.clean_state()
        got, want = co.forward_steps(x, pad_end=True), model(x)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12), length


@pytest.mark.parametrize("example", [20, 25])
@pytest.mark.parametrize("crop", [lambda h, t: h[:, :, :t - t % 5], lambda h, t: h.narrow(2, 0, t // 5 * 5)],
                         ids=["t - t % 5", "narrow to t // 5 * 5"])
def test_a_crop_computed_from_the_length_by_a_remainder_is_refused_whatever_the_example(example, crop):
    """On examples of whole multiples every run crops nothing; the arithmetic itself is what is refused."""
    class Cropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = conv()

        def forward(self, x):
            h = self.c(x)
            return crop(h, h.shape[2])

    with pytest.raises(cofx.ConversionError, match="crops time at a position computed from the clip length by "
                                                   "other arithmetic than adding or subtracting"):
        cofx.convert(Cropped().to(D).eval(), clip(t=example))


class DictLeaf(nn.Module):
    """torch.fx cannot trace it (Python on the rank); it returns a dict."""
    def forward(self, x):
        y = x * 2 if x.dim() > 2 else x
        return {"a": y.cumsum(1), "b": -x}


def test_outputs_joined_as_tuples_or_returned_as_a_dict_by_a_module_kept_whole_stream_each():
    class Joined(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.leaf = conv(), DictLeaf()

        def forward(self, x):
            h = self.c(x)
            d = self.leaf(h)
            return h.chunk(2, 1) + (d["a"] + d["b"], d)

    torch.manual_seed(0)
    model, x = Joined().to(D).eval(), clip(t=8)
    co = assert_exact(model, x)
    got, want = co.forward_steps(x, pad_end=True), model(x)
    assert _shapes(got) == _shapes(want) and max_error(got, want) <= 1e-12


def test_an_output_that_is_zero_does_not_tighten_the_tolerance_of_the_others():
    """Each output of several is held to its own magnitude: a ReLU output that is off in one stream is zero."""
    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a = nn.Conv1d(C, C, 1), nn.Conv1d(C, C, 3, 2, 1)

        def forward(self, x):
            h = self.stem(x)
            return torch.relu(torch.relu(self.a(h)) + h[:, :, ::2])[:, :3].unbind(1)

    refused = 0
    for seed in range(12):
        torch.manual_seed(seed)
        try:
            cofx.convert(Three().to(D).eval(), torch.randn(1, C, 4, dtype=D))
        except cofx.ConversionError:
            refused += 1
    assert refused == 0


class Spectrogram(nn.Module):
    """A log-magnitude front end on raw audio (B, samples), then a per-frame classifier."""
    def __init__(self, win=16, return_complex=True, normalized=False, center=False):
        super().__init__()
        self.register_buffer("window", torch.hann_window(win, dtype=D))
        self.fc = nn.Linear(9, 3)
        self.win, self.complex, self.normalized, self.center = win, return_complex, normalized, center

    def forward(self, wav):
        spec = torch.stft(wav, 16, 8, win_length=self.win, window=self.window, center=self.center,
                          return_complex=self.complex, normalized=self.normalized)
        power = spec.abs().pow(2) if self.complex else spec.pow(2).sum(-1)
        return self.fc(torch.log(power + 1e-6).transpose(1, 2))


@pytest.mark.parametrize("win, return_complex, normalized", [(16, True, False), (12, True, True), (16, False, False)])
def test_an_uncentred_stft_front_end_steps_exactly_at_every_length(win, return_complex, normalized):
    torch.manual_seed(0)
    model = Spectrogram(win, return_complex, normalized).to(D).eval()
    co = cofx.convert(model, torch.randn(1, 160, dtype=D), time_dim=1)
    assert co.is_exact and co.stride == 8 and co.receptive_field == 16
    for samples in (160, 161, 175, 333):
        x = torch.randn(2, samples, dtype=D)
        co.clean_state()
        got, want = co.forward_steps(x, pad_end=True), model(x)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-10), samples


def test_a_centred_stft_is_refused_saying_to_pass_center_false():
    with pytest.raises(cofx.ConversionError, match="centred stft pads each end .*\n.*\n  fix: compute it with "
                                                   "center=False"):
        cofx.convert(Spectrogram(center=True).to(D).eval(), torch.randn(1, 160, dtype=D), time_dim=1)


def test_stacked_frames_after_a_cut_whose_shape_is_read_again_save_and_load(tmp_path):
    """The rewritten graph is plain ops: a loaded file traces it again."""
    torch.manual_seed(0)
    model, x = ReReadStacking(3).to(D).eval(), torch.randn(1, 20, C, dtype=D)
    co = cofx.convert(model, x, time_dim=1)
    cofx.save(co, tmp_path / "stacked.continual.pt")
    loaded = cofx.load(tmp_path / "stacked.continual.pt", trust=True)
    stream = torch.randn(2, 31, C, dtype=D)
    assert torch.allclose(loaded.forward_steps(stream, pad_end=True), model(stream), atol=1e-12)


class FramesAndPooled(nn.Module):
    """torch.fx cannot trace it (a branch on a value); it returns its frames and their mean over time."""
    def forward(self, h):
        if h.sum() > -1e30:
            return h, h.mean(2)
        return h, h.mean(2)


def test_a_value_pooled_inside_a_module_kept_whole_that_also_returns_frames_is_refused_saying_so():
    model = nn.Sequential(conv(), FramesAndPooled()).to(D).eval()
    with pytest.raises(cofx.ConversionError, match=r"takes a value without time out of what node '_1' \(module '1'\)"
                                                   r".*\n  fix: make that module traceable"):
        cofx.convert(model, clip(t=8))


def test_a_value_pooled_inside_a_module_kept_whole_is_refused_however_deep_in_its_output():
    class Nested(nn.Module):
        def forward(self, h):
            if h.sum() > -1e30:
                return {"frames": (h, 2 * h), "pooled": [h.amax(2)]}
            return {"frames": (h, 2 * h), "pooled": [h.amax(2)]}

    with pytest.raises(cofx.ConversionError, match="takes a value without time out of what node '_1'"):
        cofx.convert(nn.Sequential(conv(), Nested()).to(D).eval(), clip(t=8))


def test_a_pad_whose_list_is_built_in_forward_is_read_as_the_padding_it_is():
    class Padded(nn.Module):
        def forward(self, x):
            return F.pad(x, [0, 0] * (x.dim() - 2) + [0, 1])[:, :, 1:]   # one frame more at the end, the first cut

    model = Padded().to(D).eval()
    co = assert_exact(model, clip(t=8))
    x = clip(t=11, batch=2)
    assert torch.allclose(co.forward_steps(x, pad_end=True), model(x), atol=1e-12)


@pytest.mark.parametrize("options", [dict(onesided=False), dict(win_length=12),
                                     dict(win_length=12, onesided=False, normalized=True)],
                         ids=["two-sided", "short rectangular window", "both, normalised"])
def test_uncentred_stft_options_step_exactly(options):
    class Magnitude(nn.Module):
        def forward(self, wav):
            return torch.stft(wav, 16, 8, center=False, return_complex=True, **options).abs().transpose(1, 2)

    model = Magnitude().to(D).eval()
    co = cofx.convert(model, torch.randn(1, 160, dtype=D), time_dim=1)
    for samples in (160, 175):
        x = torch.randn(2, samples, dtype=D)
        co.clean_state()
        assert torch.allclose(co.forward_steps(x, pad_end=True), model(x), atol=1e-10)
