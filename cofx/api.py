"""`cofx.convert`: a clip model in, a continual model out."""
from __future__ import annotations

import itertools
import math
import numbers
import sys
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from cofx import passes
from .clip_length import implied_input
from .conversion_digest import digest
from .dtype_device import dtype_device
from .attributes_kept import attributes_kept
from .errors import ConversionError
from .kernels import StreamContext
from .module import ContinualModule
from .report import Report, Row, op_label, temporal_params
from .scratch_stream import scratch_stream
from .tracer import is_namedtuple_call, trace
from .validate import validate as validate_steps

INITS = ("zeros", "replicate")


def convert(model: nn.Module, example_input: Optional[torch.Tensor] = None, *, strict: bool = False,
            leaf_modules: Iterable = (), time_dim: int = 2, window: Optional[Mapping[str, int]] = None,
            init: str = "zeros", tune: bool = True, validate: bool = True, verbose: bool = False) -> ContinualModule:
    """Convert a clip model into a continual model that shares its weights.

    Args:
        model: an ``nn.Module`` whose forward takes a clip (B, C, T, ...).
        example_input: a clip of the size the model will see (frame size and
            clip length). Optional when the model implies it (a pooling layer
            spanning the clip, as in X3D).
        strict: refuse any approximation (windowed reductions, replicate init).
        leaf_modules: module types, instances or qualified names to keep whole
            (they must act frame by frame; cofx checks).
        time_dim: the input's time dimension.
        window: frames of the sliding window of global temporal reductions, by
            module path or node name, e.g. ``{"blocks.5.pool.pool": 64}`` to
            pool over 64 frames, or 1 for per-frame squeeze-and-excitation.
        init: start padding of every temporal op: ``"zeros"`` (exact) or
            ``"replicate"`` (the first frame repeated; shorter start-up transient).
        tune: time the equivalent implementations of each Conv3d step on this
            machine and use the fastest (results differ by float rounding only).
            Choices are cached on disk per op shape, dtype, thread count, torch
            version and CPU, in ``$COFX_CACHE_DIR`` (default
            ``$XDG_CACHE_HOME/cofx``, else ``~/.cache/cofx``), so converting again
            on the same machine times nothing.
        validate: check the continual model against ``model`` on fresh random
            inputs before returning it (`cofx.validate`); ``False`` skips the
            check, and a model that the conversion rules miss may then step wrong.
        verbose: print progress.

    Returns:
        A `ContinualModule`.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"cofx.convert takes an nn.Module, got {type(model).__name__}")
    _check_model_kind(model)
    if isinstance(time_dim, numbers.Integral) and not isinstance(time_dim, bool):
        time_dim = int(time_dim)   # a numpy int read from a config
    leaf_modules = _check_arguments(model, time_dim, leaf_modules, window)
    say = (lambda msg: print(f"cofx: {msg}", file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    modes = {m: m.training for m in model.modules()}
    kept = _kept_tensors(model)
    with attributes_kept(model):   # modes, counters, plain tensors: the model comes back as it was
        model.eval()
        try:
            co = _convert(model, example_input, strict, leaf_modules, time_dim, window, init, tune, validate,
                          say, kept)
        finally:
            _restore(model, kept)
    co.train(modes[model])
    _set_modes(modes)   # co.train set the mode of the model's own submodules, which co holds
    say(f"done: receptive field {co.receptive_field}, delay {co.delay}, stride {co.stride}, "
        f"{'exact' if co.is_exact else 'not exact'}")
    return co


def _convert(model, example_input, strict, leaf_modules, time_dim, window, init, tune, validate, say, kept):
    say("tracing")
    gm = trace(model, leaf_modules)
    training_differs = _training_graph_differs(model, leaf_modules, gm)
    if example_input is None:
        example_input = implied_input(gm, time_dim)
        say(f"input implied by the model: {tuple(example_input.shape)}")
    clip = _check_example(example_input, time_dim, model)
    _check_single_input(gm)
    _check_input_shape_kept(gm)
    _check_no_namedtuples(gm)
    passes.frame_sizes_as_numbers(gm, clip, time_dim)
    passes.inplace_as_functional(gm)
    passes.diff_as_slices(gm)
    passes.im2col_as_unfold(gm)
    passes.stft_as_frames(gm)
    passes.unfold_as_slices(gm)
    passes.views_collapsed(gm)
    passes.values_only(gm)
    passes.lp_pool_as_avg(gm)
    passes.negative_pads_as_crops(gm)
    say("recording shapes on the clip, a longer clip and two streams")
    errors = _first_runs(gm, model, clip, time_dim)
    rewritten = passes.name_view_batches(gm)
    rewritten += passes.outputs_unpacked(gm)
    rewritten += passes.stacked_frames(gm)
    rewritten += passes.zeros_as_pad(gm)
    rewritten += passes.reduce_before_view(gm)
    rewritten += passes.matmul_before_view(gm)
    rewritten += passes.frames_resized_alone(gm)
    if rewritten:
        errors = passes.record_runs(gm, _runs(clip, time_dim))
    if errors["longer"] and clip.shape[time_dim] > 1:   # time told apart by a shorter clip there
        passes.record_runs(gm, {"shorter": clip.narrow(time_dim, 0, clip.shape[time_dim] // 2)})
    passes.label_layouts(gm)
    passes.mark_length_values(gm)
    say("classifying nodes")
    passes.classify_nodes(gm, time_dim, window, errors["longer"])
    passes.fold_crops(gm)
    say("checking frame-by-frame ops on the clip")
    passes.check_framewise(gm, clip)
    passes.check_causal(gm, clip)
    passes.annotate_timing(gm, replicate=init == "replicate")
    _check_strict(gm, strict, init)
    if tune:
        say("timing step implementations of each Conv3d")
        passes.select_kernels(gm)
    passes.mark_batchnorm_folds(gm)
    ctx = StreamContext(init)
    say("building the continual graph")
    graph, kernels, out_axes, node_kernels = passes.build_step_graph(gm, ctx)
    passes.read_rows(graph, kernels, gm)
    newest = passes.newest_rows(graph, kernels, gm)
    info = _summary(gm, clip, time_dim, out_axes, node_kernels, init)
    finite = clip[clip.isfinite()]   # (what a load converts the saved model on: `saving.load`)
    info["example_range"] = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
    info["options"] = dict(strict=strict, leaf_modules=tuple(leaf_modules), time_dim=time_dim,
                           window=dict(window or {}), init=init, tune=tune)
    info.update(model=model, training_differs=training_differs)
    co = ContinualModule(gm, graph, kernels, ctx, info, newest_graph=newest)
    _check_unchanged(model, kept)
    if validate:
        say("validating the continual model against the clip model on fresh inputs")
        _validate(co, model, clip, kept)
    return co


def _validate(co, model: nn.Module, clip: torch.Tensor, kept: dict) -> None:
    """Validate `co` against `model` (`cofx.validate`) and record the digest of what was validated (in eval
    mode, as steps run, on the clean state the validation then steps)."""
    co.eval()
    validated = digest(co)
    validate_steps(co, model, clip)
    _check_unchanged(model, kept)
    co._info["validated"] = validated


def validate_converted(co, model: nn.Module, clip: torch.Tensor) -> None:
    """The validation `convert` runs, for `co` converted from `model` with ``validate=False``."""
    kept = _kept_tensors(model)
    with attributes_kept(model):
        model.eval()
        try:
            _validate(co, model, clip, kept)
        finally:
            _restore(model, kept)


def _training_graph_differs(model: nn.Module, leaf_modules, gm) -> bool:
    """Whether tracing in training mode gives another graph (`if self.training`, `F.dropout(training=...)`):
    steps, built from the eval graph, then need eval mode."""
    slots = [(live, dict(live)) for m in model.modules() for live in (m._parameters, m._buffers)]
    model.train()
    try:
        return trace(model, leaf_modules).code != gm.code
    except ConversionError:
        return True
    finally:
        for live, saved in slots:   # tracing ``if self.training: self.n += 1`` stores a Proxy in the slot
            for name, tensor in saved.items():
                if live[name] is not tensor:
                    live[name] = tensor
        model.eval()


def _kept_tensors(model: nn.Module) -> dict:
    """A copy of every parameter and buffer, to give the model back as it came and to see what its forward
    changes."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {k: (v, v.detach().clone()) for k, v in named if v is not None}


