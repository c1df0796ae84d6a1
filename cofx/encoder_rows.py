"""A transformer encoder computed for the one token a model reads, and on projections computed per frame.

A model that reads one token of its encoder's output (``enc(h)[:, 0]``, a class
token; ``enc(h)[:, -1]``, the newest frame) needs that row of the last layer
only: its attention takes every key and value but a single query, and its
feed-forward a single row (`cofx.passes.read_rows` asks `EncoderRows` for it).
Each earlier layer still computes every row, as the next layer's keys and values
need them. Same weights, masks and ops as the layer's own (unfused) path.

Where an attention takes the frames of the stream as they are (nothing that
depends on a frame's place in the window lies between the frame and it), its
queries, keys and values are per-frame projections: the step computes each
frame's once (`Projections`) and keeps them in a window of their own
(`cofx.passes.continualize`), for the first layer of an encoder and for an
`nn.MultiheadAttention` (`ProjectedAttention`).

Example::

    >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    >>> x, mask = torch.randn(3, 5, 8), torch.ones(5, 5, dtype=torch.bool).triu(1)
    >>> torch.allclose(EncoderRows(layer, -2)(x, src_mask=mask), layer(x, src_mask=mask)[:, -2:-1], atol=1e-6)
    True
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import Kernel

ENCODERS = (nn.TransformerEncoder, nn.TransformerEncoderLayer)


def batch_first(encoder: nn.Module) -> bool:
    layer = encoder.layers[0] if isinstance(encoder, nn.TransformerEncoder) else encoder
    return layer.self_attn.batch_first


def layers_of(encoder: nn.Module) -> list:
    return list(encoder.layers) if isinstance(encoder, nn.TransformerEncoder) else [encoder]


def projects_in_one(attention: nn.MultiheadAttention) -> bool:
    """Whether `attention` projects queries, keys and values with one weight of its width (what `Projections`
    computes), with nothing added to its keys."""
    return attention._qkv_same_embed_dim and attention.bias_k is None and not attention.add_zero_attn


def caches_projections(encoder: nn.Module) -> bool:
    """Whether the first layer's attention projects queries, keys and values as `Projections` does."""
    return projects_in_one(layers_of(encoder)[0].self_attn)


class Projections(Kernel):
    """The queries, keys and values an attention projects from each frame (..., d) -> (..., 3d): those of the
    first layer of an encoder (after its first norm where it is pre-norm), or of an `nn.MultiheadAttention`."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        layer = owner if isinstance(owner, nn.MultiheadAttention) else layers_of(owner)[0]
        self.__dict__["layer"] = layer

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.MultiheadAttention):
            return F.linear(frames, layer.in_proj_weight, layer.in_proj_bias)
        x = layer.norm1(frames) if layer.norm_first else frames
        return F.linear(x, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias)


class ProjectedAttention(Kernel):
    """`nn.MultiheadAttention` (same arguments, the weights not returned) on `Projections` of its query, key and
    value instead of on them: each frame's projections are computed once, before a window over the clip."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        self.__dict__["attention"] = attention

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        assert key_padding_mask is None and not is_causal, "converted only without them"
        out = attend(self.attention, query, key, attn_mask, 1 if self.attention.batch_first else 0)
        return out, None


class EncoderRows(Kernel):
    """``encoder(src, ...)`` with the encoder's own arguments (a mask, key padding, ``is_causal``) at token `row`
    only (a fixed position, negative from the end; the token axis kept, of size 1), or at every token (None);
    with `projections` (`Projections` of src, same layout) the first layer's attention takes them instead of
    projecting src."""

    def __init__(self, encoder: nn.Module, row=None):
        super().__init__()
        self.__dict__["encoder"] = encoder   # the model's own module, not a submodule of the kernel
        self.__dict__["signature"] = inspect.signature(encoder.forward)   # (bound at every step)
        self.row = row

    def extra_repr(self) -> str:
        return f"row={self.row}"

    def forward(self, *args, projections: torch.Tensor = None, **kwargs) -> torch.Tensor:
        encoder = self.encoder
        if self.row is None and projections is None:
            return encoder(*args, **kwargs)
        given = self.signature.bind(*args, **kwargs).arguments
        x = given.get("src")
        mask, padding = given.get("mask", given.get("src_mask")), given.get("src_key_padding_mask")
        t = 1 if batch_first(encoder) else 0
        if mask is None and given.get("is_causal"):   # the mask is_causal stands for
            mask = torch.ones(x.shape[t], x.shape[t], dtype=torch.bool, device=x.device).triu(1)
        layers = layers_of(encoder)
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            row = self.row % x.shape[t] if last and self.row is not None else None
            x = _layer(layer, x, row, t, projections if i == 0 else None, mask, padding)
        if isinstance(encoder, nn.TransformerEncoder) and encoder.norm is not None:
            x = encoder.norm(x)
        return x


def _layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, row, t: int, projections, mask,
           padding) -> torch.Tensor:
    """The layer's unfused forward (`nn.TransformerEncoderLayer.forward`) for the query at `row` alone (every
    row for None), its attention on `projections` where given (then without a mask or padding)."""
    if row is None and projections is None:
        return layer(x, src_mask=mask, src_key_padding_mask=padding)
    rows = mask if mask is None or row is None else mask.narrow(-2, row, 1)

    def attend(query, keys):
        if projections is None:
            out = layer.self_attn(query, keys, keys, attn_mask=rows, key_padding_mask=padding, need_weights=False)[0]
        else:
            out = _attend(layer.self_attn, projections, row, t)
        return layer.dropout1(out)

    own = x if row is None else x.narrow(t, row, 1)
    if layer.norm_first:
        normed = layer.norm1(x)
        y = own + attend(normed if row is None else normed.narrow(t, row, 1), normed)
        return y + layer._ff_block(layer.norm2(y))
    y = layer.norm1(own + attend(own, x))
    return layer.norm2(y + layer._ff_block(y))


def _attend(attention: nn.MultiheadAttention, projections: torch.Tensor, row, t: int):
    """The self-attention of the queries at `row` (every row for None) of `projections` (tokens at dim `t`)."""
    return attend(attention, projections if row is None else projections.narrow(t, row, 1), projections, None, t)


def attend(attention: nn.MultiheadAttention, queries: torch.Tensor, keys: torch.Tensor, mask, t: int):
    """`attention` of the queries projected in `queries` over the keys and values projected in `keys`
    (`Projections`, tokens at dim `t`), with `nn.MultiheadAttention`'s `attn_mask` (True where not allowed, or
    added), as the layer computes it."""
    d, heads = attention.embed_dim, attention.num_heads
    if t == 0:   # (tokens, batch, 3d) -> (batch, tokens, 3d)
        queries, keys = queries.transpose(0, 1), keys.transpose(0, 1)
    q, k, v = queries[..., :d], keys[..., d:2 * d], keys[..., 2 * d:]

    def split(x):
        return x.unflatten(-1, (heads, d // heads)).transpose(1, 2)
    if mask is not None:
        mask = ~mask if mask.dtype == torch.bool else mask
        if mask.dim() == 3:   # (batch * heads, L, S)
            mask = mask.unflatten(0, (-1, heads))
    y = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask).transpose(1, 2).flatten(2)
    y = attention.out_proj(y)
    return y.transpose(0, 1) if t == 0 else y
