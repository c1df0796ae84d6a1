"""Attention forms that tests/test_attention.py does not write: masks computed from the frames, boolean and
additive masks (causal and banded) handed to `F.scaled_dot_product_attention` and `nn.MultiheadAttention`, heads
split by einsum, blocks stacked by hand and encoders read at a token other than the first or last.

Models take (B, T, C) sensor streams (time_dim=1); a per-frame Linear is the only op before the attention, so
every exact model is also checked to answer at step t for the last N frames (one-answer models) or to give the
clip model's frames from the first frame on (per-frame outputs of causal attention). A form that does not convert
must be a `cofx.ConversionError` that says what is refused.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cofx
from cofx.verify import by_chunks, chunk_sizes

D = torch.float64
C = 4          # input channels per frame
N = 6          # clip length of the example
ATOL = 1e-10


def frames(batch: int, length: int, zeros=(), seed: int = 0) -> torch.Tensor:
    """(batch, length, C) float64 frames; the frames (b, t) in `zeros` are all zero (padding, a dropped sensor)."""
    x = torch.randn(batch, length, C, dtype=D, generator=torch.Generator().manual_seed(seed))
    for b, t in zeros:
        x[b, t] = 0
    return x


def steps(co, stream):
    co.clean_state()
    with torch.no_grad():
        outs = [co.forward_step(stream[:, t]) for t in range(stream.shape[1])]
    co.clean_state()
    return outs


def assert_exact(model: nn.Module, *, per_frame: bool = False, zeros=(), clip_zeros=()):
    """Exact on a clip (pad_end), step t answers as the model on the stream's last N frames (or the causal model's
    newest frame), and random chunkings give the frames of frame-by-frame stepping."""
    torch.manual_seed(0)
    model = model.to(D).eval()
    co = cofx.convert(model, frames(1, N, seed=1), time_dim=1)
    assert co.is_exact, str(co.report)
    x = frames(2, N, clip_zeros, seed=2)
    with torch.no_grad():
        co.clean_state()
        whole = co.forward_steps(x, pad_end=True)
        co.clean_state()
        want = model(x)
    if per_frame:
        assert whole.shape == want.shape
        assert torch.allclose(whole, want, atol=ATOL, rtol=0), (whole - want).abs().max()
    else:
        assert whole.shape == (*want.shape, 1), (whole.shape, want.shape)
        assert torch.allclose(whole[..., -1], want, atol=ATOL, rtol=0), (whole[..., -1] - want).abs().max()

    length = N + 9
    stream = frames(2, length, zeros, seed=3)
    outs = steps(co, stream)
    with torch.no_grad():
        if per_frame:
            assert co.delay == 0 and all(o is not None for o in outs)
            for t in range(length):
                want = model(stream[:, max(0, t - N + 1):t + 1])[:, -1]
                assert torch.allclose(outs[t], want, atol=ATOL, rtol=0), (t, (outs[t] - want).abs().max())
            co.clean_state()
            got = co.forward_steps(stream[:, :N])          # no end flush: the frames are all there already
            co.clean_state()
            assert torch.allclose(got, model(stream[:, :N]), atol=ATOL, rtol=0)
            stepped = torch.stack(outs, 1)
        else:
            assert co.delay == N - 1
            assert all(o is None for o in outs[:N - 1]) and all(o is not None for o in outs[N - 1:])
            for t in range(N - 1, length):
                want = model(stream[:, t - N + 1:t + 1])
                assert torch.allclose(outs[t], want, atol=ATOL, rtol=0), (t, (outs[t] - want).abs().max())
            stepped = torch.stack(outs[N - 1:], -1)
    for seed in range(3):
        co.clean_state()
        with torch.no_grad():
            chunked = by_chunks(co, stream, chunk_sizes(length, random.Random(seed)))
        co.clean_state()
        part = chunked[:, :stepped.shape[1]] if per_frame else chunked[..., :stepped.shape[-1]]
        assert torch.allclose(part, stepped, atol=ATOL, rtol=0), (seed, (part - stepped).abs().max())
    return co


def assert_refused(model: nn.Module, match: str):
    torch.manual_seed(0)
    with pytest.raises(cofx.ConversionError, match=match) as err:
        cofx.convert(model.to(D).eval(), frames(1, N, seed=1), time_dim=1)
    return str(err.value)


def read(h, how):
    if how == "frames":
        return h
    if how == "mean":
        return h.mean(1)
    return h[:, -1 if how == "last" else how]


# ---------------------------------------------------------------- 1. key-padding masks computed from the frames

Z_STREAM = [(0, 2), (1, 5), (0, 9), (1, 10), (0, 11)]   # zero frames, never a whole window of them
Z_CLIP = [(0, 1), (1, 3), (1, 4)]


class PaddedMHA(nn.Module):
    """`key_padding_mask=` from the frames themselves: an all-zero frame is padding."""

    def __init__(self, batch_first=True, readout="last"):
        super().__init__()
        self.embed, self.head = nn.Linear(C, 8), nn.Linear(8, 3)
        self.att = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.batch_first, self.readout = batch_first, readout

    def forward(self, x):
        pad = x.abs().sum(-1) == 0                        # (B, T)
        h = self.embed(x)
        if self.batch_first:
            a, _ = self.att(h, h, h, key_padding_mask=pad, need_weights=False)
        else:
            t = h.transpose(0, 1)
            a = self.att(t, t, t, key_padding_mask=pad, need_weights=False)[0].transpose(0, 1)
        h = h + a
        if self.readout == "masked mean":
            keep = (~pad).to(h.dtype)[..., None]
            return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1))
        return self.head(read(h, self.readout))


class PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(C, 8), nn.Linear(8, 3)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x):
        return self.head(self.enc(self.embed(x), src_key_padding_mask=x.abs().sum(-1) == 0)[:, -1])


class PaddedSDPA(nn.Module):
    """A boolean or additive key mask from the frames, handed to `F.scaled_dot_product_attention`."""

    def __init__(self, kind):
        super().__init__()
        self.embed, self.q, self.k, self.v, self.head = (nn.Linear(C, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                                         nn.Linear(8, 8), nn.Linear(8, 3))
        self.kind = kind

    def forward(self, x):
        h = self.embed(x)
        keep = x.abs().sum(-1) != 0                       # (B, T)
        if self.kind == "bool":
            mask = keep[:, None, :]
        elif self.kind == "additive, zeros_like":
            mask = torch.zeros_like(keep, dtype=h.dtype).masked_fill(~keep, float("-inf"))[:, None, :]
        elif self.kind == "additive, zeros(keep.shape)":
            mask = torch.zeros(keep.shape, dtype=h.dtype, device=h.device).masked_fill(~keep, float("-inf"))[:, None]
        elif self.kind == "additive, where":
            mask = torch.where(keep, 0.0, float("-inf")).to(h.dtype)[:, None, :]
        elif self.kind == "pairwise bool":                # (B, T, T): both frames real, or the frame itself
            mask = keep[:, None, :] & keep[:, :, None] | torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        h = h + F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h), attn_mask=mask)
        return self.head(h[:, -1])


class PaddedCausal(nn.Module):
    """Per-frame outputs: a causal mask and a key-padding mask from the frames."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(C, 8), nn.Linear(8, 3)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        h = self.embed(x)
        a, _ = self.att(h, h, h, attn_mask=causal, key_padding_mask=x.abs().sum(-1) == 0, need_weights=False)
        return self.head(h + a)


