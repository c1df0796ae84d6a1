"""Attention across time: a window of the clip's N frames, run as the model runs a clip, one answer per step.

Models are written the way people write them: per-frame embeddings or a
temporal convolution in front, class tokens prepended or appended, positions as
a table sliced by the clip length, a table added whole, an embedding of
`arange(T)`, sinusoids or none, `nn.TransformerEncoder` (pre- and post-norm),
`nn.MultiheadAttention`, `F.scaled_dot_product_attention` and hand-written
heads; read out by the class token, the last frame or a pool. Each converts
exactly (float64), and where every op before the attention acts frame by frame
the output at step t is the model's output on the last N frames.
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
from cofx.verify import by_chunks, chunk_sizes, verify

D = torch.float64
C_IN = 5


class Positions(nn.Module):
    """Positions added to (B, T, d) tokens, as `kind` says."""

    def __init__(self, kind: str, d: int, frames: int):
        super().__init__()
        self.kind = kind
        self.table = nn.Parameter(torch.randn(1, frames if kind == "whole" else 40, d) * 0.3)
        self.embedding = nn.Embedding(frames if kind == "embedding of the clip's length" else 40, d)

    def forward(self, h):
        if self.kind == "sliced":
            return h + self.table[:, :h.shape[1]]
        if self.kind == "whole":
            return h + self.table
        if self.kind in ("embedding", "embedding of the clip's length"):   # nanoGPT's wpe, block size T or more
            return h + self.embedding(torch.arange(h.shape[1], device=h.device))
        if self.kind == "sinusoid":
            t = torch.arange(h.shape[1], dtype=h.dtype, device=h.device)[:, None]
            i = torch.arange(h.shape[2], dtype=h.dtype, device=h.device)[None]
            return h + torch.sin(t / 10 ** (i / h.shape[2]))
        return h


class HandWritten(nn.Module):
    """Multi-head self-attention as papers write it: one projection, heads split by view, softmax(q k^T / sqrt(d)) v."""

    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        self.qkv, self.proj, self.heads, self.causal = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, causal

    def forward(self, h):
        B, T, _ = h.shape
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (x.view(B, T, self.heads, -1).transpose(1, 2) for x in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        return h + self.proj(y)


class SDPABlock(nn.Module):
    def __init__(self, d: int, causal: bool):
        super().__init__()
        self.q, self.k, self.v, self.causal = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), causal
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        x = self.norm(h)
        return h + F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), is_causal=self.causal)


class CausalEncoder(nn.Module):
    """`nn.TransformerEncoder` with a causal mask, the way its documentation writes one."""

    def __init__(self, d: int, heads: int, layers: int, norm_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, h):
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], dtype=h.dtype, device=h.device)
        return self.encoder(h, mask=mask, is_causal=True)


class MHABlock(nn.Module):
    """`nn.MultiheadAttention` with time first (batch_first=False), a residual and a feed-forward."""

    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        self.att, self.causal = nn.MultiheadAttention(d, heads), causal
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h):
        x = h.transpose(0, 1)   # (T, B, d)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[0], dtype=x.dtype) if self.causal else None
        a, _ = self.att(x, x, x, attn_mask=mask, need_weights=False)
        h = h + a.transpose(0, 1)
        return h + self.ff(h)


class FrameTransformer(nn.Module):
    """(B, C, T) frames -> a prefix -> tokens (B, T, d) -> optional class token -> positions -> attention -> head."""

    def __init__(self, *, d=8, heads=2, layers=1, attention="encoder", prefix="linear", token="none",
                 positions="sliced", readout="token", frames=6, causal=False, norm_first=False):
        super().__init__()
        self.prefix, self.token, self.readout = prefix, token, readout
        self.embed = nn.Linear(C_IN, d) if prefix == "linear" else nn.Conv1d(C_IN, d, 3, padding=1)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        tokens = frames + (token != "none")
        self.positions = Positions(positions, d, tokens)
        if attention == "encoder":
            layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=True, norm_first=norm_first)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            make = {"mha": lambda: MHABlock(d, heads, causal), "hand": lambda: HandWritten(d, heads, causal),
                    "sdpa": lambda: SDPABlock(d, causal), "causal encoder": lambda: CausalEncoder(d, heads, 1, norm_first)
                    }[attention]
            self.blocks = nn.Sequential(*(make() for _ in range(layers)))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x.transpose(1, 2)) if self.prefix == "linear" else self.embed(x).relu().transpose(1, 2)
        if self.token != "none":
            cls = self.cls.expand(h.shape[0], -1, -1)
            h = torch.cat([cls, h] if self.token == "first" else [h, cls], dim=1)
        h = self.blocks(self.positions(h))
        if self.readout == "token":
            h = h[:, 0] if self.token == "first" else h[:, -1]
        elif self.readout == "last":
            h = h[:, -1]
        elif self.readout == "frames":   # per-frame outputs (B, T, classes)
            pass
        elif self.readout == "mean":
            h = h.mean(1)
        else:
            h = h.amax(1)
        return self.head(h)


def random_config(rng: random.Random) -> dict:
    token = rng.choice(["none", "first", "last"])
    attention = rng.choice(["encoder", "mha", "hand", "sdpa", "causal encoder"])
    causal = attention == "causal encoder" or attention != "encoder" and rng.random() < 0.5
    readouts = ["token"] if token != "none" else ["last", "mean", "max"] + (["frames"] * 2 if causal else [])
    return dict(d=rng.choice([4, 8]), heads=rng.choice([1, 2]), layers=rng.randint(1, 2), attention=attention,
                prefix=rng.choice(["linear", "linear", "conv"]), token=token,
                positions=rng.choice(["none", "sliced", "whole", "embedding", "embedding of the clip's length",
                                     "sinusoid"]),
                readout=rng.choice(readouts), frames=rng.randint(3, 8), causal=causal, norm_first=rng.random() < 0.5)


def assert_random_model(config: dict):
    if config["readout"] == "frames":
        assert_per_frame_model({**config, "positions": "sliced" if config["positions"] == "whole" else
                                config["positions"]})
    else:
        assert_window_model(config)


DEFAULTS = dict(frames=6, prefix="linear", token="none", positions="sliced", attention="encoder")


def build(config: dict) -> FrameTransformer:
    torch.manual_seed(0)
    return FrameTransformer(**{**DEFAULTS, **config}).to(D).eval()


def clip(frames: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, C_IN, frames, dtype=D)


def steps_frame_by_frame(co, stream):
    co.clean_state()
    with torch.no_grad():
        outs = [co.forward_step(stream[:, :, i]) for i in range(stream.shape[2])]
    co.clean_state()
    return outs


def assert_window_model(config: dict):
    """Exact (verify: the clip, chunkings, state), a report row for the attention, and, where the prefix acts
    frame by frame, step t answers for the last N frames."""
    config = {**DEFAULTS, **config}
    model, n = build(config), config["frames"]
    co = cofx.convert(model, clip(n))
    assert co.is_exact
    report = verify(co, model, seed=3)
    assert report.ok, str(report)
    # the window's first op and the attention are reported with the window (behind a table sized for the clip,
    # added whole, time is not told apart from other sizes, and a product of two windows is not named)
    rows = [r for r in co.report if r.kind in ("attention", "window")]
    assert rows and all(r.kernel == n + (config["token"] != "none") or r.kernel == n for r in rows), str(co.report)
    assert "window of the last" in rows[0].note
    if config["positions"] != "whole" or config["attention"] in ("encoder", "mha", "sdpa"):
        assert any(r.kind == "attention" for r in rows), str(co.report)
    stream = clip(n + 7, batch=2)
    outs = steps_frame_by_frame(co, stream)
    delay = co.delay
    assert all(o is None for o in outs[:delay]) and all(o is not None for o in outs[delay:])
    if config["prefix"] == "linear":   # nothing before the attention looks at other frames
        assert delay == n - 1
        with torch.no_grad():
            for t in range(n - 1, stream.shape[2]):
                want = model(stream[:, :, t - n + 1:t + 1])
                assert torch.allclose(outs[t], want, atol=1e-10, rtol=0), (t, (outs[t] - want).abs().max())
    # chunk invariance: random chunks give the frames frame-by-frame stepping gives
    sizes = chunk_sizes(stream.shape[2], random.Random(5))
    co.clean_state()
    with torch.no_grad():
        chunked = by_chunks(co, stream, sizes)
    co.clean_state()
    stepped = torch.stack([o for o in outs if o is not None], -1)
    assert chunked.shape[-1] >= stepped.shape[-1]
    assert torch.allclose(chunked[..., :stepped.shape[-1]], stepped, atol=1e-10, rtol=0)
    return co, model


CASES = {
    "encoder, class token, sliced table": dict(token="first", positions="sliced", readout="token"),
    "pre-norm encoder, two layers, appended token, whole table": dict(token="last", positions="whole",
                                                                     readout="token", layers=2, norm_first=True),
    "MultiheadAttention time first, causal mask, last frame": dict(attention="mha", causal=True, readout="last"),
    "hand-written heads, embedding positions, mean": dict(attention="hand", positions="embedding", readout="mean"),
    "MultiheadAttention, an embedding of exactly the clip's positions, mean":
        dict(attention="mha", positions="embedding of the clip's length", readout="mean"),
    "SDPA causal, sinusoids, max": dict(attention="sdpa", causal=True, positions="sinusoid", readout="max"),
    "conv in front, encoder, class token": dict(prefix="conv", token="first"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_model_converts_exactly(case):
    assert_window_model(CASES[case])


@pytest.mark.parametrize("seed", range(4))
def test_random_attention_models_convert_exactly(seed):
    assert_random_model(random_config(random.Random(seed)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4, 60))
def test_random_attention_models_convert_exactly_many(seed):
    assert_random_model(random_config(random.Random(seed)))


def assert_per_frame_model(config: dict):
    """Per-frame outputs of causal attention: from the first frame on, frame for frame the clip model's; in steady
    state the newest frame of the model on the last N frames."""
    config = {**DEFAULTS, **config, "readout": "frames", "token": "none", "causal": True}
    model, n = build(config), config["frames"]
    co = cofx.convert(model, clip(n))
    assert co.is_exact
    report = verify(co, model, seed=4)
    assert report.ok, str(report)
    x = clip(n, batch=2)
    with torch.no_grad():
        co.clean_state()
        assert torch.allclose(co.forward_steps(x, pad_end=True), model(x), atol=1e-10, rtol=0)   # (B, T, classes)
    stream = clip(n + 7, batch=2)
    outs = steps_frame_by_frame(co, stream)
    if config["prefix"] == "linear":
        assert co.delay == 0 and all(o is not None for o in outs)
        with torch.no_grad():
            for t in range(stream.shape[2]):
                first = max(0, t - n + 1)
                want = model(stream[:, :, first:t + 1])[:, -1]
                assert torch.allclose(outs[t], want, atol=1e-10, rtol=0), (t, (outs[t] - want).abs().max())
    sizes = chunk_sizes(stream.shape[2], random.Random(6))
    co.clean_state()
    with torch.no_grad():
        chunked = by_chunks(co, stream, sizes)
    co.clean_state()
    stepped = torch.stack([o for o in outs if o is not None], 1)
    assert torch.allclose(chunked[:, :stepped.shape[1]], stepped, atol=1e-10, rtol=0)


PER_FRAME = {
    "causal encoder, sliced table": dict(attention="causal encoder", positions="sliced"),
    "causal pre-norm encoder, sinusoids, two layers": dict(attention="causal encoder", positions="sinusoid",
                                                            norm_first=True),
    "MultiheadAttention time first, causal mask, embedding positions": dict(attention="mha", positions="embedding",
                                                                             layers=2),
    "SDPA is_causal, no positions": dict(attention="sdpa", positions="none"),
    "hand-written causal mask, conv in front": dict(attention="hand", prefix="conv", positions="sliced"),
}


@pytest.mark.parametrize("case", sorted(PER_FRAME))
def test_per_frame_outputs_of_causal_attention_are_the_clip_models_frame_for_frame(case):
    assert_per_frame_model(PER_FRAME[case])


def test_state_of_a_window_is_fixed_and_resumes_exactly():
    co, _ = assert_window_model(CASES["encoder, class token, sliced table"])
    stream = clip(40, batch=2)
    with torch.no_grad():
        co.clean_state()
        co.forward_steps(stream[:, :, :12])
        size = sum(t.numel() for t in _tensors(co.get_state()))
        saved = co.get_state()
        first = co.forward_steps(stream[:, :, 12:])
        assert sum(t.numel() for t in _tensors(co.get_state())) == size   # the window does not grow
        co.set_state(saved)
        again = co.forward_steps(stream[:, :, 12:])
    assert torch.equal(first, again)


@pytest.mark.parametrize("case", ["encoder, class token, sliced table", "per-frame causal"])
def test_a_stream_of_a_hundred_thousand_frames_answers_as_the_model_on_its_last_frames(case):
    """No running sums: after 10^5 frames (chunks of 5,000, then single frames) each answer is still the model's
    on the window, to float64 rounding."""
    config = CASES[case] if case in CASES else dict(attention="mha", causal=True, readout="frames")
    model, n = build(config), DEFAULTS["frames"]
    co = cofx.convert(model, clip(n))
    length, chunk = 100_000, 5_000
    torch.manual_seed(1)
    stream = clip(length + 3)
    with torch.no_grad():
        co.clean_state()
        size = None
        for at in range(0, length, chunk):
            out = co.forward_steps(stream[:, :, at:at + chunk])
            assert torch.isfinite(out).all()
            size = size or sum(t.numel() for t in _tensors(co.get_state()))
            assert sum(t.numel() for t in _tensors(co.get_state())) == size
        for t in range(length, length + 3):
            got, window = co.forward_step(stream[:, :, t]), stream[:, :, t - n + 1:t + 1]
            want = model(window)[:, -1] if config["readout"] == "frames" else model(window)
            assert torch.allclose(got, want, atol=1e-10, rtol=0), (t, (got - want).abs().max())
        co.clean_state()


def _tensors(state):
    return [v for v in tree_flatten(state)[0] if isinstance(v, torch.Tensor)]


class Attend(nn.Module):
    """`nn.MultiheadAttention` over the frames of (B, C, T), read by `read(output, weights)`."""

    def __init__(self, read):
        super().__init__()
        self.att, self.read = nn.MultiheadAttention(C_IN, 1, batch_first=True), read

    def forward(self, x):
        h = x.transpose(1, 2)
        out, weights = self.att(h, h, h)
        return self.read(out, weights)


def test_per_frame_outputs_of_attention_are_refused_with_the_fix():
    with pytest.raises(cofx.ConversionError, match="per-frame outputs computed over a window") as err:
        cofx.convert(Attend(lambda out, weights: out).eval(), torch.randn(1, C_IN, 6))
    message = str(err.value)
    assert "node 'att'" in message and "test_attention.py" in message and "out[:, -1]" in message.split("fix:")[1]


def test_reading_attention_weights_is_refused():
    with pytest.raises(cofx.ConversionError, match="reads the attention weights"):
        cofx.convert(Attend(lambda out, weights: out[:, -1] + weights[:, -1, :1]).eval(), torch.randn(1, C_IN, 6))


def test_window_option_on_attention_is_refused_with_the_fix():
    model = build(dict(token="first"))
    with pytest.raises(cofx.ConversionError, match="example clip of the length") as err:
        cofx.convert(model, clip(6), window={"blocks": 12})
    assert "blocks" in str(err.value)


def test_attention_over_tokens_of_frames_and_pixels_is_refused():
    class SpaceTime(nn.Module):
        """Tokens of every frame and pixel in one axis, as MViT has them."""
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):               # (B, C, T, H, W)
            tokens = x.flatten(2).transpose(1, 2)
            return self.att(tokens, tokens, tokens)[0].mean(1)

    with pytest.raises(cofx.ConversionError, match="tokens") as err:
        cofx.convert(SpaceTime().eval(), torch.randn(1, 4, 4, 3, 3))
    assert "attention" in str(err.value)


def test_windows_of_different_lengths_are_refused():
    class TwoRates(nn.Module):
        """Queries at the frame rate, keys and values at half of it."""
        def __init__(self):
            super().__init__()
            self.down = nn.Conv1d(C_IN, C_IN, 2, stride=2)

        def forward(self, x):
            q, kv = x.transpose(1, 2), self.down(x).transpose(1, 2)
            return F.scaled_dot_product_attention(q, kv, kv).mean(1)

    with pytest.raises(cofx.ConversionError, match="different lengths|different temporal strides"):
        cofx.convert(TwoRates().eval(), torch.randn(1, C_IN, 8))


def test_compiled_steps_of_a_transformer_equal_its_eager_steps():
    model, n = build(CASES["encoder, class token, sliced table"]), 6
    co = cofx.convert(model, clip(n))
    ref = cofx.convert(model, clip(n))
    co.compile_steps("eager")
    stream = clip(co.warmup_frames + 6)
    compiled = []
    with torch.no_grad():
        for i in range(stream.shape[2]):
            got, want = co.forward_step(stream[:, :, i]), ref.forward_step(stream[:, :, i])
            assert (got is None) == (want is None)
            if got is not None:
                assert torch.allclose(got, want, atol=1e-12, rtol=0)
            compiled.append(co.last_step_compiled)
    assert any(compiled)


def test_streams_out_of_phase_match_each_stream_alone():
    model = build(dict(attention="hand", token="first", positions="embedding"))
    co = cofx.convert(model, clip(6))
    stream = clip(20, batch=2)
    alone = [steps_frame_by_frame(co, stream[:1]),
             steps_frame_by_frame(co, stream[1:, :, :8]) + steps_frame_by_frame(co, stream[1:, :, 8:])]
    with torch.no_grad():
        co.clean_state()
        for i in range(20):
            if i == 8:
                co.clean_state(streams=[1])   # stream 1 starts again
            out = co.forward_step(stream[:, :, i])
            for b in (0, 1):
                want = alone[b][i]
                if want is None:
                    assert out is None or not bool(co.ready[b])
                else:
                    assert out is not None and bool(co.ready[b])
                    assert torch.allclose(out[b], want[0], atol=1e-10, rtol=0)


def test_onnx_step_of_a_transformer_matches_forward_step(tmp_path):
    pytest.importorskip("onnxruntime")
    from test_export import assert_matches, run_alone, run_onnx, session
    torch.manual_seed(0)
    model = FrameTransformer(**{**DEFAULTS, "token": "first", "layers": 2, "norm_first": True}).eval()
    co = cofx.convert(model, torch.randn(1, C_IN, 6))
    cofx.export_onnx(co, tmp_path / "step.onnx")   # the encoder's fused inference kernel is not exported
    frames = torch.randn(2, C_IN, 14)
    results = run_onnx(session(tmp_path / "step.onnx"), frames, resets={9: [1]})
    expected = [run_alone(co, frames[0]), run_alone(co, frames[1, :, :9]) + run_alone(co, frames[1, :, 9:])]
    assert_matches(results, expected)


def test_leaf_mixing_the_windows_of_its_batch_is_refused():
    """Inside a window each row of the batch is one window of one stream: a module cofx does not trace into
    must keep them apart (this one gates every row on the whole batch's statistics)."""
    class BatchGate(nn.Module):
        def forward(self, h):
            return h * (h.abs().mean() < 3)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = BatchGate()

        def forward(self, x):
            h = x.transpose(1, 2)
            return self.gate(F.scaled_dot_product_attention(h, h, h)).mean(1)

    with pytest.raises(cofx.ConversionError, match="mixes the rows of its batch") as err:
        cofx.convert(Model().eval(), torch.randn(1, C_IN, 6), leaf_modules=[BatchGate])
    assert "node 'gate'" in str(err.value)


class FeatureEncoder(nn.Module):
    """Per-frame features (B, T, d) straight into an encoder (time first or batch first), read at one token."""

    def __init__(self, layers: int, norm_first: bool, time_first: bool, row: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=not time_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False, norm=nn.LayerNorm(8))
        self.time_first, self.row = time_first, row

    def forward(self, x):
        if self.time_first:
            return self.encoder(x.transpose(0, 1))[self.row]
        return self.encoder(x)[:, self.row]


@pytest.mark.parametrize("layers,norm_first,time_first,row", [
    (1, False, False, -1), (1, True, True, -1), (2, False, True, 0), (2, True, False, 3)])
def test_encoder_read_at_one_token_computes_that_row_and_each_frames_projections_once(layers, norm_first, time_first, row):
    from cofx.flops import clip_flops, step_flops
    torch.manual_seed(0)
    model, n = FeatureEncoder(layers, norm_first, time_first, row).to(D).eval(), 16
    co = cofx.convert(model, torch.randn(1, n, 8, dtype=D), time_dim=1)
    assert co.is_exact and verify(co, model, seed=2).ok
    stream = torch.randn(2, n + 6, 8, dtype=D)
    with torch.no_grad():
        outs = [co.forward_step(stream[:, i]) for i in range(stream.shape[1])]
        for t in range(n - 1, stream.shape[1]):   # the model on the last n frames
            assert torch.allclose(outs[t], model(stream[:, t - n + 1:t + 1]), atol=1e-10, rtol=0)
    reduction = clip_flops(co) / step_flops(co)   # counted unfused: the products of the fused path count too
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:   # gradients on: the layers run unfused
        model(torch.zeros(1, n, 8, dtype=D))
    assert clip_flops(co) == counter.get_total_flops() > 0   # as counted by hand with gradients on (unfused)
    # one layer: keys and values of the new frame, one query row: a small fraction of the clip's work
    assert reduction > (n / 2 if layers == 1 else 1.5), reduction


def test_per_frame_outputs_run_compiled():
    model = build({**DEFAULTS, "attention": "causal encoder", "readout": "frames", "causal": True})
    co, ref = cofx.convert(model, clip(6)), cofx.convert(model, clip(6))
    co.compile_steps("eager")
    stream = clip(co.warmup_frames + 6)
    with torch.no_grad():
        for i in range(stream.shape[2]):
            assert torch.allclose(co.forward_step(stream[:, :, i]), ref.forward_step(stream[:, :, i]), atol=1e-12,
                                  rtol=0)
    assert co.last_step_compiled


@pytest.mark.parametrize("attention", ["causal encoder", "hand"])
def test_onnx_step_of_per_frame_causal_outputs_matches_forward_step(tmp_path, attention):
    pytest.importorskip("onnxruntime")
    from test_export import assert_matches, run_alone, run_onnx, session
    torch.manual_seed(0)
    model = FrameTransformer(**{**DEFAULTS, "attention": attention, "readout": "frames", "causal": True,
                                "positions": "embedding"}).eval()
    co = cofx.convert(model, torch.randn(1, C_IN, 6))
    cofx.export_onnx(co, tmp_path / "step.onnx")
    frames = torch.randn(2, C_IN, 14)
    results = run_onnx(session(tmp_path / "step.onnx"), frames, resets={4: [0], 9: [1]})
    expected = [run_alone(co, frames[0, :, :4]) + run_alone(co, frames[0, :, 4:]),
                run_alone(co, frames[1, :, :9]) + run_alone(co, frames[1, :, 9:])]
    assert_matches(results, expected)


def test_per_frame_causal_streams_run_out_of_phase():
    model = build({**DEFAULTS, "attention": "sdpa", "readout": "frames", "causal": True})
    co = cofx.convert(model, clip(6))
    stream = clip(16, batch=2)
    alone = [steps_frame_by_frame(co, stream[:1]),
             steps_frame_by_frame(co, stream[1:, :, :5]) + steps_frame_by_frame(co, stream[1:, :, 5:])]
    with torch.no_grad():
        co.clean_state()
        for i in range(16):
            if i == 5:
                co.clean_state(streams=[1])
            out = co.forward_step(stream[:, :, i])
            for b in (0, 1):
                assert bool(co.ready[b]) and torch.allclose(out[b], alone[b][i][0], atol=1e-10, rtol=0)


class PreviousFrameKeys(nn.Module):
    """Causal attention whose keys and values are the previous frame's (a shift written with `torch.cat`): the
    shifted branch crops a frame and pads one at the start, so its frames run level with the queries'."""

    def __init__(self):
        super().__init__()
        self.inp, self.q, self.k = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.inp(x)
        t = h.shape[1]
        previous = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        s = self.q(h) @ self.k(previous).transpose(1, 2)
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ previous


@pytest.mark.parametrize("sizes", [[0, 8], [0, 0, 1, 7], [0, 3, 0, 5]])
def test_an_empty_chunk_before_the_first_frame_leaves_branches_level(sizes):
    """Start padding made on an empty first chunk ran the padded branch a frame ahead of the queries' (a raw
    size mismatch, and a false refusal from the validation's empty first chunk): nothing is due before the
    stream's first frame."""
    torch.manual_seed(0)
    model = PreviousFrameKeys().double().eval()
    co = cofx.convert(model, torch.randn(1, 8, 4, dtype=torch.float64), time_dim=1)
    clip = torch.randn(2, 8, 4, dtype=torch.float64)
    with torch.no_grad():
        assert co.forward_steps(clip[:, :0]) is None and not co.ready.any()
        co.clean_state()
        torch.testing.assert_close(by_chunks(co, clip, sizes), model(clip), rtol=0, atol=1e-12)


class JointsOverTime(nn.Module):
    """A skeleton (B, C, T, J) with causal attention over time per joint, the joints folded into the batch."""

    def __init__(self, read):
        super().__init__()
        self.inp, self.attn, self.read = nn.Linear(3, 8), nn.MultiheadAttention(8, 2, batch_first=True), read

    def forward(self, x):
        b, c, t, j = x.shape
        h = self.inp(x.permute(0, 3, 2, 1).reshape(b * j, t, c))
        h = self.attn(h, h, h, attn_mask=torch.ones(t, t, dtype=torch.bool).triu(1), need_weights=False)[0]
        h = h.reshape(b, j, t, -1).mean(1)
        return h[:, -1] if self.read == "last" else h.transpose(1, 2)


def test_per_frame_outputs_of_a_window_with_joints_folded_into_the_batch_are_refused():
    """Each step keeps the newest row of every window, one per stream: a window holding a stream's joints as
    rows would mix joints into frames (it stepped wrong with validate=False)."""
    torch.manual_seed(0)
    clip = torch.randn(1, 3, 8, 2, dtype=torch.float64)
    with pytest.raises(cofx.ConversionError, match=r"(?s)per-frame outputs of a window over the clip whose batch "
                                                   r"holds several rows per stream.*fix: read one frame"):
        cofx.convert(JointsOverTime("frames").double().eval(), clip, validate=False)
    co = cofx.convert(JointsOverTime("last").double().eval(), clip)   # one answer per window: exact
    assert co.is_exact


class DividedSpaceTime(nn.Module):
    """TimeSformer's divided attention: each block attends over time per patch, then over the patches of each
    frame (frames folded into the batch, inside the window the temporal attention opened)."""

    def __init__(self, blocks=2, d=8):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.temporal = nn.ModuleList(nn.MultiheadAttention(d, 2, batch_first=True) for _ in range(blocks))
        self.spatial = nn.ModuleList(nn.MultiheadAttention(d, 2, batch_first=True) for _ in range(blocks))
        self.head = nn.Linear(d, 5)

    def forward(self, x):   # (B, 3, T, 8, 8)
        b, c, t, h, w = x.shape
        p = self.patch(x.transpose(1, 2).reshape(b * t, c, h, w)).flatten(2).transpose(1, 2)   # (B*T, S, d)
        s = p.shape[1]
        for temporal, spatial in zip(self.temporal, self.spatial):
            q = p.view(b, t, s, -1).permute(0, 2, 1, 3).reshape(b * s, t, -1)
            q = q + temporal(q, q, q, need_weights=False)[0]
            p = q.view(b, s, t, -1).permute(0, 2, 1, 3).reshape(b * t, s, -1)
            p = p + spatial(p, p, p, need_weights=False)[0]
        return self.head(p.view(b, t, s, -1).mean((1, 2)))


def test_spatial_attention_after_temporal_attention_is_a_per_frame_op_of_the_window():
    torch.manual_seed(0)
    model = DividedSpaceTime().double().eval()
    n = 6
    co = cofx.convert(model, torch.randn(1, 3, n, 8, 8, dtype=torch.float64))
    assert co.is_exact
    stream = torch.randn(2, 3, 2 * n + 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        outs = co.forward_steps(stream)
        want = torch.stack([model(stream[:, :, t - n + 1:t + 1]) for t in range(n - 1, stream.shape[2])], -1)
    torch.testing.assert_close(outs, want, rtol=0, atol=1e-10)
