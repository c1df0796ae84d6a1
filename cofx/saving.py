"""`cofx.save` / `cofx.load`: a continual model in a file, loaded back ready to step.

A continual model is its clip model plus how it was converted, so the file
holds exactly that, and `load` converts again (the same graph, the same
weights, the same delay). How the clip model is stored decides whether
loading is safe:

- with ``source="package.module:callable"`` the file holds only tensors and
  plain facts: it loads with ``torch.load(weights_only=True)`` and the model is
  rebuilt by calling the code the user installed, as ``cofx convert`` does for
  an import spec. Models whose graph cannot be pickled (X3D keeps lambdas) can
  only be saved this way.
- without it the file holds the pickled clip graph (``co.clip_model()``), and
  unpickling that runs code from the file, like ``torch.load(weights_only=False)``:
  `load` refuses it unless ``trust=True``.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import warnings

import torch
from torch import nn

from .dtype_device import dtype_device
from .model_source import from_spec

FORMAT = "cofx.continual"
VERSION = 1
FACTS = ("delay", "receptive_field", "stride", "exact")


def save(co, path, *, source: str = None) -> None:
    """Write continual model `co` to `path` so that `cofx.load(path)` returns it ready to step.

    Args:
        co: a `ContinualModule` from `cofx.convert`.
        path: the file to write (``model.continual.pt`` by convention).
        source: import spec ``package.module:callable`` that builds the clip model
            (called with ``pretrained=False`` when it takes that). Makes the file
            safe to load (weights_only); see the module docstring.
    """
    record = {"format": FORMAT, "version": VERSION, "meta": _facts(co), "source": source}
    if source is not None:
        model = from_spec(source)
        if model.state_dict().keys() != co.state_dict().keys():
            raise ValueError(f"'{source}' does not build the model that was converted (its state_dict keys "
                             "differ); pass the import spec of the same architecture")
        record["options"] = _plain_options(co.options)
        record["state_dict"] = co.state_dict()
    else:
        buf = io.BytesIO()
        try:
            torch.save({"model": co.clip_model(), "options": co.options}, buf)
        except (pickle.PicklingError, AttributeError, TypeError) as e:   # lambdas, local classes
            raise ValueError(f"this model cannot be pickled ({e}); save it with source='package.module:callable' "
                             "naming the code that builds it") from None
        record["graph"] = buf.getvalue()
    torch.save(record, path)


def info(path) -> dict:
    """What a cofx file says about itself, read safely (weights_only): meta, source, whether loading needs trust."""
    record = _read(path)
    return {"meta": dict(record["meta"]), "source": record["source"], "needs_trust": "graph" in record}


def is_continual_file(path) -> bool:
    """True when `path` is a file written by `cofx.save`."""
    try:
        _read(path)
        return True
    except ValueError:
        return False


def load(path, *, trust: bool = False):
    """Load a continual model written by `cofx.save`: converted again, in eval mode, with a clean state.

    Args:
        path: the file.
        trust: allow unpickling the clip graph of a file saved without ``source=``
            (that runs code from the file: only for files you made or trust).
            Files saved with ``source=`` never need it.
    """
    from .api import convert   # cofx.api imports the whole compiler; cofx.saving stays light to import
    record = _read(path)
    meta = record["meta"]
    dtype = getattr(torch, meta["dtype"])
    if "graph" in record:
        if not trust:
            raise ValueError(f"'{path}' holds the model's pickled graph (it was saved without source=), and "
                             "unpickling it runs code from the file; load it only if you trust it: "
                             f"cofx.load({str(path)!r}, trust=True) (on the command line: --trust)")
        saved = torch.load(io.BytesIO(record["graph"]), map_location="cpu", weights_only=False)
        model, options = saved["model"], saved["options"]
    else:
        model = from_spec(record["source"]).to(dtype)
        model.load_state_dict(record["state_dict"], strict=True)
        options = _live_options(record["options"])
    co = convert(model.eval(), torch.zeros(meta["clip_shape"], dtype=dtype), **options)
    co.eval()
    changed = [f"{k} {meta[k]} -> {getattr(co, 'is_exact' if k == 'exact' else k)}" for k in FACTS
               if meta[k] != getattr(co, "is_exact" if k == "exact" else k)]
    if changed:
        warnings.warn(f"'{path}' was written by cofx {meta['cofx']}; this cofx converts it differently "
                      f"({', '.join(changed)}); the outputs still equal the clip model's", stacklevel=2)
    return co


def _read(path) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"no such file: '{path}'")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a continual model written by cofx.save")
    if record["version"] > VERSION:
        raise ValueError(f"'{path}' was written by a newer cofx ({record['meta']['cofx']}); upgrade cofx to load it")
    return record


def _facts(co) -> dict:
    """The facts a file records: versions, the input it was converted for, and its timing."""
    from . import __version__
    dtype, _ = dtype_device(co)
    return {"cofx": __version__, "torch": str(torch.__version__), "clip_shape": list(co.clip_shape),
            "dtype": str(dtype).removeprefix("torch."), "delay": co.delay, "receptive_field": co.receptive_field,
            "stride": co.stride, "exact": co.is_exact}


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


def _live_options(options: dict) -> dict:
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
