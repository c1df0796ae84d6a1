"""A view that stacks every k frames into one, written as the k strided crops it stacks.

Speech encoders cut their frame rate by stacking neighbouring frames,
``x.reshape(b, t // 4, 4 * f)`` (RNN-T's time reduction, LAS's pyramid), and
pools are written as ``h.view(b, c, t // 2, 2).amax(-1)``. Such a view splits
the time axis into (T/k, k), row-major, and merges the k into the dimensions
after it: frame j of the result holds frames jk ... jk + k - 1. That is
``torch.stack([x[.., i::k] for i in range(k)], t + 1)`` viewed the same way,
and strided crops stream exactly (frame j is ready once frame jk + k - 1 is
in). Recognised from the shape runs: the time axis is the one size that
changes between runs, the view keeps the dimensions in front of it and gives
the same k on every run. A crop to whole groups of k frames before it
(``x[:, :T - T % k]``) is dropped: the stacked crops leave an incomplete
group out on every length; a pad to whole groups becomes a pad of k - 1
frames (the last group, completed at the end of the stream). Runs after the
shape runs and asks for them again.

Example::

    >>> class Stack4(torch.nn.Module):
    ...     def forward(self, x):                       # (B, T, F)
    ...         b, t, f = x.shape
    ...         return x.reshape(b, t // 4, 4 * f)
    >>> gm = cofx.tracer.trace(Stack4())
    >>> _ = cofx.passes.record_runs(gm, cofx.api._runs(torch.randn(1, 8, 3), time_dim=1))
    >>> stacked_frames(gm)
    1
    >>> x = torch.randn(2, 12, 3)
    >>> torch.equal(gm(x), Stack4()(x))
    True
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from cofx.graph_rewrite import rewrite_nodes

from .diff_as_slices import along
from .shape_runs import Rec, run_shapes

_VIEWS = {("call_method", "view"), ("call_method", "reshape"), ("call_function", torch.reshape)}


def _stacked(node: fx.Node) -> Optional[tuple]:
    """(time axis of the input, k) where `node` views k consecutive frames as one, else None."""
    if (node.op, node.target) not in _VIEWS or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    ins, outs = run_shapes(node.args[0]), run_shapes(node)
    runs = [r for r in ("clip", "longer") if r in ins and r in outs]
    if len(runs) < 2:
        return None
    a, b = (ins[r] for r in runs)
    moved = [i for i in range(len(a)) if len(a) == len(b) and a[i] != b[i]]
    out_a, out_b = (outs[r] for r in runs)
    out_moved = [j for j in range(len(out_a)) if len(out_a) == len(out_b) and out_a[j] != out_b[j]]
    if len(moved) != 1 or len(out_moved) != 1:
        return None
    t, j = moved[0], out_moved[0]
    ks = {s[t] // o[j] for s, o in ((a, out_a), (b, out_b)) if o[j] and s[t] % o[j] == 0}
    if len(ks) != 1 or min(ks) < 2:
        return None
    k = min(ks)
    for s, o in ((a, out_a), (b, out_b)):
        if tuple(o[:j]) != tuple(s[:t]) or o[j] * k != s[t] or \
                math.prod(o[j + 1:]) != k * math.prod(s[t + 1:]):
            return None
    return t, k


def _size_read(node: fx.Node) -> bool:
    """``x.size(d)``, or ``x.shape`` or ``x.size()`` whose entries are only picked one by one
    (``b, t, f = x.shape``)."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
        return True
    whole = node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",) or \
        node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs
    return whole and all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                         for u in node.users)


def _one_other_user(node: fx.Node, user: fx.Node) -> bool:
    """Whether `user` is what reads `node`, besides reads of its sizes."""
    return [u for u in node.users if not _size_read(u)] == [user]


_LAYOUT_OPS = {("call_method", m) for m in ("transpose", "permute", "contiguous", "movedim")} | \
    {("call_function", f) for f in (torch.transpose, torch.permute, torch.movedim)}


def _start_crop(x: fx.Node) -> Optional[int]:
    """The dimension `x` crops at its end alone (``h[:, :n]``, ``h.narrow(1, 0, n)``), else None."""
    if not (x.op in ("call_function", "call_method") and x.args and isinstance(x.args[0], fx.Node)):
        return None
    ins, outs = run_shapes(x.args[0]), run_shapes(x)
    if not ins or set(ins) != set(outs) or any(len(ins[r]) != len(outs[r]) for r in ins):
        return None
    ndim = len(ins["clip"])
    if x.op == "call_function" and x.target is operator.getitem:
        index = x.args[1] if isinstance(x.args[1], tuple) else (x.args[1],)
        cut = [i for i, e in enumerate(index) if e != slice(None)]
        if Ellipsis in index or len(cut) != 1 or not isinstance(index[cut[0]], slice) or \
                index[cut[0]].start not in (None, 0) or index[cut[0]].step not in (None, 1):
            return None
        t = cut[0]
    elif x.target in ("narrow", torch.narrow) and len(x.args) == 4 and not x.kwargs and \
            isinstance(x.args[1], int) and x.args[2] == 0:
        t = x.args[1] % ndim
    else:
        return None
    same = all(a == b for r in ins for i, (a, b) in enumerate(zip(ins[r], outs[r])) if i != t)
    return t if same else None