def _check_unchanged(model: nn.Module, kept: dict) -> None:
    now = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    for name, (tensor, copy) in kept.items():
        if now.get(name) is not tensor or not _same(tensor.detach(), copy):
            raise ConversionError(f"the model's forward changes its {'parameter' if isinstance(tensor, nn.Parameter) else 'buffer'} "
                                  f"'{name}': a continual model cannot repeat that update once per clip",
                                  fix="keep running counters and statistics outside forward (or update them only "
                                  "in training mode)")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (an uninitialised buffer may hold NaN)."""
    return torch.equal(a, b) or (a.shape == b.shape and a.is_floating_point()
                                 and bool(((a == b) | (a.isnan() & b.isnan())).all()))


def _set_modes(modes: dict) -> None:
    for m, training in modes.items():
        m.train(training)


def _restore(model: nn.Module, kept: dict) -> None:
    with torch.no_grad():
        for name, (tensor, copy) in kept.items():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            slots = module._parameters if leaf in module._parameters else module._buffers
            if (slots[leaf] if leaf in slots else None) is not tensor:   # (a scripted module's have no .get)
                slots[leaf] = tensor
            if not _same(tensor.detach(), copy):
                tensor.detach().copy_(copy)


def _check_model_kind(model: nn.Module) -> None:
    """Wrappers whose forward is not the model's code to trace: refused with the module to pass instead."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ConversionError(f"the model is a TorchScript {type(model).__name__} as a whole: torch.fx traces "
                              "Python modules, and a scripted model's code cannot be taken apart",
                              fix="convert the nn.Module before torch.jit.script (scripted submodules inside a "
                                  "Python model are kept whole and checked frame by frame)")
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, parallel):
        raise ConversionError(f"the model is wrapped in {type(model).__name__}, which splits the batch over "
                              "devices at every call", fix="convert model.module, the model it wraps")
    meta = next((n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
                 if t.device.type == "meta"), None)
    if meta is not None:
        raise ConversionError(f"the model's tensor '{meta}' is on the meta device (no values): cofx runs the "
                              "model on the example to check the conversion",
                              fix="give the model real weights first (model.to_empty(device='cpu'), then load them)")


