"""The `cofx` command line: convert, inspect, verify and benchmark a clip model as a continual model.

Exit codes: 0 success; 1 `cofx verify` measured a mismatch; 2 a usage, loading
or conversion error (one line on stderr; --debug shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
import warnings

MODEL_HELP = """the clip model: a file written by torch.save(model) (needs --trust: loading
it runs code from the file), an import spec package.module:callable that builds
it (e.g. pytorchvideo.models.hub:x3d_s; called with pretrained=False), or a file
written by `cofx convert` (needs --trust: loading it imports and calls the code
the file names)"""

DESCRIPTION = """Turn a PyTorch clip model (a 3D CNN that takes a whole clip of frames) into a
continual model that takes one frame at a time with no redundant computation,
and check, inspect and time the result."""

EPILOG = """examples:
  cofx convert pytorchvideo.models.hub:x3d_s --weights x3d_s.pyth
  cofx convert model.pt --trust --input-shape 1,3,16,112,112
  cofx inspect model.pt --trust --dot latency.dot
  cofx verify model.continual.pt --trust --steps 64
  cofx bench model.continual.pt --trust --plot latency.png

exit codes: 0 ok, 1 verify found a mismatch, 2 usage, loading or conversion error.
Run `cofx COMMAND --help` for each command's options."""


