"""Shape runs on fake tensors record what a real run records (the BatchNorm shortcut included)."""
import pytest
import torch
from torch import nn

import cofx
from cofx.passes.shape_runs import RecordingInterpreter, _run_fake
from cofx.tracer import trace


def _records(gm, run):
    return {n.name: n.meta["cofx_runs"][run] for n in gm.graph.nodes}


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(4), nn.BatchNorm1d(4, affine=False), nn.GroupNorm(2, 4)])
def test_fake_runs_record_the_real_shapes(norm):
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), norm, nn.ReLU(), nn.Conv1d(4, 2, 3, stride=2)).eval()
    clip = torch.randn(2, 3, 9)
    gm = trace(model, ())
    assert _run_fake(gm, "clip", clip)
    fake = _records(gm, "clip")
    with torch.no_grad():
        RecordingInterpreter(gm, "clip").run(clip)
    assert _records(gm, "clip") == fake
    assert fake["_3"].shape == (2, 2, 4)


def test_a_batchnorm_of_the_wrong_width_still_fails_the_run():
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(5)).eval()
    with pytest.raises(cofx.ConversionError, match="fails on the example clip"):
        cofx.convert(model, torch.randn(1, 3, 8))
