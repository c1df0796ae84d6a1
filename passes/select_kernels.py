"""Choose, per op, the fastest way to compute one step on this machine.

PyTorch's CPU Conv3d picks very different kernels for a clip and for the few
frames of one step (a depthwise 3x3x3 conv over 3 frames can be 30x slower
than the same work as 2D convolutions). For every Conv3d of the stream this
pass times the equivalent implementations of one step on the op's real
shapes and weights and records the fastest:

``conv3d``, ``conv3d_cl`` (on channels-last frames), ``fold2d`` (temporal
taps folded into channels), ``taps2d`` (one 2D conv per tap, summed) or, for
1x1 kernels, ``matmul``, for the one output frame of a step of a sliding
conv, and for the one frame of a temporal-kernel-1 conv.

Implementations are checked to agree before one is chosen; all of them read
the module's weights at call time, so the choice never goes stale. Choices are
kept in the tuning cache (`cofx.tuning_cache`), keyed by the op's configuration,
shapes and dtype, not its weights: an op already measured on this machine is not
timed again.

Writes ``node.meta["cofx_impl"]``.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU()).eval()
    >>> gm, clip = cofx.tracer.trace(model), torch.randn(1, 2, 6, 8, 8)
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(clip, time_dim=2))
    >>> cofx.passes.label_layouts(gm); cofx.passes.mark_length_values(gm); cofx.passes.classify_nodes(gm)
    >>> select_kernels(gm)
    >>> {n.name: n.meta["cofx_impl"] for n in gm.graph.nodes if "cofx_impl" in n.meta}
    {'_0': '...'}
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.fx as fx

from cofx import tuning_cache
from cofx.sliding_ops import SlidingSpec


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _tensor(gm: fx.GraphModule, ref):
    if ref is None:
        return None
    if isinstance(ref, str):
        value = gm
        for part in ref.split("."):
            value = getattr(value, part)
        return value
    if isinstance(ref, fx.Node) and ref.op == "get_attr":
        return _tensor(gm, ref.target)
    return None


def _sample_shape(node: fx.Node, frames: int) -> tuple:
    """(shape, dtype) of one step's window of `frames` frames at batch 1."""
    x = node.args[0]
    rec = x.meta["cofx_runs"]["clip"]
    shape = list(rec.shape)
    shape[0], shape[x.meta["cofx_time"]] = 1, frames
    return shape, rec.dtype


def _op(node: fx.Node, spec: SlidingSpec, shape, dtype, weight, bias) -> dict:
    """What ranks the op's implementations: its configuration, shapes and dtypes (not its weights' values)."""
    return {"kind": node.meta.get("cofx_kind"), "spec": dataclasses.asdict(spec), "impls": spec.window_impls(),
            "input": shape, "dtype": str(dtype), "bias": bias is not None, "device": weight.device.type,
            "weight": {"shape": list(weight.shape), "stride": list(weight.stride()), "dtype": str(weight.dtype)}}


def _fastest(candidates: dict, rounds: int = 7):
    """The fastest candidate's name, or None where they disagree (non-finite or extreme weights: no ranking)."""
    results = {name: fn() for name, fn in candidates.items()}
    first = next(iter(results.values()))
    scale = float(first.abs().max()) + 1e-30
    if not all(torch.allclose(r, first, rtol=0, atol=1e-4 * scale) for r in results.values()):
        return None
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):   # interleaved, so that load on the machine hits every candidate alike
        for name, fn in candidates.items():
            best[name] = min(best[name], _seconds(fn))
    return min(best, key=best.get)


def select_kernels(gm: fx.GraphModule) -> None:
    # one thread: a multi-threaded kernel on a busy machine waits for descheduled threads, and those
    # stalls, not the kernels, would decide; the ranking of single-threaded kernels is what carries over
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _select(gm, threads)
    finally:
        torch.set_num_threads(threads)


def _measure(node: fx.Node, spec: SlidingSpec, x: torch.Tensor, weight, bias):
    # a sliding kernel that runs channels-last keeps its window in that layout (one new frame converted
    # per step): time that implementation on a window already converted
    kept = {"conv3d_cl": x.contiguous(memory_format=torch.channels_last_3d)} \
        if node.meta.get("cofx_kind") == "sliding" else {}
    return _fastest({impl: (lambda impl=impl: spec.window(impl, kept.get(impl, x), weight, bias))
                     for impl in spec.window_impls()})


def _select(gm: fx.GraphModule, threads: int) -> None:
    with torch.no_grad():
        for node in gm.graph.nodes:
            spec = node.meta.get("cofx_spec") if node.meta.get("cofx_kind") == "sliding" else \
                node.meta.get("cofx_frame_spec")
            if not isinstance(spec, SlidingSpec) or len(spec.window_impls()) < 2:
                continue
            weight, bias = (_tensor(gm, t) for t in node.meta["cofx_tensors"])
            if weight is None:
                continue
            shape, dtype = _sample_shape(node, spec.span)
            # keyed by the caller's thread count, which the chosen kernels run at, though timed on one thread
            key = tuning_cache.key(_op(node, spec, shape, dtype, weight, bias), threads)
            impl = tuning_cache.lookup(key, spec.window_impls())
            if impl is None:
                impl = _measure(node, spec, torch.randn(shape, dtype=dtype), weight, bias)
                if impl is not None:
                    tuning_cache.store(key, impl)
            node.meta["cofx_impl"] = impl or spec.window_impls()[0]
