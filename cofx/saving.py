"""`cofx.save` / `cofx.load`: a continual model in a file, loaded back ready to step.

A continual model is its clip model plus how it was converted, so the file
holds exactly that, and `load` converts again (the same graph, the same
weights, the same delay). Nothing a file names runs unless the caller trusts
the file or names the code themselves, since a crafted file could name any
callable (``builtins:exit`` would end the process with status 0):

- with ``source="package.module:callable"`` the file holds only tensors and
  plain facts, read with ``torch.load(weights_only=True)``; the model is
  rebuilt by calling installed code, as ``cofx convert`` does for an import
  spec. `load` imports and calls the import spec and leaf-module types the
  file names only with ``trust=True``; ``source=`` and ``leaf_modules=`` give
  them instead. Models whose graph cannot be pickled (X3D keeps lambdas) can
  only be saved this way.
- without it the file holds the pickled model as it was converted (or, where
  that does not pickle, its traced graph, ``co.clip_model()``), and unpickling
  that runs code from the file, like ``torch.load(weights_only=False)``: `load`
  refuses it unless ``trust=True``. Converted again, the model gives the same
  kernels (a state taken before saving resumes on the loaded model).

A model whose steps were compiled (``co.compile_steps()``) keeps them: the file
holds each phase's AOTInductor package inline, as bytes, with the machine it was
built for and the fingerprint of the program it compiles
(`cofx.compiled_package`). A package is a shared library, executable code, so
`load` writes and loads one only with ``trust=True`` (otherwise the model loads
with eager steps and a notice), and only on a machine of the same description;
see `load`.
"""
from __future__ import annotations

import importlib
import io
import math
import os
import pickle
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .compiled_package import built_for
from .dtype_device import dtype_device
from .errors import first_line
from .model_source import from_spec

FORMAT = "cofx.continual"
VERSION = 2   # 2 adds compiled steps; a file without them is written as version 1, which any cofx reads
FACTS = ("delay", "receptive_field", "stride", "exact")
IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")   # package.module:qualname, nothing else


def functional(name: str):
    """`torch.nn.functional.<name>`: how a saved graph names the functions torch builds at import (the max pools
    ``F.max_pool2d``, ``F.adaptive_max_pool1d``: local functions, which pickle cannot name)."""
    return getattr(F, name)


_LOCAL_FUNCTIONALS = {id(f): name for name, f in vars(F).items()
                      if callable(f) and "<locals>" in getattr(f, "__qualname__", "")}


class _FunctionalsByName:
    """A pickle module whose pickler writes torch's local functionals by their name in torch.nn.functional."""

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            name = _LOCAL_FUNCTIONALS.get(id(obj))
            if name is not None and getattr(F, name, None) is obj:
                return functional, (name,)
            return NotImplemented


def save(co, path, *, source: str = None) -> None:
    """Write continual model `co` to `path` so that `cofx.load(path)` returns it ready to step.

    Args:
        co: a `ContinualModule` from `cofx.convert`.
        path: the file to write (``model.continual.pt`` by convention).
        source: import spec ``package.module:callable`` that builds the clip model
            (called with ``pretrained=False`` when it takes that). Makes the file
            safe to load (weights_only); see the module docstring.

    The compiled steps of ``co.compile_steps()`` are kept: the phases compiled so
    far, one AOTInductor package each (each about the size of the weights, which
    it bakes in).
    """
    from .module import ContinualModule
    if not isinstance(co, ContinualModule):
        raise TypeError(f"cofx.save takes a converted model (cofx.convert(...)), got {type(co).__name__}")
    record = {"format": FORMAT, "version": 1, "meta": _facts(co), "source": source}
    compiled = co._compiled.to_record() if co._compiled is not None else None
    if compiled is not None:
        record.update(version=VERSION, compiled=compiled)
    if source is not None:
        _check_architecture(from_spec(source), co.state_dict(), source, "the model that was converted")
        record["options"] = _plain_options(co.options)
        record["state_dict"] = co.state_dict()
    else:
        # the model as it was converted (converted again, it gives the same kernels, names and digest), else, where
        # that does not pickle (a closure among its attributes), the traced graph of it
        tried = [lambda: co._info["model"], co.clip_model] if "model" in co._info else [co.clip_model]
        for i, make in enumerate(tried):
            clip, buf = make(), io.BytesIO()
            try:
                torch.save({"model": clip, "options": co.options}, buf, pickle_module=_FunctionalsByName)
                break
            except (pickle.PicklingError, AttributeError, TypeError, RuntimeError) as e:   # lambdas, local classes,
                if i + 1 == len(tried):                                                       # parametrizations
                    raise ValueError(f"this model cannot be pickled ({first_line(e)}); save it with "
                                     "source='package.module:callable' naming the code that builds it") from None
        local = sorted({type(m).__qualname__ for m in clip.modules() if type(m).__module__ == "__main__"} |
                       {leaf.__qualname__ for leaf in co.options["leaf_modules"]
                        if isinstance(leaf, type) and leaf.__module__ == "__main__"})
        if local:   # pickled by name: another process has no such names
            warnings.warn(f"cofx.save: the model uses module types defined in the script that runs "
                          f"({', '.join(local)}); the file holds them by name, so only a process that defines them "
                          "can load it: define them in an importable module, or save with "
                          "source='package.module:callable'", stacklevel=2)
        record["graph"] = buf.getvalue()
    torch.save(record, path)


