"""Windows over the clip compute only the rows the model reads (`cofx.passes.read_rows`).

Random hand-written encoders (1-3 layers, 1-2 heads, pre- or post-norm, a class token first, last or none,
learned positions sliced by the clip length or none, no mask, a causal mask or `is_causal=True`, attention written
out or through `F.scaled_dot_product_attention`) read at one token: each must stay exact (at step t, the model on
the last N frames) while its last layer's query, projection and feed-forward run on that token alone, and the
step's FLOPs must fall accordingly.
"""
from __future__ import annotations

import operator
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from test_attention_forms import C, D, N, assert_exact, frames

import cofx

W = 8   # model width


class Attention(nn.Module):
    def __init__(self, heads: int, sdpa: bool, mask: str):
        super().__init__()
        self.heads, self.sdpa, self.mask = heads, sdpa, mask
        self.qkv, self.proj = nn.Linear(W, 3 * W), nn.Linear(W, W)
        self.scale = (W // heads) ** -0.5

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if self.sdpa:
            if self.mask == "is_causal":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal if self.mask == "causal" else None)
        else:
            a = (q @ k.transpose(-2, -1)) * self.scale
            if self.mask != "none":
                a = a.masked_fill(~causal, float("-inf"))
            y = a.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, W))


class Layer(nn.Module):
    def __init__(self, heads, sdpa, mask, pre_norm):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = Attention(heads, sdpa, mask)
        self.norm1, self.norm2 = nn.LayerNorm(W), nn.LayerNorm(W)
        self.mlp = nn.Sequential(nn.Linear(W, 2 * W), nn.GELU(), nn.Linear(2 * W, W))

    def forward(self, x):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, layers, heads, sdpa, mask, pre_norm, token, positions, read):
        super().__init__()
        self.token, self.positions, self.read = token, positions, read
        self.embed = nn.Linear(C, W)
        self.cls = nn.Parameter(torch.randn(1, 1, W))
        self.pos = nn.Parameter(torch.randn(1, 16, W))
        self.layers = nn.Sequential(*[Layer(heads, sdpa, mask, pre_norm) for _ in range(layers)])
        self.head = nn.Linear(W, 3)

    def forward(self, x):
        h = self.embed(x)
        if self.positions:
            h = h + self.pos[:, :h.shape[1]]
        cls = self.cls.expand(h.shape[0], -1, -1)
        if self.token == "first":
            h = torch.cat([cls, h], 1)
        elif self.token == "last":
            h = torch.cat([h, cls], 1)
        return self.head(self.layers(h)[:, self.read])


def encoders(count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        token = rng.choice(["first", "last", "none"])
        mask = rng.choice(["none", "causal", "is_causal"]) if token != "first" else "none"
        yield dict(layers=rng.randint(1, 3), heads=rng.choice([1, 2]), sdpa=rng.random() < 0.5, mask=mask,
                   pre_norm=rng.random() < 0.5, token=token, positions=rng.random() < 0.5,
                   read={"first": 0, "last": -1}.get(token, rng.choice([-1, 0, 2])))


def narrowed(co) -> set:
    return {n.name for n in co.graph.nodes if "cofx_rows" in n.meta}


@pytest.mark.parametrize("config", list(encoders(12, seed=0)), ids=str)
def test_random_encoders_read_at_a_token_compute_that_row_of_their_last_layer(config):
    if config["mask"] == "is_causal" and not config["sdpa"]:
        config = {**config, "mask": "causal"}
    co = assert_exact(Encoder(**config))
    last = f"layers_{config['layers'] - 1}"
    rows = narrowed(co)
    assert {f"{last}_mlp_0", f"{last}_mlp_2", f"{last}_attn_proj"} <= rows, rows
    if config["layers"] > 1:   # an earlier layer gives every row: the next layer's keys and values need them
        assert not any(name.startswith("layers_0_") for name in rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("config", list(encoders(40, seed=1)), ids=str)
def test_more_random_encoders_read_at_a_token_are_exact(config):
    if config["mask"] == "is_causal" and not config["sdpa"]:
        config = {**config, "mask": "causal"}
    assert_exact(Encoder(**config))


def step_flops(co, frame) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        co.forward_steps(frame)
    return counter.get_total_flops()


def test_one_layer_read_at_the_newest_frame_costs_a_row_per_step():
    """One layer on a window of 32 frames read at the newest: keys and values come once per frame, so a step
    is one query against 32 keys and one row of everything after it."""
    torch.manual_seed(0)
    model = Encoder(1, 2, False, "none", True, "none", False, -1).to(D).eval()
    clip = torch.randn(1, 32, C, dtype=D)
    co = cofx.convert(model, clip, time_dim=1)
    with torch.no_grad():
        co.forward_steps(torch.randn(1, 40, C, dtype=D))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(clip)
    per_clip = counter.get_total_flops()
    per_step = step_flops(co, torch.randn(1, 1, C, dtype=D))
    assert per_step * 20 < per_clip, (per_step, per_clip)


def test_causal_sdpa_read_at_an_inner_token_sees_the_keys_up_to_it():
    """`is_causal=True` on one query row becomes that row's mask (top-left aligned, as torch lays it out)."""
    model = Encoder(2, 2, True, "is_causal", False, "none", True, 2)
    co = assert_exact(model)
    assert "causal_row" in co.step_code


class MHABlock(nn.Module):
    """`nn.MultiheadAttention` over the frames (batch first or time first, with or without a causal mask), a
    residual, read at one token."""

    def __init__(self, batch_first, mask, read):
        super().__init__()
        self.batch_first, self.mask, self.read = batch_first, mask, read
        self.embed = nn.Linear(C, W)
        self.attn = nn.MultiheadAttention(W, 2, batch_first=batch_first)
        self.head = nn.Linear(W, 3)

    def forward(self, x):
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        T = h.shape[1 if self.batch_first else 0]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1) if self.mask else None
        a, _ = self.attn(h, h, h, attn_mask=mask)
        y = h + a
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y[:, self.read])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("read", [-1, 2])
def test_multihead_attention_read_at_a_token_computes_that_query_only(batch_first, mask, read):
    co = assert_exact(MHABlock(batch_first, mask, read))
    assert {"attn", "add"} <= narrowed(co), narrowed(co)


