"""Build the continual (step) graph from an analysed graph.

Walks the analysed GraphModule once and emits, node by node:

- time-free and shape nodes: copied;
- pointwise stream nodes: copied; reshapes get sizes that follow the stream
  (`cofx.kernels.reshape`), ops that reject empty chunks get a `Framewise` guard;
- sliding nodes (conv, pool, crop): a `Sliding` kernel;
- global reductions: the per-frame part, a `Sliding` window over frames, a
  fold of the frames into the batch, then the original op (with sizes read
  off the clip taken as those of one window; a reshape that flattens time
  into features reshapes each window);
- merges: an `Align` kernel (delay buffers) in front of the original op, and
  an unfold for inputs that come from a reduction;
- the output: folded results unfolded to (B, ..., n); each output keeps its
  own frames (outputs are not aligned with each other).

Returns the step graph, the kernels it calls (to be registered on the
continual module), the time axis of each output leaf and the kernels built
for each original node. The step graph reads ``self.<path>`` for the original
modules and parameters, so it shares every weight with the original graph.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.ReLU()).eval()
    >>> gm, clip = cofx.tracer.trace(model), torch.randn(1, 2, 8)
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(clip, time_dim=2))
    >>> cofx.passes.label_layouts(gm); cofx.passes.mark_length_values(gm); cofx.passes.classify_nodes(gm)
    >>> cofx.passes.check_framewise(gm, clip); cofx.passes.annotate_timing(gm); cofx.passes.mark_batchnorm_folds(gm)
    >>> graph, kernels, out_axes, node_kernels = build_step_graph(gm, cofx.kernels.StreamContext())
    >>> kernels                         # the conv's kernel keeps its last frames between steps
    {'co__0': Sliding(span=3, stride=1, pad=(1, 1), keep=2)}
    >>> print(graph)                    # the conv runs as its kernel, the ReLU is copied
    graph():
        ...
        %_0 : [num_users=1] = call_module[target=co__0](args = (%input_1, %_0_weight, %_0_bias), kwargs = {})
        %_1 : [num_users=1] = call_module[target=1](args = (%_0,), kwargs = {})
        return _1
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from cofx import kernels as K
from cofx.bn_fold import BatchNormFold, FoldedConv
from cofx.encoder_rows import (ENCODERS, EncoderRows, ProjectedAttention, Projections, caches_projections,
                                projects_in_one)
from cofx.growing_window import ClipStart, NewestFrames
from cofx.errors import ConversionError
from cofx.sliding_ops import PadSpec, SlidingSpec
from cofx.stock_modules import stock

from .layout import Labels, has_time, rows_per_stream
from .node_kind import RESHAPES, node_inputs
from .receptive_field import same_readiness
from .shape_runs import Rec
from .temporal_geometry import CropSpec, ReductionSpec, WindowSpec

_EMPTY_SAFE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                       nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
                       nn.Softmax, nn.LogSoftmax, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                       nn.Dropout3d, nn.AlphaDropout, nn.Linear, nn.LayerNorm, nn.Flatten,
                       nn.modules.batchnorm._BatchNorm)
_EMPTY_SAFE_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "permute", "transpose",
                       "contiguous", "flatten", "unsqueeze", "movedim", "clamp", "clamp_min", "neg",
                       "exp", "abs", "pow", "sqrt", "float", "double", "type_as", "to", "softmax",
                       "expand_as", "squeeze", "__getitem__", "chunk", "split", "size"}
_EMPTY_SAFE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                         operator.getitem, operator.floordiv, torch.add, torch.sub, torch.mul, torch.div,
                         torch.cat, torch.stack, torch.relu, torch.sigmoid, torch.tanh, torch.flatten,
                         torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze, torch.movedim,
                         torch.clamp, torch.exp, torch.abs, torch.maximum, torch.minimum, torch.where,
                         torch.chunk, torch.split,
                         F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.elu, F.hardswish,
                         F.hardsigmoid, F.hardtanh, F.softplus, F.softmax, F.log_softmax, F.dropout,
                         F.linear, F.layer_norm, F.batch_norm, torch.sigmoid}


def co_labels(node: fx.Node):
    """Labels of a node's tensor (or pytree of labels, None for leaves that are not tensors) in the continual
    graph: after a reduction, frames ride in the batch; over a window of the clip, time is the window's fixed
    number of frames."""
    layout = node.meta["cofx_layout"]
    if node.meta.get("cofx_role") != "folded":
        return layout
    window = node.meta.get("cofx_from_window")

    def leaf(labels, clip):
        if not isinstance(labels, Labels):
            return None
        return Labels("BT" if lab == "B" else clip.shape[i] if window and lab == "T" else lab
                      for i, lab in enumerate(labels))
    if isinstance(layout, Labels):
        return leaf(layout, node.meta["cofx_runs"]["clip"])
    labels, spec = tree_flatten(layout)
    return tree_unflatten(list(map(leaf, labels, tree_flatten(node.meta["cofx_runs"]["clip"])[0])), spec)


def co_dtypes(node: fx.Node):
    """The dtype of each output of `node` that is not floating point (a mask, indices), as a pytree parallel to
    `co_labels`; None where an output follows the stream's dtype (a model cast with ``.double()`` steps in it)."""
    def one(rec):
        return rec.dtype if isinstance(rec, Rec) and not rec.dtype.is_floating_point else None
    return tree_map(one, node.meta["cofx_runs"]["clip"])


