"""`torch.stft` without centring, written as the windowed frames and the Fourier transform it computes.

A spectrogram front end made for streaming (``torch.stft(wav, n_fft, hop,
window=w, center=False, return_complex=True)``, torchaudio's
``Spectrogram(center=False)``) cuts the waveform into frames of ``n_fft``
samples every ``hop`` samples, weights each by the window and transforms it:
``torch.fft.rfft(wav.unfold(-1, n_fft, hop) * w, dim=-1)``, frames on the
second-to-last axis, then transposed. Written so, the frames are strided
crops of the waveform (`unfold_as_slices` takes them further) and the
transform acts on each frame alone, so the front end streams exactly. A
centred stft (torch's default) pads each end by reflecting the waveform,
which needs samples from the future: refused, saying to pass center=False.

Example::

    >>> class Spectrum(torch.nn.Module):
    ...     def forward(self, wav):                      # (B, samples)
    ...         spec = torch.stft(wav, 16, 8, window=torch.hann_window(16), center=False, return_complex=True)
    ...         return spec.abs()
    >>> gm = torch.fx.symbolic_trace(Spectrum())
    >>> stft_as_frames(gm)
    1
    >>> wav = torch.randn(2, 100)
    >>> torch.allclose(gm(wav), Spectrum()(wav), atol=1e-5)
    True
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from cofx.errors import ConversionError
from cofx.graph_rewrite import rewrite_nodes

_ARGS = ("input", "n_fft", "hop_length", "win_length", "window", "center", "pad_mode", "normalized", "onesided",
         "return_complex")


def _is_stft(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.stft or \
        node.op == "call_method" and node.target == "stft"


def _frames(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    b = dict(zip(_ARGS, node.args), **node.kwargs)
    n_fft = b.get("n_fft")
    hop = b.get("hop_length") or (n_fft // 4 if isinstance(n_fft, int) else None)
    win = b.get("win_length") or n_fft
    window = b.get("window")
    if b.get("center", True) is not False:
        raise ConversionError("a centred stft pads each end of the waveform by reflecting it, which needs samples "
                              "from the future", node=node, fix="compute it with center=False (torch.stft(..., "
                              "center=False), torchaudio's Spectrogram(center=False)), which streams exactly")
    if not all(isinstance(v, int) for v in (n_fft, hop, win)) or win > n_fft or \
            b.get("return_complex") not in (True, False):
        raise ConversionError("an stft whose sizes are not numbers written in the code, or that returns real "
                              "pairs without return_complex=False said", node=node,
                              fix="pass n_fft, hop_length and win_length as ints and return_complex=True")
    frames = graph.call_method("unfold", (b["input"], -1, n_fft, hop))
    if window is None and win < n_fft:   # a rectangular window shorter than the frame
        window = graph.call_method("new_ones", (b["input"], win))
    if window is not None:
        if win < n_fft:   # a shorter window sits in the middle of the frame
            left = (n_fft - win) // 2
            window = graph.call_function(F.pad, (window, (left, n_fft - win - left)))
        frames = graph.call_function(operator.mul, (frames, window))
    fft = torch.fft.rfft if b.get("onesided") in (None, True) else torch.fft.fft
    spectrum = graph.call_function(fft, (frames,), {"dim": -1, "norm": "ortho" if b.get("normalized") else None})
    out = graph.call_method("transpose", (spectrum, -1, -2))
    return out if b["return_complex"] else graph.call_function(torch.view_as_real, (out,))


def stft_as_frames(gm: fx.GraphModule) -> int:
    """Rewrite every uncentred `torch.stft` of `gm` as windowed frames and `rfft`; returns how many were."""
    return rewrite_nodes(gm, [n for n in gm.graph.nodes if _is_stft(n)], _frames)