class MaskedPool(nn.Module):
    """No mask in the attention; a pool over the real frames afterwards, the mask from the frames."""

    def __init__(self, how):
        super().__init__()
        self.embed, self.head, self.how = nn.Linear(C, 8), nn.Linear(8, 3), how

    def forward(self, x):
        keep = x.abs().sum(-1) != 0                       # (B, T) bool, frame by frame
        h = self.embed(x)
        a = h + F.scaled_dot_product_attention(h, h, h)
        if self.how == "cast":
            w = keep[..., None].to(a.dtype)
            return self.head((a * w).sum(1) / w.sum(1).clamp_min(1))
        a = a.masked_fill(~keep[..., None], 0.0)          # the boolean mask used inside the window
        return self.head(a.sum(1) / keep.sum(1, keepdim=True).clamp_min(1))


KEY_PADDING = {
    "MultiheadAttention batch first, key_padding_mask, last frame": lambda: PaddedMHA(True, "last"),
    "MultiheadAttention time first, key_padding_mask, last frame": lambda: PaddedMHA(False, "last"),
    "MultiheadAttention, key_padding_mask, masked mean": lambda: PaddedMHA(True, "masked mean"),
    "TransformerEncoder, src_key_padding_mask": PaddedEncoder,
    "SDPA, boolean key mask (B, 1, T)": lambda: PaddedSDPA("bool"),
    "SDPA, additive key mask from zeros_like": lambda: PaddedSDPA("additive, zeros_like"),
    "SDPA, additive key mask from torch.where": lambda: PaddedSDPA("additive, where"),
}


