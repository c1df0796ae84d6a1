"""Transformer layers run as the ops they are made of, not as PyTorch's fused inference kernels.

`nn.MultiheadAttention` and `nn.TransformerEncoderLayer` take a fused path in
inference (no gradients, eval mode) that FlopCounterMode does not count and
ONNX has no op for. Counting FLOPs and exporting both run them unfused.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def unfused_attention():
    """The body runs with torch's fused multi-head attention path off (as it was on exit)."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