def _check_arguments(model: nn.Module, time_dim, leaf_modules, window) -> tuple:
    """The leaf modules as a tuple: one module, type or name stands for itself (a string or an nn.Sequential
    would otherwise be taken apart into its characters or its children)."""
    if not isinstance(time_dim, int) or isinstance(time_dim, bool) or time_dim < 1:
        raise ConversionError(f"time_dim must be a positive int (dim 0 is the batch of streams), got {time_dim!r}",
                              fix="pass the input's time dimension counted from the front: 2 for (B, C, T, ...), "
                              "1 for (B, T, C)")
    leaf_fix = "name module types (nn.LSTM), instances (model.head) or qualified names ('blocks.3')"
    if leaf_modules is None:
        raise ConversionError("leaf_modules is None, not a list", fix=f"pass leaf_modules=() for none, or {leaf_fix}")
    if isinstance(leaf_modules, (str, nn.Module, type)):
        leaf_modules = (leaf_modules,)
    try:
        leaf_modules = tuple(leaf_modules)
    except TypeError:
        raise ConversionError(f"leaf_modules is {leaf_modules!r} ({type(leaf_modules).__name__}), not a list",
                              fix=f"pass a list: {leaf_fix}") from None
    for leaf in leaf_modules:
        if not (isinstance(leaf, (str, nn.Module)) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
            raise ConversionError(f"leaf_modules holds {leaf!r} ({type(leaf).__name__})", fix=leaf_fix)
        if isinstance(leaf, str) and leaf not in dict(model.named_modules()):
            raise ConversionError(f"leaf_modules names '{leaf}', which is not a submodule of the model",
                                  fix="use a name from dict(model.named_modules())")
    window_fix = ('pass a dict of glob patterns to frames, e.g. window={"blocks.5.pool.pool": 64} '
                  '(1 for per-frame gates), or leave window= out for the clip length')
    if window is not None and not isinstance(window, Mapping):
        raise ConversionError(f"window is {window!r} ({type(window).__name__}), not a dict", fix=window_fix)
    for key, frames in (window or {}).items():
        if not isinstance(key, str) or not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ConversionError(f"window holds {key!r}: {frames!r} ({type(frames).__name__}); a window is a "
                                  "pattern and a positive whole number of frames", fix=window_fix)
    return leaf_modules


def _check_example(x, time_dim, model: nn.Module) -> torch.Tensor:
    if isinstance(x, (tuple, list, dict)):
        raise ConversionError(f"example_input is a {type(x).__name__} of {len(x)}: cofx streams one input tensor",
                              fix="wrap the model so that forward takes one clip (streams concatenated along the "
                              "channels, say) and pass that clip")
    if not isinstance(x, torch.Tensor):
        raise ConversionError(f"example_input must be a clip tensor (B, C, T, ...), got {type(x).__name__}")
    if x.dim() <= time_dim:
        raise ConversionError(f"example_input of shape {tuple(x.shape)} has no time dimension {time_dim}",
                              fix="pass a clip shaped (B, C, T, ...) or set time_dim=")
    if x.device.type == "meta":
        raise ConversionError("example_input is on the meta device (no values): cofx runs the model on the "
                              "example to check the conversion", fix="pass a clip with values on the model's device")
    if not x.is_floating_point():
        raise ConversionError(f"example_input is {x.dtype}: cofx checks the conversion on random clips of the "
                              "example's dtype", fix="pass a floating-point clip (x.float())")
    if x.shape[0] == 0 or x.shape[time_dim] == 0:
        raise ConversionError(f"example_input of shape {tuple(x.shape)} is empty",
                              fix="pass a clip of at least one stream and the clip length the model sees")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and param.dtype != x.dtype:
        raise ConversionError(f"example_input is {x.dtype} but the model's parameters are {param.dtype}",
                              fix=f"pass example_input.to({param.dtype}) or convert model.to({x.dtype})")
    x = x[:1].detach()
    formats = [torch.contiguous_format] + [{4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())]
    if not any(f is not None and x.is_contiguous(memory_format=f) for f in formats):
        x = x.contiguous()   # a strided view (x[:, ::2]): the checks' copies of it are dense, and half-precision
    return x                 # matmuls round dense and strided inputs apart


def _check_single_input(gm) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(n.users for n in placeholders[1:]):
        raise ConversionError("the model takes more than one input", node=placeholders[1],
                              fix="wrap the model so that forward takes the clip only")


_RESHAPED_IN_PLACE = {"unsqueeze_", "squeeze_", "transpose_", "t_", "swapaxes_", "swapdims_", "resize_",
                      "resize_as_", "as_strided_", "set_"}


def _check_input_shape_kept(gm) -> None:
    """An input whose shape forward changes in place (``x.transpose_(1, 2)``) is another tensor before and after
    that call, which the trace does not tell apart: refused with the out-of-place form."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for user in x.users:
        if user.op == "call_method" and user.target in _RESHAPED_IN_PLACE and user.args[0] is x:
            raise ConversionError(f"forward changes the shape of its input in place (.{user.target}())", node=user,
                                  fix=f"assign the result instead: x = x.{user.target[:-1]}(...)")


def _check_no_namedtuples(gm) -> None:
    """A namedtuple returned is an output like a tuple (`tracer`); one passed to an op is a call of its class,
    which the continual graph has no meaning for: refused with the forms it has."""
    for node in gm.graph.nodes:
        if is_namedtuple_call(node):
            fields = node.target._fields
            raise ConversionError(f"passes the namedtuple {node.target.__name__}{tuple(fields)} of tensors to another "
                                  "op or returns it inside a container: cofx streams a namedtuple only as the whole "
                                  "output", node=node,
                                  fix=f"pass a tuple or a dict (dict({', '.join(f'{f}=...' for f in fields)})) "
                                  f"instead of {node.target.__name__}(...)")


def _first_runs(gm, model: nn.Module, clip: torch.Tensor, time_dim: int) -> dict:
    """`record_runs` of the traced graph; where it fails on the example the model itself takes, the trace fixed
    a path the model does not take (a ``try``/``except`` around a call, a branch on a value): said so."""
    runs = _runs(clip, time_dim)
    try:
        errors = passes.record_runs(gm, {"clip": runs.pop("clip")})
    except ConversionError as e:
        try:
            with torch.no_grad():
                model(clip)
        except Exception:
            raise e from None
        raise ConversionError(f"{e.why}, which the model itself takes: torch.fx fixed at tracing a path through "
                              "forward that the model does not take", node=e.node,
                              fix="write forward without Python control flow on what tracing cannot know (a "
                              "try/except around a call, a branch on a tensor's value), or keep the module that "
                              "has it whole with leaf_modules=[...] if it acts frame by frame") from None
    return {**errors, **passes.record_runs(gm, runs)}


def _runs(clip: torch.Tensor, time_dim: int) -> dict:
    t = clip.shape[time_dim]
    extra = max(2 * t, 32)
    more = torch.randn_like(clip.narrow(time_dim, 0, 1).expand(
        *[extra if i == time_dim else -1 for i in range(clip.dim())]).contiguous())
    longer = torch.cat([clip, more * clip.std().clamp_min(1e-3)], time_dim)
    return {"clip": clip, "longer": longer, "batch": torch.cat([clip, clip], 0)}


def _exactness(gm) -> dict:
    exact = {}
    for node in gm.graph.nodes:
        own = node.meta.get("cofx_kind") != "windowed"
        exact[node] = own and all(exact.get(a, True) for a in node.all_input_nodes)
    return exact


def _check_strict(gm, strict: bool, init: str) -> None:
    if not strict:
        return
    bad = [n for n in gm.graph.nodes if n.meta.get("cofx_kind") == "windowed"]
    if init != "zeros":
        raise ConversionError(f"init={init!r} is not exact at the start of a stream and strict=True refuses it",
                              fix="use init='zeros' or strict=False")
    if bad:
        lines = "; ".join(f"{n.name} ({op_label(n)}): {temporal_params(n.meta['cofx_spec'])[4]}" for n in bad)
        raise ConversionError(f"strict=True refuses windowed approximations: {lines}",
                              fix="pass strict=False to accept them (co.report lists each window), "
                              "or set window= to the clip length")


def _summary(gm, clip, time_dim, out_axes, node_kernels, init) -> dict:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    timings = [a.meta["cofx_timing"] for a in out.all_input_nodes if a.meta.get("cofx_timing")]
    if not timings:
        raise ConversionError("the output does not depend on the input stream")
    exact = _exactness(gm)
    frame = tuple(s for i, s in enumerate(clip.shape) if i not in (0, time_dim))
    return dict(
        time_dim=time_dim, frame_shape=frame, out_time_axes=out_axes, clip_shape=tuple(clip.shape),
        delay=max(t.ready for t in timings), receptive_field=max(t.receptive_field for t in timings),
        stride=timings[0].stride, period=math.lcm(*(n.meta["cofx_timing"].stride for n in gm.graph.nodes
                                                   if n.meta.get("cofx_timing"))),
        exact=all(exact[a] for a in out.all_input_nodes) and init == "zeros",
        make_report=lambda co: _report(gm, co, node_kernels, exact))


def _report(gm, co: ContinualModule, node_kernels: dict, exact: dict) -> Report:
    sizes = _steady_state_bytes(co)
    rows = Report()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        timing = node.meta.get("cofx_timing")
        k, s, p, d, note = temporal_params(node.meta.get("cofx_spec"))
        if "cofx_rows" in node.meta:   # narrowed to the row the model reads (passes.read_rows)
            dim, row = node.meta["cofx_rows"]
            note = "; ".join(filter(None, (note, f"row {row} of dim {dim} only, the row read")))
        rows.append(Row(name=node.name, op=op_label(node), kind=node.meta.get("cofx_kind", "time-free"),
                        kernel=k, stride=s, padding=p, dilation=d,
                        receptive_field=timing.receptive_field if timing else None,
                        delay=timing.ready if timing else None,
                        state_bytes=sum(sizes.get(name, 0) for name in node_kernels.get(node.name, [])),
                        exact=exact[node], checked="examples" if _is_leaf(gm, node) else "rule", note=note))
    return rows


def _is_leaf(gm, node) -> bool:
    """A module of the stream whose code the trace did not enter and that is not one of torch's own layers."""
    if node.op != "call_module" or node.meta.get("cofx_role") not in ("stream", "folded"):
        return False
    return not type(gm.get_submodule(node.target)).__module__.startswith("torch.")


def _steady_state_bytes(co: ContinualModule) -> dict:
    """State bytes per kernel after a stream of batch 1 has run long enough to reach steady state."""
    info = co._info
    with scratch_stream(co, eval_mode=False), torch.no_grad():
        dtype, device = dtype_device(co)
        shape = list(info["clip_shape"])
        shape[info["time_dim"]] = co.warmup_frames
        co.forward_steps(torch.zeros(shape, dtype=dtype, device=device))
        return {n: sum(t.numel() * t.element_size() for t in k.state_tensors()) for n, k in co._named_kernels()}
