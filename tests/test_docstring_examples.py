"""Every runnable example (``>>>``) in the docstrings of cofx and cofx.passes runs, and shows what it says.

Modules are discovered, not listed: a new example that does not run fails here.
"""
import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import torch

import cofx
import cofx.passes

PACKAGES = [cofx, cofx.passes]

GLOBS = {"torch": torch, "cofx": cofx}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _source(name: str) -> str:
    """The module's source, read without importing it (cofx.__main__ would run the CLI)."""
    origin = importlib.util.find_spec(name).origin
    with open(origin, encoding="utf-8") as f:
        return f.read()


def modules_with_examples() -> list:
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(n for n in set(names) if ">>>" in _source(n))


MODULES = modules_with_examples()


def test_discovery_finds_both_packages():
    assert {"cofx", "cofx.pixel_convs", "cofx.passes.layout"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    torch.manual_seed(0)
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs=GLOBS, optionflags=FLAGS, report=False)
    assert result.attempted > 0, f"{name} has '>>>' in its source but no example doctest finds"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} fail (output above)"