@pytest.mark.parametrize("case", sorted(KEY_PADDING))
def test_key_padding_masks_from_the_frames_are_exact(case):
    """The mask is a stream like the frames: each window holds its own frames' mask."""
    co = assert_exact(KEY_PADDING[case](), zeros=Z_STREAM, clip_zeros=Z_CLIP)
    assert any(row.kind == "attention" for row in co.report)


def test_causal_and_key_padding_masks_give_per_frame_outputs():
    assert_exact(PaddedCausal(), per_frame=True, zeros=Z_STREAM, clip_zeros=Z_CLIP)


class FilledKeyPadding(nn.Module):
    """Causal attention written out, the key-padding mask from the frames filled as HF fills it."""

    def __init__(self, fill):
        super().__init__()
        self.embed, self.qkv, self.head, self.fill = nn.Linear(C, 8), nn.Linear(8, 24), nn.Linear(8, 3), fill

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(self.embed(x)).chunk(3, -1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        s = (q @ k.transpose(-2, -1)).masked_fill(causal | (x.abs().sum(-1) == 0)[:, None, :], self.fill)
        return self.head(s.softmax(-1) @ v)


def test_a_finite_fill_of_a_key_padding_mask_is_refused_for_per_frame_outputs():
    """A query whose every key is padding, filled with -1e9, attends to every frame, future ones too: the clip
    model is not causal on a clip that starts with padding (its first outputs read the frames after them)."""
    torch.manual_seed(0)
    x = frames(1, N)
    x[:, :2] = 0
    model = FilledKeyPadding(-1e9).double().eval()
    later = x.clone()
    later[:, 5:] = frames(1, N - 5, seed=1)
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, :2], model(later)[:, :2])   # its first two outputs read frame 5 on
    assert_refused(model, "first frames zero \\(padding\\): a query whose every key is masked, by a finite fill")
    assert_exact(FilledKeyPadding(float("-inf")), per_frame=True, zeros=Z_STREAM, clip_zeros=Z_CLIP)


class FilledInPlace(nn.Module):
    """transformers' `_make_causal_mask`: a mask made for the clip length, then filled in place."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Linear(C, 8), nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        T = h.shape[1]
        mask = torch.full((T, T), -1e9, dtype=h.dtype)
        cond = torch.arange(mask.size(-1))
        mask.masked_fill_(cond < (cond + 1).view(mask.size(-1), 1), 0)
        q, k, v = self.qkv(h).chunk(3, -1)
        return self.head(((q @ k.transpose(-2, -1) + mask).softmax(-1) @ v))


def test_a_causal_mask_filled_in_place_gives_per_frame_outputs():
    """The fill is what later code reads: the window builds the mask filled (it once built it unfilled)."""
    assert_exact(FilledInPlace(), per_frame=True)


class MaskAcrossChannels(nn.Module):
    """A "mask" whose frames lie along its first axis after the batch, not its key axis."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(C, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        mask = (x.abs().sum(-1) != 0)[:, :, None, None].expand(-1, -1, N, N)   # (B, T, N, N)
        return self.head(F.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None], attn_mask=mask)[:, 0, -1])


def test_a_mask_whose_frames_are_not_along_its_key_axis_is_refused():
    message = assert_refused(MaskAcrossChannels(), "takes a mask from the stream")
    assert "query or key axis" in message and "key_padding_mask" in message.split("fix:")[1]


def test_additive_key_mask_sized_by_keep_shape_is_refused_with_the_fix():
    message = assert_refused(PaddedSDPA("additive, zeros(keep.shape)"), "reads the batch size and the clip length")
    assert "zeros_like" in message.split("fix:")[1]


