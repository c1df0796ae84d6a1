"""`WeightMarks` sees every change of a parameter or buffer slot that PyTorch can tell, in C++ and in Python."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from cofx import weight_marks
from cofx.weight_marks import WeightMarks


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1, bias=False))


def in_place(m):
    with torch.no_grad():
        m[0].weight.add_(1)


def statistic(m):
    m[1].running_var.mul_(2)


def replaced(m):
    m[0].bias = nn.Parameter(torch.zeros(3))


def removed(m):
    m[0].bias = None


def added_where_none(m):
    m[3].bias = nn.Parameter(torch.zeros(4))


def buffer_replaced(m):
    m[1].running_mean = torch.zeros(3)


def data_swapped(m):
    m[3].weight.data = torch.randn(4, 3, 1, 1)


def tensors_swapped(m):
    torch.utils.swap_tensors(m[0].weight, nn.Parameter(torch.randn(3, 2, 3, 3)))


def moved(m):
    m.double()


def batches_counted(m):
    m[1].num_batches_tracked.add_(1)   # what a training-mode forward counts (its statistics count no version)


CHANGES = [in_place, statistic, replaced, removed, added_where_none, buffer_replaced, data_swapped,
           tensors_swapped, moved, batches_counted]


def read_only(m):
    _ = [t.sum() for t in m.state_dict().values()]


KEPT = [read_only]


@pytest.fixture(params=["native", "python"])
def python_only(request):
    if request.param == "native" and weight_marks.native() is None:
        pytest.skip("the C++ check cannot be built here (the Python check still runs)")
    return request.param == "python"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(CHANGES + KEPT), min_size=1, max_size=4))
def test_marks_see_exactly_the_changes(python_only, edits):
    model = net().eval()
    marks = WeightMarks(model, python_only=python_only)
    assert (marks.marks is None) == python_only
    assert marks.unchanged()
    for edit in edits:
        with torch.no_grad():
            edit(model)
    assert marks.unchanged() == all(edit in KEPT for edit in edits)
    assert WeightMarks(model, python_only=python_only).unchanged()


def test_a_swap_to_the_memory_a_marked_tensor_left_is_seen(python_only):
    """`.data =` twice: the second tensor must not land at the address the first left and look unchanged."""
    model = net()
    for _ in range(20):
        marks = WeightMarks(model, python_only=python_only)
        model[3].weight.data = torch.randn(4, 3, 1, 1)
        model[3].weight.data = torch.randn(4, 3, 1, 1)
        assert not marks.unchanged()


def test_the_python_check_takes_over_where_the_cpp_one_cannot_be_built(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def fail(*args, **kwargs):
        raise RuntimeError("no compiler")
    said = []
    monkeypatch.setattr(weight_marks, "_native", None)
    monkeypatch.setattr(cpp, "load_inline", fail)
    model = net()
    marks = WeightMarks(model, say=said.append)
    assert marks.marks is None and marks.unchanged()
    in_place(model)
    assert not marks.unchanged()
    assert "checking in Python" in said[-1]