def info(path) -> dict:
    """What a cofx file says about itself, read with weights_only and importing nothing.

    ``needs_trust`` is True when the file holds a pickled graph (only ``trust=True``
    loads it); otherwise ``source`` and ``leaf_types`` are the code `load` imports,
    which needs ``trust=True`` or the caller's ``source=`` and ``leaf_modules=``.
    """
    record = _read(path)
    compiled = record.get("compiled")
    if compiled is not None:
        compiled = {"built_for": dict(compiled["built_for"]),
                    "programs": [{k: v for k, v in p.items() if k != "package"} for p in compiled["programs"]]}
    return {"meta": dict(record["meta"]), "source": record["source"], "leaf_types": _leaf_types(record),
            "needs_trust": "graph" in record, "compiled": compiled}


def is_continual_file(path) -> bool:
    """True when `path` is a file written by `cofx.save`."""
    try:
        _read(path)
        return True
    except ValueError:
        return False


def load(path, *, trust: bool = False, source: str = None, leaf_modules=None):
    """Load a continual model written by `cofx.save`: converted again, in eval mode, with a clean state.

    Args:
        path: the file.
        trust: let the file name the code that runs: unpickle the model of a
            file saved without ``source=``, or import and call the import spec and
            leaf-module types of a file saved with it. Only for files you made or trust.
        source: the import spec that builds the clip model (as given to `cofx.save`),
            used instead of the one the file names; loads a file saved with
            ``source=`` without trusting it.
        leaf_modules: the leaf modules the model was converted with, used instead
            of the types the file names (needed with ``source=`` when it names any).

    Compiled steps the file keeps run, without compiling, from the first
    steady-state step, with ``trust=True`` on a machine that matches the one they
    were built on (torch version, CPU model and vector ISA, GPU): each phase is
    recorded when a stream first reaches it, and its package runs only if that
    recording has the package's fingerprint (the same program and weights) and
    was saved for its batch, dtype and device. Anywhere else steps run eagerly,
    with a one-line notice (a `UserWarning`) saying why; ``co.compile_steps()``
    compiles them for this machine.
    """
    from .api import convert, validate_converted   # the whole compiler: cofx.saving stays light to import
    from .conversion_digest import digest
    record = _read(path)
    meta = record["meta"]
    dtype = getattr(torch, meta["dtype"])   # (a floating dtype: `_read` checked the record's form)
    if "graph" in record:
        if not trust:
            raise ValueError(f"'{path}' holds the model's pickled graph (it was saved without source=), and "
                             "unpickling it runs code from the file; load it only if you trust it: "
                             f"cofx.load({str(path)!r}, trust=True) (on the command line: --trust)")
        try:
            saved = torch.load(io.BytesIO(record["graph"]), map_location="cpu", weights_only=False)
        except (AttributeError, ImportError) as e:   # a class the graph names that this process cannot import
            raise ValueError(f"'{path}' holds a model whose code this process cannot import ({e}); load it where "
                             "that code is defined (the script that saved it, or with its module on PYTHONPATH)"
                             ) from None
        model, options = saved["model"], saved["options"]
    else:
        _check_named(path, record, trust, source, leaf_modules)
        spec = source or record["source"]
        model = from_spec(spec).to(dtype)
        _check_architecture(model, record["state_dict"], spec, f"the model saved in '{path}'")
        model.load_state_dict(record["state_dict"], strict=True)
        options = _live_options(record["options"], leaf_modules)
    clip = _example(meta, dtype)
    co = convert(model.eval(), clip, **options, validate=False).eval()
    if meta.get("validated") is None or digest(co) != meta["validated"]:
        validate_converted(co, model, clip)   # not the model the file's conversion validated: validated here
    else:
        co._info["validated"] = meta["validated"]
    changed = [f"{k} {meta[k]} -> {getattr(co, 'is_exact' if k == 'exact' else k)}" for k in FACTS
               if meta[k] != getattr(co, "is_exact" if k == "exact" else k)]
    if changed:
        warnings.warn(f"'{path}' was written by cofx {meta['cofx']}; this cofx converts it differently "
                      f"({', '.join(changed)}); the outputs still equal the clip model's", stacklevel=2)
    if "compiled" in record:
        _load_compiled(co, record["compiled"], path, trust)
    return co


