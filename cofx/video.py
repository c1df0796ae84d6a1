"""Real frames for checks: decode a video file with PyAV into a clip tensor the model takes."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# Kinetics normalisation, which the video models cofx targets (X3D, R(2+1)D, SlowFast) were trained with
MEAN, STD = 0.45, 0.225


def read_frames(path: str, count: int, size: tuple) -> torch.Tensor:
    """Up to `count` RGB frames of `path` as a (1, 3, T, H, W) float32 tensor, resized to `size` = (H, W)."""
    try:
        import av
    except ImportError:
        raise ValueError("reading a video needs PyAV: pip install av") from None
    if not os.path.isfile(path):
        raise ValueError(f"no such video file: '{path}'")
    frames = []
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if len(frames) == count:
                    break
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot decode a video stream from '{path}': {e}") from None
    if not frames:
        raise ValueError(f"'{path}' holds no video frames")
    x = torch.stack(frames).permute(0, 3, 1, 2).float() / 255         # T, 3, h, w
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).permute(1, 0, 2, 3).unsqueeze(0).contiguous()
