"""What a continual model computes, as one digest, so that a conversion validated once is not validated again.

`cofx.load` converts a saved model again. The continual model it builds is
a function of the code and values below; where its digest equals the one
recorded when the saved model was validated, the two step alike, and `load`
does not repeat the validation (a second of X3D-S's start-up; most of a
plain 3D CNN's). Everything the steps can depend on goes in:

- the code of cofx itself and the torch version, the CPU model and vector ISA
  (the timed choice of implementation, and its rounding, are the machine's);
- the code of the clip graph and of the step graphs;
- every module of the model, kernels included, field by field as far as its
  objects reach (configuration, weights and buffers by value, hooks), and
  the state the steps read beside them;
- the whole source file of every class or function from outside torch and
  cofx that these name (a leaf module's helper functions live beside it).

A model whose code cannot be read (defined interactively) has no digest, and
is always validated. The digest is taken on a clean state; runtime state
that differs (a stream stepped) only makes it differ, which costs a
validation, never a skipped one.

>>> import torch, cofx
>>> make = lambda: torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3, padding=1)).eval()
>>> model = make()
>>> one = cofx.convert(model, torch.randn(1, 2, 8), validate=False)
>>> two = cofx.convert(model, torch.zeros(1, 2, 8), validate=False)
>>> digest(one) == digest(two), digest(one) == digest(cofx.convert(make(), torch.zeros(1, 2, 8), validate=False))
(True, False)
"""
from __future__ import annotations

import functools
import hashlib
import re
import sys
import types
from operator import attrgetter
from pathlib import Path
from typing import Optional

import torch
import torch.fx as fx

from .machine import cpu

_OWN = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "passes")
_TORCH = Path(torch.__file__).resolve().parent
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PLAIN = (str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device, torch.memory_format,
          torch.Size, type(Ellipsis))
_SKIPPED_INFO = ("model", "validated")   # the clip model (walked as the modules), and the digest itself


class _Unreadable(Exception):
    """Code the digest cannot read: the model has no digest."""


def digest(co) -> Optional[str]:
    """The digest of continual model `co` (see the module docstring); None where some of its code cannot be read."""
    walk = _Walk()
    walk.text(_own_source(), str(torch.__version__), repr(cpu()))
    try:
        walk.text(co.code, *(graph.python_code("self").src for graph in
                             (co._step_graph, getattr(co._newest_module, "graph", None)) if graph is not None))
        walk.value({k: v for k, v in co._info.items() if k not in _SKIPPED_INFO})
        walk.value(co._ctx)
        walk.value({node.target: attrgetter(node.target)(co) for node in co.graph.find_nodes(op="get_attr")})
        for name, module in co.named_modules():
            if module is not co:   # the continual model's own fields are its runtime: read above where they count
                walk.text(name)
                walk.value(module)
    except _Unreadable:
        return None
    return walk.hash.hexdigest()


