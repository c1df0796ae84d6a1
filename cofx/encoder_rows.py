"""The last layer of a transformer encoder for the one token a model reads.

A model that reads one token of its encoder's output (``enc(h)[:, 0]``, a class
token; ``enc(h)[:, -1]``, the newest frame) needs that row of the last layer
only: its attention takes every key and value but a single query, and its
feed-forward a single row. Over a window of the clip (`cofx.passes.continualize`)
the step computes that row instead of all N (each earlier layer still computes
every row, as the next layer's keys and values need them). Same weights and the
same ops as the layer's own (unfused) path.

Example::

    >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    >>> x = torch.randn(3, 5, 8)
    >>> torch.allclose(EncoderRow(layer, -1)(x), layer(x)[:, -1], atol=1e-6)
    True
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels import Kernel

ENCODERS = (nn.TransformerEncoder, nn.TransformerEncoderLayer)


def batch_first(encoder: nn.Module) -> bool:
    layer = encoder.layers[0] if isinstance(encoder, nn.TransformerEncoder) else encoder
    return layer.self_attn.batch_first


class EncoderRow(Kernel):
    """``encoder(x)`` at token `row` (a fixed position, negative from the end), without the token axis."""

    def __init__(self, encoder: nn.Module, row: int):
        super().__init__()
        self.__dict__["encoder"] = encoder   # the model's own module, not a submodule of the kernel
        self.row = row

    def extra_repr(self) -> str:
        return f"row={self.row}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        layers = list(encoder.layers) if isinstance(encoder, nn.TransformerEncoder) else [encoder]
        for layer in layers[:-1]:
            x = layer(x)
        t = 1 if batch_first(encoder) else 0
        y = _row_of_layer(layers[-1], x, self.row % x.shape[t], t)
        if isinstance(encoder, nn.TransformerEncoder) and encoder.norm is not None:
            y = encoder.norm(y)
        return y.select(t, 0)


def _row_of_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, row: int, t: int) -> torch.Tensor:
    """The layer's unfused forward (`nn.TransformerEncoderLayer.forward`) for the query at `row` alone."""
    def attend(query, keys):
        return layer.dropout1(layer.self_attn(query, keys, keys, need_weights=False)[0])

    if layer.norm_first:
        normed = layer.norm1(x)
        y = x.narrow(t, row, 1) + attend(normed.narrow(t, row, 1), normed)
        return y + layer._ff_block(layer.norm2(y))
    y = layer.norm1(x.narrow(t, row, 1) + attend(x.narrow(t, row, 1), x))
    return layer.norm2(y + layer._ff_block(y))
