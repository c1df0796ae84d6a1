"""`cofx.load` validates a conversion again unless it builds the one validated when the model was converted.

Loading converts the saved model again. The file keeps the digest of the
continual model `convert` validated (`cofx.conversion_digest`); a load that
builds a model of that digest skips the validation, and any difference (the
weights, a module's code, its configuration, cofx, the machine) costs a
validation, never a skipped one.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import cli_models
import cofx
from cofx import api, saving
from cofx.conversion_digest import digest


@pytest.fixture
def validations(monkeypatch):
    """Every validation `convert` or `load` runs (the model converted), counted."""
    seen = []
    run = api.validate_steps

    def counted(co, model, clip, **kw):
        seen.append(model)
        return run(co, model, clip, **kw)
    monkeypatch.setattr(api, "validate_steps", counted)
    return seen


def _tcn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv1d(8, 4, 3)).double().eval()


def _steps(co, frames):
    co.clean_state()
    return torch.cat([co.forward_steps(frames), co.forward_steps(frames[:, :, :0], pad_end=True)], 2)


def test_a_validated_file_loads_without_validating_again_and_steps_alike(tmp_path, validations):
    model = _tcn()
    co = cofx.convert(model, torch.randn(1, 3, 10, dtype=torch.float64))
    assert len(validations) == 1 and len(co._info["validated"]) == 64
    cofx.save(co, tmp_path / "tcn.pt")
    assert saving.info(tmp_path / "tcn.pt")["meta"]["validated"] == co._info["validated"]
    loaded = cofx.load(tmp_path / "tcn.pt", trust=True)
    assert len(validations) == 1   # none more
    frames = torch.randn(2, 3, 23, dtype=torch.float64)
    torch.testing.assert_close(_steps(loaded, frames), model(frames), rtol=0, atol=1e-12)
    cofx.save(loaded, tmp_path / "again.pt")   # what was validated is kept through a second round trip
    cofx.load(tmp_path / "again.pt", trust=True)
    assert len(validations) == 1


def test_a_conversion_that_was_not_validated_is_validated_on_load(tmp_path, validations):
    co = cofx.convert(_tcn(), torch.randn(1, 3, 10, dtype=torch.float64), validate=False)
    assert not validations and saving.info(_saved(co, tmp_path))["meta"]["validated"] is None
    loaded = cofx.load(tmp_path / "m.pt", trust=True)
    assert len(validations) == 1
    cofx.save(loaded, tmp_path / "validated.pt")   # validated now: its next load skips it
    cofx.load(tmp_path / "validated.pt", trust=True)
    assert len(validations) == 1


def test_weights_changed_after_the_validation_are_validated_on_load(tmp_path, validations):
    model = _tcn()
    co = cofx.convert(model, torch.randn(1, 3, 10, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight[0, 0, 0] += 1.0   # the continual model shares the weights
    cofx.load(_saved(co, tmp_path), trust=True)
    assert len(validations) == 2


def test_a_file_whose_digest_is_not_the_conversions_is_validated_on_load(tmp_path, validations):
    co = cofx.convert(cli_models.tiny(), leaf_modules=(nn.Linear,))
    path = tmp_path / "tiny.pt"
    cofx.save(co, path, source="cli_models:tiny")
    record = torch.load(path, weights_only=True)
    record["meta"]["validated"] = "0" * 64
    torch.save(record, path)
    cofx.load(path, source="cli_models:tiny", leaf_modules=(nn.Linear,))
    assert len(validations) == 2


def _saved(co, tmp_path):
    cofx.save(co, tmp_path / "m.pt")
    return tmp_path / "m.pt"


def test_the_digest_is_the_steps_not_the_example():
    model = _tcn()
    one = cofx.convert(model, torch.randn(1, 3, 10, dtype=torch.float64), validate=False)
    two = cofx.convert(model, torch.zeros(1, 3, 10, dtype=torch.float64), validate=False)
    assert digest(one) == digest(two)


@pytest.mark.parametrize("change", ["weight", "padding", "dilation", "activation", "options"])
def test_the_digest_changes_with_what_the_steps_compute(change):
    model, options = _tcn(), {}
    before = digest(cofx.convert(model, torch.randn(1, 3, 10, dtype=torch.float64), validate=False))
    if change == "weight":
        with torch.no_grad():
            model[2].bias[1] += 1e-12
    elif change == "padding":
        model[0].padding = (1,)
    elif change == "dilation":
        model[0].dilation = (1,)
    elif change == "activation":
        model[1] = nn.GELU()
    else:
        options = dict(init="replicate")
    after = digest(cofx.convert(model, torch.randn(1, 3, 10, dtype=torch.float64), validate=False, **options))
    assert after != before


class Doubled(nn.Module):
    def forward(self, x):
        return 2 * x


@torch.fx.wrap
def halved(x):
    return x / 2


class WithWrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)

    def forward(self, x):
        return halved(self.conv(x))


def _plain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU()).eval()


@pytest.mark.parametrize("how", ["leaf module", "wrapped function", "forward hook", "global module hook"])
def test_code_kept_whole_or_run_beside_the_graph_has_no_digest(how):
    """Such code can read anything when it runs (a helper in another file, a global, the environment), which no
    digest follows: every load of it validates."""
    kw = {}
    if how == "leaf module":
        model, kw = nn.Sequential(nn.Conv1d(2, 3, 3), Doubled()).eval(), {"leaf_modules": (Doubled,)}
    elif how == "wrapped function":
        model = WithWrapped().eval()
    else:
        model = _plain()
    if how == "forward hook":
        model[0].register_forward_hook(lambda module, args, out: None)
    co = cofx.convert(model, torch.randn(1, 2, 8), validate=False, **kw)
    if how == "global module hook":   # registered in the process that loads
        assert digest(co) is not None
        handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
        try:
            assert digest(co) is None
        finally:
            handle.remove()
    else:
        assert digest(co) is None


def test_the_digest_is_the_same_in_another_process():
    """What load compares is computed in another process than the file's: no addresses, no hash order."""
    code = textwrap.dedent("""
        import torch, cofx, cli_models
        from torch import nn
        from cofx.conversion_digest import digest
        print(digest(cofx.convert(cli_models.tiny(), leaf_modules=(nn.Linear,), validate=False)))
    """)
    here = digest(cofx.convert(cli_models.tiny(), leaf_modules=(nn.Linear,), validate=False))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).parent))
    assert out.stdout.strip() == here


