"""Give every node its role in the stream and its kind (the table "What each node becomes" of the README).

Roles say what a node's value is in the continual graph:

- ``static``: parameters, constants and anything computed from them only;
- ``shape``: Python numbers and sizes read off stream tensors (``x.shape[0]``);
- ``stream``: tensors with a time dimension, processed chunk by chunk;
- ``folded``: what follows a global temporal reduction: one value per output
  frame, the frames folded into the batch dimension so the original ops run
  unchanged.

Kinds: ``time-free``, ``pointwise``, ``sliding``, ``merge``, ``reduction``
(global, exact), ``windowed`` (global, approximated by a window),
``recurrent`` (LSTM/GRU/RNN carrying their state from step to step).

Writes ``node.meta``: ``cofx_role``, ``cofx_kind``, ``cofx_time`` (time axis of a
stream tensor), ``cofx_spec`` (SlidingSpec/CropSpec/ReductionSpec),
``cofx_check`` (True when the node must pass the framewise check), and raises
`ConversionError` for anything not convertible.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(1)).eval()
    >>> gm = cofx.tracer.trace(model)
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(torch.randn(1, 2, 8), time_dim=2))
    >>> cofx.passes.label_layouts(gm); cofx.passes.mark_length_values(gm)
    >>> classify_nodes(gm, time_dim=2)
    >>> {n.name: n.meta["cofx_kind"] for n in gm.graph.nodes}
    {'input_1': 'pointwise', '_0': 'sliding', '_1': 'pointwise', '_2': 'reduction', 'output': 'time-free'}
"""
from __future__ import annotations

import fnmatch
import operator
import warnings
from typing import Iterator, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from cofx.errors import ConversionError, user_line, describe
from cofx.sliding_ops import pad_spec, sliding_spec
from cofx.stock_modules import stock

from .layout import Labels, has_time, rows_per_stream, time_axes, time_axis
from .length_values import is_value
from .temporal_geometry import CropSpec, RecurrentStateSpec, ReductionSpec, WindowSpec

RESHAPES = {("call_method", "view"), ("call_method", "reshape"), ("call_function", torch.reshape)}
_REDUCE_METHODS = {"mean": "mean", "sum": "sum", "amax": "amax", "amin": "amin"}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
_ADAPTIVE_MODULES = {nn.AdaptiveAvgPool1d: (F.adaptive_avg_pool1d, "mean"),
                     nn.AdaptiveAvgPool2d: (F.adaptive_avg_pool2d, "mean"),
                     nn.AdaptiveAvgPool3d: (F.adaptive_avg_pool3d, "mean"),
                     nn.AdaptiveMaxPool1d: (F.adaptive_max_pool1d, "amax"),
                     nn.AdaptiveMaxPool2d: (F.adaptive_max_pool2d, "amax"),
                     nn.AdaptiveMaxPool3d: (F.adaptive_max_pool3d, "amax")}
_ADAPTIVE_FUNCTIONS = {fn: mode for fn, mode in _ADAPTIVE_MODULES.values()}
RECURRENT = (nn.RNNBase,)
ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
             nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


LENGTH_BUILT = "a tensor built for the clip length (positions, a mask)"   # what starts its window

ATTENTION_FIX = ("attention converts where its tokens are frames (time its own axis, as in (B, T, C) or "
                 "(B, heads, T, d)); tokens that mix frames with pixels in one axis (MViT, Swin3D) do not: attend "
                 "over frames (per pixel or per pooled frame), or keep that part out of the streamed model")
_ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention, torch.matmul, torch.bmm, operator.matmul, torch.einsum,
                        F.multi_head_attention_forward}


_TOKEN_ARGS = ((nn.MultiheadAttention, ("query", "key", "value")), (nn.Transformer, ("src", "tgt")),
               ((nn.TransformerEncoder, nn.TransformerEncoderLayer), ("src",)),
               ((nn.TransformerDecoder, nn.TransformerDecoderLayer), ("tgt", "memory")))


def _token_inputs(node: fx.Node, module) -> Optional[set]:
    """The inputs of an attention node that hold its tokens (its other inputs are masks); None where cofx does
    not know the layer's arguments (every input is then taken for tokens)."""
    names = next((names for types, names in _TOKEN_ARGS if isinstance(module, types)), None)
    if node.op == "call_function" and node.target in (F.scaled_dot_product_attention, F.multi_head_attention_forward):
        names = ("query", "key", "value")
    if names is None:
        return None
    given = list(node.args[:len(names)]) + [node.kwargs.get(name) for name in names]
    return {a for a in given if isinstance(a, fx.Node)}


def _attention_like(n: fx.Node, gm: fx.GraphModule):
    """A description of `n` if it is attention (a module, a wrapped function or a product), else None."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if "attention" in type(mod).__name__.lower() or isinstance(mod, ATTENTION):
            return f"module '{n.target}', {type(mod).__name__}"
    if n.op != "call_function":
        return None
    name = getattr(n.target, "__name__", str(n.target))
    if n.target in _PRODUCTS and sum(_from_input(a) for a in n.all_input_nodes) < 2:
        return None   # a product with a weight or a constant (a graph convolution's adjacency): not attention
    if n.target in _ATTENTION_FUNCTIONS or "attention" in name.lower():
        owner = next((f"module '{path}', {getattr(cls, '__name__', cls)}"
                      for path, cls in reversed(list(n.meta.get("nn_module_stack", {}).values()))
                      if "attention" in str(getattr(cls, "__name__", cls)).lower()), None)
        return owner or name
    return None


_PRODUCTS = {torch.matmul, torch.bmm, operator.matmul, torch.einsum}


def _from_input(node: fx.Node) -> bool:
    """Whether `node`'s value is computed from the model's input (not only from weights and constants)."""
    return node.op == "placeholder" or any(a.op == "placeholder" for a in _ancestors(node))


def attention_hint(node: fx.Node, gm: fx.GraphModule) -> str:
    """' It is/feeds attention at ...' when `node` is or leads to attention, else ''."""
    own = _attention_like(node, gm)
    if own:
        return f" It is attention across time ({own})."
    todo, seen = list(node.users), set()
    while todo and len(seen) < 500:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        found = _attention_like(n, gm)
        if found:
            return f" It feeds attention at node '{n.name}' ({found})."
        todo.extend(n.users)
    return ""


_ZEROS = {("call_function", torch.zeros), ("call_function", torch.zeros_like), ("call_method", "new_zeros")}
_SAME_VALUES = {("call_method", m) for m in ("to", "type_as", "cuda", "cpu", "detach", "contiguous", "float",
                                            "double", "half")}


def _reached(node: fx.Node, through) -> Iterator[fx.Node]:
    """Each node reached from `node`'s users, once, going on past the nodes `through` accepts."""
    todo, seen = list(node.users), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        if through(n):
            todo.extend(n.users)


def _ancestors(node: fx.Node) -> set:
    todo, seen = list(node.all_input_nodes), set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