class UsageError(Exception):
    """A mistake in what the user asked for; the message says how to fix it."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (with where to get help) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types -----------------------------------------------------------------------------

def input_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(
            f"bad --input-shape '{text}': give the clip's sizes B,C,T,... as positive integers, "
            "e.g. 1,3,16,112,112")
    return shape


def window(text: str) -> tuple:
    path, sep, frames = text.rpartition("=")
    if not sep or not path or not frames.isdigit() or int(frames) < 1:
        raise argparse.ArgumentTypeError(f"bad --window '{text}': give PATTERN=FRAMES, e.g. blocks.5.pool.pool=64")
    return path, int(frames)


def time_dim(text: str) -> int:
    try:
        dim = int(text)
    except ValueError:
        dim = 0
    if dim < 1:
        raise argparse.ArgumentTypeError(
            f"bad --time-dim '{text}': give the index of the input's time dimension, counted from 0 and at least 1 "
            "(dimension 0 is the batch), e.g. 2 for B,C,T,H,W or 1 for B,T,C")
    return dim


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return int(text)


# -- the parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cofx", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    model = _Parser(add_help=False)
    model.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    loading = model.add_argument_group("loading the model")
    loading.add_argument("--weights", metavar="FILE",
                         help="a state_dict to load into the model (or a checkpoint holding one under a key such "
                              "as state_dict or model_state); read with weights_only=True")
    loading.add_argument("--trust", action="store_true",
                         help="allow loading MODEL from a pickled file, or from a file written by cofx convert that "
                              "names the code building the model; this runs code the file names, so only for "
                              "files you made or trust (PyTorch's weights_only rule)")
    conv = model.add_argument_group("conversion")
    conv.add_argument("--input-shape", type=input_shape, metavar="B,C,T,...",
                      help="the clip the model takes, e.g. 1,3,16,112,112; needed unless the model implies "
                           "it (a pooling layer spanning the whole clip, as in X3D)")
    conv.add_argument("--time-dim", type=time_dim, default=None, metavar="DIM",
                      help="the input's time dimension (default 2: B,C,T,...); with another, pass --input-shape")
    conv.add_argument("--window", type=window, action="append", default=[], metavar="PATTERN=FRAMES",
                      help="sliding-window length of global temporal reductions matched by a glob pattern over "
                           "node names, module paths or module class names (repeatable), e.g. "
                           "SqueezeExcitation=1 for per-frame squeeze-and-excitation")
    conv.add_argument("--init", choices=("zeros", "replicate"), default=None,
                      help="start padding of the stream: zeros (exact, default) or replicate (the first frame "
                           "repeated: a shorter transient, not exact)")
    model.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    def command(name, help, description, epilog):
        return sub.add_parser(name, parents=[model], help=help, description=description, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("convert", "convert a clip model and save the continual model",
                "Convert MODEL into a continual model and save it. Load it in Python with\n"
                "cofx.load(OUT, source=SPEC) for a model given as an import spec SPEC, or\n"
                "cofx.load(OUT, trust=True) (files converted from a torch.save file need the latter).\n"
                "The file records the cofx and torch versions, the input shape, delay and receptive field.",
                "example:\n  cofx convert pytorchvideo.models.hub:x3d_s --weights x3d_s.pyth -o x3d_s.continual.pt")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="where to write the continual model (default: MODEL.continual.pt)")
    p.add_argument("--strict", action="store_true",
                   help="refuse any approximation (windowed reductions, replicate init): exit 2 instead")
    p.add_argument("--onnx", metavar="FILE",
                   help="also write one step as ONNX with explicit state (inputs frame, reset, state_*; outputs "
                        "output, ready, next_state_*), for ONNX Runtime and inference servers")
    p.set_defaults(run=run_convert)

    p = command("inspect", "show every node's kind, delay, state and FLOPs",
                "Show how MODEL converts: one row per node (kind, temporal kernel/stride/padding/\n"
                "dilation, receptive field, delay, state bytes, FLOPs per step) and a summary.",
                "example:\n  cofx inspect model.pt --trust --dot latency.dot && dot -Tpng latency.dot -o latency.png")
    p.add_argument("--json", action="store_true",
                   help="print JSON instead of a table, for machines (strict JSON: an unbounded receptive field "
                        "is the string \"inf\")")
    p.add_argument("--dot", metavar="FILE",
                   help="write a Graphviz graph of where the latency comes from: nodes coloured by kind and "
                        "labelled with their delay, delay buffers in red on the edges that hold them")
    p.set_defaults(run=run_inspect)

    p = command("verify", "check that the continual model matches the original",
                "Check the guarantees on random input (and on real frames with --video):\n"
                "  clip equivalence  stepping through a clip equals the original model on it\n"
                "  chunk invariance  any split of a stream into chunks gives the same outputs\n"
                "  state reset       clean_state, update_state=False and get/set_state behave\n"
                "Prints the max error of each check. Exit 0 when every check is within tolerance\n"
                "(float32: 1e-4, float64: 1e-9 of the output's largest magnitude), 1 on a mismatch,\n"
                "2 on usage or conversion errors. A windowed (not exact) model prints its measured\n"
                "deviation from the original and exits 0 unless --strict.",
                "example (in CI):\n  cofx verify pytorchvideo.models.hub:x3d_s --weights x3d_s.pyth --steps 48")
    p.add_argument("--steps", type=positive, metavar="N",
                   help="frames in the stream of the chunk and state checks (default: clip length + delay + 8)")
    p.add_argument("--video", metavar="FILE",
                   help="also check on frames decoded from this video (PyAV), resized to the model's frame size")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 1) when a windowed model deviates from the original beyond tolerance")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    p.set_defaults(run=run_verify)

    p = command("bench", "time a continual step against re-running the clip model",
                "Measure the latency of one forward_step against the sliding-window clip model\n"
                "(forward on a whole clip, which a streaming application without cofx runs for every\n"
                "output): median and interquartile range over interleaved rounds; plus FLOPs and\n"
                "state memory. Progress goes to stderr.",
                "example:\n  cofx bench pytorchvideo.models.hub:x3d_s --threads 4 --plot latency.png")
    p.add_argument("--batch", type=positive, default=1, metavar="B", help="streams processed together (default 1)")
    p.add_argument("--threads", type=positive, metavar="N", help="torch intra-op threads (default: torch's)")
    p.add_argument("--rounds", type=positive, default=20, metavar="N", help="timed rounds (default 20)")
    p.add_argument("--plot", metavar="FILE.png", help="draw latency per step and per clip as a bar chart")
    p.add_argument("--compile", action="store_true",
                   help="time compiled steps (co.compile_steps(): inductor, compiles for a while first)")
    p.set_defaults(run=run_bench)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"cofx {version('cofx')}"
    except PackageNotFoundError:
        return "cofx (not installed)"


# -- loading and converting ---------------------------------------------------------------------

def _load(args):
    """(original model, continual model, import spec or None) for MODEL and the conversion flags."""
    import torch
    import cofx
    from cofx import model_source, saving
    from cofx.clip_length import implied_input
    from cofx.dtype_device import dtype_device
    from cofx.tracer import trace

    if os.path.isfile(args.model) and saving.is_continual_file(args.model):
        flags = [f for f, on in (("--weights", args.weights), ("--input-shape", args.input_shape),
                                 ("--time-dim", args.time_dim is not None), ("--window", args.window),
                                 ("--init", args.init is not None)) if on]
        if args.command == "convert":
            raise UsageError(f"'{args.model}' is already a continual model; convert the original model")
        if flags:
            raise UsageError(f"{', '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply to "
                             f"'{args.model}', which is already converted (with the options it was saved with); "
                             "pass the original model to change how it converts")
        co = saving.load(args.model, trust=args.trust)
        return co, co, None
    args.time_dim = 2 if args.time_dim is None else args.time_dim
    args.init = args.init or "zeros"
    if args.input_shape and args.time_dim >= len(args.input_shape):
        raise UsageError(f"--time-dim {args.time_dim} is beyond the input's {len(args.input_shape)} dimensions "
                         f"(--input-shape {','.join(map(str, args.input_shape))}); give 1 to "
                         f"{len(args.input_shape) - 1}")
    spec = args.model if model_source.is_spec(args.model) else None
    if spec:
        model = model_source.from_spec(spec)
    else:
        model = model_source.from_file(args.model, trust=args.trust, command=f"cofx {args.command}")
    if args.weights:
        model_source.load_weights(model, args.weights)
    model.eval()
    if args.input_shape:
        example = torch.randn(args.input_shape, dtype=dtype_device(model)[0])
    else:
        gm = trace(model)
        try:
            example = implied_input(gm, args.time_dim)
        except cofx.ConversionError as e:
            raise UsageError(f"cannot infer the clip length of '{args.model}' ({e.why}); "
                             "pass --input-shape B,C,T,... e.g. 1,3,16,112,112") from None
    co = cofx.convert(model, example, strict=getattr(args, "strict", False) and args.command == "convert",
                      time_dim=args.time_dim, window=dict(args.window), init=args.init,
                      validate=args.command != "verify")   # verify measures and reports every check itself
    co.eval()
    return model, co, spec


def _default_output(model_arg: str) -> str:
    from cofx.model_source import is_spec
    if is_spec(model_arg):
        return model_arg.partition(":")[2].split(".")[-1] + ".continual.pt"
    root, ext = os.path.splitext(model_arg)
    return (root if ext in (".pt", ".pth", ".pkl", ".bin") else model_arg) + ".continual.pt"


_WRITING = {"convert": "converting", "inspect": "inspecting", "bench": "benchmarking"}


def _outputs(args, *outputs) -> None:
    """Refuse, before converting (which takes a while), files the command cannot or must not write, given as
    (flag, path, example name): a folder, a path in no folder, the model or weights file it reads (lost
    once written), or a path two flags name (one file cannot hold both)."""
    written = []
    for flag, path, example in outputs:
        if path is None:
            continue
        if os.path.isdir(path):
            raise UsageError(f"{flag} '{path}' is a folder; give a file name, e.g. "
                             f"{flag} {os.path.join(path, example)}")
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            raise UsageError(f"{flag} '{path}': the folder '{folder}' does not exist; create it or give another path")
        for given in (args.model, args.weights):
            if given and os.path.exists(given) and _same_file(path, given):
                raise UsageError(f"{flag} '{path}' is the input '{given}', which {_WRITING[args.command]} would "
                                 f"overwrite; give another {flag}")
        for other_flag, other in written:
            if _same_file(path, other):
                raise UsageError(f"{flag} '{path}' is the file {other_flag} '{other}' names, and one file cannot "
                                 f"hold both; give another {flag}")
        written.append((flag, path))


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: `samefile` where both exist (links, ./x and x), else the same real path."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


# -- commands -----------------------------------------------------------------------------------

def run_convert(args) -> int:
    from cofx import saving
    from cofx.summary import format_summary, summary
    out, onnx = args.output or _default_output(args.model), args.onnx
    _outputs(args, ("-o", out, "model.continual.pt"), ("--onnx", onnx, "model.onnx"))
    _, co, spec = _load(args)
    saving.save(co, out, source=spec)
    how = f"cofx.load({out!r}, source={spec!r})" if spec else (
        f"cofx.load({out!r}, trust=True) (it holds the model's pickled graph, as the model file did)")
    print(f"wrote {out}; load it with {how}")
    if onnx:
        from cofx.onnx_export import export_onnx
        info = export_onnx(co, onnx)
        print(f"wrote {onnx}: one step with {len(info['state_names'])} state tensors; start each stream "
              "with zero states and reset=True")
    print(format_summary(summary(co)))
    return 0


def run_inspect(args) -> int:
    from cofx.flops import node_step_flops
    from cofx.latency_graph import write_dot
    from cofx.summary import format_summary, summary
    _outputs(args, ("--dot", args.dot, "latency.dot"))
    _, co, _ = _load(args)
    facts = summary(co)
    flops = node_step_flops(co)
    if args.dot:
        write_dot(co, args.dot)
    if args.json:
        nodes = [{**row, "flops_per_step": flops.get(row["name"], 0)} for row in co.report.to_dicts()]
        print(json.dumps(_strict_json({"model": args.model, "summary": facts, "nodes": nodes}), indent=2,
                         allow_nan=False))
        return 0
    print(node_table(co.report, flops))
    print()
    print(format_summary(facts))
    if args.dot:
        print(f"\nwrote {args.dot} (render it with: dot -Tpng {args.dot} -o latency.png)")
    return 0


def _strict_json(obj):
    """`obj` with infinities as the strings "inf"/"-inf" and NaN as None: JSON has no such numbers."""
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def node_table(report, flops: dict) -> str:
    """The report as a table, with each node's FLOPs per step before the note."""
    from cofx.summary import human
    return report.table({"FLOPs/step": {r.name: human(flops.get(r.name, 0)) for r in report}})


