"""Real video models from torchvision and pytorchvideo, built without weights, converted unmodified.

Marked slow: they run in CI; skip them locally with -m "not slow".
"""
import warnings

import pytest
import torch

import cofx
from guarantees import assert_chunk_invariance, assert_equivalent, max_err

warnings.filterwarnings("ignore", category=UserWarning)
tvm = pytest.importorskip("torchvision.models.video")
hub = pytest.importorskip("pytorchvideo.models.hub")
from pytorchvideo.models.x3d import create_x3d  # noqa: E402

pytestmark = pytest.mark.slow


def _seeded(build):
    """The model with random BatchNorm statistics and affines: zero-initialised final norms would hide
    residual branches (and their squeeze-and-excitation gates) from every comparison."""
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _check_exact(model, clip, stream_frames):
    co = cofx.convert(model, clip)
    assert co.is_exact, [r.name for r in co.report if not r.exact]
    assert_equivalent(co, model, clip)
    stream = torch.randn(1, *clip.shape[1:2], stream_frames, *clip.shape[3:])
    assert_chunk_invariance(co, stream)
    return co


@pytest.mark.parametrize("name,frames,size,delay,stride", [
    ("r3d_18", 8, 32, 54, 8), ("mc3_18", 8, 32, 12, 1), ("r2plus1d_18", 8, 32, 54, 8)])
def test_torchvision_resnets_3d(name, frames, size, delay, stride):
    model = _seeded(lambda: getattr(tvm, name)(num_classes=10))
    co = _check_exact(model, torch.randn(1, 3, frames, size, size), 3 * 8 + delay)
    assert (co.delay, co.stride) == (delay, stride)


def test_torchvision_s3d():
    model = _seeded(lambda: tvm.s3d(num_classes=10))   # its head pools 7x7 at 1/32: 224x224 frames
    _check_exact(model, torch.randn(1, 3, 16, 224, 224), 40)


@pytest.mark.parametrize("name", ["slow_r50", "i3d_r50"])
def test_pytorchvideo_resnets(name):
    model = _seeded(lambda: getattr(hub, name)(pretrained=False))
    co = _check_exact(model, torch.randn(1, 3, 8, 224, 224), 24)
    if name == "i3d_r50":   # a temporal max pool with stride 2 between stages
        assert co.stride == 2


def test_x3d_without_squeeze_excitation_is_exact():
    model = _seeded(lambda: create_x3d(input_clip_length=6, input_crop_size=64, model_num_class=10,
                                       se_ratio=0, head_activation=None))
    _check_exact(model, torch.randn(1, 3, 6, 64, 64), 30)


def test_x3d_squeeze_excitation_is_windowed_and_everything_else_exact():
    model = _seeded(lambda: create_x3d(input_clip_length=6, input_crop_size=64, model_num_class=10,
                                       head_activation=None))
    clip = torch.randn(1, 3, 6, 64, 64)
    co = cofx.convert(model, clip)
    assert not co.is_exact
    windowed = [n for n in co.graph.nodes if n.meta.get("cofx_kind") == "windowed"]
    assert windowed and all(any(cls.__name__ == "SqueezeExcitation" for _, cls in n.meta["nn_module_stack"].values())
                            for n in windowed)
    for row in co.report:
        if row.kind == "windowed":
            assert row.note.startswith("causal window of 6 frames")
        elif row.kind in ("sliding", "reduction"):
            assert row.note == "" or "window" in row.note
    head = [r for r in co.report if r.kind == "reduction"]
    assert head and all(r.kernel == 6 or r.kernel == 1 for r in head)
    # the measured deviation from the clip model is real and small
    with torch.no_grad():
        dev = max_err(co.forward_steps(clip, pad_end=True)[..., -1], model(clip))
    assert 0 < dev < model(clip).abs().max()
    assert_chunk_invariance(co, torch.randn(1, 3, 30, 64, 64))
    # per-frame gates (the paper's code) and a wider final pool, by module class and path
    co1 = cofx.convert(model, clip, window={"SqueezeExcitation": 1, "blocks.5.pool.pool": 12})
    notes = {r.note for r in co1.report.windowed}
    assert "causal window of 1 frames (mean), clip length here is 6" in notes
    assert next(r for r in co1.report if r.name == "blocks_5_pool_pool").kernel == 12
    with pytest.raises(cofx.ConversionError, match="strict=True refuses windowed approximations"):
        cofx.convert(model, clip, strict=True)


def test_hub_x3d_xs_one_liner():
    model = _seeded(lambda: hub.x3d_xs(pretrained=False))
    co = cofx.convert(model)
    assert co.clip_shape == (1, 3, 4, 160, 160)
    assert len(co.report.windowed) > 0 and not co.is_exact
    clip = torch.randn(1, 3, 4, 160, 160)
    with torch.no_grad():
        out = co.forward_steps(clip, pad_end=True)
        assert out.shape == (1, 400, 1)
        assert torch.equal(co(clip), model(clip))


def test_x3d_s_step_flops_are_a_tenth_of_the_clip():
    from cofx.flops import clip_flops, step_flops
    model = _seeded(lambda: hub.x3d_s(pretrained=False))
    co = cofx.convert(model)
    assert co.clip_shape == (1, 3, 13, 160, 160)
    assert step_flops(co) * 10 <= clip_flops(co)


@pytest.mark.parametrize("name,shape,where", [
    ("mvit_v1_b", (1, 3, 16, 224, 224), "module 'blocks.0.attn', MultiscaleAttention"),
    ("swin3d_t", (1, 3, 16, 64, 64), "module 'features.0.0.attn', ShiftedWindowAttention3d")])
def test_video_transformers_are_refused_at_their_attention(name, shape, where):
    model = _seeded(lambda: getattr(tvm, name)(num_classes=10))
    with pytest.raises(cofx.ConversionError, match="tokens are frames") as err:   # tokens mix frames and pixels
        cofx.convert(model, torch.randn(shape))
    assert where in str(err.value) and "attention" in str(err.value).split("fix:")[0]
