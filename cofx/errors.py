"""The two exceptions users see: one for models that cannot be converted, one for bad streams."""
from __future__ import annotations

import os
import re
import traceback
from typing import Optional

import torch
import torch.fx as fx

_LIBRARIES = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,)) + (os.path.dirname(__file__) + os.sep,)


def _users(frames) -> list:
    """The frames (path, line, function, code) of the user's code: not torch's, not cofx's."""
    return [f for f in frames if not os.path.abspath(f[0]).startswith(_LIBRARIES)
            and not f[0].startswith("<eval_with_key>")]


def user_line(node: fx.Node) -> Optional[str]:
    """The innermost frame of the user's code that created `node` ("file:line in fn: code")."""
    trace = node.meta.get("stack_trace") or getattr(node, "stack_trace", None)
    if not trace:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n(?!\s*File ")\s*(.*)', trace)
    user = _users(frames)
    if not user:
        return None
    path, line, fn, code = user[-1]
    return f"{path}:{line} in {fn}: {code.strip()}"


def first_line(error: BaseException) -> str:
    """An exception's message in one line (its first, at most 200 characters), for a message of cofx's own."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def raised_at(error: BaseException) -> Optional[str]:
    """The innermost frame of the user's code an exception passed through ("file:line in fn: code")."""
    frames = [(f.filename, f.lineno, f.name, f.line or "") for f in traceback.extract_tb(error.__traceback__)]
    user = _users(frames)
    if not user:
        return None
    path, line, fn, code = user[-1]
    return f"{path}:{line} in {fn}: {code.strip()}"


def describe(node: fx.Node) -> str:
    """One line naming a node the way a user finds it in their own code."""
    if node.op == "call_module":
        what = f"module '{node.target}'"
    elif node.op == "call_method":
        what = f"method '.{node.target}()'"
    elif node.op == "call_function":
        what = f"function '{getattr(node.target, '__name__', node.target)}'"
    else:
        what = f"{node.op} '{node.target}'"
    return f"node '{node.name}' ({what})"


class ConversionError(RuntimeError):
    """The model (or a node of it) cannot be turned into a continual model.

    The message names the node, its op, the module path, the user's source line,
    why the conversion stopped and what to do about it.
    """

    def __init__(self, why: str, *, node: Optional[fx.Node] = None, fix: Optional[str] = None,
                 at: Optional[str] = None):
        self.why, self.node, self.fix = why, node, fix
        lines = []
        if node is not None:
            lines.append(f"cannot convert {describe(node)}: {why}")
            at = user_line(node)
        else:
            lines.append(f"cannot convert: {why}")
        if at:
            lines.append(f"  at {at}")
        if fix:
            lines.append(f"  fix: {fix}")
        super().__init__("\n".join(lines))


class StreamError(ValueError):
    """A frame or chunk does not fit the stream the continual model is processing."""


class NotATensor(StreamError, TypeError):
    """A step was given something other than a tensor (a list, a numpy array): a `StreamError`, and the
    `TypeError` Python code expects for an argument of the wrong type."""


class LengthNotTaken(StreamError):
    """A stream ended at a length the model itself does not take (branches strided apart end at different
    frames there)."""