@functools.lru_cache(maxsize=None)
def _own_source() -> str:
    """cofx's code (the package and its passes), as one digest."""
    h = hashlib.sha256()
    for folder in _OWN:
        for path in sorted(folder.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


class _Walk:
    """A sha256 over values, reached depth first; an object met again is written as a reference to the first."""

    def __init__(self):
        self.hash = hashlib.sha256()
        self.seen: dict = {}   # id -> order of first meeting
        self.met: list = []     # what `seen` counts, held so that no id is reused while the walk runs
        self.files: set = set()

    def text(self, *parts: str) -> None:
        for part in parts:
            self.hash.update(part.encode())
            self.hash.update(b"\0")

    def value(self, obj) -> None:
        if isinstance(obj, _PLAIN):
            self.text(type(obj).__name__, repr(obj))
            return
        if id(obj) in self.seen:
            self.text("seen", str(self.seen[id(obj)]))
            return
        self.seen[id(obj)] = len(self.met)
        self.met.append(obj)
        if isinstance(obj, torch.Tensor):
            self._tensor(obj)
        elif isinstance(obj, (fx.GraphModule, fx.Graph)):
            graph = obj.graph if isinstance(obj, fx.GraphModule) else obj
            self.text("graph", graph.python_code("self").src)
        elif isinstance(obj, fx.Node):
            self.text("node", obj.name)
        elif isinstance(obj, dict):
            self.text("dict", str(len(obj)))
            for k, v in obj.items():
                self.value(k)
                self.value(v)
        elif isinstance(obj, (list, tuple)):
            self.text(type(obj).__name__, str(len(obj)))
            for v in obj:
                self.value(v)
        elif isinstance(obj, (set, frozenset)):
            self.text("set", *sorted(_ADDRESS.sub("", repr(v)) for v in obj))
        elif isinstance(obj, functools.partial):
            self.text("partial")
            self.value((obj.func, obj.args, obj.keywords))
        elif isinstance(obj, types.MethodType):
            self.value(obj.__func__)
            self.value(obj.__self__)
        elif isinstance(obj, types.FunctionType):   # its code, and the values it holds (defaults, closure)
            self._code(obj)
            cells = []
            for cell in obj.__closure__ or ():
                try:
                    cells.append(cell.cell_contents)
                except ValueError:   # a cell not filled yet
                    cells.append("<empty cell>")
            self.value((obj.__defaults__, obj.__kwdefaults__, cells))
        elif isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)) or \
                callable(obj) and type(obj).__module__.split(".")[0] == "torch" and \
                not isinstance(obj, torch.nn.Module):   # a class, a builtin, one of torch's operators
            self._code(obj)
        else:
            self._object(obj)

    def _tensor(self, t: torch.Tensor) -> None:
        self.text("tensor", repr((tuple(t.shape), t.dtype, t.device, t.requires_grad)))
        if t.device.type == "meta" or t.is_sparse or t.is_quantized:
            raise _Unreadable
        data = t.detach().cpu().contiguous().reshape(-1)
        self.hash.update(data.view(torch.uint8).numpy() if data.numel() else b"")

    def _object(self, obj) -> None:
        kind = type(obj)
        self._code(kind)
        fields = getattr(obj, "__dict__", None)
        slots = [s for c in kind.__mro__ for s in getattr(c, "__slots__", ()) if isinstance(s, str)]
        if fields is None and not slots:
            self.text(_ADDRESS.sub("", repr(obj)))
            return
        if isinstance(obj, torch.nn.Module):
            fields = {k: v for k, v in fields.items() if k != "_modules"}   # each child is walked on its own
        self.value(fields or {})
        for s in slots:
            self.text(s)
            self.value(getattr(obj, s, None))

    def _code(self, obj) -> None:
        """A function or class by its name, and by the whole file that defines it unless that is torch's or
        cofx's (a builtin has none)."""
        module = getattr(obj, "__module__", None) or type(obj).__module__
        self.text("code", str(module), str(getattr(obj, "__qualname__", type(obj).__qualname__)))
        for file in _source_files(obj, module):
            if file not in self.files:
                self.files.add(file)
                self.hash.update(Path(file).read_bytes())


def _source_files(obj, module: str) -> list:
    """The files that define `obj` (a class: its module's, and its methods' where they came from other files;
    those a dataclass writes have none), torch's, cofx's and builtins' left out; raises `_Unreadable` for code that
    has no file (defined at the prompt, or a function from a string passed to exec)."""
    if isinstance(obj, types.ModuleType):
        return [f for f in [_foreign(getattr(obj, "__file__", None))] if f]
    if isinstance(obj, types.FunctionType):
        return [f for f in [_foreign(_real(obj.__code__.co_filename))] if f]
    if not isinstance(obj, type) or module == "builtins" or module in sys.builtin_module_names:
        return []   # a builtin, or one of torch's operators (named)
    mod = sys.modules.get(module)
    files = [_foreign(_real(getattr(mod, "__file__", None)))]
    files += [_foreign(f.__code__.co_filename) for f in vars(obj).values()   # methods put there from elsewhere
              if isinstance(f, types.FunctionType) and Path(f.__code__.co_filename).is_file()]
    return sorted({f for f in files if f})


def _real(file: Optional[str]) -> str:
    if file is None or not Path(file).is_file():
        raise _Unreadable
    return file


@functools.lru_cache(maxsize=None)
def _foreign(file: Optional[str]) -> Optional[str]:
    """`file`, resolved, where it is Python code from outside torch and cofx (None otherwise)."""
    if file is None:
        return None
    path = Path(file).resolve()
    if path.suffix != ".py" or _TORCH in path.parents or any(own == path.parent for own in _OWN):
        return None
    return str(path)