def test_pairwise_boolean_mask_from_the_frames_is_exact():
    """The window holds a boolean mask (a state of another dtype than the frames')."""
    assert_exact(PaddedSDPA("pairwise bool"), zeros=Z_STREAM, clip_zeros=Z_CLIP)


def test_pool_over_real_frames_with_a_cast_mask_is_exact():
    assert_exact(MaskedPool("cast"), zeros=Z_STREAM, clip_zeros=Z_CLIP)


def test_pool_over_real_frames_with_a_boolean_masked_fill_is_exact():
    """A chunk of no frames keeps the mask boolean (the validation's random chunks start with one)."""
    assert_exact(MaskedPool("masked_fill"), zeros=Z_STREAM, clip_zeros=Z_CLIP)


# ---------------------------------------------------------------- 2. masks for SDPA built from the clip length

def clip_mask(kind: str, T: int, dtype, device, w: int = 2):
    i, j = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None]
    if kind == "tril bool":
        return torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if kind == "tril additive":      # the classic: 0 where allowed, -inf elsewhere
        m = torch.tril(torch.ones(T, T, dtype=dtype, device=device))
        return m.masked_fill(m == 0, float("-inf")).masked_fill(m == 1, 0.0)
    if kind == "arange bool":
        return j <= i
    if kind == "causal band bool":
        return (i - j >= 0) & (i - j <= w)
    if kind == "causal band additive":
        return torch.zeros(T, T, dtype=dtype, device=device).masked_fill(~((0 <= i - j) & (i - j <= w)), float("-inf"))
    if kind == "band bool":
        return (i - j).abs() <= w
    if kind == "band additive":
        return torch.where((i - j).abs() <= w, 0.0, float("-inf")).to(dtype)
    raise KeyError(kind)


class MaskedSDPA(nn.Module):
    """Pre-norm SDPA block, heads split by view, a mask of (T, T) built from the clip length."""

    def __init__(self, kind, readout):
        super().__init__()
        self.embed, self.qkv, self.norm, self.head = nn.Linear(C, 8), nn.Linear(8, 24), nn.LayerNorm(8), nn.Linear(8, 3)
        self.kind, self.readout = kind, readout

    def forward(self, x):
        h = self.embed(x)
        B, T, _ = h.shape
        q, k, v = self.qkv(self.norm(h)).chunk(3, -1)
        q, k, v = (t.view(B, T, 2, -1).transpose(1, 2) for t in (q, k, v))
        mask = clip_mask(self.kind, T, h.dtype, h.device)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5)
        return self.head(read(h + a.transpose(1, 2).reshape(B, T, -1), self.readout))


CAUSAL_MASKS = ["tril bool", "tril additive", "arange bool", "causal band bool", "causal band additive"]
BANDS = ["band bool", "band additive"]


@pytest.mark.parametrize("kind", CAUSAL_MASKS + BANDS)
@pytest.mark.parametrize("readout", ["last", "mean"])
def test_sdpa_with_a_mask_from_the_clip_length_is_exact(kind, readout):
    assert_exact(MaskedSDPA(kind, readout))


@pytest.mark.parametrize("kind", CAUSAL_MASKS)
def test_sdpa_with_a_causal_mask_gives_per_frame_outputs(kind):
    assert_exact(MaskedSDPA(kind, "frames"), per_frame=True)


@pytest.mark.parametrize("kind", BANDS)
def test_per_frame_outputs_of_a_symmetric_band_are_refused(kind):
    message = assert_refused(MaskedSDPA(kind, "frames"), "the attention is not causal")
    assert "per-frame outputs" in message and "node 'scaled_dot_product_attention'" in message


# ---------------------------------------------------------------- 3. nn.MultiheadAttention, time first, masks

class MHA(nn.Module):
    def __init__(self, kind, readout, time_first=True, is_causal=False):
        super().__init__()
        self.embed, self.head = nn.Linear(C, 8), nn.Linear(8, 3)
        self.att = nn.MultiheadAttention(8, 2, batch_first=not time_first)
        self.kind, self.readout, self.time_first, self.is_causal = kind, readout, time_first, is_causal

    def forward(self, x):
        h = self.embed(x)
        if self.time_first:
            h = h.permute(1, 0, 2)                        # (T, B, d)
        T = h.shape[0] if self.time_first else h.shape[1]
        i = torch.arange(T, device=h.device)
        mask = {"none": lambda: None,
                "generated": lambda: nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype, device=h.device),
                "triu bool": lambda: torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1),
                "band bool": lambda: (i[:, None] - i[None]).abs() > 2,
                "causal band bool": lambda: (i[:, None] - i[None] < 0) | (i[:, None] - i[None] > 2)}[self.kind]()
        hint = {"is_causal": True} if self.is_causal else {}
        a, _ = self.att(h, h, h, attn_mask=mask, need_weights=False, **hint)
        h = h + a
        if self.time_first:
            h = h.transpose(0, 1)
        return self.head(read(h, self.readout))


