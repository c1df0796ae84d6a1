"""FLOPs of a clip forward and of one continual step, counted by torch's FlopCounterMode.

The point of a continual model is the work it saves: a sliding-window clip
model recomputes the whole clip for every output, a continual model computes
each frame once. These counts put numbers on that. They are what
`torch.utils.flop_counter.FlopCounterMode` counts: convolutions and matrix
products (2 FLOPs per multiply-add); pooling and elementwise ops count 0.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from .dtype_device import dtype_device
from .scratch_stream import scratch_stream
from .unfused import unfused_attention


def _example(co, time_dim_size=None) -> torch.Tensor:
    """Zeros shaped like the clip `co` was converted with (dtype and device of its parameters)."""
    dtype, device = dtype_device(co)
    shape = list(co.clip_shape)
    if time_dim_size is not None:
        shape[co.options["time_dim"]] = time_dim_size
    return torch.zeros(shape, dtype=dtype, device=device)


def clip_flops(co) -> int:
    """FLOPs of one `forward` on a clip of `co.clip_shape`: the cost per output of a sliding-window clip model."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), unfused_attention(), counter:
        co.forward(_example(co))
    return int(counter.get_total_flops())


def _in_steady_state(co, count: Callable) -> object:
    """Run `count()` once every layer computes on every step; the caller's stream state is kept.

    The output needs `delay` frames, and once it is produced every layer on the
    way has produced too and goes on doing so each step (each stride period):
    `delay + stride` warm-up frames reach the steady cost. The frames further back
    in the receptive field change what a step computes, not how much.
    """
    with scratch_stream(co, eval_mode=False), torch.no_grad():
        co.forward_steps(_example(co, co.delay + co.stride))
        return count()


def step_flops(co) -> int:
    """FLOPs of one `forward_step` in steady state (the mean over one temporal-stride period).

    With a temporal stride s, only every s-th step runs the later layers, so one
    step is not representative; the mean over s steps is the cost per input
    frame, and `s * step_flops(co)` the cost per output.
    """
    frame = _example(co, 1).select(co.options["time_dim"], 0)

    def count():
        counter = FlopCounterMode(display=False)
        with unfused_attention(), counter:
            for _ in range(co.stride):
                co.forward_step(frame)
        return round(counter.get_total_flops() / co.stride)
    return _in_steady_state(co, count)


def node_step_flops(co) -> dict:
    """FLOPs per steady-state step of every node of the original graph (by node name), summing to `step_flops`.

    Runs the continual graph node by node after a warm-up; each node of that graph
    is charged to the original node it was made from (its name, or the name it
    starts with: ``conv`` for ``conv_align``), the rest to ``""``.
    """
    names = sorted((n.name for n in co.graph.nodes), key=len, reverse=True)
    chunk = _example(co, 1)

    def owner(step_name: str) -> str:
        return next((n for n in names if step_name == n or step_name.startswith(n + "_")), "")

    class Counting(fx.Interpreter):
        def run_node(self, n):
            counter = FlopCounterMode(display=False)
            with counter:
                out = super().run_node(n)
            key = owner(n.name)
            totals[key] = totals.get(key, 0) + counter.get_total_flops()
            return out

    def count():
        for _ in range(co.stride):
            Counting(co, graph=co.step_graph).run(chunk)
        return {k: round(v / co.stride) for k, v in totals.items()}

    totals: dict = {}
    return _in_steady_state(co, count)
