"""Plain copies of the containers a value is made of (torch.fx hands out immutable lists and dicts)."""
from __future__ import annotations


def containers_copied(value):
    """`value` with its lists, tuples and dicts copied as plain ones (their tensors and proxies shared)."""
    if isinstance(value, list):
        return [containers_copied(v) for v in value]
    if type(value) is tuple:
        return tuple(containers_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: containers_copied(v) for k, v in value.items()}
    return value