@pytest.mark.parametrize("time_first", [True, False])
@pytest.mark.parametrize("kind,readout", [("none", "mean"), ("generated", "last"), ("triu bool", "mean"),
                                          ("band bool", "last"), ("band bool", "mean"), ("causal band bool", -3)])
def test_multihead_attention_with_a_mask_from_the_clip_length_is_exact(kind, readout, time_first):
    assert_exact(MHA(kind, readout, time_first))


@pytest.mark.parametrize("time_first", [True, False])
@pytest.mark.parametrize("kind", ["generated", "triu bool", "causal band bool"])
def test_multihead_attention_causal_per_frame_outputs(kind, time_first):
    assert_exact(MHA(kind, "frames", time_first), per_frame=True)


@pytest.mark.parametrize("readout", ["frames", "last"])
def test_multihead_attention_told_its_mask_is_causal(readout):
    """`is_causal=True` beside the mask: the module runs for every query (its hint would misplace one query's
    mask), and the row read is taken after it."""
    assert_exact(MHA("generated", readout, time_first=False, is_causal=True), per_frame=readout == "frames")


def test_time_first_input_layout_is_refused_with_the_fix():
    class TimeFirst(nn.Module):   # x: (T, B, C), as nn.MultiheadAttention's default layout
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(C, 1)

        def forward(self, x):
            return self.att(x, x, x, need_weights=False)[0][-1]

    with pytest.raises(cofx.ConversionError, match="time_dim must be a positive int") as err:
        cofx.convert(TimeFirst().to(D).eval(), torch.randn(N, 1, C, dtype=D), time_dim=0)
    assert "(B, T, C)" in str(err.value)


# ---------------------------------------------------------------- 4. heads split by einsum; 5. stacked, read at a token

class EinsumAttention(nn.Module):
    """q k v of shape (B, T, heads, d), scores by einsum("bthd,bshd->bhts"), scale q.shape[-1] ** -0.5."""

    def __init__(self, d=8, heads=2, mask="none", max_len=8):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads, self.mask = heads, mask
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, h):
        B, T, _ = h.shape
        q, k, v = (f(h).view(B, T, self.heads, -1) for f in (self.q, self.k, self.v))
        s = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
        if self.mask == "triu":
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool, device=h.device), 1), float("-inf"))
        elif self.mask == "band":
            i = torch.arange(T, device=h.device)
            s = s + torch.where((i[:, None] - i[None] >= 0) & (i[:, None] - i[None] <= 2), 0.0,
                                float("-inf")).to(s.dtype)
        elif self.mask == "buffer":   # minGPT / nanoGPT: a causal buffer sliced by the clip length
            s = s.masked_fill(self.tril[:, :, :T, :T] == 0, float("-inf"))
        y = torch.einsum("bhts,bshd->bthd", s.softmax(dim=-1), v).reshape(B, T, -1)
        return h + self.o(y)


class EinsumModel(nn.Module):
    def __init__(self, mask, readout, layers=1, norm=False, max_len=8):
        super().__init__()
        self.embed, self.readout = nn.Linear(C, 8), readout
        self.blocks = nn.ModuleList(EinsumAttention(mask=mask, max_len=max_len) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(layers)) if norm else None
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if self.norms is not None:
                h = self.norms[i](h)
        return self.head(read(h, self.readout))


@pytest.mark.parametrize("mask,readout", [("none", "last"), ("none", "mean"), ("none", 2), ("none", -3),
                                          ("triu", "last"), ("triu", 2), ("band", "mean"), ("band", -3)])
def test_einsum_heads_are_exact(mask, readout):
    assert_exact(EinsumModel(mask, readout))