def _whole_groups(x: fx.Node, k: int, view: fx.Node) -> Optional[tuple]:
    """(what the stacked frames read, the crop they need no longer, its time axis, what its sizes are read
    off) where `x`, or the permutes and transposes it comes through, only crops its input to whole groups of k
    frames (``h[:, :T - T % k]``, torchaudio's RNN-T time reduction): stacked frames drop an incomplete group
    anyway, on every length. Besides, the crop may only have its sizes read (``b, t, f = x.shape``)."""
    chain, crop = [], x
    while (crop.op, crop.target) in _LAYOUT_OPS and isinstance(crop.args[0], fx.Node) and len(crop.users) == 1:
        chain.append(crop)
        crop = crop.args[0]
    t = _start_crop(crop)
    if t is None or not _one_other_user(crop, chain[-1] if chain else view):
        return None
    ins, outs = run_shapes(crop.args[0]), run_shapes(crop)
    if any(outs[r][t] != ins[r][t] - ins[r][t] % k for r in ins):
        return None
    if not chain:
        return crop.args[0], crop, t, crop.args[0]
    chain[-1].args = (crop.args[0], *chain[-1].args[1:])   # the permutes take the frames uncut
    return x, crop, t, crop.args[0]


def _padded_to_groups(graph: fx.Graph, x: fx.Node, t: int, k: int, view: fx.Node) -> Optional[tuple]:
    """Where `x` pads the end of its input with a constant to whole groups of k frames, by an amount computed
    from the length (NeMo's stacking subsampling: ``F.pad(x, (0, 0, 0, (k - T % k) % k))``), the same input
    padded by k - 1 frames, as `_whole_groups` gives it: stacked frames leave out what is past the last whole
    group, on every length (the padded length is the longer one's, cut to whole groups)."""
    if not (x.op == "call_function" and x.target is F.pad and isinstance(x.args[0], fx.Node)) or \
            not _one_other_user(x, view):
        return None
    bound = dict(zip(("input", "pad", "mode", "value"), x.args), **x.kwargs)
    pad, ins, outs = bound.get("pad"), run_shapes(x.args[0]), run_shapes(x)
    if bound.get("mode", "constant") != "constant" or not isinstance(pad, (tuple, list)) or not ins or \
            set(ins) != set(outs):
        return None
    at = 2 * (len(next(iter(ins.values()))) - 1 - t) + 1   # the entry that pads the end of time
    if at >= len(pad) or any(p != 0 for i, p in enumerate(pad) if i != at) or \
            any(outs[r][t] % k or not 0 <= outs[r][t] - ins[r][t] < k for r in ins):
        return None
    fixed = [0] * len(pad)
    fixed[at] = k - 1
    with graph.inserting_after(x):
        longer = graph.call_function(F.pad, (x.args[0], tuple(fixed)),
                                     {"mode": "constant", "value": bound.get("value")})
    return longer, x, t, longer


def _cut_sizes(graph: fx.Graph, node: fx.Node, t: int, k: int, source: fx.Node) -> None:
    """Every size read of `node` (dropped), read off `source` instead, its length cut to whole groups of k."""
    ndim = len(run_shapes(node)["clip"])
    for read in [u for u in node.users if _size_read(u)]:
        read.args = (source, *read.args[1:])
        entries = [read] if read.op == "call_method" and len(read.args) == 2 else list(read.users)   # x.size(d)
        for entry in [e for e in entries if e.args[1] % ndim == t]:
            with graph.inserting_after(entry):
                rest = graph.call_function(operator.mod, (entry, k))
            with graph.inserting_after(rest):
                cut = graph.call_function(operator.sub, (entry, rest))
            entry.replace_all_uses_with(cut, delete_user_cb=lambda user: user not in (rest, cut))


def _as_crops(graph: fx.Graph, node: fx.Node, dropped: list) -> Optional[fx.Node]:
    found = _stacked(node)
    if found is None:
        return None
    t, k = found
    x = node.args[0]
    found = _whole_groups(x, k, node) or _padded_to_groups(graph, x, t, k, node)
    if found is not None:
        x, cut_node, t_cut, source = found
        _cut_sizes(graph, cut_node, t_cut, k, source)
        dropped.append(cut_node)
    taps = [graph.call_function(operator.getitem, (x, along(t, slice(i, -(k - 1 - i) or None, k))))
            for i in range(k)]
    stacked = graph.call_function(torch.stack, (taps,), {"dim": t + 1})
    sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
    return graph.call_method("reshape", (stacked, *sizes), dict(node.kwargs))


def stacked_frames(gm: fx.GraphModule) -> int:
    """Rewrite every view of `gm` that stacks frames as stacked strided crops; returns how many were."""
    dropped: list = []
    count = rewrite_nodes(gm, [n for n in gm.graph.nodes if _stacked(n) is not None],
                          lambda graph, node: _as_crops(graph, node, dropped))
    erased = set()
    while dropped:   # the crops to whole groups, then the arithmetic only they read
        node = dropped.pop()
        if node in erased or node.users or node.op not in ("call_function", "call_method"):
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        erased.add(node)
        dropped += [a for a in inputs if not isinstance(a.meta.get("cofx_runs", {}).get("clip"), Rec)]
    gm.recompile()
    return count
