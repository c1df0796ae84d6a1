"""Compute only the rows of a window that the model reads.

Over a window of the clip (attention, a per-position table) the step runs the
model's ops on the window's N frames. A model that then reads one frame of the
result (``blocks(x)[:, -1]``, ``x[:, -1:]``, a class token ``x[:, 0]``) needs
that row alone from every op that acts row by row: its attention takes one
query against all N keys and values, and its projection, norms and
feed-forward run on one row instead of N. This pass walks back from such reads
through the ops whose row r depends only on row r of their inputs (elementwise
ops, `Linear`, `LayerNorm`, a softmax over another axis, transposes and
reshapes that keep the axis, heads folded into the batch included, the query
side of ``q @ k^T``, of `torch.bmm`, of an einsum that keeps the query's letter
and of `F.scaled_dot_product_attention`) and narrows
each to the row read; a value that is also needed whole (the keys and values)
stays whole and is narrowed where the row is taken from it. Each rewrite is an
identity of the op, so the step computes the same numbers.

It rewrites the step graph that `build_step_graph` built, in place, and
records ``meta['cofx_rows'] = (dim, row)`` on each original node it narrowed.

Example::

    >>> class Pool(torch.nn.Module):       # attention pooling of a window, read at its newest frame
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k, self.fc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         a = (self.q(x) @ self.k(x).transpose(1, 2)).softmax(-1)
    ...         return self.fc(a @ x)[:, -1]
    >>> co = cofx.convert(Pool().eval(), torch.randn(1, 6, 4), time_dim=1)
    >>> {n.name: n.meta["cofx_rows"] for n in co.graph.nodes if "cofx_rows" in n.meta}   # (axis, row) computed
    {'matmul': (1, 5), 'softmax': (1, 5), 'matmul_1': (1, 5), 'fc': (1, 5)}
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from cofx import kernels as K
from cofx.encoder_rows import ENCODERS, EncoderRows, batch_first
from cofx.growing_window import NewestFrames
from cofx.stock_modules import stock

from .continualize import co_labels
from .shape_runs import Rec

_ELEMENTWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add,
                          torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh, torch.exp,
                          torch.where, torch.maximum, torch.minimum, torch.clamp, F.relu, F.gelu, F.silu,
                          F.sigmoid, F.tanh, F.elu, F.leaky_relu, F.hardswish, F.mish, F.softplus, torch.rsqrt,
                          torch.sqrt, torch.pow, torch.square}
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "relu", "sigmoid", "tanh", "exp", "clamp", "abs",
                        "masked_fill", "contiguous", "float", "double", "sqrt", "rsqrt", "pow", "square"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}   # over other axes: row by row (an RMSNorm's mean of squares)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.ELU,
                        nn.LeakyReLU, nn.Mish, nn.Hardswish, nn.Softplus)
_MATMULS = {torch.matmul, operator.matmul, torch.bmm}
_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}


class _Op:
    """What a step node computes, seen through a `Framewise` guard: (op kind, target), and the original node."""

    def __init__(self, node: fx.Node, step_gm_modules: dict, gm: fx.GraphModule, orig: fx.Node):
        self.node, self.orig = node, orig
        kernel = step_gm_modules.get(node.target) if node.op == "call_module" else None
        self.guard = kernel if isinstance(kernel, K.Framewise) else None
        if self.guard is not None:
            if self.guard.method is not None:
                self.kind, self.target = "call_method", self.guard.method
            elif isinstance(self.guard.op, nn.Module):
                self.kind, self.target = "call_module", self.guard.op
            else:
                self.kind, self.target = "call_function", self.guard.op
        elif node.op == "call_module":
            self.kind = "call_module"
            self.target = gm.get_submodule(node.target) if node.target == orig.target else None
        else:
            self.kind, self.target = node.op, node.target


def _shape(value) -> Optional[tuple]:
    rec = value.meta.get("cofx_runs", {}).get("clip") if isinstance(value, fx.Node) else None
    return tuple(rec.shape) if isinstance(rec, Rec) else None


def _attention_module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.MultiheadAttention]:
    """The `nn.MultiheadAttention` an original node calls (its output: the attention and its weights)."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
        return gm.get_submodule(node.target)
    return None


