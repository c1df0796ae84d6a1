"""The dtype and device a model computes in: those of its first floating parameter (float32 on the CPU
when it has none). Inputs cofx makes for a model (warm-up frames, probes, examples) follow them."""
from __future__ import annotations

import torch
from torch import nn


def dtype_device(model: nn.Module) -> tuple:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
