"""The tuning cache: an op measured once on a machine is not timed again, and nothing on disk is trusted unchecked."""
import importlib
import json
import threading
import warnings

import pytest
import torch
from torch import nn

import cofx
from cofx import machine, tuning_cache

sk = importlib.import_module("cofx.passes.select_kernels")


def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(4, 4, (3, 3, 3), padding=1, groups=4)).to(dtype).eval()


def _clip(size=8, frames=5, dtype=torch.float32):
    return torch.randn(1, 3, frames, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _convert(model, clip):
    return cofx.convert(model, clip, validate=False)   # validation is not what is tested here


def _impls(co) -> dict:
    return {n.name: n.meta["cofx_impl"] for n in co.graph.nodes if "cofx_impl" in n.meta}


@pytest.fixture
def entries(tmp_path, monkeypatch):
    """The entry files of an empty cache folder of this test's own."""
    monkeypatch.setenv("COFX_CACHE_DIR", str(tmp_path / "cache"))
    return lambda: sorted((tmp_path / "cache" / "tuning").glob("*.json"))


@pytest.fixture
def timed(monkeypatch):
    """The ops select_kernels times (each a tuple of the implementations it compared)."""
    calls, real = [], sk._fastest
    monkeypatch.setattr(sk, "_fastest", lambda candidates: calls.append(tuple(candidates)) or real(candidates))
    return calls


def test_a_miss_times_every_op_and_writes_its_choice(entries, timed):
    co = _convert(_net(), _clip())
    impls = _impls(co)
    assert len(impls) == 2 and len(timed) == 2
    stored = [json.loads(p.read_text()) for p in entries()]
    assert sorted(e["impl"] for e in stored) == sorted(impls.values())
    assert all(e["format"] == tuning_cache.FORMAT and e["key"]["threads"] == torch.get_num_threads()
               for e in stored)


def test_a_hit_does_no_timing_and_steps_as_the_uncached_convert(entries, monkeypatch):
    frames = torch.randn(1, 3, 12, 8, 8)
    measured = _convert(_net(), _clip())
    monkeypatch.setattr(sk, "_fastest", lambda candidates: pytest.fail("a cached op was timed"))
    monkeypatch.setattr(sk, "_seconds", lambda fn: pytest.fail("a cached op was timed"))
    cached = _convert(_net(), _clip())
    assert _impls(cached) == _impls(measured)
    assert torch.equal(cached.forward_steps(frames), measured.forward_steps(frames))


def test_weights_are_not_part_of_the_key(entries, timed):
    _convert(_net(seed=0), _clip())
    _convert(_net(seed=1), _clip())
    assert len(timed) == 2 and len(entries()) == 2


def _not_json(entry):
    return "{not json"


def _not_text(entry):
    return b"\xff\xfe\x00"


def _not_an_object(entry):
    return json.dumps([entry])


def _foreign_key(entry):
    entry["key"]["threads"] += 1
    return json.dumps(entry)


def _other_format(entry):
    entry["format"] = tuning_cache.FORMAT + 1
    return json.dumps(entry)


def _unknown_impl(entry):
    entry["impl"] = "winograd"
    return json.dumps(entry)


@pytest.mark.parametrize("spoil", [_not_json, _not_text, _not_an_object, _foreign_key, _other_format, _unknown_impl])
def test_a_spoiled_entry_is_measured_again_and_rewritten(entries, timed, spoil):
    _convert(_net(), _clip())
    for path in entries():
        spoilt = spoil(json.loads(path.read_text()))
        path.write_bytes(spoilt) if isinstance(spoilt, bytes) else path.write_text(spoilt)
    co = _convert(_net(), _clip())
    assert len(timed) == 4
    assert all(impl in ("conv3d", "conv3d_cl", "fold2d", "taps2d") for impl in _impls(co).values())
    _convert(_net(), _clip())
    assert len(timed) == 4   # the entries measured again were written whole


def test_an_unwritable_folder_warns_once_and_tuning_still_works(tmp_path, monkeypatch, timed):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("COFX_CACHE_DIR", str(tmp_path / "a file" / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _convert(_net(), _clip())
        second = _convert(_net(), _clip())
    told = [w for w in caught if "COFX_CACHE_DIR" in str(w.message)]
    assert len(told) == 1 and "tuning cache" in str(told[0].message)
    assert len(timed) == 4 and len(_impls(first)) == len(_impls(second)) == 2


@pytest.mark.parametrize("change", ["threads", "dtype", "frame size", "weight shape"])
def test_the_key_changes_with_what_ranks_kernels(entries, timed, change):
    _convert(_net(), _clip())
    threads = torch.get_num_threads()
    try:
        if change == "threads":
            torch.set_num_threads(threads + 1)
            _convert(_net(), _clip())
        elif change == "dtype":
            _convert(_net(dtype=torch.float64), _clip(dtype=torch.float64))
        elif change == "frame size":
            _convert(_net(), _clip(size=6))
        else:
            torch.manual_seed(0)
            _convert(nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.ReLU(),
                                       nn.Conv3d(6, 4, (3, 3, 3), padding=1, groups=2)).eval(), _clip())
    finally:
        torch.set_num_threads(threads)
    assert len(timed) == 4 and len(entries()) == 4


def test_the_key_names_the_machine_and_torch(monkeypatch):
    op = {"spec": "any"}
    here = tuning_cache.key(op, 1)
    assert tuning_cache.key(op, 2) != here
    monkeypatch.setattr(machine, "cpu", lambda: ("another CPU", "AVX-512"))
    assert tuning_cache.key(op, 1) != here
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert tuning_cache.key(op, 1) != here


def test_the_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COFX_CACHE_DIR", str(tmp_path / "named"))
    assert tuning_cache.folder() == tmp_path / "named"
    monkeypatch.delenv("COFX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning_cache.folder() == tmp_path / "xdg" / "cofx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning_cache.folder() == tmp_path / "home" / ".cache" / "cofx"


def test_writers_at_once_leave_whole_entries(entries):
    key, offered = tuning_cache.key({"spec": "any"}, 1), ("conv3d", "fold2d", "taps2d")
    seen, done = [], threading.Event()

    def write(impl):
        for _ in range(50):
            tuning_cache.store(key, impl)

    writers = [threading.Thread(target=write, args=(impl,)) for impl in offered]
    tuning_cache.store(key, "conv3d")
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        seen.append(tuning_cache.lookup(key, offered))
    for w in writers:
        w.join()
    assert None not in seen and tuning_cache.lookup(key, offered) in offered
    assert [p.suffix for p in entries()[0].parent.iterdir()] == [".json"]   # no temporary file left