_SPLITS = {("call_method", "chunk"), ("call_function", torch.chunk), ("call_method", "split"),
           ("call_function", torch.split), ("call_method", "unbind"), ("call_function", torch.unbind)}


def _output_shape(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple]:
    """The shape of a node's tensor; of `nn.MultiheadAttention`'s, the attention's (its first output); of a
    split (``chunk``, ``split``, ``unbind``), its first part's."""
    if _attention_module(gm, node) is not None or (node.op, node.target) in _SPLITS:
        rec = node.meta.get("cofx_runs", {}).get("clip")
        return tuple(rec[0].shape) if isinstance(rec, (tuple, list)) and rec and isinstance(rec[0], Rec) else None
    return _shape(node)


def _labels_narrowed(labels, axis: int):
    """Labels (or those of each output of a split) with a size-1 axis `axis`."""
    if labels and isinstance(labels[0], tuple):
        return tuple(_labels_narrowed(one, axis) for one in labels)
    return tuple(1 if i == axis else lab for i, lab in enumerate(labels))


def _encoder(op: "_Op") -> Optional[nn.Module]:
    """The transformer encoder (or encoder layer) a guarded step node runs, whole or as `EncoderRows`."""
    if op.guard is None:
        return None
    if isinstance(op.target, EncoderRows):
        return op.target.encoder
    return op.target if isinstance(op.target, ENCODERS) else None


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def _dim(d, ndim: int) -> Optional[int]:
    return d % ndim if isinstance(d, int) and -ndim <= d < ndim else None


