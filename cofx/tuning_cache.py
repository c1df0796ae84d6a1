"""Kernel choices kept on disk, so that a model converted again on the same machine is not timed again.

One JSON file per op, named by a hash of its key. The key holds what decides which
implementation is fastest (the op, its shapes and dtype, the thread count, torch's version,
the CPU model and vector ISA) and is stored whole in the file: an entry whose format, key or
choice does not match what is asked is treated as missing and measured again. Entries are
written under a temporary name and renamed, so two processes converting at once each leave a
whole file.

The folder is ``$COFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/cofx``, else ``~/.cache/cofx``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import machine

FORMAT = 1
_warned = set()   # folders already reported unwritable in this process


def folder() -> Path:
    """The cache folder named by the environment."""
    named = os.environ.get("COFX_CACHE_DIR")
    if named:
        return Path(named).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "cofx"


def key(op: dict, threads: int) -> str:
    """The key of `op` (what it computes, on which shapes and dtype) run at `threads` on this machine."""
    name, isa = machine.cpu()
    return json.dumps({"op": op, "threads": threads, "torch": torch.__version__, "cpu": name, "isa": isa,
                       "aten_isa": torch.backends.cpu.get_cpu_capability()}, sort_keys=True)


def _path(key: str) -> Path:
    return folder() / "tuning" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def lookup(key: str, offered) -> Optional[str]:
    """The stored choice for `key` if its entry is readable, of this format, of this key and one of `offered`."""
    try:
        entry = json.loads(_path(key).read_text())
    except (OSError, ValueError):   # missing, unreadable, not text or not JSON
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or \
            json.dumps(entry.get("key"), sort_keys=True) != key or entry.get("impl") not in offered:
        return None
    return entry["impl"]


def store(key: str, impl: str) -> None:
    """Record `impl` for `key`; a folder that cannot be written warns once and leaves tuning uncached."""
    path, tmp = _path(key), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "key": json.loads(key), "impl": impl}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if path.parent not in _warned:
            _warned.add(path.parent)
            warnings.warn(f"cofx cannot write its tuning cache in {path.parent} ({error}); every convert times "
                          f"its kernels again. Set COFX_CACHE_DIR to a writable folder.")