@pytest.mark.parametrize("mask", ["triu", "band"])
def test_einsum_heads_causal_per_frame_outputs(mask):
    assert_exact(EinsumModel(mask, "frames"), per_frame=True)


@pytest.mark.parametrize("mask,readout", [("none", 2), ("none", -3), ("none", 0), ("triu", 2), ("triu", -3)])
def test_stacked_einsum_blocks_with_layer_norm_read_at_one_token_are_exact(mask, readout):
    assert_exact(EinsumModel(mask, readout, layers=2, norm=True))


def test_stacked_causal_einsum_blocks_per_frame_outputs():
    assert_exact(EinsumModel("triu", "frames", layers=2, norm=True), per_frame=True)


class TimeMixer(EinsumAttention):
    """The same block under a name without "attention" in it."""


@pytest.mark.parametrize("max_len", [64, N])
def test_causal_buffer_sliced_by_the_clip_length_in_a_block_not_named_attention_is_exact(max_len):
    # minGPT / nanoGPT's `self.bias[:, :, :T, :T]`: a buffer read in forward is a graph input, sliced by the
    # traced length like a parameter would be (also when it holds only the clip's frames)
    m = EinsumModel("buffer", "last", max_len=max_len)
    m.blocks = nn.ModuleList([TimeMixer(mask="buffer", max_len=max_len)])
    assert_exact(m)


@pytest.mark.parametrize("max_len,readout", [(64, "last"), (64, "frames"), (8, "last")])
def test_causal_buffer_sliced_by_the_clip_length_in_an_attention_block_is_exact(max_len, readout):
    """minGPT's block: torch.fx cannot trace the slice, so the block runs whole over windows, its rows checked
    to stay apart."""
    assert_exact(EinsumModel("buffer", readout, max_len=max_len), per_frame=readout == "frames")


def test_attention_kept_whole_as_a_leaf_is_exact():
    torch.manual_seed(0)
    model = EinsumModel("triu", "last").to(D).eval()
    co = cofx.convert(model, frames(1, N, seed=1), time_dim=1, leaf_modules=[EinsumAttention])
    assert co.is_exact
    x = frames(2, N, seed=2)
    with torch.no_grad():
        assert torch.allclose(co.forward_steps(x, pad_end=True)[..., -1], model(x), atol=ATOL, rtol=0)


class BatchCenteredAttention(EinsumAttention):
    """An attention block that subtracts the mean over the batch: its rows are not apart."""

    def forward(self, h):
        out = super().forward(h)
        return out - out.mean(0, keepdim=True)


class WithBatchCentered(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.att, self.head = nn.Linear(C, 8), BatchCenteredAttention(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.att(self.embed(x))[:, -1])


def test_an_attention_block_kept_whole_that_mixes_rows_is_refused():
    torch.manual_seed(0)
    with pytest.raises(cofx.ConversionError, match="mixes the rows of its batch"):
        cofx.convert(WithBatchCentered().to(D).eval(), frames(1, N, seed=1), time_dim=1,
                     leaf_modules=[BatchCenteredAttention])


def test_attention_blocks_keep_their_rows_apart():
    """What the two tests above rely on: the block's answer for one row does not depend on another row."""
    torch.manual_seed(0)
    for mask, max_len in (("buffer", 64), ("triu", 8)):
        block = EinsumAttention(mask=mask, max_len=max_len).to(D).eval()
        x = torch.randn(1, N, 8, dtype=D)
        with torch.no_grad():
            alone = block(x)
            for scale in (1e-3, 1.0, 1e3):
                assert torch.equal(block(torch.cat([x, torch.randn_like(x) * scale]))[:1], alone)


class MHAStack(nn.Module):
    """Two post-norm `nn.MultiheadAttention` blocks with residuals, read at one token (or per frame, causal)."""

    def __init__(self, readout, causal=False):
        super().__init__()
        self.embed, self.head, self.readout, self.causal = nn.Linear(C, 8), nn.Linear(8, 3), readout, causal
        self.att = nn.ModuleList(nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(2))
        self.norm = nn.ModuleList(nn.LayerNorm(8) for _ in range(2))

    def forward(self, x):
        h = self.embed(x)
        T = h.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1) if self.causal else None
        for att, norm in zip(self.att, self.norm):
            h = norm(h + att(h, h, h, attn_mask=mask, need_weights=False)[0])
        return self.head(read(h, self.readout))


