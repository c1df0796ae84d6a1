"""The runnable examples in module docstrings run, and show what they say."""
import doctest
import importlib

import pytest
import torch

SELF_CONTAINED = ["cofx.pixel_convs", "cofx.whole_pools", "cofx.weight_marks"]


@pytest.mark.parametrize("name", SELF_CONTAINED)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
