"""`co.report`: one row per node of the original graph, printable as a table."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch.fx as fx

from .sliding_ops import PadSpec, SlidingSpec


@dataclass
class Row:
    name: str
    op: str
    kind: str
    kernel: Optional[int]
    stride: Optional[int]
    padding: Optional[tuple]
    dilation: Optional[int]
    receptive_field: Optional[int]
    delay: Optional[int]
    state_bytes: int
    exact: bool
    note: str = ""


def op_label(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def temporal_params(spec) -> tuple:
    """(kernel, stride, padding, dilation, note) of a node's temporal op, as the report shows them."""
    if isinstance(spec, SlidingSpec):
        return spec.k, spec.s, (spec.pad_l, spec.pad_r), spec.d, ""
    if isinstance(spec, PadSpec):
        return 1, 1, (spec.pad_l, spec.pad_r), 1, f"{spec.mode} padding"
    name = type(spec).__name__
    if name == "CropSpec":
        return None, spec.step, None, None, f"crop {spec.start} at start, {spec.end} at end"
    if name == "ReductionSpec":
        how = "causal window" if spec.causal else "sliding window"
        note = f"{how} of {spec.window} frames ({spec.mode})"
        if spec.window != spec.clip_window:
            note += f", clip length here is {spec.clip_window}"
        return spec.window, 1, None, None, note
    return None, None, None, None, ""


class Report(list):
    """Rows of `Row`; `str(report)` is a table, `report.to_dicts()` is for JSON."""

    COLUMNS = ("name", "op", "kind", "kernel", "stride", "padding", "dilation", "receptive_field", "delay",
               "state_bytes", "exact", "note")
    HEAD = ("node", "op", "kind", "k", "s", "pad", "dil", "rf", "delay", "state B", "exact", "note")

    def to_dicts(self) -> list:
        return [asdict(r) for r in self]

    @property
    def windowed(self) -> list:
        return [r for r in self if r.kind == "windowed"]

    def __str__(self) -> str:
        def cell(v):
            if v is None:
                return "-"
            if isinstance(v, bool):
                return "yes" if v else "NO"
            if isinstance(v, tuple):
                return ",".join(str(x) for x in v)
            return str(v)
        rows = [[cell(getattr(r, c)) for c in self.COLUMNS] for r in self]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(self.HEAD)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*self.HEAD), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row).rstrip() for row in rows]
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(str(self))