class ReadTwice(nn.Module):
    """Attention written out, its heads merged by a transpose given by keywords, read at a token and then at a
    channel (the second read of the first)."""

    def __init__(self, read):
        super().__init__()
        self.read = read
        self.embed, self.qkv, self.proj = nn.Linear(C, W), nn.Linear(W, 3 * W), nn.Linear(W, W)

    def forward(self, x):
        h = self.embed(x)
        B, T, _ = h.shape
        q, k, v = self.qkv(h).reshape(B, T, 3, 2, W // 2).permute(2, 0, 3, 1, 4).unbind(0)
        y = ((q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v).transpose(dim0=1, dim1=2)
        h = h + self.proj(y.reshape(B, T, W))
        return self.read(h)


@pytest.mark.parametrize("read", [lambda h: h[:, -1], lambda h: torch.sigmoid(h[:, 2])[:, 0],
                                  lambda h: h[:, 2][:, 1], lambda h: torch.tanh(h[:, :, 1])[:, -1]],
                         ids=["last", "inner then channel", "read of a read", "channel then last"])
def test_reads_of_reads_and_keyword_transposes(read):
    assert_exact(ReadTwice(read))


class BatchSizedMask(nn.Module):
    """A causal mask expanded to the batch times the heads, as `nn.MultiheadAttention` takes a 3-d mask."""

    def __init__(self):
        super().__init__()
        self.embed, self.attn = nn.Linear(C, W), nn.MultiheadAttention(W, 2, batch_first=True)

    def forward(self, x):
        h = self.embed(x)
        T = h.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1).expand(x.shape[0] * 2, T, T)
        return (h + self.attn(h, h, h, attn_mask=mask)[0])[:, -1]


def test_a_mask_sized_by_the_batch_times_the_heads_follows_the_windows():
    assert_exact(BatchSizedMask())


class RMSBlock(nn.Module):
    """Written-out attention and a hand-written RMSNorm, read by `select` or with an Ellipsis."""

    def __init__(self, read):
        super().__init__()
        self.read = read
        self.embed, self.qkv, self.proj = nn.Linear(C, W), nn.Linear(W, 3 * W), nn.Linear(W, W)
        self.w = nn.Parameter(torch.randn(W))

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        h = h + self.proj((q @ k.swapaxes(1, 2) / W ** 0.5).softmax(-1) @ v)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        return self.read(h)


@pytest.mark.parametrize("read", [lambda h: h.select(1, -1), lambda h: h[..., -1, :], lambda h: h[..., 2, :]],
                         ids=["select", "ellipsis", "ellipsis inner"])
def test_rms_norm_and_select_or_ellipsis_reads_narrow(read):
    co = assert_exact(RMSBlock(read))
    assert {"proj", "mean", "rsqrt", "mul_1"} <= narrowed(co), narrowed(co)


class MaskedEncoder(nn.Module):
    """`nn.TransformerEncoder` (batch first or time first) given a boolean mask, a float causal mask with
    ``is_causal=True``, or nothing, read at one token."""

    def __init__(self, batch_first, mask, read, norm_first):
        super().__init__()
        self.batch_first, self.mask, self.read = batch_first, mask, read
        self.embed = nn.Linear(C, W)
        layer = nn.TransformerEncoderLayer(W, 2, 2 * W, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        T = h.shape[1 if self.batch_first else 0]
        if self.mask == "boolean":
            y = self.encoder(h, mask=torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1))
        elif self.mask == "is_causal":
            y = self.encoder(h, mask=nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype), is_causal=True)
        else:
            y = self.encoder(h)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return y[:, self.read]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "boolean", "is_causal"])
