"""torch.fx tracing that accepts the models people actually write.

Differences from `torch.fx.symbolic_trace`:
- a submodule whose code cannot be traced (autograd Functions, data-dependent
  Python) becomes a leaf instead of failing the whole trace; the analysis later
  checks that such a leaf really acts frame by frame;
- `leaf_modules` lets the user keep chosen modules (types, instances or
  qualified names) whole;
- forward's optional arguments after the clip are bound to their defaults,
  whatever they hold (tuples, tensors, functions), and leave no placeholder;
- numpy scalars in arguments (pytorchvideo keeps kernel sizes as numpy ints)
  become Python numbers;
- tensor factories given sizes read off tensors (``torch.ones(T, T)``, as
  attention masks are made) are recorded as calls, where fx would fail;
- stack traces are recorded so errors can point at the user's source line.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Iterable, Union

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph import _PyTreeCodeGen
from torch.utils._pytree import tree_flatten, tree_unflatten

from .attributes_kept import attributes_kept
from .containers import containers_copied
from .errors import ConversionError, first_line, raised_at

LeafSpec = Union[type, nn.Module, str]
MORE_INPUTS_FIX = "wrap the model so that forward takes the clip only"
_FACTORIES = ("ones", "zeros", "empty", "full", "rand", "randn", "randint", "eye", "tril_indices", "triu_indices")


class CofxTracer(fx.Tracer):
    def __init__(self, leaf_modules: Iterable[LeafSpec] = ()):
        super().__init__()
        self.record_stack_traces = True
        # buffers read in forward are graph inputs, as parameters are: a table or mask sliced by the clip length
        # (`self.pe[:x.size(1)]`) is then an op cofx can give a meaning, not a constant fx cannot slice
        self.proxy_buffer_attributes = True
        leaves = list(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_ids = {id(x) for x in leaves if isinstance(x, nn.Module)}
        self._leaf_names = {x for x in leaves if isinstance(x, str)}
        self.untraceable: dict[str, str] = {}
        self.bound: list[fx.Node] = []   # the placeholders of the arguments `trace` binds to their defaults
        self._bound_names: set = set()
        self._params: dict = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or id(m) in self._leaf_ids or qualname in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)

    def create_arg(self, a):
        if isinstance(a, np.generic):
            return a.item()
        if isinstance(a, np.ndarray) and a.ndim == 0:
            return a.item()
        return super().create_arg(a)

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        """A bound argument's placeholder without its default: forward runs on the default itself, and fx would
        write it into the generated code (a tuple or a dict there does not compile; a function or a module
        cannot be written at all)."""
        name, _, count = target.rpartition("_") if kind == "placeholder" else ("", "", "")
        bound = name in self._bound_names and count.isdigit() and target not in self._params
        proxy = super().create_proxy(kind, target, () if bound else args, kwargs, *rest, **more)
        if bound:
            self.bound.append(proxy.node)
        proxy.node.meta["cofx_grad"] = torch.is_grad_enabled()   # off inside `with torch.no_grad():`
        return proxy

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """forward(self, x, *args, **kwargs) runs as a step calls it, on the clip alone: *args is () and
        **kwargs is {} (their placeholders stay, unread)."""
        root_fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)

        def empty(a):
            target = a.node.target if isinstance(a, fx.Proxy) and a.node.op == "placeholder" else ""
            return {} if target.startswith("**") else () if target.startswith("*") else a
        return root_fn, [empty(a) for a in args]

    def trace(self, root, concrete_args=None):
        self._bound_names = set(concrete_args or ()) if isinstance(concrete_args, dict) else set()
        self._params = _parameters(root)
        originals = {name: getattr(torch, name) for name in _FACTORIES}
        try:   # as fx patches the functions it wraps, for the length of the trace
            for name, make in originals.items():
                setattr(torch, name, self._factory(make))
            with warnings.catch_warnings():   # fx's warning that it cannot check a bound argument: none is passed
                warnings.filterwarnings("ignore", message="Was not able to add assertion")
                return super().trace(root, concrete_args)
        finally:
            for name, make in originals.items():
                setattr(torch, name, make)

    def _factory(self, make):
        def factory(*args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in tree_flatten((args, kwargs))[0]):
                return self.create_proxy("call_function", make, args, kwargs)
            return make(*args, **kwargs)
        return factory

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        if isinstance(m, torch.jit.ScriptModule):   # fx cannot see into TorchScript: kept whole, checked as a leaf
            self.untraceable[name] = "it is a TorchScript module: give cofx the module before torch.jit.script"
            return self.create_proxy("call_module", name, args, kwargs)
        given = containers_copied((args, kwargs))   # as they came: a failed trace may have written into them
        depth = len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # the module's code is not traceable: keep it whole
            while len(self.module_stack) > depth:   # fx pops its module stack only when forward returns
                self.module_stack.popitem()
            self.untraceable[name] = f"{type(e).__name__}: {e}"
            return self.create_proxy("call_module", name, *given)


def trace(model: nn.Module, leaf_modules: Iterable[LeafSpec] = ()) -> fx.GraphModule:
    """Trace `model` into a GraphModule whose graph calls the model's own submodules; the model's attributes
    come back as they were (forward run on proxies may assign them, fx adds its constants)."""
    with attributes_kept(model):
        return _trace(model, leaf_modules)


def _trace(model: nn.Module, leaf_modules: Iterable[LeafSpec]) -> fx.GraphModule:
    tracer = CofxTracer(leaf_modules)
    defaults = _defaults_after_first(model) or {}
    try:
        with torch.enable_grad():   # (so that a block that turns gradients off shows, whatever the caller's mode)
            graph = tracer.trace(model, concrete_args=defaults or None)
    except Exception as e:
        held = [k for k, v in defaults.items() if any(isinstance(a, nn.Module) for a in tree_flatten(v)[0])]
        if "not installed as a submodule" in str(e) and held:
            raise ConversionError(f"forward's argument '{held[0]}' defaults to a module that the model does not "
                                  "hold, which torch.fx cannot call",
                                  fix=f"make it a submodule (self.{held[0]} = ...) or {MORE_INPUTS_FIX}") from e
        fix = ("make the forward traceable (no Python control flow on tensor values), "
               "or pass the offending submodules as leaf_modules=[...] if they act frame by frame")
        if "does not support item assignment" in str(e):
            fix = ("build the tensor instead of assigning into its slices (torch.cat of the parts, F.pad for a "
                   "shift along time), or pass the module as leaf_modules=[...] if it acts frame by frame")
        if "finfo" in str(e) or "iinfo" in str(e):
            fix = ("name the dtype instead of reading it off a tensor the trace follows: torch.finfo(torch.float32)"
                   ".min (the dtype the model runs in), or float('-inf') for a mask")
        if "cannot be iterated" in str(e):
            fix = ("name the sizes instead of iterating or star-unpacking a shape or a tensor (b, c, t, h, w = "
                   "x.shape, then x.view(b, c, t, h * w); not x.view(b, c, *x.shape[2:]) or a loop over x.shape)")
        raise ConversionError(f"torch.fx could not trace the model ({type(e).__name__}: {first_line(e)})",
                              fix=fix, at=raised_at(e)) from e
    fixed = set(tracer.bound)
    for node in list(graph.nodes):   # the guards fx adds for arguments fixed at their default
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name == "_assert_is_none":
            graph.erase_node(node)
        elif name == "_assert" and isinstance(node.args[0], fx.Node) \
                and set(node.args[0].all_input_nodes) <= fixed:
            condition = node.args[0]
            graph.erase_node(node)
            if not condition.users:
                graph.erase_node(condition)
    for node in tracer.bound:   # forward ran on the defaults themselves: nothing reads these
        if not node.users:
            graph.erase_node(node)
    _refuse_other_inputs(graph)
    _unflattened(graph)
    _namedtuples_returned_as_values(graph)
    _grad_modes_kept(graph)
    try:
        gm = fx.GraphModule(model, graph, model.__class__.__name__)
    except Exception as e:
        raise ConversionError(f"torch.fx could not write the code of the traced model ({type(e).__name__}: {e})",
                              fix=f"{MORE_INPUTS_FIX} (forward's {', '.join(map(repr, defaults))} are bound to "
                              "their defaults)" if defaults else None) from e
    if tracer.untraceable:  # drop what was traced of them before tracing gave up
        gm.graph.eliminate_dead_code()
        gm.recompile()
    adopt_attributes(gm, model)
    gm.meta["cofx_untraceable"] = dict(tracer.untraceable)
    return gm


def _grad_modes_kept(graph: fx.Graph) -> None:
    """``with torch.no_grad():`` inside forward, which fx does not record: the nodes traced with gradients off
    run with them off, between a switch off and a switch back to the mode the caller had (a frozen backbone
    under a head that trains gets no gradients, in forward and in the steps alike)."""
    before, off = None, False
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            continue
        wants_off = node.op != "output" and node.meta.get("cofx_grad") is False
        if wants_off != off:
            with graph.inserting_before(node):
                if wants_off:
                    before = graph.call_function(torch.is_grad_enabled)
                graph.call_function(torch._C._set_grad_enabled, (False if wants_off else before,))
            off = wants_off


def _refuse_other_inputs(graph: fx.Graph) -> None:
    """forward's arguments after the clip without a default that it never reads (`forward(self, x, lengths)`):
    a stream has one input, and a step could not be given a value for them (`convert` refuses those it reads
    once it has checked the example)."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        if not node.users and not node.target.startswith("*"):   # *args and **kwargs are empty
            raise ConversionError("the model takes more than one input", node=node, fix=MORE_INPUTS_FIX)


