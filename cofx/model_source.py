"""Get the user's clip model from what they name on the command line.

Two ways to name a model: a file written by ``torch.save(model)``, or an import
spec ``package.module:callable`` that builds it (``pytorchvideo.models.hub:x3d_s``),
optionally with weights from a state_dict file. Unpickling a whole module runs
code from the file, so, following PyTorch's ``weights_only`` convention, such a
file is refused unless the user says they trust it. Weights files are always
loaded with ``weights_only=True``.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pickle
import re
from typing import Optional

import torch
from torch import nn

from .errors import first_line

# checkpoint keys that commonly hold the state_dict, in the order they are tried
STATE_KEYS = ("state_dict", "model_state", "model_state_dict", "model", "net", "weights", "params")


class SourceError(ValueError):
    """The model or weights named by the user cannot be loaded; the message says why and what to do."""


def is_spec(text: str) -> bool:
    """True for ``package.module:callable`` (and not for an existing file or a Windows drive letter)."""
    module, sep, attr = text.partition(":")
    return bool(sep) and bool(module) and bool(attr) and not os.path.exists(text) and len(module) > 1


def from_spec(spec: str) -> nn.Module:
    """Import ``package.module:callable`` and call it; builders that take ``pretrained`` get ``pretrained=False``."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise SourceError(f"cannot import '{module_name}' from the import spec '{spec}': {e}; "
                          "check the spelling, that the package is installed, or add its folder to PYTHONPATH")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"'{module_name}' has no '{attr}' (import spec '{spec}'); "
                              "give package.module:callable, e.g. pytorchvideo.models.hub:x3d_s")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise SourceError(f"'{spec}' is a value of type {type(obj).__name__}, not a callable that builds a model")
    kwargs = {}
    try:
        if "pretrained" in inspect.signature(obj).parameters:
            kwargs["pretrained"] = False   # never download: give weights with --weights
    except (TypeError, ValueError):
        pass
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise SourceError(f"'{spec}' returned a value of type {type(model).__name__}, not an nn.Module")
    return model


def from_file(path: str, trust: bool = False, command: str = "cofx convert") -> nn.Module:
    """A module saved with ``torch.save(model)``; refused unless `trust`, since unpickling it runs code."""
    if not os.path.isfile(path):
        raise SourceError(f"no such file: '{path}' (give a file written by torch.save(model), "
                          "or an import spec package.module:callable)")
    if not trust:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            pickled = _pickled_global(e)
            if pickled is None:
                raise SourceError(f"'{path}' {_unreadable(e)}")
            raise SourceError(f"refusing to load '{path}': it holds a pickled {pickled}, and loading it runs code "
                              "from the file (PyTorch's weights_only rule); if you trust the file, run: "
                              f"{command} {path} --trust")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (AttributeError, ImportError) as e:
            raise SourceError(f"cannot load '{path}': {first_line(e)}; the code of the model's classes must be "
                              "importable: add its folder to PYTHONPATH")
        except Exception as e:
            raise SourceError(f"cannot load '{path}': {first_line(e)}")
    if isinstance(obj, nn.Module):
        return obj
    if _state_dict_in(obj) is not None:
        raise SourceError(f"'{path}' holds weights (a state_dict), not a module; name the code that builds the "
                          f"model and pass the file as weights: --weights {path} with package.module:callable")
    raise SourceError(f"'{path}' holds a {type(obj).__name__}, not a module; save the model with torch.save(model)")


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict (or a checkpoint holding one under a common key) into `model`, weights_only."""
    if not os.path.isfile(path):
        raise SourceError(f"no such weights file: '{path}'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        pickled = _pickled_global(e)
        why = _unreadable(e) if pickled is None else f"holds a pickled {pickled}, not only tensors"
        raise SourceError(f"cannot read weights from '{path}': it {why}; save them with "
                          "torch.save(model.state_dict(), path)")
    state = _state_dict_in(obj)
    if state is None:
        keys = f" (its keys: {', '.join(map(str, list(obj)[:8]))})" if isinstance(obj, dict) else ""
        raise SourceError(f"'{path}' holds no state_dict{keys}; expected a state_dict or a checkpoint holding "
                          f"one under one of the keys {', '.join(STATE_KEYS)}")
    if all(k.startswith("module.") for k in state):   # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
        why = (f"missing {_few(missing)}, unexpected {_few(unexpected)}" if missing or unexpected
               else first_line(e))
        raise SourceError(f"the weights in '{path}' do not fit the model: {why}")


def _pickled_global(e: Exception) -> Optional[str]:
    """The class or function named in torch's weights_only refusal `e`, else None."""
    if not isinstance(e, pickle.UnpicklingError) or "Unsupported global" not in str(e):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return found.group(1) if found else "module"


def _unreadable(e: Exception) -> str:
    """Why torch.load failed, in cofx's words: torch's own text has terminal colours and unsafe advice."""
    if isinstance(e, EOFError) or "central directory" in str(e):
        return "is truncated or damaged (not a whole file written by torch.save)"
    return "is not a file written by torch.save (it cannot be read)"


def _state_dict_in(obj) -> Optional[dict]:
    """`obj` itself when it is a state_dict, else the state_dict under a common checkpoint key, else None."""
    def is_state(d):
        return isinstance(d, dict) and d and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in d.items())
    if is_state(obj):
        return obj
    if isinstance(obj, dict):
        return next((obj[k] for k in STATE_KEYS if is_state(obj.get(k))), None)
    return None


def _few(keys) -> str:
    keys = sorted(keys)
    return "none" if not keys else ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

