"""Compiled steps as files: AOTInductor packages, what each computes, and the machine it was built for.

A package (`torch._inductor.aoti_compile_and_package`) is a shared library that
inductor builds with ``-march=native`` against one torch build, with the weights
baked in: it runs right only on that torch, on a CPU with that instruction set,
and for the program it was compiled from. `cofx.save` therefore keeps, with each
phase's package (its bytes), the machine it was built on (`built_for`) and the
program's fingerprint (`fingerprint`); `cofx.load` runs a package only on a
machine of the same description, and only for a phase whose recording on the
loaded model has the same fingerprint (see `CompiledSteps.from_file`).
"""
from __future__ import annotations

import hashlib
import operator
from typing import Callable, Optional

import torch

from .machine import cpu


def built_for(devices) -> dict:
    """What a package's library depends on: the torch build, the CPU it was compiled for (model and widest
    vector ISA) and each GPU among `devices` (name and compute capability)."""
    name, isa = cpu()
    machine = {"torch": str(torch.__version__), "cpu": f"{name} ({isa})"}
    for device in sorted({str(d) for d in devices if torch.device(d).type == "cuda"}):
        machine[device] = (f"{torch.cuda.get_device_name(device)} (sm "
                           f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
                           if torch.cuda.is_available() else "no CUDA device")
    return machine


def fingerprint(graph: torch.fx.GraphModule, args: tuple) -> str:
    """What a recorded program computes: its code, the layouts of its inputs, and every constant it bakes (the
    weights and BatchNorm folds), so a package runs only for the program and weights it was compiled from."""
    digest = hashlib.sha256(graph.code.encode())
    digest.update(repr([(tuple(a.shape), a.stride(), a.dtype, a.device) for a in args]).encode())
    for node in graph.graph.find_nodes(op="get_attr"):
        value = operator.attrgetter(node.target)(graph)
        digest.update(f"{node.target}: {_layout(value)}".encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


def _layout(value) -> str:
    if isinstance(value, torch.Tensor):
        return repr((tuple(value.shape), value.stride(), value.dtype, value.device))
    return repr(value)


def compile_package(graph: torch.fx.GraphModule, args: tuple, options: Optional[dict], path: str) -> Callable:
    """Compile `graph` with AOTInductor into the package file `path` (a ``.pt2``) and load it."""
    torch._inductor.aoti_compile_and_package(torch.export.export(graph, args), package_path=path,
                                             inductor_configs=options)
    return load_package(path)


def load_package(path: str) -> Callable:
    """The library of the package at `path`, called with no guards or wrappers (the caller lays the inputs out).

    The loaded package's own call parses its input and output specs and flattens
    its arguments at every call (~50-100 us for X3D-S's ~140 inputs); the step's
    inputs and outputs are flat already, so the library's boxed call is used. The
    library is loaded by AOTInductor's loader itself: `aoti_load_package` also
    deserializes the exported program and compares the CPU's vector ISA, which
    inductor finds by compiling test programs (seconds on a cold inductor cache);
    `built_for` was compared when the file was loaded.
    """
    boxed = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1).boxed_run
    return lambda *inputs: boxed(list(inputs))