@pytest.mark.parametrize("read,norm_first", [(-1, False), (2, True)])
def test_encoders_with_masks_or_time_first_compute_the_token_read(batch_first, mask, read, norm_first):
    co = assert_exact(MaskedEncoder(batch_first, mask, read, norm_first))
    assert "encoder" in narrowed(co), narrowed(co)


class SwiGLUBlock(nn.Module):
    """Written-out attention, then a SwiGLU feed-forward whose two halves come from one Linear by `chunk`
    (or `unbind` of a reshape): the split passes the row read on."""

    def __init__(self, split):
        super().__init__()
        self.split = split
        self.embed, self.qkv, self.proj = nn.Linear(C, W), nn.Linear(W, 3 * W), nn.Linear(W, W)
        self.w12, self.w3 = nn.Linear(W, 4 * W), nn.Linear(2 * W, W)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        h = h + self.proj((q @ k.transpose(1, 2) / W ** 0.5).softmax(-1) @ v)
        if self.split == "chunk":
            a, b = self.w12(h).chunk(2, dim=-1)
        else:
            a, b = self.w12(h).unflatten(-1, (2, 2 * W)).unbind(-2)
        return (h + self.w3(F.silu(a) * b))[:, -1]


@pytest.mark.parametrize("split", ["chunk", "unbind"])
def test_a_split_feed_forward_passes_the_row_read_on(split):
    co = assert_exact(SwiGLUBlock(split))
    assert {"w12", "proj", "matmul"} <= narrowed(co), narrowed(co)


