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
    checked: str = "rule"   # "examples": a leaf whose code cofx cannot see, checked only on example inputs
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
        note = f"crop {spec.start} at start, {spec.end} at end"
        if spec.folded:
            note += f" ({spec.folded} more, computed from the end padding before it, are not computed)"
        return None, spec.step, None, None, note
    if name == "ReductionSpec":
        how = "causal window" if spec.causal else "sliding window"
        note = f"{how} of {spec.window} frames ({spec.mode})"
        if spec.window != spec.clip_window:
            note += f", clip length here is {spec.clip_window}"
        return spec.window, 1, None, None, note
    if name == "WindowSpec":
        return spec.window, 1, None, None, f"{spec.what}: a window of the last {spec.window} frames, run each step"
    return None, None, None, None, ""


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v)
    return str(v)


class Report(list):
    """Rows of `Row`; `str(report)` is a table, `report.to_dicts()` is for JSON."""

    COLUMNS = ("name", "op", "kind", "kernel", "stride", "padding", "dilation", "receptive_field", "delay",
               "state_bytes", "exact", "checked", "note")
    HEAD = ("node", "op", "kind", "k", "s", "pad", "dil", "rf", "delay", "state B", "exact", "checked", "note")

    def to_dicts(self) -> list:
        return [asdict(r) for r in self]

    @property
    def windowed(self) -> list:
        return [r for r in self if r.kind == "windowed"]

    @property
    def checked_on_examples(self) -> list:
        """Rows of leaves: modules whose code cofx cannot see, so that only the frame-by-frame check on the
        example and `convert`'s validation on random inputs vouch for them."""
        return [r for r in self if r.checked == "examples"]

    def table(self, extra: dict = None) -> str:
        """The rows as an aligned text table; `extra` maps a column title to {node name: text}, shown
        before the note (the command line adds FLOPs per step this way)."""
        extra = extra or {}
        head = list(self.HEAD[:-1]) + list(extra) + [self.HEAD[-1]]
        rows = [[_cell(getattr(r, c)) for c in self.COLUMNS[:-1]] + [str(col.get(r.name, "-")) for col in
                extra.values()] + [_cell(r.note)] for r in self]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row).rstrip() for row in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(str(self))
