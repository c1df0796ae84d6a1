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
  cofx that these name.

A model with code that runs beside the graph (a module kept whole, a wrapped
function, a hook of the user's or of the process) has no digest, and is always
validated: such code can read anything when it runs (a helper in another file,
a global, the environment). So has a model with a field the walk cannot read.
The digest is taken on a clean state; runtime state that differs (a stream
stepped) only makes it differ, which costs a validation, never a skipped one.

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
_SKIPPED_INFO = ("model", "validated", "example_range")   # the clip model (walked as the modules), the digest
#                                                             itself, and the example's values (a load's are others)


class _Unreadable(Exception):
    """Code the digest cannot read: the model has no digest."""


def digest(co) -> Optional[str]:
    """The digest of continual model `co` (see the module docstring); None where some of its code cannot be read
    or runs beside the graph (then every load validates)."""
    if not _all_code_traced(co):
        return None
    try:
        return _digest(co)
    except (_Unreadable, RecursionError, Exception):   # a field the walk cannot read: no digest, a validation
        return None


_LIBRARIES = {"torch", "cofx", "operator", "_operator", "builtins", "math"}


def _library(fn) -> bool:
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return str(module).split(".")[0] in _LIBRARIES


def _all_code_traced(co) -> bool:
    """Whether what the model runs is the graph and torch's own layers: code kept whole (a leaf module, a wrapped
    function) or run around the graph (hooks, the process's global module hooks) can read anything at run time
    (another file, a global, the environment), which no digest follows."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    for node in co.graph.nodes:
        if node.op == "call_module" and not type(co.get_submodule(node.target)).__module__.startswith("torch."):
            return False
        if node.op == "call_function" and not _library(node.target):
            return False
    return all(_library(hook) for m in co.modules() for hook in (*m._forward_hooks.values(),
                                                                   *m._forward_pre_hooks.values()))


def _digest(co) -> str:
    walk = _Walk()
    walk.text(_own_source(), str(torch.__version__), repr(cpu()))
    walk.text(co.code, *(graph.python_code("self").src for graph in
                         (co._step_graph, getattr(co._newest_module, "graph", None)) if graph is not None))
    walk.value({k: v for k, v in co._info.items() if k not in _SKIPPED_INFO})
    walk.value(co._ctx)
    walk.value({node.target: attrgetter(node.target)(co) for node in co.graph.find_nodes(op="get_attr")})
    for name, module in co.named_modules():
        if module is not co:   # the continual model's own fields are its runtime: read above where they count
            walk.text(name)
            walk.value(module)
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
        elif type(obj).__module__ == "numpy" and hasattr(obj, "tobytes"):   # an array or a numpy scalar
            self.text("numpy", repr((getattr(obj, "shape", ()), str(getattr(obj, "dtype", "")))))
            self.hash.update(obj.tobytes())
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
        elif isinstance(obj, types.BuiltinMethodType) and not isinstance(obj.__self__, (type, types.ModuleType)):
            self._code(obj)   # a method of an object (a tensor's .mul): the object too
            self.value(obj.__self__)
        elif isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)) or \
                callable(obj) and type(obj).__module__.split(".")[0] == "torch" and \
                not isinstance(obj, torch.nn.Module):   # a class, a builtin, one of torch's operators
            self._code(obj)
        else:
            self._object(obj)

    def _tensor(self, t: torch.Tensor) -> None:
        self.text("tensor", repr((tuple(t.shape), t.dtype, t.device)))
        if t.device.type == "meta" or t.is_sparse or t.is_quantized:
            raise _Unreadable
        data = t.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        self.hash.update(data.view(torch.uint8).numpy() if data.numel() else b"")

    def _object(self, obj) -> None:
        kind = type(obj)
        self._code(kind)
        fields = getattr(obj, "__dict__", None)
        slots = [s for c in kind.__mro__ for s in _slots(c)]
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


def _slots(cls) -> list:
    """The attribute names a class's ``__slots__`` declares (one string is one name), mangled as Python stores
    a private one."""
    names = cls.__dict__.get("__slots__", ())
    names = [names] if isinstance(names, str) else list(names)
    return [f"_{cls.__name__.lstrip('_')}{n}" if n.startswith("__") and not n.endswith("__") else n for n in names
            if n not in ("__dict__", "__weakref__")]


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