class _Rows:
    def __init__(self, graph: fx.Graph, kernels: dict, gm: fx.GraphModule, newest: bool = False):
        # `newest`: `graph` is a copy for steps whose windows are all full, where a per-frame output's
        # `NewestFrames` reads the window's last row; a kernel it replaces is added beside the original's
        self.graph, self.kernels, self.gm, self.newest = graph, kernels, gm, newest
        origs = {n.name: n for n in gm.graph.nodes}
        self.ops = {}
        for n in graph.nodes:
            orig = origs.get(n.meta.get("cofx_source"))
            if orig is not None and orig.meta.get("cofx_from_window") and _output_shape(gm, orig) is not None \
                    and n.op in ("call_function", "call_method", "call_module"):
                self.ops[n] = _Op(n, kernels, gm, orig)

    # -- the rules: for an op narrowed to row `r` of its output's axis `d`, the axis of each input leaf --------
    def input_axes(self, n: fx.Node, d: int) -> Optional[list]:
        """For `n` narrowed at axis `d` of its output, the axis each leaf of its arguments (``tree_flatten((args,
        kwargs))``) is narrowed at (None: taken whole), or None where `n` cannot be narrowed there."""
        op = self.ops.get(n)
        if op is None or op.target is None:
            return None
        attention = _attention_module(self.gm, op.orig)
        split = (op.kind, op.target) in _SPLITS
        if op.guard is not None and attention is None and not split and \
                any(isinstance(lab, tuple) for lab in op.guard.out_labels):
            return None   # several outputs
        mine, spec = tree_flatten((n.args, n.kwargs))
        none = [None] * len(mine)
        out = _output_shape(self.gm, op.orig)
        ndim = len(out)
        kind, target = op.kind, op.target
        if attention is not None:
            return self.attention_axes(n, none, _MHA_ARGS, d == (1 if attention.batch_first else 0)) \
                if kind == "call_module" and not n.kwargs.get("is_causal") else None
        encoder = _encoder(op)
        if encoder is not None:   # every input whole: the encoder computes the row itself (`EncoderRows`)
            return none if d == (1 if batch_first(encoder) else 0) else None
        if kind == "call_function" and target is operator.getitem and n.args[1] == 0 and \
                isinstance(n.args[0], fx.Node) and n.args[0] in self.ops and \
                _attention_module(self.gm, self.ops[n.args[0]].orig) is not None:
            # the attention of `nn.MultiheadAttention`'s (attention, weights), where the module computes the row
            return [d] + none[1:] if self.input_axes(n.args[0], d) is not None else None
        if kind == "call_function" and target is K.reshape:
            axis = self.reshape_axis(n, d)
            return None if axis is None else [axis] + none[1:]
        theirs, orig_spec = tree_flatten((op.orig.args, op.orig.kwargs))
        if spec != orig_spec:
            return None
        shapes = [_shape(o) if isinstance(m, fx.Node) else None for m, o in zip(mine, theirs)]

        def first(axis):
            return [axis] + none[1:] if shapes[0] is not None and axis is not None else None

        def elementwise():
            axes = []
            for s in shapes:
                a = None if s is None else d - (ndim - len(s))
                axes.append(a if a is not None and a >= 0 and s[a] != 1 else None)
            return axes

        if kind == "call_module":
            if stock(target, _ELEMENTWISE_MODULES) or stock(target, nn.Linear) and d != ndim - 1:
                return first(d)
            if stock(target, nn.LayerNorm) and d < ndim - len(target.normalized_shape):
                return first(d)
            if stock(target, (nn.Softmax, nn.LogSoftmax)) and _dim(target.dim, ndim) not in (d, None):
                return first(d)
            return None
        args = list(n.args)
        if kind == "call_function" and target in _ELEMENTWISE_FUNCTIONS or \
                kind == "call_method" and target in _ELEMENTWISE_METHODS:
            return elementwise()
        if kind == "call_function" and target is F.dropout and \
                dict(zip(("input", "p", "training"), args), **n.kwargs).get("training", True) is False:
            return first(d)   # (off: as traced in eval mode, where steps run)
        if kind == "call_function" and target is F.linear and d != ndim - 1:
            return first(d)
        if kind == "call_function" and target is F.layer_norm and len(args) > 1 and \
                d < ndim - len(tuple(args[1])):
            return first(d)
        if kind == "call_function" and target in _SOFTMAX_FUNCTIONS or \
                kind == "call_method" and target in ("softmax", "log_softmax"):
            axis = n.kwargs.get("dim", args[1] if len(args) > 1 else None)
            return first(d) if _dim(axis, ndim) not in (d, None) else None
        if kind in ("call_method", "call_function") and getattr(target, "__name__", target) in _REDUCTIONS:
            return first(self.reduced_axis(n, d, len(shapes[0]))) if shapes[0] is not None else None
        if (kind, target) in (("call_method", "transpose"), ("call_function", torch.transpose),
                              ("call_method", "swapaxes"), ("call_method", "swapdims")):
            given = dict(zip(("input", "dim0", "dim1"), args), **n.kwargs)
            a, b = _dim(given.get("dim0"), ndim), _dim(given.get("dim1"), ndim)
            return first(b if d == a else a if d == b else d) if None not in (a, b) else None
        if (kind, target) in (("call_method", "permute"), ("call_function", torch.permute)):
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return first(_dim(dims[d], ndim)) if len(dims) == ndim else None
        if (kind, target) in (("call_method", "unflatten"), ("call_function", torch.unflatten)) and \
                shapes[0] is not None:
            given = dict(zip(("input", "dim", "sizes"), args), **n.kwargs)
            at, parts = _dim(given.get("dim"), len(shapes[0])), len(given.get("sizes", ()))
            if at is None or at <= d < at + parts:
                return None
            return first(d if d < at else d - parts + 1)
        if (kind, target) in (("call_method", "flatten"), ("call_function", torch.flatten)) and \
                shapes[0] is not None:
            given = dict(zip(("input", "start_dim", "end_dim"), args), **n.kwargs)
            start = _dim(given.get("start_dim", 0), len(shapes[0]))
            end = _dim(given.get("end_dim", -1), len(shapes[0]))
            if start is None or end is None or start <= d <= start and end > start:
                return None
            return first(d if d < start or end == start else d + end - start)
        if split:   # along another axis than the one read: each part's row r is the input's row r
            given = dict(zip(("input", "sizes", "dim") if op.target not in ("unbind", torch.unbind)
                             else ("input", "dim"), args), **n.kwargs)
            axis = _dim(given.get("dim", 0), len(shapes[0])) if shapes[0] is not None else None
            if axis is None:
                return None
            if op.target in ("unbind", torch.unbind):
                return first(d if d < axis else d + 1)
            return first(d) if d != axis else None
        if kind == "call_function" and target is operator.getitem and isinstance(args[0], fx.Node) and \
                args[0] in self.ops and (self.ops[args[0]].kind, self.ops[args[0]].target) in _SPLITS:
            return [d] + none[1:]   # a part of a split: its axes are the split's
        if kind == "call_function" and target is operator.getitem and shapes[0] is not None:
            return first(_index_axis(args[1], len(shapes[0]), d))
        if kind == "call_function" and target in _MATMULS or kind == "call_method" and target == "matmul":
            a, b = shapes[0], shapes[1]
            if a is None or b is None or len(a) < 2 or len(b) < 2:
                return None
            if d == ndim - 2:
                return [len(a) - 2, None] + none[2:]
            return elementwise() if d < ndim - 2 else None
        if kind == "call_function" and target is torch.einsum:
            return _einsum_axes(args, n.kwargs, d, none)
        if kind == "call_function" and target is F.scaled_dot_product_attention and d == ndim - 2:
            return self.attention_axes(n, none, ("query", "key", "value", "attn_mask"), True)
        return None

    @staticmethod
    def reduced_axis(n, d: int, ndim: int) -> Optional[int]:
        """The input axis of output axis `d` of a reduction over other axes (``x.pow(2).mean(-1, keepdim=True)``),
        or None where it reduces over `d` or its axes are not given."""
        given = dict(zip(("input", "dim", "keepdim"), n.args), **n.kwargs)
        dims = given.get("dim")
        dims = [dims] if isinstance(dims, int) else dims
        if not isinstance(dims, (list, tuple)) or not dims or any(_dim(a, ndim) is None for a in dims):
            return None
        dims = sorted({_dim(a, ndim) for a in dims})
        if given.get("keepdim", False):
            return None if d in dims else d
        axis = d
        for a in dims:   # each reduced axis before it moves it one further in the input
            if a <= axis:
                axis += 1
        return axis if axis < ndim else None

    def reshape_axis(self, n, d) -> Optional[int]:
        """A reshape keeps axis `d` where it has the same size and what comes before it in its input the same
        streams and the same number of elements (the batch counted apart: it varies from step to step)."""
        spec, static = n.args[1], n.args[4]
        labels_in = co_labels(self.ops[n].orig.args[0])
        if len(n.args) > 5 or n.kwargs or not isinstance(spec[d], int) or not isinstance(labels_in, tuple):
            return None

        def prefixes(labels):
            # a batch axis may carry more than the streams (heads folded into it: (B * heads, N, d)); with one
            # such axis, what it carries per stream is the elements per stream not in the other axes
            folded = 1
            if sum(not isinstance(lab, int) for lab in labels) == 1:
                folded, rest = divmod(static, math.prod(lab for lab in labels if isinstance(lab, int)))
                if rest:
                    return None
            out, streams, size = [], 0, 1
            for lab in labels:
                out.append((streams, size))
                if isinstance(lab, int):
                    size *= lab
                else:
                    streams, size = streams + 1, size * folded
            return out

        mine, theirs = prefixes(spec), prefixes(labels_in)
        if mine is None or theirs is None:
            return None
        want = mine[d]
        for axis, (prefix, lab) in enumerate(zip(theirs, labels_in)):
            if prefix == want and lab == spec[d]:
                return axis
        return None

    def attention_axes(self, n, none, names, query_axis: bool):
        """Attention narrowed at its queries' axis (`query_axis`): the query and the rows of its mask; `names`
        are the op's arguments in order (the query, key and value first, the mask named ``attn_mask``)."""
        where, at = {}, 0
        for i, arg in enumerate(n.args):   # the flat position of each argument (kwargs follow the args)
            if i < len(names) and isinstance(arg, fx.Node):
                where[names[i]] = at
            at += len(tree_flatten(arg)[0])
        for name, arg in n.kwargs.items():
            if name in names and isinstance(arg, fx.Node):
                where[name] = at
            at += len(tree_flatten(arg)[0])
        if not query_axis or not {"query", "key", "value"} <= set(where):
            return None
        orig = tree_flatten((self.ops[n].orig.args, self.ops[n].orig.kwargs))[0]
        shapes = {name: _shape(orig[i]) for name, i in where.items()}
        axes = list(none)
        if names is _MHA_ARGS:   # (B, L, E) or (L, B, E): the tokens where the output has them
            axes[where["query"]] = 1 if _attention_module(self.gm, self.ops[n].orig).batch_first else 0
        else:
            axes[where["query"]] = len(shapes["query"]) - 2
        if "attn_mask" in where:
            s = shapes["attn_mask"]
            if s is None or len(s) < 2:
                return None
            axes[where["attn_mask"]] = len(s) - 2 if s[-2] != 1 else None
        return axes

    # -- demands, from the reads back ----------------------------------------------------------------------
    def reads(self, n: fx.Node) -> Optional[tuple]:
        """(input, axis, row, where the row is given) when `n` reads one row of a windowed value at a fixed
        index (``x[:, r]`` or ``x[:, -1:]``: the position of that entry in the index; ``x.select(axis, r)``:
        None)."""
        newest = self.kernels.get(n.target) if self.newest and n.op == "call_module" else None
        if isinstance(newest, NewestFrames) and n.args and n.args[0] in self.ops and newest.frames > 1:
            return n.args[0], newest.t, newest.frames - 1, "newest"
        op = self.ops.get(n)
        if op is None or not n.args:
            return None
        x = n.args[0]
        shape = _shape(op.orig.args[0]) if isinstance(op.orig.args[0], fx.Node) else None
        if not isinstance(x, fx.Node) or x not in self.ops or shape is None:
            return None
        if (op.kind, op.target) in (("call_method", "select"), ("call_function", torch.select)) and not n.kwargs:
            axis, row = (_dim(n.args[1], len(shape)), n.args[2]) if len(n.args) == 3 else (None, None)
            if axis is None or not isinstance(row, int) or not -shape[axis] <= row < shape[axis] or \
                    not isinstance(co_labels(op.orig.args[0])[axis], int):
                return None
            return x, axis, row % shape[axis], None
        if op.guard is not None or n.op != "call_function" or n.target is not operator.getitem:
            return None
        index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        axis, ints = 0, []
        for i, entry in enumerate(index):
            if entry is Ellipsis and index.count(Ellipsis) == 1:   # the axes nothing else names
                axis += len(shape) - (len(index) - 1)
                continue
            if entry is None or not isinstance(entry, (int, slice)) or isinstance(entry, bool):
                return None
            if entry != slice(None):
                ints.append((i, axis))
            axis += 1
        if len(ints) != 1:
            return None
        i, axis = ints[0]
        if axis >= len(shape) or not isinstance(co_labels(op.orig.args[0])[axis], int):
            return None
        rows = _rows_read(index[i], shape[axis])
        return (x, axis, rows[0], i) if len(rows) == 1 else None

    def run(self) -> int:
        nodes = list(self.graph.nodes)
        demands: dict = {}   # node -> set of (axis, row), or None for 'whole'
        narrowed: dict = {}
        read_of: dict = {}
        for n in nodes:
            read = self.reads(n)
            if read is not None:
                read_of[n] = read

        def demand_on(user, value):
            if user in read_of and read_of[user][0] is value:
                _, axis, row, _ = read_of[user]
                return {(axis, row)}
            if user not in narrowed:
                return {None}
            axis, row = narrowed[user]
            axes = self.input_axes(user, axis)
            mine, _ = tree_flatten((user.args, user.kwargs))
            return {None if a is None else (a, row) for m, a in zip(mine, axes) if m is value}

        for n in reversed(nodes):
            if n not in self.ops or not n.users or n in read_of:   # (a read is rewritten as a read)
                continue
            wanted = set()
            for user in n.users:
                if user.op == "call_function" and user.target is operator.getitem and not user.users:
                    continue   # a part of a tuple nothing reads (the weights `nn.MultiheadAttention` returns)
                wanted |= demand_on(user, n)
            demands[n] = wanted
            if len(wanted) == 1 and None not in wanted:
                (axis, row), = wanted
                if self.input_axes(n, axis) is not None:
                    narrowed[n] = (axis, row)
        if not narrowed:
            return 0
        self.rewrite(narrowed, read_of)
        return len(narrowed)

    # -- the rewrite -------------------------------------------------------------------------------------------
    def rewrite(self, narrowed: dict, read_of: dict) -> None:
        rows: dict = {}

        def row_of(value, axis, row, before):
            if narrowed.get(value) == (axis, row):
                return value
            key = (value, axis, row)
            if key not in rows:
                with self.graph.inserting_before(before):
                    rows[key] = self.graph.call_method("narrow", (value, axis, row, 1))
            return rows[key]

        for n in list(self.graph.nodes):
            if n in narrowed and self.part_of_whole_split(n, narrowed):
                axis, row = narrowed[n]   # the split gives its parts whole (another part is needed whole): the row
                with self.graph.inserting_after(n):   # of this part is taken after it
                    part = self.graph.call_method("narrow", (n, axis, row, 1))
                n.replace_all_uses_with(part, delete_user_cb=lambda user: user is not part)
                narrowed[part] = (axis, row)
                if not self.newest:
                    self.ops[n].orig.meta["cofx_rows"] = (axis, row)
            elif n in narrowed:
                axis, row = narrowed[n]
                axes = self.input_axes(n, axis)
                mine, spec = tree_flatten((n.args, n.kwargs))
                new = [row_of(m, a, row, n) if a is not None else m for m, a in zip(mine, axes)]
                n.args, n.kwargs = tree_unflatten(new, spec)
                self.narrowed_op(n, axis, row)
                if not self.newest:
                    self.ops[n].orig.meta["cofx_rows"] = (axis, row)
            elif n in read_of and narrowed.get(read_of[n][0]) is not None:   # the row read is the only one left
                _, axis, row, i = read_of[n]
                if i == "newest":   # `NewestFrames` passes a window already narrowed to its newest row on
                    continue
                if i is None:   # x.select(axis, row)
                    n.args = (n.args[0], n.args[1], 0)
                    continue
                index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
                index = tuple((0 if isinstance(e, int) else slice(None)) if j == i else e for j, e in enumerate(index))
                n.args = (n.args[0], index if isinstance(n.args[1], tuple) else index[0])

    def part_of_whole_split(self, n: fx.Node, narrowed: dict) -> bool:
        """Whether `n` is a part of a split (``q, k, v = qkv.chunk(3, -1)``) that is not narrowed with it."""
        split = n.args[0] if n.op == "call_function" and n.target is operator.getitem and n.args else None
        return isinstance(split, fx.Node) and split in self.ops and \
            (self.ops[split].kind, self.ops[split].target) in _SPLITS and narrowed.get(split) != narrowed[n]

    def replace_kernel(self, n: fx.Node, kernel) -> None:
        """`n` calls `kernel` instead of its guard (in a newest-row copy, under a name of its own)."""
        if self.newest:
            n.target = f"{n.target}_newest_row"
        self.kernels[n.target] = kernel

    def narrowed_op(self, n: fx.Node, axis: int, row: int) -> None:
        """What else changes with the rows: a reshape's sizes, a guard's empty output, a causal mask."""
        op = self.ops[n]
        if op.kind == "call_function" and op.target is K.reshape:
            x, spec, batch, batch_dims, static = n.args[:5]
            in_axis = self.input_axes(n, axis)[0]
            frames = co_labels(op.orig.args[0])[in_axis]
            n.args = (x, tuple(1 if i == axis else s for i, s in enumerate(spec)), batch, batch_dims,
                      static // frames, *n.args[5:])
        if _encoder(op) is not None:
            labels = tuple(1 if i == axis else lab for i, lab in enumerate(op.guard.out_labels))
            self.replace_kernel(n, K.Framewise(op.guard.ctx, EncoderRows(_encoder(op), row), None, labels,
                                               op.guard.out_dtypes))
        elif op.guard is not None and _attention_module(self.gm, op.orig) is not None:
            attention, weights = op.guard.out_labels   # the weights (B, [heads,] L, S): L second to last
            labels = (tuple(1 if i == axis else lab for i, lab in enumerate(attention)),
                      None if weights is None else tuple(1 if i == len(weights) - 2 else lab
                                                         for i, lab in enumerate(weights)))
            self.replace_kernel(n, K.Framewise(op.guard.ctx, op.guard.op, op.guard.method, labels,
                                               op.guard.out_dtypes))
        elif op.guard is not None:
            labels = _labels_narrowed(op.guard.out_labels, axis)
            self.replace_kernel(n, K.Framewise(op.guard.ctx, op.guard.op, op.guard.method, labels,
                                               op.guard.out_dtypes))
        if op.kind == "call_function" and op.target is F.scaled_dot_product_attention and \
                n.kwargs.get("is_causal", n.args[5] if len(n.args) > 5 else False):
            keys = _shape(op.orig.args[1] if len(op.orig.args) > 1 else op.orig.kwargs["key"])[-2]
            query = n.args[0] if n.args else n.kwargs["query"]
            with self.graph.inserting_before(n):
                mask = self.graph.call_function(causal_row, (query, keys, row))
            args = list(n.args[:5])
            kwargs = {k: v for k, v in n.kwargs.items() if k != "is_causal"}
            if len(args) > 3:
                args[3] = mask
            else:
                kwargs["attn_mask"] = mask
            n.args, n.kwargs = tuple(args), kwargs


def _rows_read(entry, size: int) -> range:
    """The rows index entry `entry` (an int, or a slice such as ``-1:``) reads of an axis of `size` rows."""
    if isinstance(entry, int):
        return range(entry % size, entry % size + 1) if -size <= entry < size else range(0)
    if not all(v is None or isinstance(v, int) and not isinstance(v, bool) for v in (entry.start, entry.stop,
                                                                                    entry.step)):
        return range(0)
    return range(*entry.indices(size))


def _einsum_axes(args: list, kwargs: dict, d: int, none: list) -> Optional[list]:
    """``torch.einsum(equation, *operands)`` narrowed at output axis `d`: each operand with that axis's letter is
    narrowed where the letter is (the letter is summed nowhere, as it is in the output), the others taken whole."""
    if kwargs or not args or not isinstance(args[0], str) or "..." in args[0] or "->" not in args[0]:
        return None
    inputs, output = args[0].replace(" ", "").split("->")
    subscripts = inputs.split(",")
    operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if len(subscripts) != len(operands) or d >= len(output) or \
            not all(isinstance(o, fx.Node) for o in operands):
        return None
    letter = output[d]
    if any(sub.count(letter) > 1 for sub in subscripts):
        return None   # a diagonal
    axes = list(none)   # the flat leaves: the equation, then the operands in order
    for i, sub in enumerate(subscripts):
        axes[1 + i] = sub.index(letter) if letter in sub else None
    return axes


def causal_row(query: torch.Tensor, keys: int, row: int) -> torch.Tensor:
    """The mask ``is_causal`` gives query `row` of attention over `keys` keys: the keys up to it."""
    return (torch.arange(keys, device=query.device) <= row).unsqueeze(0)


def _index_axis(index, ndim: int, d: int) -> Optional[int]:
    """The input axis that axis `d` of ``x[index]`` comes from, where that axis is taken whole."""
    entries = index if isinstance(index, tuple) else (index,)
    if any(e is Ellipsis or not isinstance(e, (int, slice)) or isinstance(e, bool) for e in entries if e is not None):
        return None
    axis, out = 0, 0
    for e in entries:
        if e is None:
            if out == d:
                return None
            out += 1
            continue
        if isinstance(e, int):
            axis += 1
            continue
        if out == d:
            return axis if e == slice(None) else None
        axis += 1
        out += 1
    return axis + (d - out) if d >= out and axis + (d - out) < ndim else None


def newest_rows(graph: fx.Graph, kernels: dict, gm: fx.GraphModule) -> Optional[fx.Graph]:
    """For per-frame outputs of causal attention over the clip (`NewestFrames`: each window's newest frame), a copy
    of the step graph that computes that row alone, for the steps whose windows are all full (until then the
    window's frames come first and its newest row moves); None where no op can be narrowed. Kernels it replaces
    are added to `kernels` under names of their own."""
    if not any(isinstance(k, NewestFrames) for k in kernels.values()):
        return None
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    if not _Rows(copy, kernels, gm, newest=True).run():
        return None
    copy.lint()
    return copy


def read_rows(graph: fx.Graph, kernels: dict, gm: fx.GraphModule) -> int:
    """Narrow the step graph's ops over a window to the rows its reads take; returns how many were narrowed."""
    count = _Rows(graph, kernels, gm).run()
    graph.lint()
    return count
