"""The transformer situations of continual-inference's test-suite, checked on cofx's contract.

Follows (situations only; no code is shared and continual-inference is not imported):
  tests/continual/test_transformer.py
      test_trans_enc_b1 -> test_one_block_encoder_read_at_last_frame (post-norm with a final LayerNorm, as the
                           reference builds it; pre-norm as well)
      test_trans_enc_b2 -> test_two_block_encoder_read_at_last_frame, incl. the peek-then-commit check
                           (forward_step with update_state=False, then the same frame committed)
  tests/continual/multihead_attention/test_single_output_mha.py
      test_multi_head_attention_default_query_index    -> test_single_output_attention[-1]
      test_multi_head_attention_nondefault_query_index -> test_single_output_attention[2], and the encoders read
                           at a fixed non-default frame (test_encoder_read_at_a_fixed_frame: h[:, 3], h[:, -2])
  tests/continual/multihead_attention/test_stacked_mha.py
      test_stacked_mha  -> test_stacked_attention (plain, as the reference stacks it; and with per-frame residuals)
  tests/continual/multihead_attention/test_retroactive_mha.py
      test_multi_head_attention -> test_per_frame_outputs_of_causal_attention (cofx's per-frame outputs are
                           those of causal attention) and test_per_frame_outputs_of_full_attention_are_refused
                           (every token of non-causal attention re-computed each step is outside the contract)

Each model is a plain torch model in float64, converted with cofx.convert(model.eval(), clip, time_dim=1).
A stream of 2N+3 frames (N: the example's length) is fed frame by frame (co.forward_step) and in chunks
(co.forward_steps); from the step at which N frames have arrived, each step's output must be the model run on
the last N frames. Per-frame outputs of causal attention are checked from the first frame (on the frames so
far) and with pad_end=True against model(clip).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cofx

D = torch.float64
TOL = dict(atol=1e-10, rtol=1e-9)
CHUNKS = [0, 1, 3, 0, 7, 2, 1, 30]          # 0-frame chunks, single frames and a chunk longer than the window


def encoder(d, layers, norm_first, final_norm):
    layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d) if final_norm else None,
                                 enable_nested_tensor=False)


class ReadAt(nn.Module):
    """An encoder over (B, T, d) read at one fixed frame index."""

    def __init__(self, body, index):
        super().__init__()
        self.body, self.index = body, index

    def forward(self, x):
        return self.body(x)[:, self.index]


def convert(model, n, d):
    torch.manual_seed(1)
    co = cofx.convert(model.to(D).eval(), torch.randn(1, n, d, dtype=D), time_dim=1)
    assert co.is_exact
    return co


def by_chunks(co, stream, cat_dim):
    co.clean_state()
    outs, at = [], 0
    for size in CHUNKS:
        out = co.forward_steps(stream[:, at:at + size])
        at += size
        if out is not None:
            outs.append(out)
    assert at >= stream.shape[1]
    co.clean_state()
    return torch.cat(outs, cat_dim)


def check_window(model, n, d, *, peek=False):
    """A value read off the window (no time axis): None until N frames, then the model on the last N frames."""
    co = convert(model, n, d)
    torch.manual_seed(2)
    stream = torch.randn(2, 2 * n + 3, d, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(co(stream[:, :n]), model(stream[:, :n]), **TOL)   # co.forward is the model
        co.clean_state()
        stepped = []
        for t in range(stream.shape[1]):
            if peek and t >= n - 1:      # look at the step without taking it, then take it
                looked = co.forward_step(stream[:, t], update_state=False)
            out = co.forward_step(stream[:, t])
            if t < n - 1:
                assert out is None, t
                continue
            want = model(stream[:, t - n + 1:t + 1])
            torch.testing.assert_close(out, want, **TOL, msg=lambda m: f"frame {t}: {m}")
            if peek:
                torch.testing.assert_close(looked, out, **TOL)
            stepped.append(out)
        stepped = torch.stack(stepped, -1)                  # (B, K, steps)
        torch.testing.assert_close(by_chunks(co, stream, -1), stepped, **TOL)
        co.clean_state()
        flushed = co.forward_steps(stream[:, :n], pad_end=True)
        torch.testing.assert_close(flushed[..., -1], model(stream[:, :n]), **TOL)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_one_block_encoder_read_at_last_frame(norm_first):
    torch.manual_seed(0)
    check_window(ReadAt(encoder(16, 1, norm_first, final_norm=True), -1), 10, 16)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_two_block_encoder_read_at_last_frame(norm_first):
    torch.manual_seed(0)
    check_window(ReadAt(encoder(16, 2, norm_first, final_norm=False), -1), 10, 16, peek=True)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("index", [3, -2])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_read_at_a_fixed_frame(layers, index, norm_first):
    torch.manual_seed(0)
    check_window(ReadAt(encoder(16, layers, norm_first, final_norm=layers == 1), index), 8, 16)


class SingleOutput(nn.Module):
    """nn.MultiheadAttention, time first as the reference has it, with its own query, key and value streams
    (the frame's channels split in three), read at one query index."""

    def __init__(self, e, index):
        super().__init__()
        self.att, self.index = nn.MultiheadAttention(e, 2), index

    def forward(self, x):                                   # x: (B, T, 3e)
        q, k, v = x.transpose(0, 1).chunk(3, dim=-1)        # (T, B, e) each
        out, _ = self.att(q, k, v)
        return out[self.index]


@pytest.mark.parametrize("index", [-1, 2], ids=["default query index -1", "query index 2"])
def test_single_output_attention(index):
    torch.manual_seed(0)
    check_window(SingleOutput(8, index), 10, 24)


class Stacked(nn.Module):
    """Two nn.MultiheadAttention (batch first) one after the other, read at the last frame."""

    def __init__(self, d, residual):
        super().__init__()
        self.l1, self.l2 = nn.MultiheadAttention(d, 2, batch_first=True), nn.MultiheadAttention(d, 2, batch_first=True)
        self.residual = residual

    def forward(self, x):
        h = self.l1(x, x, x)[0] + (x if self.residual else 0)
        h = self.l2(h, h, h)[0] + (h if self.residual else 0)
        return h[:, -1]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_stacked_attention(residual):
    torch.manual_seed(0)
    check_window(Stacked(16, residual), 10, 16)


class CausalFrames(nn.Module):
    """Per-frame outputs of causal attention: two nn.MultiheadAttention with a causal mask and residuals, or a
    causal nn.TransformerEncoder."""

    def __init__(self, d, kind):
        super().__init__()
        self.kind = kind
        if kind == "encoder":
            self.enc = encoder(d, 2, norm_first=True, final_norm=True)
        else:
            self.l1, self.l2 = nn.MultiheadAttention(d, 2, batch_first=True), nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        if self.kind == "encoder":
            return self.enc(x, mask=mask, is_causal=True)
        h = x + self.l1(x, x, x, attn_mask=mask, need_weights=False)[0]
        return h + self.l2(h, h, h, attn_mask=mask, need_weights=False)[0]


@pytest.mark.parametrize("kind", ["mha", "encoder"])
def test_per_frame_outputs_of_causal_attention(kind):
    n, d = 8, 16
    torch.manual_seed(0)
    model = CausalFrames(d, kind).to(D).eval()
    co = convert(model, n, d)
    torch.manual_seed(2)
    stream = torch.randn(2, 2 * n + 3, d, dtype=D)
    with torch.no_grad():
        co.clean_state()
        stepped = []
        for t in range(stream.shape[1]):
            out = co.forward_step(stream[:, t])
            want = model(stream[:, max(0, t - n + 1):t + 1])[:, -1]   # the frames so far, at most the last N
            assert out is not None, t
            torch.testing.assert_close(out, want, **TOL, msg=lambda m: f"frame {t}: {m}")
            stepped.append(out)
        stepped = torch.stack(stepped, 1)                   # (B, T, d)
        torch.testing.assert_close(by_chunks(co, stream, 1), stepped, **TOL)
        # pad_end: a clip of the example's length comes back as model(clip), frame for frame
        co.clean_state()
        torch.testing.assert_close(co.forward_steps(stream[:, :n], pad_end=True), model(stream[:, :n]), **TOL)
        # and the flush of a longer stream adds nothing to, and changes nothing in, what the steps gave
        co.clean_state()
        torch.testing.assert_close(co.forward_steps(stream, pad_end=True), stepped, **TOL)


class FullFrames(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        return self.att(x, x, x)[0]


def test_per_frame_outputs_of_full_attention_are_refused():
    """What the retroactive attention gives (every token of non-causal attention, again each step) is no
    per-frame stream: cofx must refuse it with its own error, not convert it nor crash."""
    torch.manual_seed(0)
    with pytest.raises(cofx.errors.ConversionError, match=r"(?s)'att'.*not causal.*fix:"):
        cofx.convert(FullFrames(16).to(D).eval(), torch.randn(1, 8, 16, dtype=D), time_dim=1)