_ZEROS_KEPT = {("call_function", operator.getitem)} | {("call_method", m) for m in (
    "narrow", "expand", "expand_as", "view", "reshape", "repeat", "permute", "transpose", "unsqueeze", "squeeze",
    "flatten")}
_MADE_LIKE = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}
_BROADCASTS = {("call_method", m) for m in ("expand", "repeat", *_MADE_LIKE)} | \
    {("call_function", f) for f in (torch.zeros, torch.ones, torch.full, torch.empty)}


def _same_for_every_frame(node: fx.Node, ins: list) -> bool:
    """A tensor with a row per stream and frame (``tok.expand(B * T, -1, -1)``, sized by a product of the batch
    size and the frame count) that repeats a time-free tensor or a constant: the same for every frame, so each
    chunk makes it for its own frames."""
    labels = node.meta["cofx_layout"]
    return (node.op, node.target) in _BROADCASTS and isinstance(labels, Labels) and "BT" in labels \
        and "T" not in labels and not any(a.meta.get("cofx_clip_const") for a in ins) \
        and all(not has_time(a.meta["cofx_layout"]) for a in ins
                if isinstance(a.meta["cofx_layout"], Labels) and a.meta["cofx_role"] == "static")


def zeros_made(node) -> bool:
    """Whether `node` is a tensor of zeros made in forward (``torch.zeros(1, x.size(0), H)``, ``x.new_zeros``),
    moved, cast, sliced or reshaped at most: a recurrent layer's initial state that is its default, zero frames
    put along time (`cofx.passes.zeros_as_pad`)."""
    while isinstance(node, fx.Node) and ((node.op, node.target) in _SAME_VALUES or
                                         (node.op, node.target) in _ZEROS_KEPT):
        node = node.args[0]
    return isinstance(node, fx.Node) and (node.op, node.target) in _ZEROS


def node_inputs(node: fx.Node) -> list:
    leaves, _ = tree_flatten((node.args, node.kwargs))
    return [a for a in leaves if isinstance(a, fx.Node)]


def clip_value(v, run: str = "clip"):
    """The value an fx argument had in a recorded run."""
    return v.meta["cofx_runs"][run] if isinstance(v, fx.Node) else v


_FRAMES_FIX = ("write it with ops that stream: padding at either end (F.pad, zero frames concatenated), crops and "
              "strided slices (x[:, :, a:-b], x[:, :, ::2]), frame differences, pools and convolutions over time; "
              "pieces of time concatenated in another order, repeats, temporal resizing and reshapes of time are "
              "not supported")


def _pooled_token(value: fx.Node) -> bool:
    """Whether `value` is a global reduction over the clip kept as a token (``h.mean(1, keepdim=True)``): put along
    time beside the frames, the window's own reduction."""
    spec = value.meta.get("cofx_spec")
    return value.meta.get("cofx_role") == "folded" and value.meta.get("cofx_kind") == "reduction" and \
        getattr(spec, "mode", "raw") != "raw" and spec.window == spec.clip_window and \
        isinstance(value.meta.get("cofx_layout"), Labels)


def _kept_frames(value: fx.Node) -> bool:
    """Whether `value` comes from frames kept from fixed positions of the clip (``x[:, -1:]``, a raw reduction over
    it), through ops on that value alone."""
    todo, seen = [value], set()
    while todo:
        n = todo.pop()
        if n in seen or n.meta.get("cofx_role") != "folded":
            continue
        seen.add(n)
        spec = n.meta.get("cofx_spec")
        if n.meta.get("cofx_kind") == "reduction" and getattr(spec, "mode", None) == "raw" and spec.window > 1:
            return True
        todo.extend(node_inputs(n))
    return False


def _time_len(node: fx.Node, run: str) -> int:
    return clip_value(node, run).shape[node.meta["cofx_time"]]


def length_source(node: fx.Node) -> Optional[fx.Node]:
    """The node that read the clip length, for the first input of `node` derived from it (see length_values)."""
    return next((a.meta["cofx_length"] for a in node.all_input_nodes if a.meta.get("cofx_length") is not None),
                None)


def _length_use(node: fx.Node, gm: fx.GraphModule, why: str, fix: str) -> ConversionError:
    source = length_source(node)
    at = user_line(source) if source is not None else None
    hint = attention_hint(node, gm)   # positions and masks of attention read the length: say attention
    read = f", read by {describe(source)}" + (f" at {at}" if at else "") if source is not None else ""
    return ConversionError(f"{why}: the clip length{read}, is each chunk's length when stepping.{hint}", node=node,
                           fix=fix + ("; positions and masks built from the clip length inside attention "
                                      "over frames convert" if hint else ""))


_LENGTH_FIX = ("use the clip length only to reshape, to crop a fixed number of frames from each end, or as the "
               "kernel of a pool over the whole clip; where a number is meant, write it as a constant")
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
                        nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d,
                        nn.Dropout2d, nn.Dropout3d)
_SHAPE_RESTATING = RESHAPES | {("call_method", "expand"), ("call_method", "unflatten"), ("call_method", "flatten")}


def _numel(rec) -> int:
    n = 1
    for s in rec.shape:
        n *= s
    return n


def _dims(v, ndim: int) -> Optional[list]:
    if v is None:
        return None
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return sorted(int(d) % ndim for d in v)