def run_verify(args) -> int:
    from cofx.verify import verify
    model, co, _ = _load(args)
    report = verify(co, model, steps=args.steps, video=None, seed=args.seed, strict=args.strict)
    reports = [report]
    if args.video:
        reports.append(verify(co, model, steps=args.steps, video=args.video, strict=args.strict))
    kind = "exact" if co.is_exact else "not exact"
    print(f"cofx verify {args.model} ({kind}, {report.dtype})")
    for r in reports:
        print(f" on {r.input}:")
        print(r)
    failed = [(r, c) for r in reports for c in r.checks if c.required and not c.passed]
    if failed:
        r, c = failed[0]
        print(f"FAIL: {c.name} max error {c.max_error:.3g} exceeds the tolerance {c.tolerance:.3g}"
              + (f" ({c.note})" if c.note else ""))
        return 1
    deviation = max((c.max_error for r in reports for c in r.checks if not c.required), default=None)
    if deviation is not None:
        print(f"PASS, not exact: the continual model deviates from the original by up to {deviation:.3g} "
              "by design (see cofx inspect); --strict fails on it")
    else:
        print("PASS: every check is within tolerance")
    return 0


def ratio(speedup: float) -> str:
    """A speed-up in words that stay true below 1."""
    return f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"


def run_bench(args) -> int:
    from cofx.bench import bench
    from cofx.summary import human, human_bytes, summary
    _outputs(args, ("--plot", args.plot, "latency.png"))
    _, co, _ = _load(args)
    facts = summary(co)

    def progress(done, total):
        print(f"\rbench: round {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
    if args.compile:
        print("bench: compiling the step...", file=sys.stderr, flush=True)
        co.compile_steps(batch=args.batch, verbose=True)
    print(f"bench: {args.rounds} rounds, batch {args.batch}...", file=sys.stderr, flush=True)
    result = bench(co, batch=args.batch, threads=args.threads, rounds=args.rounds, progress=progress)
    clip_len = co.clip_shape[co.options["time_dim"]]
    ms = 1e3
    rows = [(f"forward_step ({'compiled' if args.compile else 'continual'}, per step)", result.step),
            (f"forward on a {clip_len}-frame clip (per output)", result.clip)]
    width = max(len(name) for name, _ in rows)
    print(f"cofx bench {args.model}: batch {result.batch}, {result.threads} thread(s), {args.rounds} rounds")
    print(f"  {'':<{width}}  median     interquartile range")
    for name, t in rows:
        print(f"  {name:<{width}}  {t.median * ms:8.3f} ms  {t.q1 * ms:.3f} - {t.q3 * ms:.3f} ms")
    print(f"  per output: continual {result.per_output * ms:.3f} ms vs clip model {result.clip.median * ms:.3f} ms "
          f"({ratio(result.speedup)}: the median of the rounds' ratios)")
    print(f"  FLOPs per step {human(facts['flops_per_step'])}, per clip {human(facts['flops_per_clip'])}")
    print(f"  state memory {human_bytes(facts['state_bytes'] * args.batch)} for {args.batch} stream(s)")
    if args.plot:
        from cofx.barchart import bar_chart
        bars = [("forward_step", result.step.median * ms, result.step.q1 * ms, result.step.q3 * ms)]
        if co.stride > 1:
            per = result.stride * ms
            bars.append((f"{co.stride} steps (one output)", result.step.median * per, result.step.q1 * per,
                         result.step.q3 * per))
        bars.append((f"clip forward ({clip_len} frames)", result.clip.median * ms, result.clip.q1 * ms,
                     result.clip.q3 * ms))
        bar_chart(args.plot, bars, f"cofx bench: latency, batch {result.batch}, {result.threads} thread(s)", "ms",
                  note=f"bars: median; whiskers: interquartile range over {args.rounds} interleaved rounds")
        print(f"wrote {args.plot}")
    return 0


# -- entry point --------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    with warnings.catch_warnings():
        if not args.debug:   # keep the output to cofx's own words; --debug shows everything
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=r"cofx(\.|$)")
            torch_log.setLevel(logging.CRITICAL)
        try:
            return args.run(args)
        except KeyboardInterrupt:
            print(f"cofx {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:   # every error is one line unless --debug
            if args.debug:
                traceback.print_exc()
            print(f"cofx {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        finally:
            torch_log.setLevel(level)


def _one_line(e: Exception) -> str:
    from cofx.errors import ConversionError, StreamError
    from cofx.model_source import SourceError
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    if isinstance(e, (UsageError, SourceError, ConversionError, StreamError, ValueError, OSError)):
        return text
    return f"{type(e).__name__}: {text} (run again with --debug for the traceback)"