def _load_compiled(co, compiled: dict, path, trust: bool) -> None:
    """Give `co` the compiled steps the file keeps where they may run (trusted) and can (this machine), or say
    why its steps run eagerly."""
    from .compiled_step import CompiledSteps
    if not trust:
        warnings.warn(f"'{path}' keeps compiled steps, which are executable code, and was loaded without them "
                      f"(steps run eagerly): cofx.load({str(path)!r}, trust=True) runs them if you trust the file, "
                      "co.compile_steps() compiles them here", stacklevel=3)
        return
    here = built_for(p["device"] for p in compiled["programs"])
    differ = [f"{k} {compiled['built_for'].get(k)!r}, here {here.get(k)!r}"
              for k in sorted(here.keys() | compiled["built_for"].keys())
              if compiled["built_for"].get(k) != here.get(k)]
    if differ:
        warnings.warn(f"'{path}' keeps compiled steps built for another machine ({'; '.join(differ)}), and was "
                      "loaded without them (steps run eagerly): co.compile_steps() compiles them here",
                      stacklevel=3)
        return
    co.__dict__["_compiled"] = CompiledSteps.from_file(co, compiled)


def _read(path) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"no such file: '{path}'")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a continual model written by cofx.save")
    broken = _malformed(record)
    if broken:
        raise ValueError(f"'{path}' is not a continual model written by cofx.save ({broken})")
    if record["version"] > VERSION:
        raise ValueError(f"'{path}' was written by a newer cofx ({record['meta']['cofx']}); upgrade cofx to load it")
    named = ([record["source"]] if "graph" not in record else []) + _leaf_types(record)
    if not all(isinstance(name, str) and IMPORT_PATH.fullmatch(name) for name in named):
        raise ValueError(f"'{path}' is not a continual model written by cofx.save (it names code that is not "
                         "an import path package.module:name)")
    return record


_PROGRAM = {"phase", "frames", "batch", "dtype", "device", "rolled", "fingerprint", "package"}
_OPTIONS = {"strict": bool, "leaf_modules": (list, tuple), "time_dim": int, "window": dict, "init": str,
            "tune": bool}


