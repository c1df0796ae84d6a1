"""The `cofx` command line, run as a user runs it: subprocesses, exit codes, what they print, what they write.

Every subprocess starts Python and torch and traces a model (a few seconds),
so all of them are started together by one fixture, as many at a time as
there are cores, and each test then reads the result it needs. Each command,
exit code and error runs at least once as a subprocess (those tests are marked
slow: the fixture takes most of a minute); variations of options call
`cofx.cli.main` in this process.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

import cli_models
import cofx
from cofx.cli import main

TESTS = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, "-m", "cofx"]
SHAPE = "1,3,6,8,8"
HAVE_AV = importlib.util.find_spec("av") is not None   # PyAV, for --video

COMMANDS = {
    # commands that succeed
    "convert": ["convert", "cli_models:tiny"],
    "convert_weights": ["convert", "cli_models:hub_style", "--weights", "ckpt.pt", "--init", "replicate",
                        "-o", "hub.continual.pt"],
    "convert_trusted": ["convert", "tiny.pt", "--trust", "-o", "trusted.continual.pt"],
    "inspect": ["inspect", "cli_models:tiny", "--dot", "latency.dot"],
    "verify": ["verify", "cli_models:tiny"] + (["--video", "clip.mp4"] if HAVE_AV else []),
    "bench": ["bench", "saved.continual.pt", "--trust", "--rounds", "3", "--plot", "latency.png"],
    # verify finds a mismatch: exit 1
    "verify_corrupted": ["verify", "cli_models:corrupted"],
    # usage, loading and conversion errors: exit 2
    "pickled_refused": ["convert", "tiny.pt"],
    "missing_file": ["convert", "missing.pt"],
    "weights_not_module": ["convert", "weights.pt"],
    "not_torch_file": ["inspect", "junk.pt"],
    "bad_spec_module": ["verify", "nosuchpackage.models:net"],
    "bad_spec_name": ["bench", "cli_models:no_such_builder"],
    "spec_not_module": ["convert", "cli_models:not_a_model"],
    "bad_weights": ["convert", "cli_models:tiny", "--weights", "no_state.pt"],
    "bad_input_shape": ["convert", "cli_models:open_model", "--input-shape", "1,3,x"],
    "shape_not_implied": ["convert", "cli_models:open_model"],
    "unsupported_op": ["convert", "cli_models:flipped", "--input-shape", SHAPE],
}


def _write_video(path, frames=12):
    import av
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(frames):
            img = (np.random.RandomState(i).rand(24, 32, 3) * 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; several subprocesses share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command of COMMANDS, run in one working folder holding the files they read."""
    work = tmp_path_factory.mktemp("cli")
    torch.save(cli_models.tiny(), work / "tiny.pt")
    torch.save(cli_models.tiny().state_dict(), work / "weights.pt")
    torch.manual_seed(1)
    torch.save({"epoch": 7, "model_state": cli_models.Tiny().state_dict()}, work / "ckpt.pt")
    torch.save({"epoch": 7}, work / "no_state.pt")
    (work / "junk.pt").write_text("not a torch file")
    if HAVE_AV:
        _write_video(str(work / "clip.mp4"))
    cofx.save(cofx.convert(cli_models.tiny()), work / "saved.continual.pt", source="cli_models:tiny")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}   # tiny models: threads only wait for each other, more so on a busy machine

    def run(args):
        return subprocess.run(CLI + args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(zip(COMMANDS, pool.map(run, COMMANDS.values())))
    return work, results


def _ok(result, code=0):
    assert result.returncode == code, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _error_line(result) -> str:
    """The single stderr line of a failed command, checked to be one line and no traceback."""
    _ok(result, 2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _error_text(code, err) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """`cofx ARGS...` in this process, in an empty folder: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def run(*args):
        capsys.readouterr()   # what ran before is not the command's output
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err
    return run


# -- help -----------------------------------------------------------------------------------------

def test_console_script_is_installed_and_helps():
    script = shutil.which("cofx")
    assert script, "the cofx console script is not installed: pip install -e ."
    out = _ok(subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)).stdout
    for command in ("convert", "inspect", "verify", "bench"):
        assert re.search(rf"^\s+{command}\s+\w", out, re.M), out
    assert "exit codes" in out


@pytest.mark.parametrize("command,mentions", [
    ("convert", ["MODEL", "--output", "--strict", "--window", "--init", "--input-shape", "--weights", "--trust",
                 "cofx.load"]),
    ("inspect", ["--json", "--dot", "delay"]),
    ("verify", ["--steps", "--video", "--strict", "clip equivalence", "chunk invariance", "state reset", "1 on a"]),
    ("bench", ["--batch", "--threads", "--plot", "median"]),
])
def test_every_command_has_help(command, mentions, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in mentions:
        assert word in out, (word, out)


# -- convert --------------------------------------------------------------------------------------

def _steps(co, frames):
    co.clean_state()
    with torch.no_grad():
        outs = [co.forward_step(frames[:, :, i]) for i in range(frames.shape[2])]
    return outs


@pytest.mark.slow
def test_convert_load_step_equals_converting_in_python(runs):
    work, results = runs
    out = _ok(results["convert"]).stdout
    assert "wrote tiny.continual.pt" in out and "cofx.load('tiny.continual.pt', source='cli_models:tiny')" in out
    for words in ("exact", "receptive field  10 frames", "delay            7 frames", "FLOPs per step",
                  "FLOPs per clip", "state memory"):
        assert words in out, (words, out)
    loaded = cofx.load(work / "tiny.continual.pt", source="cli_models:tiny")
    in_python = cofx.convert(cli_models.tiny())
    assert not loaded.training and (loaded.delay, loaded.receptive_field) == (7, 10)
    frames = torch.randn(1, 3, 20, 8, 8)
    a, b = _steps(loaded, frames), _steps(in_python, frames)
    assert [x is None for x in a] == [x is None for x in b] == [True] * 7 + [False] * 13
    assert all(torch.equal(x, y) for x, y in zip(a[7:], b[7:]))


@pytest.mark.slow
def test_converted_file_records_versions_shape_and_timing(runs):
    work, _ = runs
    meta = cofx.saving.info(work / "tiny.continual.pt")["meta"]
    assert meta["cofx"] == cofx.__version__ and meta["torch"] == str(torch.__version__)
    assert meta["clip_shape"] == [1, 3, 6, 8, 8] and meta["dtype"] == "float32"
    assert (meta["delay"], meta["receptive_field"], meta["stride"], meta["exact"]) == (7, 10, 1, True)
    torch.load(work / "tiny.continual.pt", weights_only=True)   # made from an import spec: no code inside


@pytest.mark.slow
def test_convert_with_weights_from_checkpoint_and_replicate_init(runs):
    work, results = runs
    out = _ok(results["convert_weights"]).stdout
    assert "not exact: init=replicate" in out
    co = cofx.load(work / "hub.continual.pt", source="cli_models:hub_style")
    expected = torch.load(work / "ckpt.pt", weights_only=True)["model_state"]
    assert co.options["init"] == "replicate" and not co.is_exact
    assert all(torch.equal(co.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_convert_pickled_module_needs_trust(runs):
    work, results = runs
    line = _error_line(results["pickled_refused"])
    assert "refusing to load 'tiny.pt'" in line and "runs code" in line and "cli_models.Tiny" in line
    assert line.endswith("run: cofx convert tiny.pt --trust")
    out = _ok(results["convert_trusted"]).stdout
    assert "trust=True" in out
    with pytest.raises(ValueError, match="trust=True"):
        cofx.load(work / "trusted.continual.pt")
    co = cofx.load(work / "trusted.continual.pt", trust=True)
    frames = torch.randn(1, 3, 12, 8, 8)
    a, b = _steps(co, frames), _steps(cofx.convert(cli_models.tiny()), frames)
    assert all(torch.equal(x, y) for x, y in zip(a[7:], b[7:]))


def test_convert_windowed_model_says_so_and_keeps_the_window(cli):
    code, out, _ = cli("convert", "cli_models:squeeze", "--input-shape", SHAPE, "--window", "mean=1",
                       "-o", "squeeze.continual.pt")
    assert code == 0 and "windowed (not exact)" in out and "causal window of 1 frames" in out
    co = cofx.load("squeeze.continual.pt", source="cli_models:squeeze")
    assert co.options["window"] == {"mean": 1} and not co.is_exact


def test_convert_strict_refuses_a_windowed_model(cli):
    line = _error_text(*cli("convert", "cli_models:squeeze", "--input-shape", SHAPE, "--strict")[::2])
    assert "strict" in line and "windowed" in line
    assert not os.path.exists("squeeze.continual.pt")


# -- inspect --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_inspect_prints_the_node_table_and_summary(runs):
    out = _ok(runs[1]["inspect"]).stdout
    head = out.splitlines()[0].split()
    assert head[:3] == ["node", "op", "kind"] and "FLOPs/step" in head and "delay" in head
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert rows["stem"][2] == "sliding" and rows["add"][2] == "merge" and rows["pool"][2] == "reduction"
    assert "receptive field" in out and "FLOPs per clip" in out


@pytest.mark.slow
def test_inspect_dot_draws_delays_and_buffers(runs):
    work, results = runs
    _ok(results["inspect"])
    dot = (work / "latency.dot").read_text()
    assert dot.startswith("digraph cofx {") and dot.rstrip().endswith("}")
    nodes = dict(re.findall(r'^\s*"(\w+)" \[label="([^"]*)"', dot, re.M))
    assert "delay 1" in nodes["stem"] and "delay 2" in nodes["add"] and "delay 7" in nodes["fc"]
    assert re.search(r'"stem" \[label="[^"]*", fillcolor="#9ecae1"\]', dot)      # sliding
    assert re.search(r'"add" \[label="[^"]*", fillcolor="#fdae6b"\]', dot)       # merge
    buffered = re.findall(r'^\s*"(\w+)" -> "(\w+)" \[label="buffer (\d+) frames?"', dot, re.M)
    assert buffered == [("relu", "add", "1")]    # the skip connection waits one frame for `res`
    assert '"res" -> "add";' in dot


def test_inspect_dot_buffers_match_the_frames_the_model_holds():
    """The buffered frames drawn on an edge are the frames the merge's delay buffer really holds."""
    from cofx.latency_graph import latency_graph
    co = cofx.convert(cli_models.tiny())
    g = latency_graph(co)
    with torch.no_grad():
        co.forward_steps(torch.randn(1, 3, 30, 8, 8))
    held = next(row.state_bytes for row in co.report if row.name == "add")
    frame_bytes = 4 * 8 * 8 * 4     # channels x height x width x float32
    assert sum(d["buffered"] for _, v, d in g.in_edges("add", data=True)) * frame_bytes == held


def test_inspect_json_is_complete(cli):
    code, out, _ = cli("inspect", "cli_models:tiny", "--json")
    data = json.loads(out)
    nodes = {n["name"]: n for n in data["nodes"]}
    fields = {"name", "op", "kind", "kernel", "stride", "padding", "dilation", "receptive_field", "delay",
              "state_bytes", "exact", "flops_per_step"}
    assert code == 0 and all(fields <= set(n) for n in nodes.values())
    assert nodes["stem"]["kernel"] == 3 and nodes["stem"]["padding"] == [1, 1] and nodes["head"]["delay"] == 4
    summary = data["summary"]
    assert summary["exact"] is True and summary["delay"] == 7 and summary["receptive_field"] == 10
    assert sum(n["flops_per_step"] for n in nodes.values()) == summary["flops_per_step"] > 0
    assert summary["flops_per_clip"] > summary["flops_per_step"]


def test_inspect_json_is_strict_json(cli):
    """JSON has no Infinity or NaN: a recurrent layer's unbounded receptive field is the string "inf"."""
    code, out, _ = cli("inspect", "cli_models:recurrent", "--time-dim", "1", "--input-shape", "1,7,3", "--json")

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")
    data = json.loads(out, parse_constant=refuse)
    assert code == 0 and data["summary"]["receptive_field"] == "inf"
    assert next(n for n in data["nodes"] if n["name"] == "rnn")["receptive_field"] == "inf"


# -- verify ---------------------------------------------------------------------------------------

def _errors(out) -> dict:
    return {m[0]: float(m[1]) for m in re.findall(r"^\s+(\w[\w ]*?)\s+max error (\S+)", out, re.M)}


@pytest.mark.slow
def test_verify_passes_on_random_input(runs):
    out = _ok(runs[1]["verify"]).stdout
    assert "on random input, 2 streams, clip of 6 frames, stream of 21 frames" in out
    for check in ("clip equivalence", "chunk invariance", "state reset"):
        assert re.search(rf"^\s+{check}\s+max error \S+\s+tolerance \S+\s+ok$", out, re.M), (check, out)
    assert all(e <= 1e-4 for e in _errors(out).values())
    assert out.rstrip().endswith("PASS: every check is within tolerance")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_AV, reason="PyAV is not installed")
def test_verify_on_video_frames(runs):
    out = _ok(runs[1]["verify"]).stdout
    video = out[out.index("on frames of clip.mp4, clip of 6 frames, stream of 12 frames"):]
    assert video.count(" ok") == 3 and all(e <= 1e-4 for e in _errors(video).values())


@pytest.mark.slow
def test_verify_exits_1_on_a_corrupted_continual_model(runs):
    result = _ok(runs[1]["verify_corrupted"], 1)
    assert re.search(r"clip equivalence\s+max error \S+\s+tolerance \S+\s+FAIL", result.stdout)
    assert _errors(result.stdout)["clip equivalence"] > 1e-3
    assert "FAIL: clip equivalence" in result.stdout


def test_verify_windowed_reports_its_deviation(cli):
    code, out, _ = cli("verify", "cli_models:squeeze", "--input-shape", SHAPE)
    deviation = _errors(out)["deviation from the original"]
    assert code == 0 and deviation > 0 and "not exact by design" in out and f"up to {deviation:.3g}" in out
    code, out, _ = cli("verify", "cli_models:squeeze", "--input-shape", SHAPE, "--strict")
    assert code == 1 and "FAIL: deviation from the original" in out


def test_verify_steps_sets_the_stream_length(cli):
    code, out, _ = cli("verify", "cli_models:tiny", "--steps", "9", "--seed", "3")
    assert code == 0 and "stream of 9 frames" in out


# -- bench ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_times_steps_and_clips_and_plots(runs):
    work, results = runs
    result = _ok(results["bench"])
    assert "round 3/3" in result.stderr
    step = re.search(r"forward_step.*?(\d+\.\d+) ms\s+(\d+\.\d+) - (\d+\.\d+) ms", result.stdout)
    clip = re.search(r"forward on a 6-frame clip.*?(\d+\.\d+) ms\s+(\d+\.\d+) - (\d+\.\d+) ms", result.stdout)
    for m in (step, clip):
        assert m, result.stdout
        median, q1, q3 = map(float, m.groups())
        assert 0 < q1 <= median <= q3
    assert "FLOPs per step 53.8 k" in result.stdout and "state memory 9.5 KiB" in result.stdout
    from PIL import Image
    with Image.open(work / "latency.png") as img:
        assert img.format == "PNG" and img.size[0] > 300


# -- errors: one line on stderr, exit 2 -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,expected", [
    ("missing_file", "no such file: 'missing.pt'"),
    ("weights_not_module", "holds weights (a state_dict), not a module"),
    ("not_torch_file", "'junk.pt' is not a file written by torch.save"),
    ("bad_spec_module", "cannot import 'nosuchpackage.models'"),
    ("bad_spec_name", "'cli_models' has no 'no_such_builder'"),
    ("spec_not_module", "returned a value of type int, not an nn.Module"),
    ("bad_weights", "'no_state.pt' holds no state_dict (its keys: epoch)"),
    ("bad_input_shape", "bad --input-shape '1,3,x'"),
    ("shape_not_implied", "cannot infer the clip length of 'cli_models:open_model'"),
    ("unsupported_op", "cannot convert node 'flip'"),
])
def test_errors_are_one_line_with_exit_code_2(runs, name, expected):
    line = _error_line(runs[1][name])
    assert line.startswith("cofx ") and "error:" in line
    assert expected in line, line


