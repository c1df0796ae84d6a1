"""Compiled steps saved with the model: loaded where they match, run without compiling; elsewhere eager steps,
with a notice; never loaded from an untrusted file."""
import warnings

import pytest
import torch
from torch import nn

import cofx
from cofx import compiled_step
from guarantees import max_err, tolerance

SPEC = "test_compiled_save:tcn"
CLIP = (1, 3, 12)


class TCN(nn.Module):
    """Two causal temporal convolutions, one dilated: a program that compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3)
        self.c2 = nn.Conv1d(4, 4, 3, dilation=2)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def tcn():
    torch.manual_seed(0)
    return TCN().eval()


def compiled(**options):
    return cofx.convert(tcn(), torch.randn(CLIP)).compile_steps(**options)


def stream(batch=1, frames=24):
    return torch.randn(batch, 3, frames, generator=torch.Generator().manual_seed(1))


def stepped(co, frames):
    """Each frame's output (None where there is none), and whether a compiled program ran it."""
    outs, ran = [], []
    with torch.no_grad():
        for i in range(frames.shape[2]):
            outs.append(co.forward_step(frames[:, :, i]))
            ran.append(co.last_step_compiled)
    return outs, ran


def equal(a, b) -> bool:
    return all(x is None and y is None or torch.equal(x, y) for x, y in zip(a, b))


def close(a, b) -> bool:
    return all(x is None and y is None or max_err(x, y) <= tolerance(y) for x, y in zip(a, b))


def notices(record) -> list:
    return [w for w in record if "compiled" in str(w.message)]


def eager(frames) -> list:
    return stepped(cofx.convert(tcn(), torch.randn(CLIP)), frames)[0]


def never(*args, **kwargs):
    raise AssertionError("a compiled package was built or loaded")


@pytest.fixture
def no_inductor(monkeypatch):
    """Compiled steps whose package is a stand-in (the recorded program runs as it is), and no way to load one:
    what is kept and what is refused, without compiling."""
    def stand_in(graph, args, options, path):
        with open(path, "wb") as file:
            file.write(b"not a library")
        return graph
    monkeypatch.setattr(compiled_step, "compile_package", stand_in)
    monkeypatch.setattr(compiled_step, "load_package", never)


@pytest.fixture
def saved(tmp_path, no_inductor):
    path = tmp_path / "tcn.continual.pt"
    cofx.save(compiled(), path, source=SPEC)
    return path


def rewrite(path, **machine):
    """The file as another machine would have written it."""
    record = torch.load(path, weights_only=True)
    record["compiled"]["built_for"].update(machine)
    torch.save(record, path)


def test_a_file_keeps_the_compiled_steps_and_says_for_what(saved, tmp_path):
    about = cofx.saving.info(saved)["compiled"]
    assert [{k: p[k] for k in ("phase", "frames", "batch", "dtype", "device")} for p in about["programs"]] == \
        [{"phase": 0, "frames": 1, "batch": 1, "dtype": "float32", "device": "cpu"}]
    assert set(about["built_for"]) == {"torch", "cpu"} and about["built_for"]["torch"] == torch.__version__
    assert torch.load(saved, weights_only=True)["version"] == 2
    plain = tmp_path / "plain.continual.pt"   # without compiled steps: the format any cofx reads
    cofx.save(cofx.convert(tcn(), torch.randn(CLIP)), plain, source=SPEC)
    assert torch.load(plain, weights_only=True)["version"] == 1 and cofx.saving.info(plain)["compiled"] is None


def test_an_untrusted_file_loads_without_its_compiled_steps(saved, monkeypatch):
    monkeypatch.setattr(compiled_step.CompiledSteps, "from_file", never)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        co = cofx.load(saved, source=SPEC)
    assert [str(w.message) for w in notices(record)] == [f"'{saved}' keeps compiled steps, which are executable code, and was loaded "
                               f"without them (steps run eagerly): cofx.load({str(saved)!r}, trust=True) runs "
                               "them if you trust the file, co.compile_steps() compiles them here"]
    frames = stream()
    outs, ran = stepped(co, frames)
    assert co.compiled_stats is None and not any(ran) and equal(outs, eager(frames))


@pytest.mark.parametrize("machine", [{"torch": "2.0.0"}, {"cpu": "Other CPU (AVX-512)"}])
def test_compiled_steps_of_another_machine_are_not_loaded(saved, machine):
    rewrite(saved, **machine)
    (name, value), = machine.items()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        co = cofx.load(saved, trust=True)
    message, = [str(w.message) for w in notices(record)]
    assert message.startswith(f"'{saved}' keeps compiled steps built for another machine ({name} {value!r}, here ")
    assert message.endswith("and was loaded without them (steps run eagerly): co.compile_steps() compiles them "
                            "here")
    frames = stream()
    outs, ran = stepped(co, frames)
    assert co.compiled_stats is None and not any(ran) and equal(outs, eager(frames))


