"""The one-screen summary of a continual model: is it exact, when does it answer, what does it cost."""
from __future__ import annotations

from .dtype_device import dtype_device
from .flops import clip_flops, step_flops


def summary(co) -> dict:
    """Facts a user decides on: exactness, receptive field, delay, stride, FLOPs per step and clip, state bytes."""
    windowed = [f"{r.name}: {r.note}" for r in co.report if r.kind == "windowed"]
    return {
        "exact": co.is_exact,
        "windowed": windowed,
        "init": co.options["init"],
        "clip_shape": list(co.clip_shape),
        "dtype": str(dtype_device(co)[0]).removeprefix("torch."),
        "receptive_field": co.receptive_field,
        "delay": co.delay,
        "stride": co.stride,
        "flops_per_step": step_flops(co),
        "flops_per_clip": clip_flops(co),
        "state_bytes": sum(r.state_bytes for r in co.report),
    }


def format_summary(s: dict) -> str:
    """`summary(co)` as aligned lines for a terminal."""
    if s["exact"]:
        mode = "exact: every output equals the clip model's"
    elif s["windowed"]:
        mode = (f"windowed (not exact): {len(s['windowed'])} reduction(s) over causal windows "
                f"({'; '.join(s['windowed'][:3])}{'; ...' if len(s['windowed']) > 3 else ''})")
    else:
        mode = f"not exact: init={s['init']} changes the first outputs of a stream"
    per_output = s["flops_per_step"] * s["stride"]
    ratio = s["flops_per_clip"] / per_output if per_output else float("inf")
    rows = [
        ("conversion", mode),
        ("input clip", " x ".join(map(str, s["clip_shape"])) + f" ({s['dtype']})"),
        ("receptive field", f"{s['receptive_field']} frames"),
        ("delay", f"{s['delay']} frames (the first output comes with frame {s['delay'] + 1})"),
        ("stride", f"{s['stride']} input frame(s) per output"),
        ("FLOPs per step", human(s["flops_per_step"]) + (f" ({human(per_output)} per output)" if s["stride"] > 1
                                                          else "")),
        ("FLOPs per clip", f"{human(s['flops_per_clip'])} (re-running the clip model per output costs "
                           f"{ratio:.1f}x the continual model)"),
        ("state memory", f"{human_bytes(s['state_bytes'])} per stream"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def human(n: float) -> str:
    """1234567 -> '1.23 M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g}"


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