def _batch_axis(node: fx.Node) -> int:
    """Where the streams (and, folded in, the frames) of a value after a global reduction are."""
    labels = node.meta["cofx_layout"]
    if not isinstance(labels, Labels) or "B" not in labels:
        raise ConversionError("a value computed from a global temporal reduction has no batch dimension", node=node)
    return labels.index("B")


# ... and, on values over windows (the frames folded into the batch), what also takes a batch of no rows
_NO_ROWS_SAFE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                         nn.AdaptiveAvgPool3d, nn.GroupNorm)
_NO_ROWS_SAFE_METHODS = {"mean", "sum", "amax", "amin"}
_NO_ROWS_SAFE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, F.conv1d, F.conv2d, F.conv3d,
                           F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}


def _empty_safe(node: fx.Node, gm: fx.GraphModule, rows: bool = False) -> bool:
    """Whether `node`'s op takes a chunk of no frames (`rows`: a batch of no windows) as it is; others are
    guarded (`Framewise`)."""
    if node.op == "call_module":
        return stock(gm.get_submodule(node.target), _EMPTY_SAFE_MODULES + (_NO_ROWS_SAFE_MODULES if rows else ()))
    if node.op == "call_method":
        return node.target in _EMPTY_SAFE_METHODS or rows and node.target in _NO_ROWS_SAFE_METHODS
    return node.target in _EMPTY_SAFE_FUNCTIONS or rows and node.target in _NO_ROWS_SAFE_FUNCTIONS