def test_this_machine_described_otherwise_loads_no_compiled_steps(saved, monkeypatch):
    monkeypatch.setattr(cofx.saving, "built_for", lambda devices: {"torch": torch.__version__,
                                                                   "cpu": "Other CPU (AVX2)"})
    with pytest.warns(UserWarning, match=r"built for another machine \(cpu '.*', here 'Other CPU \(AVX2\)'\)"):
        co = cofx.load(saved, trust=True)
    assert co.compiled_stats is None


@pytest.mark.parametrize("case", ["batch", "fingerprint", "weights"])
def test_a_stream_the_saved_programs_do_not_serve_steps_eagerly_with_a_notice(saved, case):
    """Another batch, a program recorded differently (the file's fingerprint tampered with here), or weights
    changed after loading: the notice at the first steady-state step, and eager steps from the same state."""
    if case == "fingerprint":
        record = torch.load(saved, weights_only=True)
        record["compiled"]["programs"][0]["fingerprint"] = "0" * 64
        torch.save(record, saved)
    co = cofx.load(saved, trust=True)
    ref = cofx.convert(tcn(), torch.randn(CLIP))
    if case == "weights":
        for m in (co, ref):
            with torch.no_grad():
                m.c1.weight.mul_(2)
    frames = stream(batch=2 if case == "batch" else 1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs, ran = stepped(co, frames)
    notice, = notices(record)
    assert str(notice.message) == "cofx: " + {
        "batch": "the compiled steps saved with the model have no program for phase 1/1 of 1 frame(s), batch 2, "
                 "float32 on cpu (saved: phase 1/1 of 1 frame(s), batch 1, float32 on cpu)",
        "fingerprint": "the step of phase 1/1 of 1 frame(s), batch 1, float32 on cpu recorded on this model "
                       "differs from the one its saved compiled program was compiled from (other weights, or "
                       "converted differently)",
        "weights": "the weights changed since the model was loaded, and its saved compiled steps bake the weights "
                   "loaded"}[case] + "; steps run eagerly (co.compile_steps() compiles them here)"
    assert notice.filename == __file__   # the notice points at the caller's step
    # a recording (the tampered fingerprint) leaves the convolutions' rings: the eager steps after it add in
    # another order, equal to float rounding; declined before it, they are the eager steps bit for bit
    same = close if case == "fingerprint" else equal
    assert co.compiled_stats is None and not any(ran) and same(outs, stepped(ref, frames)[0])


def test_steps_compiled_with_other_backends_or_since_changed_are_not_saved(tmp_path, no_inductor):
    path = tmp_path / "tcn.continual.pt"
    with pytest.warns(UserWarning, match=r"keeps compiled steps of the inductor backend only .* not of 'eager'"):
        cofx.save(compiled(backend="eager"), path, source=SPEC)
    assert cofx.saving.info(path)["compiled"] is None
    co = compiled(check_weights=False)
    with torch.no_grad():
        co.c2.bias.add_(1)
    with pytest.warns(UserWarning, match=r"the weights changed since the steps were compiled: the file is saved "
                                         r"without compiled steps; call co.compile_steps\(\) before cofx.save"):
        cofx.save(co, path, source=SPEC)
    assert cofx.saving.info(path)["compiled"] is None


@pytest.fixture(scope="module")
def compiled_file(tmp_path_factory):
    """A TCN with its steps compiled by AOTInductor, saved (one compile for the module)."""
    path = tmp_path_factory.mktemp("compiled") / "tcn.continual.pt"
    cofx.save(compiled(), path)
    return path


@pytest.mark.slow
def test_loaded_compiled_steps_run_from_the_first_steady_state_step_without_compiling(compiled_file, monkeypatch):
    monkeypatch.setattr(compiled_step, "compile_package", never)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", never)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no notice: everything matches
        co = cofx.load(compiled_file, trust=True)
    ref = cofx.convert(tcn(), torch.randn(CLIP))
    frames = stream(frames=co.warmup_frames + 6)
    outs, ran = stepped(co, frames)
    # from the frame its steps repeat, which the file keeps (a stream of the loaded model finds it no sooner)
    assert ran == [i >= co.compiled_stats.start for i in range(frames.shape[2])]
    assert co.compiled_stats.start < co.warmup_frames
    assert close(outs, stepped(ref, frames)[0])
    with torch.no_grad():   # a chunk of 3 frames and a flush: not what the program serves
        chunk = frames[:, :, -3:]
        assert close([co.forward_steps(chunk)], [ref.forward_steps(chunk)]) and not co.last_step_compiled
        co.forward_steps(chunk[:, :, :0], pad_end=True)
        assert not co.last_step_compiled


@pytest.mark.slow
def test_a_loaded_model_saves_its_compiled_steps_again(compiled_file, tmp_path, monkeypatch):
    monkeypatch.setattr(compiled_step, "compile_package", never)
    again = tmp_path / "again.continual.pt"
    cofx.save(cofx.load(compiled_file, trust=True), again)
    assert cofx.saving.info(again)["compiled"] == cofx.saving.info(compiled_file)["compiled"]
    co = cofx.load(again, trust=True)
    _, ran = stepped(co, stream(frames=co.warmup_frames + 2))
    assert ran[-1]