@pytest.mark.parametrize("readout,causal", [(2, False), (-3, False), (2, True)])
def test_stacked_multihead_attention_read_at_one_token_is_exact(readout, causal):
    assert_exact(MHAStack(readout, causal))


def test_stacked_causal_multihead_attention_per_frame_outputs():
    assert_exact(MHAStack("frames", causal=True), per_frame=True)


# ---------------------------------------------------------------- 5/6. nn.TransformerEncoder: a token, causal masks

class Encoder(nn.Module):
    def __init__(self, readout, causal="none", norm_first=False, time_first=False, layers=2):
        super().__init__()
        self.embed, self.head = nn.Linear(C, 8), nn.Linear(8, 3)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=not time_first, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False, norm=nn.LayerNorm(8))
        self.readout, self.causal, self.time_first = readout, causal, time_first

    def forward(self, x):
        h = self.embed(x)
        if self.time_first:
            h = h.transpose(0, 1)
        T = h.shape[0] if self.time_first else h.shape[1]
        kwargs = {
            "none": {},
            "generated": dict(mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True),   # float32
            "generated, dtype": dict(mask=nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype),
                                     is_causal=True),
            "triu bool": dict(mask=torch.ones(T, T, dtype=torch.bool).triu(1), is_causal=True),
            "triu bool, no is_causal": dict(mask=torch.ones(T, T, dtype=torch.bool).triu(1)),
        }[self.causal]
        h = self.enc(h, **kwargs)
        if self.time_first:
            h = h.transpose(0, 1)
        return self.head(read(h, self.readout))


@pytest.mark.parametrize("time_first", [False, True])
@pytest.mark.parametrize("readout,norm_first", [(2, False), (-3, True), (-3, False)])
def test_encoder_read_at_an_inner_token_is_exact(readout, norm_first, time_first):
    assert_exact(Encoder(readout, norm_first=norm_first, time_first=time_first))


@pytest.mark.parametrize("time_first", [False, True])
@pytest.mark.parametrize("causal", ["generated", "generated, dtype", "triu bool", "triu bool, no is_causal"])
def test_causal_encoder_per_frame_outputs(causal, time_first):
    assert_exact(Encoder("frames", causal=causal, time_first=time_first), per_frame=True)


@pytest.mark.parametrize("causal", ["generated", "triu bool"])
def test_causal_encoder_read_at_an_inner_token_is_exact(causal):
    assert_exact(Encoder(2, causal=causal))


def test_key_padding_masks_run_out_of_phase_and_their_export_is_refused_with_a_reason(tmp_path):
    """Streams restarted apart step exactly; torch.onnx traces the masked attention's size reads in another
    order, which the export says (not a raw tracing error)."""
    torch.manual_seed(0)
    model = PaddedMHA(True, "last").to(D).eval()
    co = cofx.convert(model, frames(1, N, seed=1), time_dim=1)
    stream = frames(2, N + 8, Z_STREAM, seed=4)
    with torch.no_grad():
        co.clean_state()
        for t in range(4):
            co.forward_step(stream[:, t])
        co.clean_state(streams=[1])
        outs = [co.forward_step(stream[:, t]) for t in range(4, N + 8)]
        for t, out in zip(range(4, N + 8), outs):
            if t >= 4 + N - 1:   # row 1 has a whole window of its restarted stream
                want = model(stream[1:, t - N + 1:t + 1])
                assert torch.allclose(out[1:], want, atol=ATOL, rtol=0)
            if t >= N - 1:
                assert torch.allclose(out[:1], model(stream[:1, t - N + 1:t + 1]), atol=ATOL, rtol=0)
    with pytest.raises(cofx.StreamError, match="cannot export this model to ONNX"):
        cofx.export_onnx(co, str(tmp_path / "m.onnx"))