class FunctionalDropout(nn.Module):
    """`F.dropout(..., training=self.training)` on the attention weights, traced in eval mode."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.proj = nn.Linear(C, W), nn.Linear(W, 3 * W), nn.Linear(W, W)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        a = F.dropout((q @ k.transpose(1, 2)).softmax(-1), 0.1, training=self.training)
        return (h + self.proj(a @ v).flatten(2))[:, -1]


def test_functional_dropout_off_passes_the_row_read_on():
    co = assert_exact(FunctionalDropout())
    assert {"dropout", "softmax", "matmul", "proj"} <= narrowed(co), narrowed(co)


class HeadsAttention(nn.Module):
    """Attention with its heads split three ways people write them, read at one token by an index or a slice."""

    def __init__(self, form: str, read: str, heads: int = 2):
        super().__init__()
        self.form, self.read, self.heads = form, read, heads
        self.qkv, self.out = nn.Linear(C, 3 * W), nn.Linear(W, 3)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if self.form == "einsum":
            a = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
            y = torch.einsum("bhqk,bhkd->bhqd", a, v)
        elif self.form == "einsum of a list":
            a = torch.einsum("b h q d, b h k d -> b h q k", [q, k]).softmax(-1)
            y = torch.einsum("bhqk,bhkd->bhqd", [a, v])
        elif self.form == "bmm":   # heads folded into the batch
            q, k, v = (t.reshape(B * self.heads, T, W // self.heads) for t in (q, k, v))
            y = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v).reshape(B, self.heads, T, -1)
        else:
            y = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        h = self.out(y.transpose(1, 2).reshape(B, T, W))
        return {"h[:, -1]": lambda: h[:, -1], "h[:, 0]": lambda: h[:, 0], "h[:, -1:]": lambda: h[:, -1:].flatten(1),
                "h[:, 2:3]": lambda: h[:, 2:3].squeeze(1)}[self.read]()


@pytest.mark.parametrize("form,scores", [("matmul", "matmul"), ("einsum", "einsum"), ("einsum of a list", "einsum"),
                                         ("bmm", "bmm")])
@pytest.mark.parametrize("read", ["h[:, -1]", "h[:, 0]", "h[:, -1:]", "h[:, 2:3]"])
def test_heads_split_by_einsum_or_folded_into_the_batch_read_by_index_or_slice_compute_one_query(form, scores,
                                                                                                 read):
    co = assert_exact(HeadsAttention(form, read))
    rows = narrowed(co)
    assert {scores, "softmax", "out"} <= rows, rows
    assert co.graph.find_nodes(op="call_function", target=operator.getitem)   # the read itself stays a read
    row = {"h[:, -1]": N - 1, "h[:, 0]": 0, "h[:, -1:]": N - 1, "h[:, 2:3]": 2}[read]
    assert {co.graph.find_nodes(op="call_module", target="out")[0].meta["cofx_rows"]} == {(1, row)}



class SplitQKV(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how, self.qkv = how, nn.Linear(W, 3 * W)

    def forward(self, x):
        qkv = self.qkv(x)
        q, k, v = {"chunk": lambda: qkv.chunk(3, dim=-1), "split": lambda: qkv.split(W, -1),
                   "unbind": lambda: qkv.unflatten(-1, (3, W)).unbind(-2)}[self.how]()
        return (q @ k.transpose(-2, -1) * W ** -0.5).softmax(-1) @ v


@pytest.mark.parametrize("how", ["chunk", "split", "unbind"])
@pytest.mark.parametrize("read", [-1, 0])
def test_a_query_split_off_keys_needed_whole_is_narrowed_after_the_split(how, read):
    """Two layers read at a token: the last layer's keys and values need every row of its `qkv` projection, so
    the split is computed whole and only the query's row is taken from it."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.a1, self.a2 = nn.Linear(C, W), SplitQKV(how), SplitQKV(how)

        def forward(self, x):
            x = self.embed(x)
            x = x + self.a1(x)
            return (x + self.a2(x))[:, read]

    co = assert_exact(Model())
    rows = narrowed(co)
    assert {"matmul_2", "softmax_1", "matmul_3"} <= rows and "a2_qkv" not in rows, rows


def test_per_frame_outputs_of_causal_attention_compute_the_newest_row_once_windows_are_full():
    """Per-frame outputs of a causal pre-norm block over a window of 8 frames: until the window is full each step
    runs the frames so far; from then on the block's query, projection and feed-forward run on the newest row
    alone. Every output stays the model's newest frame on the last 8 frames (or the frames so far)."""

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.pos = nn.Linear(C, W), nn.Parameter(torch.randn(1, 32, W) * 0.3)
            self.norm1, self.norm2 = nn.LayerNorm(W), nn.LayerNorm(W)
            self.qkv, self.proj, self.head = nn.Linear(W, 3 * W), nn.Linear(W, W), nn.Linear(W, 3)
            self.mlp = nn.Sequential(nn.Linear(W, 2 * W), nn.GELU(), nn.Linear(2 * W, W))

        def forward(self, x):
            h = self.embed(x) + self.pos[:, :x.shape[1]]
            B, T, _ = h.shape
            q, k, v = self.qkv(self.norm1(h)).reshape(B, T, 3, 2, W // 2).permute(2, 0, 3, 1, 4)
            h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, W))
            return self.head(h + self.mlp(self.norm2(h)))

    torch.manual_seed(0)
    model = Causal().to(D).eval()
    co = cofx.convert(model, torch.randn(1, 8, C, dtype=D), time_dim=1)
    stream = torch.randn(2, 30, C, dtype=D)
    with torch.no_grad():
        co.clean_state()
        steps = [co.forward_step(stream[:, i]) for i in range(30)]
        want = [model(stream[:, max(0, i - 7):i + 1])[:, -1] for i in range(30)]
        assert all((a - b).abs().max() < 1e-10 for a, b in zip(steps, want))
        co.clean_state()
        chunked = [co.forward_steps(stream[:, a:b]) for a, b in ((0, 3), (3, 12), (12, 13), (13, 30))]
        assert (torch.cat(chunked, 1) - torch.stack(want, 1)).abs().max() < 1e-10
        full = step_flops(co, torch.randn(2, 1, C, dtype=D))
        co.__dict__["_newest_module"] = None   # every row of the window, as before the window is full
        every_row = step_flops(co, torch.randn(2, 1, C, dtype=D))
    assert full * 2 < every_row, (full, every_row)
