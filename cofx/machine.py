"""Which CPU this process runs on: kernel timings and their rankings hold for one CPU, not for another.

Read by the tuning cache (its key) and by the benchmarks (the line beside every table).
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def cpu() -> tuple:
    """(CPU model name, widest vector ISA: "AVX-512", "AVX2" or "no AVX2") from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return name, isa


def describe() -> str:
    """CPU model, vector ISA, thread count and torch version, as one line."""
    name, isa = cpu()
    return f"{name} ({isa}), {torch.get_num_threads()} threads, torch {torch.__version__}"
