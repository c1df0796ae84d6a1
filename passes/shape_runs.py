"""Run the traced model on a few inputs and record what every node produced.

Three runs tell which tensor dimensions follow the batch size and which follow
the clip length, through any reshape or permute the model does:

- ``"clip"``: the example clip, one stream (batch 1);
- ``"longer"``: the same stream with more frames;
- ``"batch"``: the clip as two streams;
- ``"shorter"``, only where the longer run failed (a table sized for the clip):
  the stream with fewer frames, so that time is still told apart from fixed
  sizes there (`other_length`).

Each node gets ``node.meta["cofx_runs"][run]``: a pytree of `Rec` (tensors:
shape and dtype) or plain Python values (ints, shapes, slices), or `FAILED`
when that run could not execute the node (a model that only accepts its clip
length fails in the ``"longer"`` run after time was flattened away; the
analysis decides whether that matters).

Example::

    >>> gm = cofx.tracer.trace(torch.nn.Conv1d(2, 4, 3).eval())
    >>> record_runs(gm, {"clip": torch.randn(1, 2, 8), "longer": torch.randn(1, 2, 40), "batch": torch.randn(2, 2, 8)})
    {'clip': {}, 'longer': {}, 'batch': {}}
    >>> out = gm.graph.find_nodes(op="output")[0]
    >>> {run: rec.shape for run, rec in out.meta["cofx_runs"].items()}   # dim 0 follows the batch, dim 2 the length
    {'clip': (1, 4, 6), 'longer': (1, 4, 38), 'batch': (2, 4, 6)}
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

from cofx.errors import ConversionError


@dataclass(frozen=True)
class Rec:
    shape: tuple
    dtype: torch.dtype


def run_shapes(node) -> dict:
    """The shape of `node`'s tensor in each run that recorded one (run name -> shape)."""
    runs = node.meta.get("cofx_runs", {})
    return {run: tuple(rec.shape) for run, rec in runs.items() if isinstance(rec, Rec)}


class _Failed:
    def __repr__(self):
        return "FAILED"


FAILED = _Failed()


def other_length(node: fx.Node):
    """What `node` gave on a clip of another length than the example's: the longer run, else the shorter run,
    else FAILED."""
    runs = node.meta.get("cofx_runs", {})
    longer = runs.get("longer", FAILED)
    return runs.get("shorter", FAILED) if longer is FAILED else longer


def _contains_failed(value) -> bool:
    leaves, _ = tree_flatten(value)
    return any(v is FAILED for v in leaves)


def _mutable(value):
    """Plain lists and dicts for fx's immutable containers (some traced helpers mutate their arguments)."""
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if type(value) is tuple:   # not the named tuples ops return (values, indices)
        return tuple(_mutable(v) for v in value)
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


def _summarise(value):
    def one(v):
        if isinstance(v, torch.Tensor):
            return Rec(tuple(v.shape), v.dtype)
        if isinstance(v, torch.Size):
            return tuple(v)
        if isinstance(v, (int, float, bool, str, slice, type(None), torch.dtype, torch.device)) or v is Ellipsis:
            return v
        return type(v).__name__
    return tree_map(one, value)


def _writes_its_input(n: fx.Node, gm) -> bool:
    """Whether `n` may write into its inputs (``y.mul_(2)``, ``torch.relu_``, a module built with inplace=True)."""
    if n.op == "call_module":
        return bool(getattr(gm.get_submodule(n.target), "inplace", False))
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("__")


class RecordingInterpreter(fx.Interpreter):
    """Runs the graph, summarising each node's value into ``meta['cofx_runs'][run]``.

    With ``tolerate_failures`` a node that raises is recorded as FAILED and so is
    everything that depends on it; otherwise the error propagates.
    ``on_node(node, args, kwargs, result)`` is an optional hook that sees real
    values (the framewise check uses it).
    """

    def __init__(self, gm: fx.GraphModule, run: Optional[str], tolerate_failures: bool = False,
                 on_node: Optional[Callable] = None):
        super().__init__(gm)
        self.run_name, self.tolerate, self.on_node = run, tolerate_failures, on_node
        self.errors: dict[str, str] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current_node = n
        with self._set_current_node(n):
            args, kwargs = _mutable(self.fetch_args_kwargs_from_env(n))
            if _contains_failed((args, kwargs)):
                result = FAILED
            else:
                given = _cloned((args, kwargs)) if self.on_node is not None and _writes_its_input(n, self.module) \
                    else None
                try:
                    result = getattr(self, n.op)(n.target, args, kwargs)
                except Exception as e:
                    if not self.tolerate:
                        raise
                    self.errors[n.name] = f"{type(e).__name__}: {e}"
                    result = FAILED
            if result is not FAILED and self.on_node is not None:   # the hook sees the inputs as they came
                self.on_node(n, *(given or (args, kwargs)), result)
        if self.run_name is not None:   # (None: a run for `on_node` alone)
            n.meta.setdefault("cofx_runs", {})[self.run_name] = FAILED if result is FAILED else _summarise(result)
        return result


class _FakeRecordingInterpreter(RecordingInterpreter):
    """A recording run on fake tensors. An inference BatchNorm gives its input's shape, so it is answered
    without torch's batch-norm decomposition, which fake tensors run op by op in Python (most of a shape run
    of a network with a norm after every convolution)."""

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if type(mod).forward is _BatchNorm.forward and not mod.training and mod.track_running_stats \
                and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            x = args[0]
            mod._check_input_dim(x)
            if x.shape[1] == mod.num_features:
                return torch.empty_like(x)
        return super().call_module(target, args, kwargs)


def _cloned(value):
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def _run_fake(gm: fx.GraphModule, run: str, x: torch.Tensor) -> bool:
    """Record a run on fake tensors (shapes without arithmetic); False when fake tensors cannot run it."""
    quiet = [logging.getLogger(name) for name in ("torch._subclasses.fake_tensor", "torch.fx.experimental")]
    levels = [log.level for log in quiet]
    for log in quiet:   # a failed fake run is expected and handled: not the user's business
        log.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            _FakeRecordingInterpreter(gm, run).run(mode.from_tensor(x))
        return True
    except Exception:   # data-dependent code, ops without fake kernels, or a genuine failure: run for real
        return False
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def record_runs(gm: fx.GraphModule, inputs: Mapping[str, torch.Tensor], tolerant: tuple = ("longer", "shorter")) -> dict:
    """Record every run of `inputs` (name -> input tensor); returns each run's errors by node.

    Runs go on fake tensors where they can (they only need shapes), so a longer
    clip costs nothing; anything fake tensors cannot run is run for real.
    """
    errors = {}
    with torch.no_grad():
        for run, x in inputs.items():
            if _run_fake(gm, run, x):
                errors[run] = {}
                continue
            interp = RecordingInterpreter(gm, run, tolerate_failures=run in tolerant)
            try:
                interp.run(x)
            except Exception as e:
                node = getattr(interp, "current_node", None)
                what = {"clip": "the example clip", "batch": "a batch of two streams"}.get(run, f"the {run} input")
                raise ConversionError(f"the traced model fails on {what} ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0]})", node=node,
                                      fix="each row of the batch must be an independent stream"
                                      if run == "batch" else "check the example input's shape") from e
            errors[run] = interp.errors
    return errors