class LearnedQueryPool(nn.Module):
    """Attention pooling over frames with a learned query, written by hand (softmax over time, weighted sum)."""

    def __init__(self, form):
        super().__init__()
        self.inp, self.score, self.head = nn.Linear(C, 8), nn.Linear(8, 1), nn.Linear(8, 3)
        self.q = nn.Parameter(torch.randn(1, 1, 8))
        self.form = form

    def forward(self, x):   # (B, T, C)
        z = self.inp(x).relu()
        if self.form == "query":
            return self.head((torch.softmax(self.q @ z.transpose(-2, -1) / 8 ** 0.5, -1) @ z).squeeze(1))
        if self.form == "score":
            return self.head((self.score(z).softmax(dim=1) * z).sum(1))
        return self.head((F.log_softmax(z @ self.q.squeeze(0).t(), 1).exp() * z).sum(1))


@pytest.mark.parametrize("form", ["query", "score", "log_softmax"])
def test_hand_written_attention_pooling_with_a_learned_query_is_exact(form):
    assert_exact(LearnedQueryPool(form))


def test_a_softmax_over_frames_returned_per_frame_is_refused_as_not_causal():
    class PerFrame(LearnedQueryPool):
        def forward(self, x):
            return self.inp(x).softmax(1)

    assert_refused(PerFrame("query"), "(?s)frame .* of the window changes the outputs of the frames before it")


class NewestQuery(nn.Module):
    """Attention of the newest frame's query against every frame (an online detector's readout), by hand."""

    def __init__(self, form: str, d: int = 8):
        super().__init__()
        self.form = form
        self.q, self.k, self.v, self.head = nn.Linear(C, d), nn.Linear(C, d), nn.Linear(C, d), nn.Linear(d, 3)

    def forward(self, x):
        q, k, v = self.q(x[:, -1:]), self.k(x), self.v(x)
        if self.form == "matmul":
            y = (q @ k.transpose(1, 2) / 8 ** 0.5).softmax(-1) @ v
        elif self.form == "einsum":
            y = torch.einsum("bqk,bkd->bqd", torch.einsum("bqd,bkd->bqk", q, k).softmax(-1), v)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.head(y[:, 0])


@pytest.mark.parametrize("form", ["matmul", "einsum", "sdpa"])
def test_the_newest_frames_query_against_every_frame_is_attention_over_the_clip(form):
    co = assert_exact(NewestQuery(form))
    assert any(r.kind == "attention" for r in co.report), str(co.report)


class PooledToken(nn.Module):
    """A token pooled over the frames put first along time, the frames attending to it, read at that token."""

    def __init__(self, pool: str):
        super().__init__()
        self.pool = pool
        self.embed, self.qkv, self.head = nn.Linear(C, 8), nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        token = h.mean(1, keepdim=True) if self.pool == "mean" else h.amax(1, keepdim=True)
        q, k, v = self.qkv(torch.cat([token, h], 1)).chunk(3, -1)
        return self.head(F.scaled_dot_product_attention(q, k, v)[:, 0])


@pytest.mark.parametrize("pool", ["mean", "amax"])
def test_a_token_pooled_over_the_frames_put_along_time_is_the_windows_own(pool):
    co = assert_exact(PooledToken(pool))
    assert [r.kind for r in co.report if r.name == "cat"] == ["window"], str(co.report)


class ScoreHead(nn.Module):
    """Attentive pooling whose score head ends in an `nn.Softmax` module (ECAPA-TDNN's attentive statistics)."""

    def __init__(self):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(C, 8), nn.Tanh(), nn.Linear(8, 1), nn.Softmax(dim=1))
        self.head = nn.Linear(2 * C, 3)

    def forward(self, x):
        w = self.score(x)
        mean = (w * x).sum(1)
        std = ((w * x * x).sum(1) - mean * mean).clamp(min=1e-6).sqrt()
        return self.head(torch.cat([mean, std], 1))


def test_attentive_pooling_with_a_softmax_module_is_a_window_over_the_clip():
    co = assert_exact(ScoreHead())
    assert any(r.kind == "attention" for r in co.report), str(co.report)


class ReturnsAttentionMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(C, 12), nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        weights = (q @ k.transpose(-2, -1) / 2).softmax(-1)
        return self.head((weights @ v)[:, -1]), weights


def test_an_attention_map_returned_is_refused_as_attention_weights():
    with pytest.raises(cofx.ConversionError) as err:
        cofx.convert(ReturnsAttentionMap().to(D).eval(), frames(1, N), time_dim=1)
    msg = str(err.value)
    assert "node 'softmax'" in msg and "a map over pairs of the window's frames (attention weights)" in msg, msg
