"""Nothing a file names runs without trust: crafted cofx files against `cofx.load`, `cofx.saving.info` and the CLI.

A file written by `cofx.save(co, path, source=...)` names the callable that
builds its model and the leaf-module types it was converted with; a crafted one
can name anything (``builtins:exit`` ended the process with status 0, so
``cofx verify`` passed in CI). Each test plants sentinels where the names lead
and checks that none was imported or called unless the caller trusted the file
or named the code.
"""
import builtins
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import cli_models
import cofx
from cofx import saving
from cofx.cli import main

TESTS = os.path.dirname(os.path.abspath(__file__))
META = {"cofx": cofx.__version__, "torch": str(torch.__version__), "clip_shape": [1, 3, 6, 8, 8],
        "dtype": "float32", "delay": 7, "receptive_field": 10, "stride": 1, "exact": True}
PLANTED = "cofx_planted_module"   # a module whose import would be seen


def crafted(path, source="builtins:exit", leaves=()):
    """A record as `cofx.save` writes it, naming `source` and the leaf types `leaves`: no code inside."""
    options = {"strict": False, "leaf_modules": [{"type": t} for t in leaves], "time_dim": 2, "window": {},
               "init": "zeros"}
    torch.save({"format": saving.FORMAT, "version": saving.VERSION, "meta": META, "source": source,
                "options": options, "state_dict": {}}, path)
    return str(path)


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Every call of builtins.exit and os.system; importing the planted module calls exit too."""
    seen = []
    monkeypatch.setattr(builtins, "exit", lambda *a: seen.append(("exit", a)))
    monkeypatch.setattr(os, "system", lambda *a: seen.append(("system", a)))
    (tmp_path / f"{PLANTED}.py").write_text("import builtins\nbuiltins.exit('imported')\n"
                                            "def build():\n    builtins.exit('called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return seen


def test_load_refuses_the_import_spec_a_file_names(calls):
    path = crafted("exit.continual.pt")
    with pytest.raises(ValueError) as e:
        cofx.load(path)
    message = str(e.value)
    assert "names code that loading imports and calls (the import spec 'builtins:exit')" in message
    assert "cofx.load('exit.continual.pt', trust=True) (on the command line: --trust)" in message
    assert "or name that code yourself: cofx.load('exit.continual.pt', source='builtins:exit')" in message
    assert calls == []


def test_load_refuses_leaf_types_a_file_names_even_with_the_callers_source(calls):
    path = crafted("system.continual.pt", source="cli_models:tiny", leaves=["os:system", f"{PLANTED}:build"])
    with pytest.raises(ValueError) as e:
        cofx.load(path, source="cli_models:tiny")
    message = str(e.value)
    assert f"(the leaf-module type 'os:system', the leaf-module type '{PLANTED}:build')" in message
    assert f"source='cli_models:tiny', leaf_modules=(os.system, {PLANTED}.build,))" in message
    assert calls == [] and PLANTED not in sys.modules


def test_nothing_imports_the_module_a_file_names(calls):
    path = crafted("planted.continual.pt", source=f"{PLANTED}:build")
    assert saving.is_continual_file(path)
    facts = saving.info(path)
    assert facts["source"] == f"{PLANTED}:build" and facts["leaf_types"] == [] and not facts["needs_trust"]
    with pytest.raises(ValueError, match="trust=True"):
        cofx.load(path)
    assert calls == [] and PLANTED not in sys.modules


def test_info_reads_leaf_types_without_importing_them(calls):
    facts = saving.info(crafted("leaf.continual.pt", source="cli_models:tiny", leaves=[f"{PLANTED}:build"]))
    assert facts["leaf_types"] == [f"{PLANTED}:build"] and facts["meta"] == META
    assert calls == [] and PLANTED not in sys.modules


@pytest.mark.parametrize("name", ["\x1b[31mos:system", "os:system; rm", "os", ":system", 42])
def test_a_file_naming_no_import_path_is_not_a_cofx_file(calls, name):
    """Only package.module:qualname: nothing else reaches an import, or a terminal through an error message."""
    path = crafted("odd.continual.pt", source=name)
    assert not saving.is_continual_file(path)
    with pytest.raises(ValueError, match="is not a continual model written by cofx.save"):
        cofx.load(path, trust=True)
    assert calls == []


def test_a_file_naming_no_dtype_is_not_a_cofx_file(tmp_path):
    path = crafted(tmp_path / "dtype.continual.pt", source="cli_models:tiny")
    record = torch.load(path, weights_only=True)
    torch.save({**record, "meta": {**META, "dtype": "load"}}, path)
    with pytest.raises(ValueError, match="its dtype 'load' is not a floating dtype"):
        cofx.load(path, source="cli_models:tiny")


MALFORMED = {
    "no version": (lambda r: r.pop("version"), "its version is not a number"),
    "version as text": (lambda r: r.update(version="2"), "its version is not a number"),
    "no facts": (lambda r: r.pop("meta"), "no facts about the model"),
    "negative clip shape": (lambda r: r.update(meta={**META, "clip_shape": [1, 3, -5]}), "positive sizes"),
    "integer dtype": (lambda r: r.update(meta={**META, "dtype": "int64"}), "not a floating dtype"),
    "no options": (lambda r: r.pop("options"), "conversion options"),
    "an unknown option": (lambda r: r["options"].update(bogus=1), "conversion options"),
    "a leaf that is a number": (lambda r: r["options"].update(leaf_modules=[3]), "leaf modules"),
    "compiled steps without programs": (lambda r: r.update(compiled={"built_for": {}}), "compiled steps"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_cofx_file_is_refused_by_every_reader(calls, capsys, case):
    """Tagged as cofx's but not of the form cofx.save writes: a ValueError saying what (not a KeyError), and
    not a cofx file to the CLI."""
    path = crafted("bad.continual.pt", source="cli_models:tiny")
    record = torch.load(path, weights_only=True)
    change, words = MALFORMED[case]
    change(record)
    torch.save(record, path)
    assert not saving.is_continual_file(path)
    for read in (saving.info, lambda p: cofx.load(p, source="cli_models:tiny", leaf_modules=())):
        with pytest.raises(ValueError, match=words):
            read(path)
    assert main(["inspect", path]) != 0 and "Error" not in capsys.readouterr().err
    assert calls == []


@pytest.mark.parametrize("command", ["inspect", "verify", "bench", "convert"])
def test_cli_commands_refuse_a_crafted_file(calls, capsys, command):
    crafted("exit.continual.pt", leaves=["os:system"])
    code = main([command, "exit.continual.pt"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    if command == "convert":
        assert "is already a continual model" in err
    else:
        assert "(the import spec 'builtins:exit', the leaf-module type 'os:system')" in err
        assert "(on the command line: --trust)" in err
    assert calls == []


@pytest.mark.slow
def test_cofx_verify_of_a_crafted_file_exits_2_not_0(tmp_path):
    """The CI case: the process must not end 'successfully' inside the crafted call."""
    crafted(tmp_path / "exit.continual.pt")
    result = subprocess.run([sys.executable, "-m", "cofx", "verify", "exit.continual.pt"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result
    assert "names code that loading imports and calls (the import spec 'builtins:exit')" in result.stderr


def _steps(co, frames):
    co.clean_state()
    with torch.no_grad():
        return [co.forward_step(frames[:, :, i]) for i in range(frames.shape[2])]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tiny() converted with nn.Linear as a leaf module, saved by import spec."""
    path = tmp_path_factory.mktemp("trust") / "tiny.continual.pt"
    co = cofx.convert(cli_models.tiny(), leaf_modules=(nn.Linear,))
    cofx.save(co, path, source="cli_models:tiny")
    return path, co


