"""Streams cofx runs on a continual model of its own accord, leaving the user's stream as it was.

Priming the fixed-shape step, recording compiled phases, exporting to ONNX,
counting FLOPs and measuring state all step the model on inputs of their own.
`scratch_stream` is the one place that saves and restores everything a step can
change: the kernels' state, the stream's batch and frame count, ``co.ready``,
``co.last_step_compiled``, the stream context's batch, and the train/eval mode
of every submodule.

>>> import torch, cofx
>>> co = cofx.convert(torch.nn.Conv1d(2, 2, 3), torch.randn(1, 2, 8))
>>> x = torch.randn(1, 2, 8)
>>> head = co.forward_steps(x[:, :, :4])
>>> with scratch_stream(co):
...     _ = co.forward_steps(torch.zeros(3, 2, 10))
>>> torch.allclose(torch.cat([head, co.forward_steps(x[:, :, 4:])], 2), co(x))
True
"""
from __future__ import annotations

from contextlib import contextmanager

_MISSING = object()


@contextmanager
def scratch_stream(co, clean: bool = True, eval_mode: bool = True):
    """Run the body on a scratch stream of `co`: from a clean state (`clean`), in eval mode (`eval_mode`);
    on exit, the user's stream and modes are back exactly as they were, whatever the body raised."""
    snap = co._snapshot()
    d = co.__dict__
    ready = d.get("ready", _MISSING)
    modes = [(m, m.training) for m in co.modules()]
    batch = co._ctx.batch
    try:
        if eval_mode:
            co.eval()
        if clean:
            co.clean_state()
        yield co
    finally:
        co._restore(snap)
        for m, was in modes:
            m.training = was
        co._ctx.batch = batch
        if ready is _MISSING:
            d.pop("ready", None)
        else:
            d["ready"] = ready