class _Builder:
    def __init__(self, gm: fx.GraphModule, ctx: K.StreamContext):
        self.gm, self.ctx = gm, ctx
        self.g = fx.Graph()
        self.env: dict = {}
        self.kernels: dict = {}
        self.origin: dict = {}   # stream node -> node whose frames it carries unchanged in count
        self.node_kernels: dict = {}   # original node name -> names of the kernels emitted for it
        self.current = None
        self.windows: dict = {}   # stream node -> its window over the clip, folded into the batch
        self.in_windows: dict = {}   # node -> its value over a window (see `in_window`)
        self.constants: set = set()   # copies of time-free nodes (those a window uses are built again there)
        self.clip_batch = next(n.meta["cofx_runs"]["clip"].shape[0] for n in gm.graph.nodes
                               if n.op == "placeholder" and n.meta.get("cofx_role") == "stream")

    def name(self, hint: str) -> str:
        base = f"co_{hint}"
        name, i = base, 1
        while name in self.kernels or hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        return name

    def add_kernel(self, hint, kernel, args, node_name=None):
        name = self.name(hint)
        self.kernels[name] = kernel
        self.node_kernels.setdefault(self.current, []).append(name)
        return self.g.create_node("call_module", name, tuple(args), {}, name=node_name or name)

    def copy(self, node, replace=None):
        replace = replace or {}
        return self.g.node_copy(node, lambda a: replace.get(a, self.env.get(a)))

    # -- emission ------------------------------------------------------------------------------
    def run(self):
        for node in self.gm.graph.nodes:
            role, kind = node.meta.get("cofx_role"), node.meta.get("cofx_kind")
            self.current = node.name
            if node.op == "placeholder":
                if role != "stream" and not node.users:   # an optional argument fixed at its default
                    continue
                new = self.g.placeholder(node.name)
                if role == "stream":
                    self.env[node] = new
                    self.origin[node] = node
                    self.batch = self.g.create_node("call_method", "size", (new, 0), {}, name="batch")
                continue
            if node.op == "output":
                self.output(node)
                continue
            if role in ("static", "shape"):
                self.env[node] = self.copy(node)
                self.constants.add(self.env[node])
                continue
            folded_into = node.meta.get("cofx_folded_into")
            if folded_into is not None:   # the convolution before it computes it (see fold_batchnorm)
                self.env[node] = self.env[folded_into]
                self.origin[node] = self.origin[folded_into]
                continue
            spec = node.meta.get("cofx_spec")
            if isinstance(spec, SlidingSpec):
                self.env[node] = self.sliding(node, spec)
            elif isinstance(spec, PadSpec):
                self.env[node] = self.pad(node, spec)
            elif isinstance(spec, CropSpec):
                self.env[node] = self.crop(node, spec)
            elif isinstance(spec, ReductionSpec):
                self.env[node] = self.reduction(node, spec)
            elif isinstance(spec, WindowSpec) and spec.start:
                self.env[node] = self.window(node, spec)
            elif kind == "recurrent":
                self.env[node] = self.recurrent(node)
            elif kind == "merge":
                self.env[node] = self.merge(node)
            else:
                self.env[node] = self.pointwise(node)
            self.origin.setdefault(node, self.origin_of(node))
        return self.g, self.kernels

    def rows(self, a: fx.Node, axis: Optional[int] = None):
        """The rows a value's batch dimension (or `axis`, frames folded into the batch) holds per step and window
        or frame: the streams, times the rows each stream has there (persons folded into the batch:
        ``x.view(N * M, C, T, V)``)."""
        labels = a.meta["cofx_layout"]
        rows = rows_per_stream(labels[_batch_axis(a) if axis is None else axis]) if isinstance(labels, Labels) else 1
        if rows == 1:
            return self.batch
        return self.g.create_node("call_function", operator.mul, (self.batch, rows), {}, name=f"{a.name}_rows")

    def origin_of(self, node):
        ins = [a for a in node_inputs(node) if a.meta.get("cofx_role") == "stream"]
        if node.meta.get("cofx_kind") == "pointwise" and node.meta.get("cofx_role") == "stream" and len(ins) == 1:
            return self.origin[ins[0]]
        return node

    def pointwise(self, node, replace=None):
        if (node.op, node.target) in RESHAPES:
            return self.reshape(node, replace)
        if node.meta.get("cofx_impl") not in (None, "conv3d"):
            return self.frame_conv(node)
        if node.meta.get("cofx_role") == "folded":   # values over windows: numbers and tensors that follow the
            replace = {**self.window_args(node, replace or {}), **(replace or {})}   # batch follow the windows
        if node.meta.get("cofx_from_window") or node.meta.get("cofx_role") == "folded":   # values over windows
            if not _empty_safe(node, self.gm, rows=True):   # no window completed: nothing to run on
                return self.guard(node, replace)
        if node.meta.get("cofx_role") == "stream" and isinstance(node.meta["cofx_layout"], Labels) \
                and not _empty_safe(node, self.gm):
            return self.guard(node, replace)
        if "cofx_bn" in node.meta:
            return self.folded_conv(node, replace)
        return self.copy(node, replace)

    def batchnorm_fold(self, node) -> BatchNormFold:
        return BatchNormFold(self.gm.get_submodule(node.meta["cofx_bn"]))

    def folded_conv(self, node, replace=None):
        """A convolution module that computes the BatchNorm after it too."""
        kernel = FoldedConv(self.gm.get_submodule(node.target), self.batchnorm_fold(node))
        args = fx.node.map_arg(node.args, lambda a: (replace or {}).get(a, self.env.get(a)))
        return self.add_kernel(node.name, kernel, args, node_name=node.name)

    def reshape(self, node, replace=None):
        """A reshape whose sizes follow the stream; a batch dimension may hold several rows per stream (persons
        folded into the batch: ``x.view(N * M, C, T, V)``), as many as it has in the clip run of one stream."""
        replace = replace or {}
        x = node.args[0]
        labels_in = co_labels(x)
        batch_dims = sum(1 for lab in labels_in if lab in ("B", "BT"))
        # over a window of N frames, a dimension that holds the batch and the frames together holds N rows of
        # each window (``x.reshape(B * T, P, C)`` inside attention over the clip)
        frames = node.meta.get("cofx_window_frames", 1) if node.meta.get("cofx_from_window") else 1
        static = 1
        for lab, own in zip(labels_in, x.meta["cofx_layout"]):
            static *= lab if isinstance(lab, int) else rows_per_stream(own) * (frames if own == "BT" else 1)
        labels = co_labels(node)
        rows = tuple(rows_per_stream(own) * (frames if own == "BT" else 1) for own in node.meta["cofx_layout"])
        value = replace.get(x, self.env[x])
        return self.g.create_node("call_function", K.reshape, (value, tuple(labels), self.batch, batch_dims, static),
                                  {"rows": rows} if any(r != 1 for r in rows) else {}, name=node.name)

    def guard(self, node, replace=None):
        replace = replace or {}
        mapped = lambda a: replace.get(a, self.env.get(a))  # noqa: E731
        if node.op == "call_module":
            op, method = self.gm.get_submodule(node.target), None
            if "cofx_bn" in node.meta:
                op = FoldedConv(op, self.batchnorm_fold(node))
        elif node.op == "call_method":
            op, method = None, node.target
        else:
            op, method = node.target, None
        kernel = K.Framewise(self.ctx, op, method, co_labels(node), co_dtypes(node))
        args = fx.node.map_arg(node.args, mapped)
        name = self.name(node.name)
        self.kernels[name] = kernel
        self.node_kernels.setdefault(self.current, []).append(name)
        return self.g.create_node("call_module", name, tuple(args), fx.node.map_arg(node.kwargs, mapped),
                                  name=node.name)

    def op_tensors(self, node) -> list:
        """The weight and bias a conv reads, as nodes of the step graph."""
        tensors = []
        for tensor in node.meta["cofx_tensors"]:
            if isinstance(tensor, str):
                tensors.append(self.g.get_attr(tensor))
            elif isinstance(tensor, fx.Node):
                tensors.append(self.env[tensor])
            else:
                tensors.append(tensor)
        if "cofx_bn" in node.meta:
            fold = self.add_kernel(f"{node.name}_bn", self.batchnorm_fold(node), tensors[:2],
                                   node_name=f"{node.name}_bn")
            tensors = [self.g.create_node("call_function", operator.getitem, (fold, i), {}) for i in (0, 1)]
        return tensors

    def hooked_input(self, node, value: fx.Node) -> fx.Node:
        """The input of a module a kernel stands in for, through the module's forward pre-hooks (before its
        weights are read: ``weight_norm`` computes the weight there). (Its forward hooks do not run: one that
        changes the output fails the validation, which says so.)"""
        if node.op != "call_module" or not self.gm.get_submodule(node.target)._forward_pre_hooks:
            return value
        return self.g.create_node("call_function", K.forward_pre_hooks, (self.g.get_attr(node.target), value), {},
                                  name=f"{node.name}_pre_hooks")

    def frame_conv(self, node):
        spec, x = node.meta["cofx_frame_spec"], node.args[0]
        impl = node.meta["cofx_impl"]
        kernel = K.FrameConv(self.ctx, spec.chunk_compute(impl), functools.partial(spec.window, impl),
                             x.meta["cofx_time"], co_labels(node))
        value = self.hooked_input(node, self.env[x])
        return self.add_kernel(node.name, kernel, (value, *self.op_tensors(node)), node_name=node.name)

    def sliding(self, node, spec: SlidingSpec):
        x = node.args[0]
        value = self.hooked_input(node, self.env[x])
        tensors = self.op_tensors(node)
        impl = node.meta.get("cofx_impl")
        window = functools.partial(spec.window, impl) if impl not in (None, "conv3d", "conv3d_cl") else None
        avg = (spec.k, spec.count_include_pad) if spec.family == "avg_pool" and spec.divisor_override is None \
            else None
        kernel = K.Sliding(self.ctx, spec.compute, x.meta["cofx_time"], spec.span, spec.s, spec.pad_l,
                           spec.pad_r, spec.pad_value, co_labels(node), replicate=spec.padding_mode == "replicate",
                           ceil_mode=spec.ceil_mode, avg_count=avg, window=window,
                           layout=torch.channels_last_3d if impl == "conv3d_cl" else None,
                           ring=spec.family == "conv" and spec.d == 1 and bool(tensors) and tensors[0] is not None)
        return self.add_kernel(node.name, kernel, (value, *tensors), node_name=node.name)

    def pad(self, node, spec: PadSpec):
        x = node.args[0]
        kernel = K.Sliding(self.ctx, spec.compute, x.meta["cofx_time"], 1, 1, spec.pad_l, spec.pad_r, spec.value,
                           co_labels(node), replicate=spec.mode == "replicate")
        return self.add_kernel(node.name, kernel, (self.env[x],), node_name=node.name)

    def recurrent(self, node):
        per_frame_state = any(u.op == "call_function" and u.target is operator.getitem and u.args[1] != 0
                              for u in node.users)
        window = node.args[0].meta["cofx_runs"]["clip"].shape[node.args[0].meta["cofx_time"]]
        kernel = K.Recurrent(self.ctx, self.gm.get_submodule(node.target), window, per_frame_state)
        return self.add_kernel(node.name, kernel, (self.env[node.args[0]],), node_name=node.name)

    def crop(self, node, spec: CropSpec):
        x = node.args[0]
        t = x.meta["cofx_time"]
        g = spec.geometry
        if g.span == 1 and g.stride == 1 and g.pad_l == 0:   # its end went to the convolution before it (fold_crops)
            cropped = self.env[x]
        else:
            kernel = K.Sliding(self.ctx, K.crop_select(t, g.stride, g.span), t, g.span, g.stride, g.pad_l, 0, 0.0,
                               co_labels(x))
            cropped = self.add_kernel(node.name, kernel, (self.env[x],), node_name=f"{node.name}_crop")
        if node.target is not operator.getitem:
            return cropped
        index = self._index_without_time(node.args[1], len(x.meta["cofx_layout"]), t)
        if index is None:
            return cropped
        index = fx.node.map_arg(index, lambda a: self.env[a])
        return self.g.create_node("call_function", operator.getitem, (cropped, index), {}, name=node.name)

    @staticmethod
    def _index_without_time(idx, ndim, t):
        items = idx if isinstance(idx, tuple) else (idx,)
        if any(e is Ellipsis for e in items):
            at = next(i for i, e in enumerate(items) if e is Ellipsis)
            used = sum(1 for e in items if e is not None and e is not Ellipsis)
            items = items[:at] + (slice(None),) * (ndim - used) + items[at + 1:]
        out, d = [], 0
        for e in items:
            if e is not None:
                if d == t:
                    e = slice(None)
                d += 1
            out.append(e)
        if all(isinstance(e, slice) and e == slice(None) for e in out):
            return None
        return tuple(out)

    def reduction(self, node, spec: ReductionSpec):
        x = next(a for a in node_inputs(node) if a.meta.get("cofx_role") == "stream")
        t = x.meta["cofx_time"]
        labels = list(co_labels(x))
        if "B" not in labels:
            raise ConversionError("global temporal reduction of a tensor without a batch dimension", node=node)
        b = labels.index("B")
        value = self.env[x]
        if spec.partial is not None:
            fn, arg = spec.partial
            if fn in (torch.mean, torch.sum, torch.amax, torch.amin):
                if arg:
                    value = self.g.create_node("call_function", fn, (value, list(arg)), {"keepdim": True},
                                               name=f"{node.name}_per_frame")
                    for d in arg:
                        labels[d] = 1
            elif any(size is not None for size in arg):   # adaptive pooling: guarded, it rejects empty chunks
                for i, size in enumerate(arg):
                    if size is not None:
                        labels[i + 2] = size
                value = self.add_kernel(f"{node.name}_per_frame", K.Framewise(self.ctx, fn, None, labels),
                                        (value, arg), node_name=f"{node.name}_per_frame")
        raw = spec.mode == "raw"
        if raw:
            labels.append(spec.window)
        pad = {"amax": float("-inf"), "amin": float("inf")}.get(spec.mode, 0.0)
        g = spec.geometry
        kernel = K.Sliding(self.ctx, K.window_reduce(spec.mode, t, spec.window), t, g.span, 1, g.pad_l, 0, pad,
                           labels, avg_count=(spec.window, False) if spec.causal and spec.mode == "mean" else None)
        windows = self.add_kernel(f"{node.name}_window", kernel, (value,), node_name=f"{node.name}_window")
        folded = self.g.create_node("call_function", K.fold_time, (windows, t, b), {"raw": True} if raw else {},
                                    name=f"{node.name}_fold")
        if (node.op, node.target) in RESHAPES:   # time flattened into features: each window as the clip was
            return self.flatten_window(node, folded)
        # sizes read off the clip (a pool's kernel spanning it) are those of one window
        sizes = {a: a.meta["cofx_runs"]["clip"] for a in node.all_input_nodes if a.meta.get("cofx_length") is not None}
        if raw and not has_time(node.meta["cofx_layout"]):   # the op on each window, skipped for a chunk of no
            # windows (std and var warn on those); time flattened into features is reshaped, empty or not
            return self.guard(node, replace={**sizes, x: folded})
        return self.pointwise(node, replace={**sizes, x: folded})

    def window(self, node, spec: WindowSpec):
        """`node` on the last `spec.window` frames of its stream inputs at each step (one window per frame,
        folded into the batch), aligned with what already comes per window."""
        ins = list(dict.fromkeys(a for a in node_inputs(node) if a.meta.get("cofx_role") in ("stream", "folded")))
        windowed = node.meta["cofx_window_inputs"]
        if len(ins) == 1 and ins[0] in windowed and not spec.growing and \
                (self.projected_attention(node, ins[0], spec) or self.projected_encoder(node, ins[0], spec)):
            return self.env[node]
        values = {a: self.windowed(a, spec) if a in windowed else self.env[a] for a in ins}
        ready = self.gm.meta["cofx_readiness"]
        horizon = self.gm.meta["cofx_horizon"]
        g = spec.geometry
        arrivals = {tuple(ready(a, j + g.span - 1 - g.pad_l) if a in windowed else ready(a, j) for j in range(horizon))
                    for a in ins}
        if len(arrivals) > 1:
            values = self.align_windows(node, ins, values)
        return self.pointwise(node, values)

    def projected_attention(self, node, frames, spec: WindowSpec) -> bool:
        """`nn.MultiheadAttention` over a window of one stream's frames (self-attention, no key padding, its
        weights not read): each frame's queries, keys and values projected once, then windowed
        (`cofx.encoder_rows.ProjectedAttention`). True when `node` is that attention, now emitted."""
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, nn.MultiheadAttention) or not projects_in_one(module) or \
                module._forward_hooks or module._forward_pre_hooks:   # (called whole, its hooks run)
            return False
        args = dict(zip(("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                         "average_attn_weights", "is_causal"), node.args), **node.kwargs)
        if any(args.get(name) is not frames for name in ("query", "key", "value")) or \
                args.get("key_padding_mask") is not None or args.get("is_causal") or \
                any(not (u.op == "call_function" and u.target is operator.getitem and
                         (u.args[1] == 0 or not u.users)) for u in node.users):
            return False
        projected = self.projections(node, module, frames, spec)
        replace = {**self.window_args(node, {frames: projected}), frames: projected}
        kernel = K.Framewise(self.ctx, ProjectedAttention(module), None, co_labels(node), co_dtypes(node))
        self.env[node] = self.add_kernel(node.name, kernel, fx.node.map_arg(node.args, replace.get),
                                         node_name=node.name)
        self.env[node].kwargs = fx.node.map_arg(node.kwargs, lambda a: replace.get(a, self.env.get(a)))
        return True

    def projected_encoder(self, node, frames, spec: WindowSpec) -> bool:
        """A transformer encoder over a window of one stream's frames (no mask): its first layer's queries,
        keys and values projected once per frame, then windowed (`cofx.encoder_rows.EncoderRows`). True when
        `node` is that encoder, now emitted."""
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, ENCODERS) or not caches_projections(module) or node.args != (frames,) or \
                node.kwargs or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
            return False
        projected = self.projections(node, module, frames, spec)
        kernel = K.Framewise(self.ctx, EncoderRows(module), None, co_labels(node), co_dtypes(node))
        self.env[node] = self.add_kernel(node.name, kernel, (self.windowed(frames, spec),), node_name=node.name)
        self.env[node].kwargs = {"projections": projected}
        return True

    def projections(self, node, module, frames, spec: WindowSpec) -> fx.Node:
        """The window of the queries, keys and values `module` projects from each frame of `frames`."""
        labels = list(co_labels(frames))
        labels[-1] *= 3
        per_frame = self.add_kernel(f"{node.name}_projections", K.Framewise(self.ctx, Projections(module), None, labels),
                                    (self.env[frames],), node_name=f"{node.name}_projections")
        return self.window_of(per_frame, frames.meta["cofx_time"], labels, spec, f"{node.name}_projections")

    def windowed(self, a: fx.Node, spec: WindowSpec):
        """The last `spec.window` frames of stream `a` at each step, a window per frame folded into the batch:
        (.., n*B@b, .., frames@t, ..); a growing window also answers before, with the frames so far first."""
        if a not in self.windows:
            self.windows[a] = self.window_of(self.env[a], a.meta["cofx_time"], list(co_labels(a)), spec, a.name)
        return self.windows[a]

    def window_of(self, value: fx.Node, t: int, labels: list, spec: WindowSpec, name: str) -> fx.Node:
        """`windowed` of a value of the step graph whose frames are at `t` and dimensions labelled `labels`."""
        frames, b = spec.window, labels.index("B")
        kernel = K.Sliding(self.ctx, K.window_reduce("raw", t, frames), t, frames, 1, spec.geometry.pad_l, 0, 0.0,
                           labels + [frames])
        frames_node = self.add_kernel(f"{name}_window", kernel, (value,), node_name=f"{name}_window")
        folded = self.g.create_node("call_function", K.fold_time, (frames_node, t, b), {"raw": True},
                                    name=f"{name}_windows")
        if not spec.growing:
            return folded
        return self.add_kernel(f"{name}_clip_start", ClipStart(self.ctx, frames, t, b), (folded,),
                               node_name=f"{name}_clip_start")

    def window_args(self, node, replace: dict) -> dict:
        """The inputs of `node` that are numbers or tensors made outside the window, as the window sees them
        (`in_window`)."""
        out, batch = {}, []

        def windows():   # the number of windows times the batch, read off one of the node's windows (whose
            if not batch:   # batch axis may hold several rows per stream: heads folded into it, B * H)
                a = next(a for a in node.all_input_nodes if a.meta.get("cofx_role") in ("stream", "folded")
                         and isinstance(a.meta["cofx_layout"], Labels))
                size = self.g.create_node("call_method", "size", (replace.get(a, self.env.get(a)), _batch_axis(a)), {})
                rows = a.meta["cofx_runs"]["clip"].shape[_batch_axis(a)] // self.clip_batch
                batch.append(size if rows == 1 else self.g.create_node("call_function", operator.floordiv,
                                                                       (size, rows), {}))
            return batch[0]

        for a in node.all_input_nodes:
            if a.meta.get("cofx_role") not in ("stream", "folded") and a not in replace:
                value = self.in_window(a, windows)
                if value is not None:
                    out[a] = value
        return out

    def in_window(self, a: fx.Node, windows):
        """`a` (a number or a tensor made outside the window) over a window: a number read off the clip's
        length is the clip's, the batch size is the number of windows times the batch (`windows()`), and
        tensors built from them are built again; None where `a` is the same inside the window (a stream read
        for its dtype only, as ``x.new_zeros(B, H)`` reads it, among them)."""
        if a.meta.get("cofx_role") in ("stream", "folded"):
            return None
        if a.meta.get("cofx_length") is not None:
            runs = a.meta["cofx_runs"]
            if runs.get("batch") != runs["clip"]:
                raise ConversionError("reads the batch size and the clip length in one value, which a window over "
                                      "the clip uses", node=a,
                                      fix="read them separately (B, T = x.shape[0], x.shape[1]), or make tensors "
                                      "with torch.zeros_like(x) and friends")
            return runs["clip"]
        layout = a.meta.get("cofx_layout")
        if a.meta.get("cofx_role") == "shape" and layout == "B":
            runs = a.meta["cofx_runs"]
            if runs.get("batch") == 2 * runs["clip"] == 2 * self.clip_batch:   # the batch size itself
                return windows()
        elif a.op == "get_attr" or not (a.meta.get("cofx_clip_const") or
                                        (isinstance(layout, Labels) and "B" in layout)):
            return None   # (a number made from the batch size, as B * heads, is made again from the windows')
        if a not in self.in_windows:
            def arg(x):
                value = self.in_window(x, windows)
                return self.env[x] if value is None else value
            self.in_windows[a] = self.g.node_copy(a, arg)
        return self.in_windows[a]

    def align_windows(self, node, ins, values) -> dict:
        """The values of `ins` (one per window each, batch first) paired window by window (a delay buffer)."""
        if any(co_labels(a)[0] != "BT" if a.meta["cofx_role"] == "folded" else a.meta["cofx_layout"][0] != "B"
               for a in ins):
            raise ConversionError("joins values computed over windows of the clip whose batch is not their first "
                                  "dimension", node=node)
        frames = [self.g.create_node("call_function", K.split_frames, (values[a], self.rows(a)), {},
                                     name=f"{a.name}_frames") for a in ins]
        aligned = self.add_kernel(f"{node.name}_align", K.Align(self.ctx, [0] * len(ins)), frames,
                                  node_name=f"{node.name}_align")
        return {a: self.g.create_node("call_function", K.join_frames,
                                      (self.g.create_node("call_function", operator.getitem, (aligned, i), {}),),
                                      {}, name=f"{a.name}_aligned") for i, a in enumerate(ins)}

    def flatten_window(self, node, folded):
        """The reshape that flattens a window of frames into features, on windows folded into the batch."""
        labels = node.meta["cofx_layout"]
        if list(labels).count("B") != 1 or "BT" in labels:
            raise ConversionError("flattens time together with the batch", node=node,
                                  fix="keep the batch as its own dimension: x.reshape(x.shape[0], -1)")
        at = labels.index("B")
        rows = self.g.create_node("call_method", "size", (folded, _batch_axis(node.args[0])), {},
                                  name=f"{node.name}_windows")
        shape = [rows if i == at else n for i, n in enumerate(node.meta["cofx_runs"]["clip"].shape)]
        return self.g.create_node("call_method", "reshape", (folded, shape), {}, name=node.name)

    def merge(self, node):
        if node.meta["cofx_role"] == "folded":
            return self.folded_merge(node)
        t_out = node.meta.get("cofx_time")
        out_labels = node.meta["cofx_layout"]
        ins, seen = [], set()
        for a in node_inputs(node):
            if a.meta.get("cofx_role") in ("stream", "folded") and a not in seen:
                seen.add(a)
                ins.append(a)
        values, axes = [], []
        for a in ins:
            if a.meta["cofx_role"] == "folded":
                if t_out is None:
                    raise ConversionError("merges a globally pooled tensor into a tensor without time", node=node)
                labels = a.meta["cofx_layout"]
                pos = t_out - (len(out_labels) - len(labels))
                if not 0 < pos < len(labels) or labels[pos] != 1:
                    raise ConversionError("merges a globally pooled tensor back into the stream, but the pooled "
                                          "tensor has no size-1 time dimension to broadcast along", node=node,
                                          fix="keep the pooled time dimension (keepdim=True / AdaptiveAvgPool to 1)")
                values.append(self.g.create_node("call_function", K.unfold_time,
                                                 (self.env[a], pos, self.rows(a), _batch_axis(a)), {},
                                                 name=f"{a.name}_unfold"))
                axes.append(pos)
            else:
                labels = a.meta["cofx_layout"]
                if not isinstance(labels, Labels):
                    raise ConversionError("merges a tuple of streams", node=node)
                values.append(self.env[a])
                axes.append(a.meta["cofx_time"])
        origins = {self.origin.get(a) for a in ins if a.meta["cofx_role"] == "stream"}
        if len(origins) == 1 and all(a.meta["cofx_role"] == "stream" for a in ins):
            return self.pointwise(node)
        if same_readiness(self.gm, ins):   # frames arrive together: no delay buffer needed
            folded_values = {a: v for a, v in zip(ins, values) if a.meta["cofx_role"] == "folded"}
            return self.pointwise(node, folded_values)
        # frames folded into the batch (stream-major: each stream's frames in a row), on an axis of their own
        # while they wait, so that a delay holds back frames of every stream, not the last rows of the batch
        folded = [a.meta["cofx_role"] == "stream" and a.meta["cofx_layout"][ax] == "BT" for a, ax in zip(ins, axes)]
        values = [self.g.create_node("call_method", "unflatten", (v, ax, (self.rows(a, ax), -1)), {},
                                     name=f"{a.name}_by_stream") if f else v
                  for a, v, ax, f in zip(ins, values, axes, folded)]
        aligned = self.add_kernel(f"{node.name}_align", K.Align(self.ctx, [ax + f for ax, f in zip(axes, folded)]),
                                  values, node_name=f"{node.name}_align")
        replace = {}
        for i, (a, ax, f) in enumerate(zip(ins, axes, folded)):
            out = self.g.create_node("call_function", operator.getitem, (aligned, i), {}, name=f"{a.name}_aligned")
            replace[a] = self.g.create_node("call_method", "flatten", (out, ax, ax + 1), {},
                                            name=f"{a.name}_aligned_rows") if f else out
        return self.pointwise(node, replace)

    def folded_merge(self, node):
        """Values computed once per step from different clip-wide reductions: aligned by step."""
        ins = list(dict.fromkeys(a for a in node_inputs(node) if a.meta.get("cofx_role") == "folded"))
        if same_readiness(self.gm, ins):
            return self.pointwise(node)
        if any(co_labels(a)[0] != "BT" for a in ins):
            raise ConversionError("merges values of different temporal reductions whose batch is not their "
                                  "first dimension", node=node)
        frames = [self.g.create_node("call_function", K.split_frames, (self.env[a], self.rows(a)), {},
                                     name=f"{a.name}_frames") for a in ins]
        aligned = self.add_kernel(f"{node.name}_align", K.Align(self.ctx, [0] * len(ins)), frames,
                                  node_name=f"{node.name}_align")
        replace = {a: self.g.create_node("call_function", K.join_frames,
                                         (self.g.create_node("call_function", operator.getitem, (aligned, i), {}),),
                                         {}, name=f"{a.name}_aligned") for i, a in enumerate(ins)}
        return self.pointwise(node, replace)

    def output(self, node):
        leaves, spec = tree_flatten(node.args[0])
        values, axes, time_axes_out = [], [], []
        for leaf in leaves:
            if not isinstance(leaf, fx.Node) or leaf.meta.get("cofx_role") not in ("stream", "folded"):
                values.append(fx.node.map_arg(leaf, lambda a: self.env[a]))
                time_axes_out.append(None)
                continue
            if leaf.meta.get("cofx_newest") is not None:   # per-frame outputs of a growing window
                pos, frames = leaf.meta["cofx_newest"], leaf.meta["cofx_window_frames"]
                newest = self.add_kernel(f"{leaf.name}_newest", NewestFrames(self.ctx, frames, pos, _batch_axis(leaf)),
                                         (self.env[leaf],), node_name=f"{leaf.name}_newest")
                values.append(self.g.create_node("call_function", K.unfold_time,
                                                 (newest, pos, self.rows(leaf), _batch_axis(leaf)), {},
                                                 name=f"{leaf.name}_frames"))
            elif leaf.meta["cofx_role"] == "folded":
                labels = leaf.meta["cofx_layout"]
                replace = len(labels) > 2 and labels[2] == 1
                pos = 2 if replace else min(2, len(labels))
                values.append(self.g.create_node("call_function", K.unfold_time,
                                                 (self.env[leaf], pos, self.rows(leaf), _batch_axis(leaf)),
                                                 {"replace": replace}, name=f"{leaf.name}_frames"))
            else:
                if not isinstance(leaf.meta["cofx_layout"], Labels):
                    raise ConversionError("the output is a tuple of streams inside a container (a named tuple an op "
                                          "returns, as h.max(2) does)", node=leaf,
                                          fix="return its fields as a plain tuple: values, indices = h.max(2); "
                                          "return values, indices")
                pos = leaf.meta["cofx_time"]
                values.append(self.env[leaf])
            axes.append(pos)
            time_axes_out.append(pos)
        self.g.output(tree_unflatten(values, spec))
        self.out_time_axes = tree_unflatten(time_axes_out, spec)


def build_step_graph(gm: fx.GraphModule, ctx: K.StreamContext):
    """(step graph, kernels by name, time axis of each output leaf, kernel names by original node)."""
    b = _Builder(gm, ctx)
    graph, kernels = b.run()
    for node in reversed(graph.nodes):   # time-free values only a window used: not computed for each chunk too
        if node in b.constants and not node.users and \
                (stock(gm.get_submodule(node.target), nn.Module) if node.op == "call_module" else
                 not node.is_impure()):   # a torch layer as torch defines it has no side effects
            graph.erase_node(node)
    for node, new in b.env.items():
        if isinstance(new, fx.Node) and "cofx_folded_into" not in node.meta:
            new.meta.setdefault("cofx_source", node.name)   # the original node a step node computes
            if node.meta.get("cofx_role") == "stream":   # which step nodes carry its frames (for diagnosis)
                new.meta.setdefault("cofx_origin", node.name)
    graph.lint()
    return graph, kernels, b.out_time_axes, b.node_kernels