def _unflattened(graph: fx.Graph) -> None:
    """fx's plain calling convention and output again where a default was a tuple, list or dict: fx traced a
    wrapper that takes every argument flattened and returns the outputs flattened, for code taking the bound
    arguments, which no longer exist."""
    if not isinstance(graph._codegen, _PyTreeCodeGen):
        return
    output = graph.find_nodes(op="output")[0]
    output.args = (tree_unflatten(list(output.args[0]), graph._codegen.pytree_info.out_spec),)
    graph._codegen = fx.graph.CodeGen()


def is_namedtuple_call(node: fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and isinstance(target, type) and issubclass(target, tuple) \
        and hasattr(target, "_fields")


def _namedtuples_returned_as_values(graph: fx.Graph) -> None:
    """A namedtuple returned, which fx records as a call of its class, becomes the output's value: a namedtuple
    of nodes, a pytree of them as every output is in cofx (and fx's code builds it the same). One passed to an
    op, or returned inside a container (fx's code cannot build that), stays a call, which `convert` refuses."""
    output = graph.find_nodes(op="output")[0]
    value = output.args[0]
    if isinstance(value, fx.Node) and is_namedtuple_call(value) and set(value.users) == {output} \
            and not value.kwargs and not any(is_namedtuple_call(a) for a in value.all_input_nodes):
        output.args = (value.target(*value.args),)
        graph.erase_node(value)


def _parameters(model: nn.Module) -> dict:
    """forward's parameters by name (none where Python cannot tell them)."""
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _defaults_after_first(model: nn.Module) -> dict:
    """forward's optional arguments after the clip, fixed at their defaults (a stream has one input)."""
    params = list(_parameters(model).values())[1:]
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD} or None


def adopt_attributes(gm: nn.Module, model: nn.Module) -> None:
    """Give `gm` the model's own children, parameters and buffers, in the model's order.

    fx copies only what the graph uses, into stand-in containers; adopting the
    originals keeps `state_dict()` identical to the model's (keys, order, tensors).
    """
    # tensors created in forward, and plain tensor attributes of the root (`self.scale = torch.tensor(2.)`),
    # which fx copied in as buffers: the graph reads them, the model's state does not hold them
    constants = {k: v for k, v in gm._buffers.items() if k not in model._buffers and k not in model._parameters}
    gm._modules.clear()
    gm._parameters.clear()
    gm._buffers.clear()
    gm._non_persistent_buffers_set.clear()
    for name, value in constants.items():   # tensors created in forward: not part of the model's state
        gm.register_buffer(name, value, persistent=False)
    for name, p in model._parameters.items():
        gm._parameters[name] = p
    for name, b in model._buffers.items():
        gm._buffers[name] = b
    gm._non_persistent_buffers_set.update(model._non_persistent_buffers_set)
    for name, child in model._modules.items():
        gm._modules[name] = child
    gm.train(model.training)