@pytest.mark.parametrize("how", [dict(trust=True), dict(source="cli_models:tiny", leaf_modules=(nn.Linear,))])
def test_a_trusted_or_named_file_loads_and_steps(saved, how):
    path, co = saved
    assert saving.info(path)["leaf_types"] == ["torch.nn.modules.linear:Linear"]
    loaded = cofx.load(path, **how)
    assert loaded.options["leaf_modules"] == (nn.Linear,) and not loaded.training
    frames = torch.randn(1, 3, 12, 8, 8)
    a, b = _steps(loaded, frames), _steps(co, frames)
    assert [x is None for x in a] == [x is None for x in b] == [True] * 7 + [False] * 5
    assert all(torch.equal(x, y) for x, y in zip(a[7:], b[7:]))


def test_the_callers_source_is_what_builds_the_model(saved):
    """source= names the caller's code: it runs instead of the file's (the weights still come from the file)."""
    path, co = saved
    loaded = cofx.load(path, source="cli_models:hub_style", leaf_modules=(nn.Linear,))   # pretrained=False
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in co.state_dict().items())


def test_a_source_of_another_architecture_is_refused_on_save_and_on_load(saved):
    path, co = saved
    for act in (lambda: cofx.load(path, source="cli_models:recurrent", leaf_modules=(nn.Linear,)),
                lambda: cofx.save(co, str(path) + ".2", source="cli_models:recurrent")):
        with pytest.raises(ValueError, match="'cli_models:recurrent' does not build the model .*weights it "
                                             ".*pass the import spec of the same architecture"):
            act()


def test_save_of_a_plain_module_says_what_it_takes(tmp_path):
    with pytest.raises(TypeError, match=r"cofx.save takes a converted model \(cofx.convert\(...\)\), got Tiny"):
        cofx.save(cli_models.tiny(), tmp_path / "m.continual.pt")


def test_save_of_a_model_that_cannot_be_pickled_says_to_name_its_code(tmp_path):
    """torch refuses to pickle parametrized modules (the current weight_norm): the file names the code instead."""
    from torch.nn.utils.parametrizations import weight_norm
    model = nn.Sequential(weight_norm(nn.Conv1d(2, 3, 3, padding=1)), nn.ReLU()).eval()
    co = cofx.convert(model, torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match=r"this model cannot be pickled \(Serialization of parametrized modules.*"
                                         r"save it with source='package.module:callable'"):
        cofx.save(co, tmp_path / "m.continual.pt")


class ScriptLeaf(nn.Module):
    """A leaf type as a script defines it (its class in __main__): pickled by name."""
    def forward(self, x):
        return torch.tanh(x)


def test_a_model_with_types_of_the_running_script_warns_on_save_and_loads_only_where_they_are(tmp_path, monkeypatch):
    monkeypatch.setattr(ScriptLeaf, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "ScriptLeaf", ScriptLeaf, raising=False)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), ScriptLeaf()).eval()
    co = cofx.convert(model, torch.randn(1, 3, 8), leaf_modules=(ScriptLeaf,))
    path = str(tmp_path / "script.continual.pt")
    with pytest.warns(UserWarning, match=r"defined in the script that runs \(ScriptLeaf\)"):
        cofx.save(co, path)
    assert cofx.load(path, trust=True) is not None   # in the script that defines it
    monkeypatch.delattr(sys.modules["__main__"], "ScriptLeaf")
    with pytest.raises(ValueError, match="whose code this process cannot import"):   # in any other process
        cofx.load(path, trust=True)
