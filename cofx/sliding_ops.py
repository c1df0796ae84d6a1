"""What a convolution or pooling op is along time, and how to run it on buffered frames.

`sliding_spec(node, gm, t_axis)` recognises Conv1d/2d/3d, AvgPool1d/2d/3d,
MaxPool1d/2d/3d, as modules or through their functional forms, and returns a
`SlidingSpec`: the op's full configuration with the time dimension singled out.
`SlidingSpec.compute` runs the op on a buffer of frames with no temporal
padding (the continual kernel supplies the padding frames itself) and the
op's own spatial padding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten
import torch.nn.functional as F
from torch import nn

from . import onednn_conv
from .errors import ConversionError
from .stock_modules import stock

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_AVG_FN = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX_FN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_AVG_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_AVG_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                 "divisor_override": None}
_MAX_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MAX_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}


def _functional_table():
    table = {}
    for nd in (1, 2, 3):
        for fn in {_CONV_FN[nd], getattr(torch, f"conv{nd}d")}:
            table[fn] = ("conv", nd)
        for fn in {_AVG_FN[nd], getattr(torch, "avg_pool1d") if nd == 1 else _AVG_FN[nd]}:
            table[fn] = ("avg_pool", nd)
        for fn in {_MAX_FN[nd], getattr(F, f"max_pool{nd}d_with_indices"), getattr(torch, f"max_pool{nd}d")}:
            table[fn] = ("max_pool", nd)
    return table


_FUNCTIONAL = _functional_table()
_MODULES = {nn.Conv1d: ("conv", 1), nn.Conv2d: ("conv", 2), nn.Conv3d: ("conv", 3),
            nn.AvgPool1d: ("avg_pool", 1), nn.AvgPool2d: ("avg_pool", 2), nn.AvgPool3d: ("avg_pool", 3),
            nn.MaxPool1d: ("max_pool", 1), nn.MaxPool2d: ("max_pool", 2), nn.MaxPool3d: ("max_pool", 3)}
TRANSPOSED = "a transposed convolution that upsamples time (a temporal stride above 1, or output padding in time)"
TRANSPOSED_FIX = ("a stream keeps one frame per frame: upsample time outside the streamed part, or use a temporal "
                  "stride of 1 with no temporal output padding (then cofx streams it as the convolution it is)")

TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
TRANSPOSED_FUNCTIONS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


def _tuple(v, nd) -> tuple:
    if isinstance(v, (list, tuple)):
        v = tuple(int(x) for x in v)
        return v * nd if len(v) == 1 else v
    return (int(v),) * nd


@dataclass(frozen=True)
class SlidingSpec:
    family: str            # "conv" | "avg_pool" | "max_pool"
    nd: int                # 1, 2 or 3 spatial dims of the op
    t: int                 # which of the op's dims is time
    kernel: tuple
    stride: tuple
    pads: tuple            # ((left, right), ...) per dim
    dilation: tuple
    groups: int = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: Optional[int] = None
    padding_mode: str = "zeros"
    output_padding: tuple = ()   # a transposed convolution's, per dim (0 in time)

    @property
    def k(self) -> int:
        return self.kernel[self.t]

    @property
    def s(self) -> int:
        return self.stride[self.t]

    @property
    def d(self) -> int:
        return self.dilation[self.t]

    @property
    def pad_l(self) -> int:
        return self.pads[self.t][0]

    @property
    def pad_r(self) -> int:
        return self.pads[self.t][1]

    @property
    def span(self) -> int:
        return self.d * (self.k - 1) + 1

    @property
    def trivial(self) -> bool:
        """Kernel 1, stride 1, no padding in time: the op acts frame by frame."""
        return self.k == 1 and self.s == 1 and self.pad_l == 0 and self.pad_r == 0

    @property
    def pad_value(self) -> float:
        return float("-inf") if self.family == "max_pool" else 0.0

    def with_kernel(self, k: int) -> "SlidingSpec":
        kernel = tuple(k if i == self.t else v for i, v in enumerate(self.kernel))
        return replace(self, kernel=kernel)

    def _pad_spatial(self, x: torch.Tensor):
        """(x, padding argument): symmetric zero padding is left to the op, anything else done here."""
        spatial = [p if i != self.t else (0, 0) for i, p in enumerate(self.pads)]
        if all(l == r for l, r in spatial) and self.padding_mode == "zeros":
            return x, tuple(l for l, _ in spatial)
        flat = [v for pair in reversed(spatial) for v in pair]
        if self.family == "max_pool":
            return F.pad(x, flat, value=float("-inf")), 0
        if self.padding_mode in ("zeros", "constant"):
            return F.pad(x, flat), 0
        return F.pad(x, flat, mode=self.padding_mode), 0

    def compute(self, x: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """The op on frames `x` (time already padded by the caller), spatial padding as the original."""
        if self.family == "conv_transpose":   # its own padding crops its output: in time, to the valid frames
            padding = [self.d * (self.k - 1) if i == self.t else p for i, (p, _) in enumerate(self.pads)]
            return _CONV_TRANSPOSE_FN[self.nd](x, weight, bias, self.stride, padding, self.output_padding,
                                               self.groups, self.dilation)
        x, padding = self._pad_spatial(x)
        if self.family == "conv":
            conv = onednn_conv.conv3d if self.nd == 3 else _CONV_FN[self.nd]
            return conv(x, weight, bias, self.stride, padding, self.dilation, self.groups)
        if self.family == "avg_pool":
            extra = () if self.nd == 1 else (self.divisor_override,)   # avg_pool1d has no divisor_override
            return _AVG_FN[self.nd](x, self.kernel, self.stride, padding, self.ceil_mode,
                                    self.count_include_pad, *extra)
        return _MAX_FN[self.nd](x, self.kernel, self.stride, padding, self.dilation, self.ceil_mode)


    # -- one output frame: ways to compute it that PyTorch's CPU kernels run at very different speeds --------
    def window_impls(self) -> tuple:
        """Implementations of `window` for this op (the first is `compute` itself)."""
        if self.family == "conv" and self.nd == 3 and self.t == 0:
            pointwise_in_space = all(k == 1 for k in self.kernel[1:]) and all(s == 1 for s in self.stride[1:]) \
                and all(p == (0, 0) for p in self.pads[1:])
            return ("conv3d", "conv3d_cl", "fold2d", "taps2d") + (("matmul",) if pointwise_in_space else ())
        return ("conv3d",)

    def chunk_compute(self, impl: Optional[str]):
        """`compute` for any number of frames in the way `impl` lays them out: channels-last if chosen."""
        return partial(self.window, impl) if impl == "conv3d_cl" else self.compute

    def window(self, impl: str, x: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """The one output frame of a window of exactly `span` frames (time kept, size 1).

        ``conv3d_cl`` runs it on channels-last frames (oneDNN's fast depthwise kernels) and
        returns the usual layout (user code downstream may `.view` it),
        ``fold2d`` folds the temporal taps into the channels of a 2D convolution,
        ``taps2d`` sums one 2D convolution per tap, ``matmul`` (1x1 spatial kernels) is one
        matrix product per group; all read the same weights.
        """
        if impl == "conv3d":
            return self.compute(x, weight, bias)
        if impl == "conv3d_cl":   # a layout inside the op only (an exported graph, traced, has none)
            if torch.jit.is_tracing():
                return self.compute(x, weight, bias)
            return self.compute(x.contiguous(memory_format=torch.channels_last_3d), weight, bias).contiguous()
        x, padding = self._pad_spatial(x)
        padding = padding[1:] if isinstance(padding, tuple) else 0
        stride, dilation = self.stride[1:], self.dilation[1:]
        taps = x if self.d == 1 else x[:, :, ::self.d]
        if impl == "matmul":   # a 1x1 spatial kernel is a matrix product over channels and taps, per group
            b, c, k = taps.shape[:3]
            g, out_c = self.groups, weight.shape[0]
            if b == 1 and g == 1 and bias is not None:
                out = torch.addmm(bias[:, None], weight.reshape(out_c, c * k), taps.reshape(c * k, -1))
            else:
                out = torch.matmul(weight.reshape(g, out_c // g, c // g * k), taps.reshape(b, g, c // g * k, -1))
                if bias is not None:
                    out = out + bias.reshape(g, out_c // g, 1)
            return out.reshape(b, out_c, 1, *taps.shape[3:])
        if impl == "fold2d":
            b, c, k = taps.shape[:3]
            folded = taps.reshape(b, c * k, *taps.shape[3:])
            w = weight.reshape(weight.shape[0], weight.shape[1] * k, *weight.shape[3:])
            return F.conv2d(folded, w, bias, stride, padding, dilation, self.groups).unsqueeze(2)
        out = F.conv2d(taps[:, :, 0], weight[:, :, 0], bias, stride, padding, dilation, self.groups)
        for i in range(1, self.k):
            out = out + F.conv2d(taps[:, :, i], weight[:, :, i], None, stride, padding, dilation, self.groups)
        return out.unsqueeze(2)


def _bind(names, defaults, args, kwargs) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _constant(value, name: str, node: fx.Node, whole: Optional[tuple] = None):
    """An op argument computed in the graph (a kernel read from the tensor's size) as the number it is on every
    recorded run. One that follows the clip length has no fixed continual meaning and is refused, except a
    pool's kernel and stride spanning the whole clip along time (`whole`: the time entry and the number of
    entries), which make it a global reduction."""
    if not any(isinstance(v, fx.Node) for v in tree_flatten(value)[0]):
        return value
    runs = [fx.node.map_arg(value, lambda a, r=r: a.meta["cofx_runs"][r]) for r in ("clip", "longer")]
    if runs[0] != runs[1] and not (whole is not None and _spans_time(runs, node, *whole)):
        raise ConversionError(f"its {name} is computed from the clip's length ({runs[0]} on the example clip, "
                              f"{runs[1]} on a longer one)", node=node,
                              fix="pool over time with x.mean(2) or x.amax(2) (a global reduction cofx streams "
                              "exactly) and over space with a fixed kernel")
    return runs[0]


def _spans_time(runs: list, node: fx.Node, t: int, nd: int) -> bool:
    """Whether a kernel that differs between the runs is, in each, the input's whole extent along time only."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, fx.Node) or not 0 <= t < nd:
        return False
    sizes = [_tuple(r, nd) if r is not None else None for r in runs]
    if None in sizes:
        return False
    recs = [x.meta["cofx_runs"].get(r) for r in ("clip", "longer")]
    if not all(hasattr(r, "shape") for r in recs):
        return False
    extents = [r.shape[t + 2] for r in recs]
    return all(s[t] == e for s, e in zip(sizes, extents)) and \
        [v for i, v in enumerate(sizes[0]) if i != t] == [v for i, v in enumerate(sizes[1]) if i != t]


def _pads(padding, kernel, dilation, nd, node) -> tuple:
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise ConversionError(f"unknown padding {padding!r}", node=node)
    return tuple((p, p) for p in _tuple(padding, nd))


def sliding_spec(node: fx.Node, gm: fx.GraphModule, t_axis: int):
    """(SlidingSpec, tensor args) if `node` is a conv/pool over a tensor whose time axis is `t_axis`, else None.

    The tensor args are what the op needs besides its input: the weight and bias,
    as fx values (get_attr targets for modules, the node's own args otherwise).
    """
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if stock(mod, TRANSPOSED_MODULES):
            family, nd = "conv_transpose", len(mod.kernel_size)
            cfg = _transposed_config(node, t_axis, nd, mod.kernel_size, mod.stride, mod.padding, mod.output_padding,
                                     mod.dilation, mod.groups)
            tensors = (f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None)
            return _spec(node, family, nd, t_axis, cfg, tensors)
        entry = next((v for k, v in _MODULES.items() if stock(mod, k)), None)
        if entry is None:
            return None
        family, nd = entry
        cfg = _module_config(mod, family, nd, node)
        tensors = (f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None) \
            if family == "conv" else ()
    elif node.op == "call_function" and node.target in _FUNCTIONAL:
        family, nd = _FUNCTIONAL[node.target]
        names, defaults = {"conv": (_CONV_ARGS, _CONV_DEFAULTS), "avg_pool": (_AVG_ARGS, _AVG_DEFAULTS),
                           "max_pool": (_MAX_ARGS, _MAX_DEFAULTS)}[family]
        b = _bind(names, defaults, node.args, node.kwargs)
        b = {k: (v if k in ("input", "weight", "bias") else
                 _constant(v, k, node, (t_axis - 2, nd) if k in ("kernel_size", "stride") else None))
             for k, v in b.items()}
        if family == "conv":
            w = b["weight"]
            wshape = w.meta["cofx_runs"]["clip"].shape if isinstance(w, fx.Node) else tuple(w.shape)
            kernel = tuple(wshape[2:])
            dilation = _tuple(b["dilation"], nd)
            cfg = dict(kernel=kernel, stride=_tuple(b["stride"], nd), dilation=dilation,
                       pads=_pads(b["padding"], kernel, dilation, nd, node), groups=int(b["groups"]))
            tensors = (b["weight"], b["bias"])
        else:
            kernel = _tuple(b["kernel_size"], nd)
            stride = _tuple(b["stride"] if b["stride"] not in (None, [], ()) else kernel, nd)
            cfg = dict(kernel=kernel, stride=stride, pads=_pads(b["padding"], kernel, (1,) * nd, nd, node),
                       dilation=_tuple(b.get("dilation", 1), nd), ceil_mode=bool(b["ceil_mode"]))
            if family == "avg_pool":
                cfg.update(count_include_pad=bool(b["count_include_pad"]), divisor_override=b["divisor_override"])
            elif b.get("return_indices") or node.target in {getattr(F, f"max_pool{i}d_with_indices") for i in (1, 2, 3)}:
                raise ConversionError("max pooling that returns indices along time", node=node,
                                      fix="use return_indices=False")
            tensors = ()
    elif node.op == "call_function" and node.target in TRANSPOSED_FUNCTIONS:
        b = _bind(("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
                  {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1},
                  node.args, node.kwargs)
        w = b["weight"]
        wshape = w.meta["cofx_runs"]["clip"].shape if isinstance(w, fx.Node) else tuple(w.shape)
        family, nd = "conv_transpose", len(wshape) - 2
        cfg = _transposed_config(node, t_axis, nd, tuple(wshape[2:]), *(_constant(b[k], k, node) for k in (
            "stride", "padding", "output_padding", "dilation", "groups")))
        return _spec(node, family, nd, t_axis, cfg, (b["weight"], b["bias"]))
    else:
        return None
    return _spec(node, family, nd, t_axis, cfg, tensors)


def _spec(node: fx.Node, family: str, nd: int, t_axis: int, cfg: Optional[dict], tensors: tuple):
    t = t_axis - 2
    if not 0 <= t < nd or cfg is None:
        return None
    spec = SlidingSpec(family=family, nd=nd, t=t, **cfg)
    if spec.padding_mode not in ("zeros", "replicate") and (spec.pad_l or spec.pad_r):
        raise ConversionError(f"padding_mode={spec.padding_mode!r} pads time with frames from the future",
                              node=node, fix="use padding_mode='zeros' or 'replicate', or no temporal padding")
    return spec, tensors


def _transposed_config(node: fx.Node, t_axis: int, nd: int, kernel, stride, padding, output_padding, dilation,
                       groups) -> Optional[dict]:
    """The configuration of a transposed convolution at temporal stride 1: in time the convolution of its kernel
    flipped, padded by d (k - 1) - p at both ends; refused where it upsamples time. None where time is not one of
    its dims (frames folded into the batch)."""
    t = t_axis - 2
    if not 0 <= t < nd:
        return None
    kernel, stride, dilation = _tuple(kernel, nd), _tuple(stride, nd), _tuple(dilation, nd)
    if isinstance(padding, str) or stride[t] != 1 or _tuple(output_padding, nd)[t] != 0 or \
            _tuple(padding, nd)[t] > dilation[t] * (kernel[t] - 1):
        raise ConversionError(TRANSPOSED, node=node, fix=TRANSPOSED_FIX)
    padding = _tuple(padding, nd)
    reach = dilation[t] * (kernel[t] - 1) - padding[t]
    return dict(kernel=kernel, stride=stride, dilation=dilation, groups=int(groups),
                pads=tuple((reach, reach) if i == t else (p, p) for i, p in enumerate(padding)),
                output_padding=_tuple(output_padding, nd))


def _module_config(mod, family, nd, node) -> dict:
    if family == "conv":
        kernel = _tuple(mod.kernel_size, nd)
        dilation = _tuple(mod.dilation, nd)
        return dict(kernel=kernel, stride=_tuple(mod.stride, nd), dilation=dilation,
                    pads=_pads(mod.padding, kernel, dilation, nd, node), groups=int(mod.groups),
                    padding_mode=mod.padding_mode)
    kernel = _tuple(mod.kernel_size, nd)
    stride = _tuple(mod.stride if mod.stride not in (None, [], ()) else kernel, nd)
    cfg = dict(kernel=kernel, stride=stride, pads=_pads(mod.padding, kernel, (1,) * nd, nd, node),
               ceil_mode=bool(mod.ceil_mode), dilation=(1,) * nd)
    if family == "avg_pool":
        cfg.update(count_include_pad=bool(mod.count_include_pad),
                   divisor_override=getattr(mod, "divisor_override", None))
    else:
        cfg["dilation"] = _tuple(mod.dilation, nd)
        if mod.return_indices:
            raise ConversionError("max pooling that returns indices along time", node=node,
                                  fix="use return_indices=False")
    return cfg


@dataclass(frozen=True)
class PadSpec:
    """Explicit padding (F.pad, nn.ConstantPadNd, nn.ZeroPadNd, nn.ReplicationPadNd) with time among its dims."""
    t_axis: int
    ndim: int
    pad: tuple             # F.pad's flat list, last dimension first
    mode: str
    value: float

    @property
    def _t_index(self) -> int:
        return 2 * (self.ndim - 1 - self.t_axis)

    @property
    def pad_l(self) -> int:
        i = self._t_index
        return self.pad[i] if i < len(self.pad) else 0

    @property
    def pad_r(self) -> int:
        i = self._t_index + 1
        return self.pad[i] if i < len(self.pad) else 0

    @property
    def pad_value(self) -> float:
        return self.value

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """Pads every dimension but time (time padding comes from the stream kernel)."""
        pad = list(self.pad)
        i = self._t_index
        if i + 1 < len(pad):
            pad[i] = pad[i + 1] = 0
        if not any(pad):
            return x
        if self.mode == "constant":
            return F.pad(x, pad, mode="constant", value=self.value)
        return F.pad(x, pad, mode=self.mode)


def _recorded(v, run: str):
    """The value an fx argument had in a recorded run (see passes.shape_runs)."""
    return v.meta["cofx_runs"].get(run) if isinstance(v, fx.Node) else v


_PAD_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.CircularPad1d, nn.CircularPad2d,
                nn.CircularPad3d)


def pad_spec(node: fx.Node, gm: fx.GraphModule, t_axis: int, ndim: int) -> Optional[PadSpec]:
    """A PadSpec if `node` pads a tensor whose time axis is `t_axis` along time, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not stock(mod, _PAD_MODULES):
            return None
        name = type(mod).__name__
        mode = "replicate" if "Replication" in name else "reflect" if "Reflection" in name else \
            "circular" if "Circular" in name else "constant"
        pad, value = tuple(int(p) for p in mod.padding), float(getattr(mod, "value", 0.0))
    elif node.op == "call_function" and node.target is F.pad:
        b = _bind(("input", "pad", "mode", "value"), {"mode": "constant", "value": None}, node.args, node.kwargs)
        pads = [b["pad"]] if isinstance(b["pad"], fx.Node) else b["pad"]   # (a list built in forward: one node)
        pad = tuple(int(p) for p in tree_flatten([_recorded(p, "clip") for p in pads])[0])
        if any(isinstance(p, fx.Node) and (p.meta.get("cofx_length") is not None or
                                           _recorded(p, "longer") != _recorded(p, "clip")) for p in pads):
            raise ConversionError("the padding depends on the clip length", node=node,
                                  fix="pad by a fixed number of frames")
        mode, value = b["mode"], float(b["value"] or 0.0)
    else:
        return None
    spec = PadSpec(t_axis=t_axis, pad=pad, mode=mode, value=value, ndim=ndim)
    if not (spec.pad_l or spec.pad_r):
        return None
    if spec.pad_l < 0 or spec.pad_r < 0:
        raise ConversionError("negative padding crops time", node=node, fix="crop with a slice instead")
    if mode not in ("constant", "replicate"):
        raise ConversionError(f"{mode} padding along time needs frames from the future", node=node,
                              fix="pad time with zeros, a constant or 'replicate'")
    return spec
