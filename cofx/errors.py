"""The two exceptions users see: one for models that cannot be converted, one for bad streams."""
from __future__ import annotations

import re
from typing import Optional

import torch.fx as fx


def user_line(node: fx.Node) -> Optional[str]:
    """The innermost frame of the user's code that created `node` ("file:line in fn\n    code")."""
    trace = node.meta.get("stack_trace") or getattr(node, "stack_trace", None)
    if not trace:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    user = [f for f in frames if "/torch/" not in f[0] and "/cofx/" not in f[0]]
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

    def __init__(self, why: str, *, node: Optional[fx.Node] = None, fix: Optional[str] = None):
        self.why, self.node, self.fix = why, node, fix
        lines = []
        if node is not None:
            lines.append(f"cannot convert {describe(node)}: {why}")
            src = user_line(node)
            if src:
                lines.append(f"  at {src}")
        else:
            lines.append(f"cannot convert: {why}")
        if fix:
            lines.append(f"  fix: {fix}")
        super().__init__("\n".join(lines))


class StreamError(ValueError):
    """A frame or chunk does not fit the stream the continual model is processing."""
