"""3D convolutions of a few frames on the CPU, run by oneDNN where PyTorch would run its slow native kernel.

PyTorch sends a batch-1, one-group Conv3d with a kernel of at most 3x3 in
space to oneDNN only when the input's first four sizes multiply past 20480
(``B * C * T * H``); below that it runs its native ``slow_conv3d`` (vol2col
and a matrix product), which is 5-8x slower on the shapes a step or a chunk
of a few frames has (a 16 -> 32 channel 3x3x3 convolution of 112x112 frames:
12 ms a frame natively, 1.8 ms in oneDNN; the clip itself runs in oneDNN once
it is long enough). `conv3d` calls oneDNN directly for those calls when the
kernel is spatial and the work is large enough to pay oneDNN's fixed cost
(about 50 us a call); 1x1 and time-only kernels, whose native kernel is a
plain matrix product, stay native.

Only plain eager float32 calls on the CPU are routed: under autograd, a
tracer, `torch.compile`, any dispatch mode (recording a compiled step,
counting FLOPs) or `standard_ops` (an ONNX export, whose untraced runs must
read the sizes its trace reads) the call is `F.conv3d`, so recorded graphs and
exports see the standard op.

Example::

    >>> x, w = torch.randn(1, 16, 5, 32, 32), torch.randn(32, 16, 3, 3, 3)
    >>> torch.allclose(conv3d(x, w, None, 1, (0, 1, 1), 1, 1), F.conv3d(x, w, None, 1, (0, 1, 1)), atol=1e-4)
    True
"""
from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


_standard = ContextVar("cofx_standard_conv3d", default=False)


@contextlib.contextmanager
def standard_ops():
    """Within: every call is `F.conv3d`."""
    token = _standard.set(True)
    try:
        yield
    finally:
        _standard.reset(token)


def _triple(v) -> list:
    return [int(i) for i in v] * (3 if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else [int(v)] * 3


MIN_MACS = 2_000_000   # below this oneDNN's fixed cost per call outweighs vol2col (measured on an AMD EPYC with AVX-512, 2 threads)


def _native_is_slow(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether PyTorch would run this one-group call natively and oneDNN is worth its fixed cost."""
    kh, kw = weight.shape[-2:]
    if kh * kw == 1 or (kh > 3 and kw > 3) or x.dim() != 5 or x.shape[0] > 1 or math.prod(x.shape[:4]) > 20480:
        return False   # PyTorch's own choice is oneDNN already, or native is a plain matrix product
    return weight.numel() * math.prod(x.shape[2:]) >= MIN_MACS


def _eager_float32(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """A plain eager float32 CPU call that nothing records, traces or differentiates."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (x.device.type == "cpu" and all(t.dtype == torch.float32 for t in tensors)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()
            and all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors))


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    """`F.conv3d` (numeric `padding` only), by oneDNN for eager float32 CPU calls."""
    # cheapest first: most calls of a step (depthwise, pointwise) leave at the first or second test; no size is
    # read under `standard_ops` or a tracer (an ONNX export matches the sizes its trace reads)
    if groups != 1 or _standard.get() or torch.jit.is_tracing() or not _native_is_slow(x, weight) or \
            not _eager_float32(x, weight, bias):
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    return torch.ops.aten.mkldnn_convolution(x, weight, bias, _triple(padding), _triple(stride), _triple(dilation),
                                             groups)