@pytest.mark.slow
def test_errors_say_the_fix(runs):
    assert "pass --input-shape B,C,T" in _error_line(runs[1]["shape_not_implied"])
    assert "--weights weights.pt" in _error_line(runs[1]["weights_not_module"])
    assert "cli_models.py:" in _error_line(runs[1]["unsupported_op"])   # the user's source line


@pytest.mark.parametrize("args,expected", [
    (["convert", "cli_models:tiny", "--window", "pool"], "bad --window 'pool': give PATTERN=FRAMES"),
    (["verify", "cli_models:tiny", "--steps", "0"], "expected a positive integer, got '0'"),
    (["bench"], "the following arguments are required: MODEL"),
    (["convert", "cli_models:tiny", "--init", "edge"], "invalid choice: 'edge'"),
    (["convert", "cli_models:tiny", "--time-dim", "-1"], "bad --time-dim '-1': give the index of the input's "
                                                         "time dimension, counted from 0 and at least 1"),
    (["convert", "cli_models:tiny", "--time-dim", "0"], "bad --time-dim '0'"),
    (["convert", "cli_models:tiny", "--time-dim", "0"], "(dimension 0 is the batch)"),
    (["convert", "cli_models:tiny", "--time-dim", "T"], "bad --time-dim 'T'"),
])
def test_usage_errors_are_one_line_with_exit_code_2(args, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert expected in err and "--help" in err
    assert "Traceback" not in err


def test_time_dim_converts_another_layout_and_must_fit_the_input(cli):
    code, out, _ = cli("convert", "cli_models:recurrent", "--time-dim", "1", "--input-shape", "1,7,3")
    assert code == 0 and "receptive field  inf frames" in out
    co = cofx.load("recurrent.continual.pt", source="cli_models:recurrent")
    assert co.options["time_dim"] == 1 and co.clip_shape == (1, 7, 3)
    line = _error_text(*cli("convert", "cli_models:tiny", "--time-dim", "5", "--input-shape", SHAPE)[::2])
    assert line.endswith("--time-dim 5 is beyond the input's 5 dimensions (--input-shape 1,3,6,8,8); give 1 to 4")


@pytest.mark.parametrize("flag,value,expected", [
    ("-o", "out", "-o 'out' is a folder; give a file name, e.g. -o out/model.continual.pt"),
    ("-o", "nowhere/x.continual.pt", "the folder 'nowhere' does not exist; create it or give another path"),
    ("--onnx", "out", "--onnx 'out' is a folder; give a file name, e.g. --onnx out/model.onnx"),
])
def test_convert_output_must_be_a_file_path(cli, flag, value, expected):
    os.mkdir("out")
    line = _error_text(*cli("convert", "cli_models:tiny", flag, value)[::2])
    assert line.endswith(expected), line
    assert not os.path.exists("tiny.continual.pt")   # refused before converting


@pytest.mark.parametrize("command,flag", [("inspect", "--dot"), ("bench", "--plot")])
def test_inspect_and_bench_outputs_must_be_file_paths(cli, command, flag):
    os.mkdir("out")
    line = _error_text(*cli(command, "cli_models:tiny", flag, "out")[::2])
    assert f"{flag} 'out' is a folder; give a file name" in line


def test_convert_refuses_to_overwrite_its_input(cli):
    torch.save(cli_models.tiny(), "tiny.pt")
    torch.save(cli_models.tiny().state_dict(), "weights.pt")
    line = _error_text(*cli("convert", "tiny.pt", "--trust", "-o", "./tiny.pt")[::2])
    assert line.endswith("-o './tiny.pt' is the input 'tiny.pt', which converting would overwrite; give another -o")
    line = _error_text(*cli("convert", "cli_models:tiny", "--weights", "weights.pt", "-o", "weights.pt")[::2])
    assert "is the input 'weights.pt'" in line
    assert isinstance(torch.load("tiny.pt", weights_only=False), cli_models.Tiny)   # untouched
    assert torch.load("weights.pt", weights_only=True).keys() == cli_models.tiny().state_dict().keys()


@pytest.mark.parametrize("args,expected", [
    (["convert", "tiny.pt", "--trust", "--onnx", "tiny.pt"],
     "--onnx 'tiny.pt' is the input 'tiny.pt', which converting would overwrite; give another --onnx"),
    (["convert", "cli_models:tiny", "--weights", "weights.pt", "--onnx", "./weights.pt"],
     "--onnx './weights.pt' is the input 'weights.pt', which converting would overwrite; give another --onnx"),
    (["convert", "tiny.pt", "--trust", "--onnx", "alias.pt"],   # a link to the model
     "--onnx 'alias.pt' is the input 'tiny.pt', which converting would overwrite; give another --onnx"),
    (["convert", "cli_models:tiny", "-o", "out.pt", "--onnx", "./out.pt"],
     "--onnx './out.pt' is the file -o 'out.pt' names, and one file cannot hold both; give another --onnx"),
    (["convert", "cli_models:tiny", "--onnx", "tiny.continual.pt"],   # the default -o
     "--onnx 'tiny.continual.pt' is the file -o 'tiny.continual.pt' names, and one file cannot hold both"),
    (["inspect", "tiny.pt", "--trust", "--dot", "tiny.pt"],
     "--dot 'tiny.pt' is the input 'tiny.pt', which inspecting would overwrite; give another --dot"),
    (["bench", "cli_models:tiny", "--weights", "weights.pt", "--plot", "weights.pt"],
     "--plot 'weights.pt' is the input 'weights.pt', which benchmarking would overwrite; give another --plot"),
])
def test_no_output_overwrites_an_input_or_another_output(cli, args, expected):
    torch.save(cli_models.tiny(), "tiny.pt")
    torch.save(cli_models.tiny().state_dict(), "weights.pt")
    os.symlink("tiny.pt", "alias.pt")
    before = {name: open(name, "rb").read() for name in ("tiny.pt", "weights.pt")}
    line = _error_text(*cli(*args)[::2])
    assert line == f"cofx {args[0]}: error: {expected}" or line.startswith(f"cofx {args[0]}: error: {expected};")
    assert {name: open(name, "rb").read() for name in before} == before   # refused before writing anything
    assert sorted(os.listdir()) == ["alias.pt", "tiny.pt", "weights.pt"]


def _truncated(path):
    torch.save(cli_models.tiny().state_dict(), path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("write,why", [
    (lambda path: open(path, "w").write("not a torch file"), "it is not a file written by torch.save (it cannot be read)"),
    (_truncated, "it is truncated or damaged (not a whole file written by torch.save)"),
    (lambda path: torch.save(cli_models.tiny(), path), "it holds a pickled cli_models.Tiny, not only tensors"),
])
def test_bad_weights_file_says_why_in_plain_words(cli, write, why):
    """torch's own message colours the terminal and advises weights_only=False; cofx's says what to do."""
    write("bad.pt")
    line = _error_text(*cli("convert", "cli_models:tiny", "--weights", "bad.pt")[::2])
    assert f"cannot read weights from 'bad.pt': {why}; save them with torch.save(model.state_dict(), path)" in line
    assert "\x1b" not in line and "weights_only=False" not in line and "weights_only` set to `False" not in line


def test_debug_shows_the_traceback(cli):
    code, _, err = cli("convert", "cli_models:flipped", "--input-shape", SHAPE, "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err and "ConversionError" in err
    assert err.rstrip().splitlines()[-1].startswith("cofx convert: error: cannot convert node 'flip'")


def test_converted_file_as_model_refuses_conversion_flags(cli):
    cofx.save(cofx.convert(cli_models.tiny()), "saved.continual.pt", source="cli_models:tiny")
    line = _error_text(*cli("verify", "saved.continual.pt", "--input-shape", SHAPE)[::2])
    assert "--input-shape does not apply" in line
    line = _error_text(*cli("convert", "saved.continual.pt")[::2])
    assert "already a continual model" in line
    for given in (["--time-dim", "1"], ["--time-dim", "2"], ["--init", "zeros"]):   # a default given counts too
        line = _error_text(*cli("verify", "saved.continual.pt", *given)[::2])
        assert f"{given[0]} does not apply" in line
    line = _error_text(*cli("verify", "saved.continual.pt", "--time-dim", "2", "--init", "replicate")[::2])
    assert "--time-dim, --init do not apply" in line
    line = _error_text(*cli("verify", "saved.continual.pt")[::2])
    assert "names code that loading imports and calls (the import spec 'cli_models:tiny')" in line
    assert "(on the command line: --trust)" in line
    code, out, _ = cli("verify", "saved.continual.pt", "--trust", "--steps", "10")
    assert code == 0 and "PASS" in out


def test_bench_takes_the_speed_up_round_by_round():
    """A round's speed-up is its clip's time over its steps' (a machine that drifts moves both alike); the
    result is their median, between the extremes of the rounds."""
    from cofx.bench import bench
    co = cofx.convert(cli_models.tiny(), torch.randn(1, 3, 6, 8, 8))
    r = bench(co, rounds=5)
    rounds = [clip / (step * co.stride) for step, clip in zip(r.step.values, r.clip.values)]
    assert len(rounds) == 5 and r.speedups.samples == 5
    assert r.speedup == sorted(rounds)[2] and r.speedups.q1 <= r.speedup <= r.speedups.q3


def test_bench_batch_and_threads(cli):
    code, out, err = cli("bench", "cli_models:tiny", "--rounds", "2", "--batch", "2", "--threads", "1")
    assert code == 0 and "batch 2, 1 thread(s), 2 rounds" in out and "round 2/2" in err
    assert "state memory 19 KiB for 2 stream(s)" in out
    assert torch.get_num_threads() == 1    # restored (the module runs on one thread)


@pytest.mark.slow
def test_bench_times_compiled_steps(cli):
    code, out, err = cli("bench", "cli_models:tiny", "--rounds", "2", "--compile")
    assert code == 0 and "forward_step (compiled, per step)" in out
    assert "compiling the step" in err and "phase 1/1" in err


def test_save_without_source_needs_a_picklable_model(tmp_path):
    co = cofx.convert(cli_models.unpicklable())
    with pytest.raises(ValueError, match="cannot be pickled.*source="):
        cofx.save(co, tmp_path / "x.continual.pt")


def test_a_speed_up_below_one_reads_as_slower():
    from cofx.cli import ratio
    assert ratio(2.04) == "2.0x faster" and ratio(0.8) == "1.2x slower" and ratio(1.0) == "1.0x faster"


def test_verify_refuses_a_stream_too_short_to_reach_an_output():
    co = cofx.convert(nn.Conv1d(2, 2, 5, padding=2).eval(), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match=r"steps must exceed the delay \(2 frames\)"):
        cofx.verify(co, steps=2)
    assert cofx.verify(co, steps=3).ok


def test_a_model_of_functional_max_pools_saves_without_source_and_loads_with_trust(tmp_path):
    torch.manual_seed(0)
    model, clip = cli_models.FunctionalPools().eval(), torch.randn(1, 4, 16)
    co = cofx.convert(model, clip)
    cofx.save(co, tmp_path / "pools.continual.pt")
    loaded = cofx.load(tmp_path / "pools.continual.pt", trust=True)
    assert torch.equal(loaded.forward_steps(clip, pad_end=True), co.forward_steps(clip, pad_end=True))