class LogFrames(nn.Module):
    """A spectrogram model: the log of its (positive) frames, then a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)

    def forward(self, x):
        return self.conv(torch.log(x))


def test_a_load_converts_on_frames_of_the_examples_range(tmp_path, validations):
    """Loading converts on noise over the range of the example the model was converted with: a model that takes
    the log of its frames loads (zeros would make every frame -inf), and is validated on frames of that sign."""
    torch.manual_seed(0)
    model = LogFrames().double().eval()
    co = cofx.convert(model, torch.rand(1, 3, 8, dtype=torch.float64) + 0.5, validate=False)
    assert saving.info(_saved(co, tmp_path))["meta"]["example_range"] == list(co._info["example_range"])
    loaded = cofx.load(tmp_path / "m.pt", trust=True)
    assert len(validations) == 1
    x = torch.rand(2, 3, 12, dtype=torch.float64) + 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_steps(x, pad_end=True), model(x), rtol=0, atol=1e-12)


def test_a_convolution_and_its_batchnorm_load_without_validating_again(tmp_path, validations):
    """The clip graph a file keeps holds none of the conversion's kernels (a BatchNorm fold kept there made the
    load name its own fold otherwise, and the digest differ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.ReLU())
    co = cofx.convert(model.double().eval(), torch.randn(1, 2, 8, dtype=torch.float64))
    cofx.load(_saved(co, tmp_path), trust=True)
    assert len(validations) == 1


class StackedPairs(nn.Module):
    """Frame pairs stacked by a view after a crop to whole pairs: a graph cofx rewrites before converting."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1 = nn.Linear(3, 4), nn.Linear(8, 5)

    def forward(self, x):   # (B, T, F)
        b, t, f = x.shape
        h = torch.relu(self.l0(x))[:, :t // 2 * 2]
        return self.l1(h.reshape(b, t // 2, 8))


def test_a_state_taken_before_saving_resumes_on_the_loaded_model(tmp_path):
    """The file keeps the model as it was converted, so a load converts it to the same kernels (the graph cofx
    had rewritten, converted again, named them otherwise)."""
    torch.manual_seed(0)
    model = StackedPairs().double().eval()
    co = cofx.convert(model, torch.randn(1, 10, 3, dtype=torch.float64), time_dim=1)
    loaded = cofx.load(_saved(co, tmp_path), trust=True)
    x = torch.randn(1, 9, 3, dtype=torch.float64)
    with torch.no_grad():
        first = co.forward_steps(x[:, :5])
        loaded.set_state(co.get_state())
        rest = loaded.forward_steps(x[:, 5:], pad_end=True)
        co.clean_state()
        whole = co.forward_steps(x, pad_end=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=0, atol=1e-12)