def _malformed(record: dict) -> str:
    """What in a record tagged as cofx's does not have the form `save` writes ("" when nothing)."""
    version, meta = record.get("version"), record.get("meta")
    if type(version) is not int:
        return "its version is not a number"
    if not isinstance(meta, dict):
        return "it has no facts about the model"
    shape = meta.get("clip_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) < 2 or \
            not all(type(n) is int and n > 0 for n in shape):
        return f"its clip shape {shape!r} is not a list of positive sizes"
    dtype = getattr(torch, str(meta.get("dtype")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return f"its dtype {meta.get('dtype')!r} is not a floating dtype"
    if any(k not in meta for k in FACTS):
        return "facts about the model are missing"
    if not isinstance(meta.get("validated"), (str, type(None))):
        return "its validation digest is not text"
    bounds = meta.get("example_range", [0.0, 0.0])
    if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(type(v) is float for v in bounds)
            and all(math.isfinite(v) for v in bounds) and bounds[0] <= bounds[1]):
        return f"its example range {bounds!r} is not two finite numbers, low then high"
    compiled = record.get("compiled")
    if compiled is not None and not (
            isinstance(compiled, dict) and isinstance(compiled.get("built_for"), dict)
            and isinstance(compiled.get("chunks"), (list, tuple)) and isinstance(compiled.get("programs"), list)
            and all(isinstance(p, dict) and _PROGRAM <= p.keys() and isinstance(p["package"], bytes)
                    and isinstance(getattr(torch, str(p["dtype"]), None), torch.dtype)
                    for p in compiled["programs"])):
        return "its compiled steps are not the ones cofx.save writes"
    if "graph" in record:
        return "" if isinstance(record["graph"], bytes) else "its graph is not bytes"
    options = record.get("options")
    if not isinstance(record.get("source"), str) or not isinstance(record.get("state_dict"), dict):
        return "it holds neither a graph nor an import spec and weights"
    if not isinstance(options, dict) or set(options) - set(_OPTIONS) or \
            any(not isinstance(v, _OPTIONS[k]) or (k == "time_dim" and isinstance(v, bool))
                for k, v in options.items()):
        return "its conversion options are not the ones cofx.convert takes"
    if any(not isinstance(leaf, (str, dict)) or isinstance(leaf, dict) and not isinstance(leaf.get("type"), str)
           for leaf in options.get("leaf_modules", ())):
        return "its leaf modules are neither names nor types"
    return ""


def _leaf_types(record) -> list:
    """The leaf-module types a file saved with ``source=`` names, as ``module:qualname``."""
    leaves = record.get("options", {}).get("leaf_modules", ())
    return [leaf.get("type") for leaf in leaves if isinstance(leaf, dict)]


def _example(meta: dict, dtype: torch.dtype) -> torch.Tensor:
    """A clip for converting the saved model again: noise over the range of the example it was converted with (a
    model that takes the log of its frames gets frames it can take, and the validation noise of that sign), zeros
    for a file that does not say."""
    low, high = meta.get("example_range") or (0.0, 0.0)
    gen = torch.Generator().manual_seed(0)
    return (low + (high - low) * torch.rand(meta["clip_shape"], generator=gen, dtype=torch.float64)).to(dtype)


def _check_named(path, record, trust, source, leaf_modules) -> None:
    """Refuse, before importing anything, to run code the file names that the caller neither gave nor trusted."""
    types = _leaf_types(record)
    untrusted = []
    if not trust and source is None:
        untrusted.append(f"the import spec '{record['source']}'")
    if not trust and leaf_modules is None:
        untrusted += [f"the leaf-module type '{t}'" for t in types]
    if not untrusted:
        return
    given = f"source={source or record['source']!r}" + (
        f", leaf_modules=({', '.join(t.replace(':', '.') for t in types)},)" if types else "")
    raise ValueError(f"'{path}' names code that loading imports and calls ({', '.join(untrusted)}), and a crafted "
                     f"file can name any callable; load it only if you trust the file: cofx.load({str(path)!r}, "
                     f"trust=True) (on the command line: --trust), or name that code yourself: "
                     f"cofx.load({str(path)!r}, {given})")


def _check_architecture(model, state_dict: dict, spec: str, what: str) -> None:
    """Refuse an import spec that builds another architecture than the weights' (keys or shapes differ)."""
    mine = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in mine.items()}
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
    if shapes != theirs:
        missing, unexpected = sorted(theirs.keys() - shapes.keys()), sorted(shapes.keys() - theirs.keys())
        resized = sorted(k for k in shapes.keys() & theirs.keys() if shapes[k] != theirs[k])
        detail = "; ".join(f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for label, keys in
                           (("weights it lacks:", missing), ("weights it adds:", unexpected),
                            ("weights of other shapes:", resized)) if keys)
        raise ValueError(f"'{spec}' does not build {what} ({detail}); pass the import spec of the same "
                         "architecture")


def _facts(co) -> dict:
    """The facts a file records: versions, the input it was converted for, and its timing."""
    from . import __version__
    dtype, _ = dtype_device(co)
    return {"cofx": __version__, "torch": str(torch.__version__), "clip_shape": list(co.clip_shape),
            "dtype": str(dtype).removeprefix("torch."), "delay": co.delay, "receptive_field": co.receptive_field,
            "stride": co.stride, "exact": co.is_exact, "validated": co._info.get("validated"),
            "example_range": list(co._info.get("example_range", (0.0, 0.0)))}


def _plain_options(options: dict) -> dict:
    """`options` with leaf-module types written as import paths, so the file loads with weights_only."""
    leaves = []
    for leaf in options["leaf_modules"]:
        if isinstance(leaf, str):
            leaves.append(leaf)
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            leaves.append({"type": f"{leaf.__module__}:{leaf.__qualname__}"})
        else:
            raise ValueError(f"cofx.save with source= keeps leaf_modules given as module names or types, "
                             f"not {type(leaf).__name__} instances; convert with their names instead")
    return {**options, "leaf_modules": leaves}


def _live_options(options: dict, leaf_modules=None) -> dict:
    """`options` with the caller's `leaf_modules`, or else the types the file names imported (trusted)."""
    if leaf_modules is not None:
        return {**options, "leaf_modules": tuple(leaf_modules)}
    leaves = []
    for leaf in options["leaf_modules"]:
        if isinstance(leaf, dict):
            module, _, qualname = leaf["type"].partition(":")
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            leaf = obj
        leaves.append(leaf)
    return {**options, "leaf_modules": tuple(leaves)}