def _index_entry(idx, ndim: int, dim: int):
    """The entry of a subscript that applies to input dimension `dim`."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(e is Ellipsis for e in idx):
        at = next(i for i, e in enumerate(idx) if e is Ellipsis)
        used = sum(1 for e in idx if e is not None and e is not Ellipsis)
        idx = idx[:at] + (slice(None),) * (ndim - used) + idx[at + 1:]
    d = 0
    for e in idx:
        if e is None:
            continue
        if d == dim:
            return e
        d += 1
    return slice(None)


class _Classifier:
    def __init__(self, gm: fx.GraphModule, time_dim: int, windows: Mapping[str, int], longer_errors: Mapping,
                 statistics: Optional[set] = None):
        self.gm, self.time_dim, self.windows = gm, time_dim, dict(windows)
        self.longer_errors = dict(longer_errors)
        self.used_windows: set = set()
        self.statistics = statistics   # reductions run over a window of the clip (None: not looked for yet)

    # -- helpers ------------------------------------------------------------------------------
    def module(self, node):
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def window_for(self, node, clip_window):
        """The user's window for this reduction: keys are glob patterns over the node name, the module
        path, and the paths and class names of the modules that contain it; the innermost match wins. A
        reduction of a clip of one frame there (a flatten after a pool) has no window to widen."""
        if clip_window <= 1:
            return clip_window
        names = [node.name]
        if node.op == "call_module":
            names += [node.target, type(self.module(node)).__name__]
        for path, cls in reversed(list(node.meta.get("nn_module_stack", {}).values())):
            names += [path, getattr(cls, "__name__", str(cls))]
        matches = [key for name in names for key in self.windows if fnmatch.fnmatchcase(name, key)]
        self.used_windows.update(matches)   # a catch-all another key overrides here is no typo
        return int(self.windows[matches[0]]) if matches else clip_window

    def set(self, node, role, kind, **extra):
        node.meta.update(cofx_role=role, cofx_kind=kind, cofx_check=extra.pop("check", False),
                         cofx_spec=extra.pop("spec", None), cofx_time=extra.pop("time", None))
        node.meta.update({f"cofx_{k}": v for k, v in extra.items()})

    # -- the walk -----------------------------------------------------------------------------
    def run(self):
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for node in self.gm.graph.nodes:
            if node.op == "output":
                if length_source(node) is not None:
                    raise _length_use(node, self.gm, "returns a value derived from the clip length", _LENGTH_FIX)
                self.check_outputs(node)
                node.meta.update(cofx_role="output", cofx_kind="time-free")
                continue
            if node.op == "placeholder":
                self.placeholder(node, node is placeholders[0])
                continue
            if node.op == "get_attr":
                self.set(node, "static", "time-free")
                continue
            self.classify(node)
        self.place_reductions()

    def placeholder(self, node, first):
        if not first:
            if node.users:
                raise ConversionError("the model takes more than one input", node=node,
                                      fix="wrap the model so that forward takes the clip only")
            self.set(node, "static", "time-free")
            return
        t = time_axis(node)
        if t != self.time_dim:
            raise ConversionError(f"the input's time dimension was expected at dim {self.time_dim}, "
                                  f"found {t}", node=node, fix="pass time_dim= to cofx.convert")
        self.set(node, "stream", "pointwise", time=t)

    def classify(self, node):
        ins = node_inputs(node)
        if node.op == "call_method" and node.target in _MADE_LIKE:   # x.new_zeros(B, H): x gives its dtype only
            ins = [a for a in ins if a is not node.args[0]]
        roles = {a.meta["cofx_role"] for a in ins}
        streams = [a for a in ins if a.meta["cofx_role"] == "stream"]
        folded = [a for a in ins if a.meta["cofx_role"] == "folded"]
        layout = node.meta["cofx_layout"]
        if is_value(node):   # a size or a number: where it may flow is what the length rule checks
            self.set(node, "static" if roles <= {"static"} else "shape", "time-free")
            return
        if not streams and not folded:
            tensors = isinstance(layout, Labels) or isinstance(layout, (tuple, list)) and bool(layout) and \
                all(isinstance(part, Labels) for part in layout)   # (a table split into parts: its parts)
            if tensors and (length_source(node) is not None or has_time(layout) or
                            any(a.meta.get("cofx_clip_const") for a in ins)) \
                    and not _same_for_every_frame(node, ins):
                # built for the clip's length (positions, masks): meaningful only over a window of the clip
                self.set(node, "static", "time-free", clip_const=self.clip_const_source(node, ins))
                return
            if "shape" in roles or not isinstance(layout, Labels):
                kind_role = "shape" if not isinstance(layout, Labels) else "static"
                self.set(node, kind_role if roles & {"shape"} else "static", "time-free")
            else:
                self.set(node, "static", "time-free")
            return
        why = self.window_reason(node, streams, folded)
        if why is not None:
            self.window(node, streams, folded, why)
            return
        if not isinstance(layout, Labels) and not (isinstance(layout, (list, tuple, dict)) and layout):
            self.set(node, "shape", "time-free")
            return
        if node.op == "call_module" and stock(self.module(node), RECURRENT):
            self.recurrent(node, streams)
            return
        if node.op == "call_function" and node.target is operator.getitem and \
                node.args[0].meta.get("cofx_kind") == "recurrent":
            if node.args[1] == 0:   # the output sequence
                self.set(node, "stream", "pointwise", time=time_axis(node))
            else:                   # the state after each clip position: one value per step
                window = _time_len(node.args[0].args[0], "clip")
                self.set(node, "folded", "pointwise", spec=RecurrentStateSpec(window))
            return
        if streams and folded and node.meta.get("cofx_longer_failed"):
            # a clip-wide result merged back into the stream (it cannot run on longer clips)
            self.set(node, "stream", "merge", time=streams[0].meta["cofx_time"])
            return
        if streams and node.meta.get("cofx_longer_failed"):
            clip = clip_value(next(n for n in self.gm.graph.nodes if n.op == "placeholder"))
            last = " (time is the input's last dim here: for (B, T, C) inputs convert with time_dim=1, on the " \
                "command line --time-dim 1)" if self.time_dim == len(clip.shape) - 1 else ""
            raise ConversionError(f"the model fails on clips longer than the example "
                                  f"({self.longer_errors.get(node.name) or next(iter(self.longer_errors.values()), '')})",
                                  node=node, fix="a continual model must accept any number of frames; "
                                  f"remove fixed clip lengths from the model{last}")
        if streams:
            self.stream_op(node, streams, folded)
        else:
            self.folded_op(node)

    def elementwise_module(self, node, x) -> bool:
        """A torch layer that acts on each value alone, or (eval BatchNorm) per channel with time elsewhere:
        frame by frame by construction, so the framewise check would only repeat its cost."""
        module = self.module(node)
        if stock(module, _ELEMENTWISE_MODULES):
            return True
        return stock(module, nn.modules.batchnorm._BatchNorm) and not module.training and \
            module.running_mean is not None and x.meta.get("cofx_time") != 1 and len(node.all_input_nodes) == 1

    @staticmethod
    def clip_const_source(node, ins) -> fx.Node:
        """The first node of a chain of tensors built for the clip's length (for messages)."""
        return next((a.meta["cofx_clip_const"] for a in ins if a.meta.get("cofx_clip_const")), node)

    # -- windows over the clip ----------------------------------------------------------------
    def window_reason(self, node, streams, folded) -> Optional[str]:
        """Why `node` needs its stream inputs as a window of the clip (None when it does not): it is attention
        across time, it adds a tensor built for the clip's length (a per-position table, a mask), it puts a
        class token along time, or it joins a value computed over a window."""
        if not streams:
            return None
        if any(a.meta.get("cofx_from_window") for a in folded):
            return "join"
        if self.is_attention(node, streams) or self.softmax_over_time(node, streams) or \
                self.query_from_clip(node, folded):
            return "attention"
        layout = node.meta["cofx_layout"]
        if any(a.meta.get("cofx_clip_const") for a in node_inputs(node)):
            return "positions"
        if node.meta.get("cofx_longer_failed") and not any(a.meta.get("cofx_longer_failed") for a in streams) and \
                any(a.meta["cofx_role"] == "static" and isinstance(a.meta["cofx_layout"], Labels)
                    for a in node_inputs(node)):
            return "positions"   # a table sized for the clip, added whole
        if node.op == "call_module" and node.meta.get("cofx_longer_failed") and \
                not any(a.meta.get("cofx_longer_failed") for a in streams) and self.sized_for_clip(node, streams):
            if any(a.op == "placeholder" for a in streams) and self.time_dim == len(clip_value(streams[0]).shape) - 1:
                warnings.warn(f"cofx: layer '{node.target}' takes the input's last dim, the time dim given, whole "
                              f"({_time_len(streams[0], 'clip')} frames): it runs on a window of the clip; if time is "
                              "at dim 1, as in (B, T, C), convert with time_dim=1", stacklevel=2)
            return "sized"       # a layer sized for the clip (nn.Linear over time): it runs on windows of N frames
        if node.op == "call_function" and node.target in (torch.cat, torch.concat) and isinstance(layout, Labels) and \
                any(a.meta["cofx_role"] == "static" or _pooled_token(a) for a in node_inputs(node)):
            t_out = time_axes(layout)
            if t_out and any(_time_len(a, "clip") != clip_value(node).shape[t_out[0]] for a in streams
                             if isinstance(a.meta["cofx_layout"], Labels)):
                return "token"
        return None

    @staticmethod
    def query_from_clip(node, folded) -> bool:
        """A product of the frames with frames kept from the clip (``q(x[:, -1:]) @ k(x).transpose(1, 2)``: the
        newest frame's query against every frame), as `F.scaled_dot_product_attention` given that query is."""
        product = (node.op == "call_function" and node.target in (torch.matmul, operator.matmul, torch.bmm,
                                                                   torch.einsum)) or \
            (node.op == "call_method" and node.target == "matmul")
        return product and any(_kept_frames(a) for a in folded)

    def softmax_over_time(self, node, streams) -> bool:
        """A softmax over the frames (attention pooling with a learned query: ``softmax(q @ h^T) @ h``, an
        `nn.Softmax` score head): the weights of the frames of a clip, a window over it."""
        module = self.module(node)
        softmax = (node.op == "call_function" and node.target in (F.softmax, torch.softmax, F.log_softmax,
                                                                   torch.log_softmax)) or \
            (node.op == "call_method" and node.target in ("softmax", "log_softmax")) or \
            stock(module, (nn.Softmax, nn.LogSoftmax))
        if not softmax or len(streams) != 1:
            return False
        labels = streams[0].meta["cofx_layout"]
        dim = module.dim if module is not None else node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if not isinstance(dim, int) or not isinstance(labels, Labels):
            return False
        return (dim % len(labels)) in time_axes(labels)

    def sized_for_clip(self, node, streams) -> bool:
        """Whether a layer's parameters have a dimension of its stream inputs' clip length (`nn.Linear(T, H)`
        over time, `nn.LayerNorm([C, T])`): a layer made for that many frames, not one that fails on them."""
        lengths = {_time_len(a, "clip") for a in streams if a.meta.get("cofx_time") is not None}
        return any(size in lengths for p in self.module(node).parameters() for size in p.shape)

    def is_attention(self, node, ins) -> bool:
        """A layer or function of attention (its tokens checked to be the frames of `ins`), or a product of two
        tensors over time (q @ k^T, k^T @ v)."""
        module = self.module(node)
        named = module is not None and (isinstance(module, ATTENTION) or "attention" in type(module).__name__.lower())
        named = named or node.op == "call_function" and (
            node.target in (F.scaled_dot_product_attention, F.multi_head_attention_forward)
            or "attention" in getattr(node.target, "__name__", "").lower())
        if named:
            streams = [a for a in ins if a.meta.get("cofx_role") == "stream"]
            if streams and all(isinstance(a.meta["cofx_layout"], Labels) and "T" not in a.meta["cofx_layout"]
                               for a in streams):
                return False   # frames folded into the batch: attention within each frame (over its patches)
            framed = [a for a in ins if a.meta.get("cofx_from_window")]
            if framed and all(isinstance(a.meta["cofx_layout"], Labels) and "T" not in a.meta["cofx_layout"]
                              and "BT" in a.meta["cofx_layout"] for a in framed):
                return False   # the same inside a window (TimeSformer's spatial attention after its temporal)
            self.check_tokens_are_frames(node, module, ins)
            return True
        layout = node.meta["cofx_layout"]
        return len(set(ins)) > 1 and isinstance(layout, Labels) and len(time_axes(layout)) != 1 and \
            not node.meta.get("cofx_longer_failed")

    def check_tokens_are_frames(self, node, module, streams):
        """Attention that cofx calls whole must attend over frames: its token axis is the time axis of every
        stream input (a layer that mixes frames with pixels inside is refused)."""
        if isinstance(module, nn.MultiheadAttention):
            first = module.batch_first
        elif isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            first = module.self_attn.batch_first
        elif isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
            first = module.layers[0].self_attn.batch_first if len(module.layers) else True
        elif isinstance(module, nn.Transformer):
            first = module.encoder.layers[0].self_attn.batch_first
        else:
            first = None
        tokens = _token_inputs(node, module)
        for a in dict.fromkeys(streams):
            labels, t = a.meta["cofx_layout"], a.meta.get("cofx_time")
            if t is None and a.meta.get("cofx_from_window"):   # inside a window: where its frames are
                axes = time_axes(labels)
                if not axes:   # not told apart (a table sized for the clip): the window is run whole anyway
                    continue
                t = axes[0] if len(axes) == 1 else None
            if tokens is not None and a not in tokens:   # a mask from the frames: frames along its key axis
                if not (isinstance(labels, Labels) and t is not None and t >= len(labels) - 2 and "B" in labels):
                    raise ConversionError(f"attention ({_attention_like(node, self.gm) or describe(node)}) takes a "
                                          f"mask from the stream, {describe(a)}, whose frames are not along its "
                                          "query or key axis", node=node,
                                          fix="compute the mask frame by frame from the frames, shaped (B, T) for "
                                          "key_padding_mask= or (B, ..., T) for attn_mask=")
                continue
            if not isinstance(labels, Labels) or t is None:
                ok = False
            elif first is not None:
                ok = len(labels) == 3 and t == (1 if first else 0)
            elif node.target is F.scaled_dot_product_attention:
                ok = t == len(labels) - 2
            elif node.target is F.multi_head_attention_forward:
                ok = len(labels) == 3 and t == 0
            else:   # a layer cofx does not know: tokens of one frame each, (B, T, C)
                ok = len(labels) == 3 and t == 1
            if not ok:
                raise ConversionError(f"attention ({_attention_like(node, self.gm) or describe(node)}) whose tokens "
                                      f"are not the frames: its input {describe(a)} has time "
                                      f"at dim {t} of {len(labels) if isinstance(labels, Labels) else '?'}, where "
                                      "the layer does not attend over that axis alone", node=node, fix=ATTENTION_FIX)

    def window(self, node, streams, folded, why):
        """`node` runs on windows of its stream inputs: from here on, one result per window (folded into the
        batch, as after a reduction), computed as the model computes it on a clip."""
        streams = list(dict.fromkeys(streams))
        for a in streams:
            if not isinstance(a.meta["cofx_layout"], Labels) or a.meta.get("cofx_time") is None:
                raise ConversionError("takes a tuple of streams over a window of the clip", node=node)
            if "B" not in a.meta["cofx_layout"]:
                raise ConversionError("mixes the batch (independent streams) into one value", node=node)
        lengths = {_time_len(a, "clip") for a in streams}
        lengths |= {a.meta["cofx_window_frames"] for a in folded if a.meta.get("cofx_from_window")}
        if len(lengths) > 1:
            raise ConversionError(f"combines windows of the clip of different lengths {sorted(lengths)} (frames at "
                                  "different rates or crops)", node=node,
                                  fix="feed attention and what joins it tensors of the same number of frames")
        frames = lengths.pop()
        self.check_window_option(node, frames)
        if why == "join":
            source = next(a for a in folded if a.meta.get("cofx_from_window")).meta["cofx_window_source"]
            kind, what = "merge", f"joins the window of {source.name}"
        else:
            source = node
            kind = "attention" if why == "attention" else "window"
            what = {"attention": "attention over the clip", "token": "a token put along time",
                    "positions": LENGTH_BUILT, "sized": "a layer sized for the clip length",
                    "statistic": "a statistic of the clip combined with its frames"}[why]
        self.check_window_values(node)
        self.set(node, "folded", kind, spec=WindowSpec(frames, what), window_inputs=tuple(streams))
        self.mark_from_window(node, frames, source)

    def check_window_option(self, node, frames: int) -> None:
        if self.window_for(node, frames) != frames:
            raise ConversionError(f"window= for {node.name}, which runs on a window of the clip: its window is "
                                  f"the example clip's {frames} frames there", node=node,
                                  fix="give convert an example clip of the length the window should have")

    def mark_from_window(self, node, frames: int, source) -> None:
        node.meta.update(cofx_from_window=True, cofx_window_frames=frames, cofx_window_source=source,
                         cofx_window_time=has_time(node.meta["cofx_layout"]))

    def check_window_values(self, node):
        """Numbers a window's ops read become those of the clip (a length) or of the windows (a batch size);
        one that follows both cannot be told apart."""
        if (node.op, node.target) in RESHAPES:   # restates a shape: its sizes come from the labels
            return
        for a in node_inputs(node):
            runs = a.meta.get("cofx_runs", {})
            both = a.meta.get("cofx_length") is not None and runs.get("batch") != runs.get("clip")
            if a.meta.get("cofx_role") in ("shape", "static") and (a.meta.get("cofx_layout") == "BT" or both):
                raise ConversionError(f"uses {describe(a)}, a number that follows both the batch size and the clip "
                                      "length, over a window of the clip", node=node,
                                      fix="read the batch size and the number of frames separately (B, T = x.shape[:2])")

    def check_outputs(self, node):
        leaves = [leaf for leaf in tree_flatten(node.args[0])[0] if isinstance(leaf, fx.Node)]
        for leaf in leaves:
            if leaf.meta.get("cofx_clip_const"):
                raise _length_use(leaf, self.gm, "returns a tensor built for the clip's length", _LENGTH_FIX)
        windowed = [leaf for leaf in leaves if leaf.meta.get("cofx_from_window")]
        if any(leaf.meta.get("cofx_window_time") for leaf in windowed):
            self.per_frame_outputs(windowed)

    def per_frame_outputs(self, leaves):
        """Per-frame outputs of windows over the clip: each step answers for the newest frame, from the first
        frame on (exact where the window's attention is causal: `check_causal`). Every output computed over a
        window must then keep its frames, the window's frames along one axis."""
        for leaf in leaves:
            if len(time_axes(leaf.meta["cofx_layout"])) > 1:   # frames against frames: attention weights
                raise ConversionError("returns a map over pairs of the window's frames (attention weights): no "
                                      "step can give it frame by frame", node=leaf,
                                      fix="return the attention's output only, read at one frame or pooled")
        folded = next((n for n in self.gm.graph.nodes if n.meta.get("cofx_from_window") and isinstance(
            n.meta.get("cofx_layout"), Labels) and any(rows_per_stream(lab) > 1 for lab in n.meta["cofx_layout"])),
            None)
        if folded is not None:   # each step keeps the newest row of each window: one row per stream
            raise ConversionError("returns per-frame outputs of a window over the clip whose batch holds several "
                                  "rows per stream (joints or persons folded into the batch)", node=folded,
                                  fix="read one frame of the window (out[:, -1]) or pool over time, or fold those "
                                  "rows into the channels before the attention")
        for leaf in leaves:
            axes = time_axes(leaf.meta["cofx_layout"])
            frames = leaf.meta["cofx_window_frames"]
            if len(axes) == 1 and clip_value(leaf).shape[axes[0]] == frames:
                leaf.meta["cofx_newest"] = axes[0]
                continue
            if leaf.meta.get("cofx_window_time"):
                source = leaf.meta["cofx_window_source"]
                what = source.meta["cofx_spec"].what
                raise ConversionError(
                    f"returns per-frame outputs computed over a window of the clip length ({frames} frames), for "
                    f"{what} at node '{source.name}'{' (' + user_line(source) + ')' if user_line(source) else ''}: "
                    f"they are not the window's frames along one axis", node=leaf,
                    fix="return the frames along one axis, one value per clip (a class token, the last frame "
                    "out[:, -1], a pool over time)")
            raise ConversionError(f"returns one value per window of the clip beside per-frame outputs computed "
                                  f"over a window ({describe(leaf)})", node=leaf,
                                  fix="return per-frame outputs only, or one value per clip only")
        for n in self.gm.graph.nodes:   # every window answers from the first frame on
            spec = n.meta.get("cofx_spec")
            if isinstance(spec, WindowSpec) and spec.start:
                n.meta["cofx_spec"] = WindowSpec(spec.window, spec.what, growing=True)

    def recurrent(self, node, streams):
        module = self.module(node)
        x = node.args[0]
        if module.bidirectional:
            raise ConversionError("a bidirectional recurrent layer reads future frames", node=node,
                                  fix="use a unidirectional layer for streaming")
        given = tree_flatten((node.args[1:], node.kwargs))[0]
        if not all(zeros_made(h) for h in given if h is not None):
            raise ConversionError("the recurrent layer is given an initial state other than zeros", node=node,
                                  fix="let it start from zeros (no initial state, or one made by torch.zeros); the "
                                  "continual model carries the state itself")
        if x not in streams:
            raise ConversionError("the recurrent layer runs over a window of the clip (after a per-position table, "
                                  "a token put along time or attention): its state would restart at every window",
                                  node=node, fix="run the recurrent layer on the frames as they come, before the "
                                  "positions, tokens or attention")
        want = 1 if module.batch_first else 0
        if x.meta["cofx_time"] != want:
            raise ConversionError(f"time reaches the recurrent layer at dim {x.meta['cofx_time']}, not at its "
                                  f"sequence dim {want}", node=node,
                                  fix="give it the frames along its sequence dim (transpose them there, or set "
                                  "batch_first to match)")
        self.set(node, "stream", "recurrent", time=None)

    def check_length_args(self, node, allowed):
        if not allowed and length_source(node) is not None:
            raise _length_use(node, self.gm, "uses the clip length as a value", _LENGTH_FIX)

    def stream_op(self, node, streams, folded):
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else streams[0]
        layout = node.meta["cofx_layout"]
        if isinstance(layout, Labels):
            t_out = time_axis(node)
        else:
            t_out = None
        # convolutions and pools
        if x.meta["cofx_role"] == "stream" and isinstance(x.meta["cofx_layout"], Labels):
            found = sliding_spec(node, self.gm, x.meta["cofx_time"])
            if found is not None:
                spec, tensors = found
                if any(isinstance(a, fx.Node) and a.meta["cofx_role"] == "stream" for a in node.args[1:]):
                    raise ConversionError("the weights of this op change over time", node=node)
                if spec.trivial:
                    self.set(node, "stream", "pointwise", time=t_out, frame_spec=spec, tensors=tensors)
                    return
                if t_out is None:
                    if spec.family in ("conv", "conv_transpose"):
                        raise ConversionError("temporal op without time in its output", node=node)
                    self.reduction(node, x, streams, folded, kernel_read=True)   # a global pool
                    return
                kind = "sliding"
                w = _time_len(x, "clip")
                if spec.family not in ("conv", "conv_transpose") and spec.k == w and spec.pad_l == 0 and spec.pad_r == 0:
                    kind = "reduction"
                    window = self.window_for(node, w)
                    if window != w:
                        spec = spec.with_kernel(window)
                        kind = "windowed"
                self.set(node, "stream", kind, time=t_out, spec=spec, tensors=tensors)
                return
            pad = pad_spec(node, self.gm, x.meta["cofx_time"], len(x.meta["cofx_layout"]))
            if pad is not None:
                self.set(node, "stream", "sliding", time=t_out, spec=pad)
                return
        # subscripts and narrow along time: crops
        if node.op == "call_function" and node.target is operator.getitem and isinstance(x.meta["cofx_layout"], Labels):
            if self.subscript(node, x, t_out):
                return
        if node.op in ("call_method", "call_function") and getattr(node.target, "__name__", node.target) == "narrow":
            if self.narrow(node, x, t_out):
                return
        if not isinstance(layout, Labels):
            if not has_time(layout):   # e.g. x.max(dim=time) -> (values, indices)
                self.check_pooled_in_module(node, x)
                self.reduction(node, x, streams, folded)
                return
            # tuple outputs (split, chunk, ...), checked frame by frame
            self.check_length_args(node, False)
            self.check_keeps_frames(node, streams)
            n_time = len(streams) + len(folded)
            self.set(node, "stream", "merge" if n_time > 1 else "pointwise", check=True, time=None)
            return
        if t_out is None:
            self.check_pooled_in_module(node, x)
        if t_out is None:   # a frame picked at an index read off the clip (h[:, :, T // 2]) is that frame of
            picked = node.op == "call_function" and node.target is operator.getitem and \
                isinstance(x.meta["cofx_layout"], Labels) and isinstance(
                    _index_entry(node.args[1], len(x.meta["cofx_layout"]), x.meta["cofx_time"]), fx.Node)
            self.reduction(node, x, streams, folded, kernel_read=picked)   # the window, the clip's length
            return
        for a in streams:
            if isinstance(a.meta["cofx_layout"], Labels):
                for run in ("clip", "longer"):
                    if a.meta["cofx_runs"].get(run) is None or node.meta["cofx_longer_failed"]:
                        continue
                    n_in, n_out = _time_len(a, run), clip_value(node, run).shape[t_out]
                    if n_in == n_out:
                        continue
                    merged = len(layout) < len(a.meta["cofx_layout"]) and \
                        _numel(clip_value(node)) == _numel(clip_value(a))
                    if merged and len(streams) == 1 and not folded:
                        # time flattened into features: the whole clip is consumed, as by a global pooling
                        self.reduction(node, x, streams, folded)
                        node.meta["cofx_flattens"] = True
                        return
                    hint = attention_hint(node, self.gm)
                    where = " on a longer clip" if run == "longer" else ""
                    opaque = self.gm.meta.get("cofx_untraceable", {}).get(node.target) \
                        if node.op == "call_module" else None
                    if opaque:   # a module kept whole: what it does to time is unseen
                        hint += f" torch.fx could not trace into this module ({opaque}), so cofx cannot see its " \
                                "temporal ops."
                    raise ConversionError(f"changes the number of frames (its input '{a.name}' has {n_in}{where}, "
                                          f"its output {n_out}).{hint}", node=node,
                                          fix="make the module traceable (no Python on tensor sizes or values: "
                                          "max(), int() and asserts on shapes), so that cofx sees its temporal ops"
                                          if opaque else _FRAMES_FIX)
        self.check_length_args(node, (node.op, node.target) in _SHAPE_RESTATING)
        n_time = len(streams) + len(folded)
        self.set(node, "stream", "merge" if n_time > 1 else "pointwise", time=t_out,
                 check=not self.elementwise_module(node, x))

    def check_pooled_in_module(self, node, x) -> None:
        """A value without time picked out of what a module cofx does not trace into returns with frames was
        pooled inside it, over whatever frames it is given."""
        if not isinstance(x.meta["cofx_layout"], Labels):
            raise ConversionError(f"takes a value without time out of what {describe(x)} returns along with frames: "
                                  "pooled over time inside a module cofx does not trace into, over whatever frames "
                                  "it is given", node=node, fix="make that module traceable (no Python on tensor "
                                  "sizes or values), or return its frames only and pool them outside it")

    def check_keeps_frames(self, node, streams) -> None:
        """Every tensor of a tuple output has as many frames as one of the inputs (split or chunk channels, not
        time; pathways at several rates keep theirs)."""
        given = {_time_len(a, "clip") for a in streams if isinstance(a.meta["cofx_layout"], Labels)}
        for labels, rec in zip(tree_flatten(node.meta["cofx_layout"])[0], tree_flatten(clip_value(node))[0]):
            axes = time_axes(labels)
            if given and axes and rec.shape[axes[0]] not in given:
                frames = "/".join(map(str, sorted(given)))
                raise ConversionError(f"splits the frames into parts ({frames} frames in, {rec.shape[axes[0]]} in a "
                                      "part): a stream has no end to split", node=node,
                                      fix="split channels rather than time; to use part of the clip, pool or "
                                      "slice the frames you need (x[:, :, -4:])")

    def subscript(self, node, x, t_out) -> bool:
        t = x.meta["cofx_time"]
        ndim = len(x.meta["cofx_layout"])
        entry = _index_entry(node.args[1], ndim, t)
        if isinstance(entry, slice) and entry == slice(None):
            return False
        if t_out is None or not isinstance(entry, slice):
            return False   # picks fixed frames of the clip (x[:, :, -1]): a global reduction
        self.check_crop_bounds(node, (entry.start, entry.stop, entry.step), entry.step)
        spec = self.crop_from(node, x, entry.start, entry.stop, entry.step)
        self.check_length_args(node, True)
        self.set(node, "stream", "sliding", time=t_out, spec=spec)
        return True

    def narrow(self, node, x, t_out) -> bool:
        args = list(node.args[1:]) + [node.kwargs.get(k) for k in ("dim", "start", "length") if k in node.kwargs]
        dim, start, length = args[:3]
        if int(clip_value(dim)) % len(x.meta["cofx_layout"]) != x.meta["cofx_time"] or t_out is None:
            return False   # (frames kept at fixed positions of the clip, x.narrow(2, T - 3, 3): a global reduction)
        self.check_crop_bounds(node, (start, length), None)
        stop_clip = clip_value(start) + clip_value(length)
        stop_longer = clip_value(start, "longer") + clip_value(length, "longer")
        spec = self._crop(node, x, clip_value(start), clip_value(start, "longer"), stop_clip, stop_longer, 1)
        self.check_length_args(node, True)
        self.set(node, "stream", "sliding", time=t_out, spec=spec)
        return True

    def check_crop_bounds(self, node, bounds, step) -> None:
        """A crop's bounds read off the clip keep a fixed distance from its ends on every length only as a size
        read plus or minus numbers (``x[:, :, :T - 2]``); two runs cannot tell ``T - T % 4`` from that."""
        for b in bounds:
            if isinstance(b, fx.Node) and b.meta.get("cofx_length") is not None and \
                    (b is step or not b.meta.get("cofx_length_shift")):
                raise _length_use(node, self.gm, "crops time at a position computed from the clip length by other "
                                  "arithmetic than adding or subtracting a number of frames (a remainder, a "
                                  "product, a min or max)", "crop a fixed number of frames: "
                                  "x[:, :, a:x.shape[2]-b]; to use part of the clip, pool it or pick the frames "
                                  "you need from its end (x[:, :, -4:])")

    def crop_from(self, node, x, start, stop, step):
        def resolve(v, run, n, default):
            v = clip_value(v, run) if v is not None else None
            if v is None:
                return default
            v = int(v)
            return max(0, min(n, v + n if v < 0 else v))
        n_clip, n_long = _time_len(x, "clip"), _time_len(x, "longer")
        return self._crop(node, x, resolve(start, "clip", n_clip, 0), resolve(start, "longer", n_long, 0),
                          resolve(stop, "clip", n_clip, n_clip), resolve(stop, "longer", n_long, n_long),
                          int(clip_value(step)) if step is not None else 1)

    def _crop(self, node, x, start_c, start_l, stop_c, stop_l, step):
        if node.meta["cofx_longer_failed"]:
            raise ConversionError("cannot tell whether this slice along time is a constant crop", node=node)
        n_clip, n_long = _time_len(x, "clip"), _time_len(x, "longer")
        if start_c != start_l or n_clip - stop_c != n_long - stop_l or step < 1:
            raise ConversionError("slices time at positions that do not keep a fixed distance from the start "
                                  "and the end of the clip", node=node,
                                  fix="crop a fixed number of frames: x[:, :, a:x.shape[2]-b]")
        return CropSpec(start=start_c, end=n_clip - stop_c, step=step)

    def reduction(self, node, x, streams, folded, kernel_read=False):
        """`kernel_read`: a pool whose kernel, read off the tensor, spans the whole clip (checked by sliding_spec)."""
        if len(streams) + len(folded) > 1:
            hint = attention_hint(node, self.gm)
            raise ConversionError("combines frames across time from more than one tensor (a product over time, as "
                                  "in attention, or frames picked by indices computed from the frames: "
                                  f"gather/index_select along time).{hint}", node=node,
                                  fix=ATTENTION_FIX if hint else "reduce each tensor over time on its own (h.amax(2) "
                                  "rather than h.gather(2, h.argmax(2, keepdim=True)))")
        labels = node.meta["cofx_layout"]
        if isinstance(labels, Labels) and "B" not in labels and "BT" not in labels:
            raise ConversionError("mixes the batch (independent streams) into one value", node=node)
        if self.statistics and node.name in self.statistics:
            self.window(node, streams, folded, "statistic")
            return
        self.check_length_args(node, kernel_read or (node.op, node.target) in RESHAPES)
        t_in = x.meta["cofx_time"]
        if t_in is None:   # one frame on the example, so its time axis cannot be told from its other axes
            raise ConversionError("reduces a tensor whose time axis cannot be told apart from its other axes: it "
                                  "has too few frames on the example clip", node=node,
                                  fix="convert with a longer example clip")
        clip_window = _time_len(x, "clip")
        mode, partial = self.decompose(node, x, t_in)
        window = self.window_for(node, clip_window)
        if kernel_read and window != clip_window:
            raise ConversionError(f"window={window} for a pool whose kernel is read off the clip (the whole clip, "
                                  f"{clip_window} frames)", node=node,
                                  fix="pool over time with x.mean(2) or x.amax(2), whose window can be chosen")
        spec = ReductionSpec(mode=mode, window=window, clip_window=clip_window, partial=partial)
        self.set(node, "folded", "reduction", time=None, spec=spec, reduce_time=t_in)

    def decompose(self, node, x, t):
        """(mode, partial) of a reduction that splits into per-frame work and a window over frames."""
        ndim = len(x.meta["cofx_layout"])
        mode = None
        if node.op == "call_method" and node.target in _REDUCE_METHODS:
            mode, fn = _REDUCE_METHODS[node.target], getattr(torch, node.target)
        elif node.op == "call_function" and node.target in _REDUCE_FUNCTIONS:
            mode, fn = _REDUCE_FUNCTIONS[node.target], node.target
        if mode is not None:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = _dims(clip_value(dims), ndim)
            if dims is None or t not in dims or len(node.args) > 3 or "dtype" in node.kwargs:
                return "raw", None
            return mode, (fn, tuple(d for d in dims if d != t))
        module = self.module(node)
        entry = next((v for k, v in _ADAPTIVE_MODULES.items() if stock(module, k)), None)
        if entry is not None:
            if getattr(module, "return_indices", False):
                return "raw", None
            fn, mode = entry
            size = module.output_size
        elif node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
            fn, mode = node.target, _ADAPTIVE_FUNCTIONS[node.target]
            size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
            if node.kwargs.get("return_indices"):
                return "raw", None
        else:
            return "raw", None
        nd = ndim - 2
        size = list(size) if isinstance(size, (list, tuple)) else [size] * nd
        if t - 2 < 0 or size[t - 2] != 1:
            return "raw", None
        size[t - 2] = None
        return mode, (fn, tuple(size))

    def folded_op(self, node):
        layout = node.meta["cofx_layout"]
        windows = [a for a in node_inputs(node) if a.meta.get("cofx_from_window")]
        if windows:   # the model's ops on each window, as on a clip
            source = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
            if isinstance(source, fx.Node) and source.meta.get("cofx_kind") == "attention" and \
                    node.args[1] == 1 and node.users and isinstance(self.module(source), nn.MultiheadAttention):
                raise ConversionError("reads the attention weights", node=node,
                                      fix="use the attention's output only (need_weights=False)")
            frames = {a.meta["cofx_window_frames"] for a in windows}
            if len(frames) > 1:
                raise ConversionError(f"combines windows of the clip of different lengths {sorted(frames)}", node=node)
            self.check_window_values(node)
            frames = frames.pop()
            folded = [a for a in node_inputs(node) if a.meta["cofx_role"] == "folded"]
            if self.is_attention(node, folded):   # attention inside a window: reported with its window
                self.check_window_option(node, frames)
                self.set(node, "folded", "attention", spec=WindowSpec(frames, "attention over the clip", start=False))
            else:
                self.set(node, "folded", "merge" if len(set(folded)) > 1 else "pointwise")
            self.mark_from_window(node, frames, windows[0].meta["cofx_window_source"])
            return
        if has_time(layout) and not node.meta.get("cofx_longer_failed"):
            origin = next((a for a in node_inputs(node) if a.meta.get("cofx_flattens")), None)
            if origin is not None or any(a.meta.get("cofx_kind") == "pointwise" and
                                         a.meta.get("cofx_role") == "folded" for a in node_inputs(node)):
                hint = attention_hint(node, self.gm)
                raise ConversionError(
                    "works on time flattened together with other dimensions (as tokens or features) "
                    f"mid-network.{hint}", node=node,
                    fix=ATTENTION_FIX if hint else
                    "keep time as its own dimension until a global temporal pooling")
            raise ConversionError("brings time back after a global temporal reduction", node=node)
        # over a reduction's window, which is the clip's length unless window= says otherwise, the clip length
        # is that window's (``x.sum(2) / x.shape[2]``), and the batch size each step's number of windows
        sized_as_clip = not self.windows
        self.check_length_args(node, (node.op, node.target) in RESHAPES or sized_as_clip)
        if length_source(node) is not None and (node.op, node.target) not in RESHAPES:
            node.meta["cofx_reads_length"] = True   # checked once the reductions are placed (a causal one is not
            #                                         a window of the clip's length)
        for a in node_inputs(node):
            if a.meta["cofx_role"] == "shape" and a.meta["cofx_layout"] in ("B", "T", "BT") \
                    and (node.op, node.target) not in RESHAPES and (a.meta["cofx_layout"] == "BT" or not sized_as_clip):
                raise ConversionError("uses the batch size or clip length as a number after a global "
                                      "temporal reduction", node=node,
                                      fix="read sizes from the tensor at hand (x.shape[0]) or use reshape")
        n_folded = len({a for a in node_inputs(node) if a.meta["cofx_role"] == "folded"})
        self.set(node, "folded", "merge" if n_folded > 1 else "pointwise")
        node.meta["cofx_flattens"] = any(a.meta.get("cofx_flattens") for a in node_inputs(node))

    # -- where do reductions end up -------------------------------------------------------------
    def place_reductions(self):
        if self.statistics is None:
            found = {node.name for node in self.gm.graph.nodes if self.statistic_of_clip(node)}
            if found:
                raise _Statistics(found)
        for node in self.gm.graph.nodes:
            if node.meta.get("cofx_kind") != "reduction" or node.meta["cofx_role"] != "folded":
                continue
            spec = node.meta["cofx_spec"]
            if self.reenters_stream(node):
                if spec.mode == "raw" and spec.window > 1:
                    raise ConversionError(
                        "a value computed over the whole clip (a statistic such as std, or frames kept from fixed "
                        "positions of the clip, as x[:, :, :1] keeps the first) is combined back with every frame, "
                        "and as a causal window over the frames so far only mean, sum, amax and amin are computed",
                        node=node, fix="pool with mean/sum/amax/amin or adaptive pooling (squeeze-and-excitation "
                        "gates convert that way), or compute such a reference (the first or last frame, a "
                        "normalisation's statistics) outside the model and pass it the normalised frames")
                spec = ReductionSpec(spec.mode, spec.window, spec.clip_window, True, spec.partial)
                node.meta["cofx_spec"] = spec
            if not spec.exact:
                node.meta["cofx_kind"] = "windowed"
        for node in self.gm.graph.nodes:
            if node.meta.get("cofx_reads_length") and any(
                    a.meta.get("cofx_kind") in ("reduction", "windowed") and a.meta["cofx_spec"].causal
                    for a in _ancestors(node)):
                raise _length_use(node, self.gm, "uses the clip length as a value over a causal window (a "
                                  "reduction that feeds back into the stream covers the frames so far)",
                                  "average with mean (a squeeze-and-excitation gate: h.mean(2, keepdim=True), not "
                                  "h.sum(2, keepdim=True) / h.shape[2]); " + _LENGTH_FIX)
        unknown = set(self.windows) - self.used_windows
        if unknown:
            raise ConversionError(f"window= names {sorted(unknown)}, which are not global temporal reductions",
                                  fix="name modules by their path in model.named_modules() (or fx node names) "
                                  "of a temporal mean/pool over the whole clip; see cofx.convert(...).report")

    def statistic_of_clip(self, node) -> bool:
        """A reduction over the whole clip whose value goes back into the stream only through ops on each value
        (``h - h.mean(2, keepdim=True)``, ``torch.exp(h - h.amax(2, keepdim=True))``), where every frame so
        combined is pooled over time again before the output: exact over a window of the clip, and cheap (no
        layer runs on the window). A gate that feeds layers (squeeze-and-excitation) stays a causal window."""
        spec = node.meta.get("cofx_spec")
        if node.meta.get("cofx_kind") != "reduction" or not isinstance(spec, ReductionSpec) or \
                spec.window != spec.clip_window or not self.reenters_stream(node):
            return False
        for n in _reached(node, lambda n: True):   # (per-window values reach the output as they may)
            if n.meta.get("cofx_role") == "stream":
                on_values = n.op in ("call_function", "call_method") or \
                    n.op == "call_module" and stock(self.module(n), _ELEMENTWISE_MODULES)   # (no layer)
                if not on_values or n.meta.get("cofx_kind") not in ("pointwise", "merge") or \
                        any(u.op == "output" for u in n.users):
                    return False
        return True

    def reenters_stream(self, node) -> bool:
        return any(n.meta.get("cofx_role") == "stream"
                   for n in _reached(node, lambda n: n.meta.get("cofx_role") == "folded"))


def classify_nodes(gm: fx.GraphModule, time_dim: int = 2, windows: Mapping[str, int] = None,
                   longer_errors: Mapping[str, str] = None) -> None:
    """`longer_errors`: the errors of the longer run by node name (from `record_runs`).

    A statistic of the clip computed by hand and combined back with the frames, then pooled again
    (``(h - h.mean(2, keepdim=True)).pow(2).mean(2)``) is found once the reductions are placed; the
    nodes are then classified again with it run over a window of the clip (exact), not a causal window."""
    given = {node: dict(node.meta) for node in gm.graph.nodes}

    def again(statistics: set) -> None:
        for node, meta in given.items():
            node.meta.clear()
            node.meta.update(meta)
        _Classifier(gm, time_dim, windows or {}, longer_errors or {}, statistics=statistics).run()

    try:
        _Classifier(gm, time_dim, windows or {}, longer_errors or {}).run()
    except _Statistics as found:
        try:
            again(found.names)
        except ConversionError:   # the window cannot hold them (crops of other lengths joined): causal windows
            again(set())


class _Statistics(Exception):
    """Reductions to classify again as windows over the clip (see `classify_nodes`)."""
    def __init__(self, names: set):
        super().__init__(sorted(names))
        self.names = names
