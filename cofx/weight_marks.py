"""`WeightMarks`: whether the parameters and buffers a compiled step baked in are still what they were.

A compiled step bakes the weights in (inductor's freezing), so before every step
each parameter and buffer slot of the model is checked: the same tensor in the
slot, with the same version (no in-place write) and the same memory (no
`.data =` swap). After a step these ~500 objects of X3D-S (slot dicts, tensors,
their version counters and storages) are out of cache, and reading them one by
one costs ~0.5-0.7 ms of a ~7 ms step. The check therefore runs in C++ where it
can be built (`torch.utils.cpp_extension`, once per machine, ~40 s, cached by
torch): three passes whose memory reads are issued ahead (prefetched), ~0.15
ms; elsewhere in Python (C loops over `map`).

Example::

    >>> model = torch.nn.Linear(2, 2)
    >>> marks = WeightMarks(model)
    >>> marks.unchanged()
    True
    >>> with torch.no_grad():
    ...     _ = model.weight.mul_(2)
    >>> marks.unchanged()
    False
"""
from __future__ import annotations

import hashlib
import operator
from typing import Callable, Optional

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

// The slots (a dict and a key) of a module's parameters and buffers, the tensors (or None) they held, and
// those tensors' versions and memory when marked.
struct Marks {
  std::vector<py::object> dicts, keys, held;
  std::vector<size_t> tensors;            // indices into `held` of the slots that held a tensor
  std::vector<int64_t> versions;
  std::vector<const void*> memory;

  Marks(py::list dicts_, py::list keys_, py::list held_) {
    for (size_t i = 0; i < dicts_.size(); ++i) {
      dicts.push_back(dicts_[i]); keys.push_back(keys_[i]); held.push_back(held_[i]);
      if (!held_[i].is_none()) {
        const auto& t = THPVariable_Unpack(held_[i].ptr());
        tensors.push_back(i);
        versions.push_back(t._version());
        memory.push_back(t.data_ptr());
      }
    }
  }

  bool unchanged() const {
    for (size_t i = 0; i < dicts.size(); ++i) {
      __builtin_prefetch(dicts[i].ptr());
      __builtin_prefetch(keys[i].ptr());
    }
    for (size_t i = 0; i < dicts.size(); ++i) __builtin_prefetch(((PyDictObject*)dicts[i].ptr())->ma_keys);
    for (size_t i = 0; i < dicts.size(); ++i) {   // the same object in every slot (a missing key: None)
      PyObject* now = PyDict_GetItemWithError(dicts[i].ptr(), keys[i].ptr());
      if (now == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        now = Py_None;
      }
      if (now != held[i].ptr()) return false;
    }
    const size_t n = tensors.size();
    std::vector<c10::TensorImpl*> impls(n);
    for (size_t j = 0; j < n; ++j) {
      impls[j] = THPVariable_Unpack(held[tensors[j]].ptr()).unsafeGetTensorImpl();
      __builtin_prefetch(impls[j]);
    }
    for (size_t j = 0; j < n; ++j)
      if (impls[j]->has_storage()) __builtin_prefetch(impls[j]->storage().unsafeGetStorageImpl());
    for (size_t j = 0; j < n; ++j) {
      const at::Tensor& t = THPVariable_Unpack(held[tensors[j]].ptr());
      if (t._version() != versions[j] || t.data_ptr() != memory[j]) return false;
    }
    return true;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Marks>(m, "Marks")
      .def(py::init<py::list, py::list, py::list>())
      .def("unchanged", &Marks::unchanged);
}
"""

_native = None   # the built extension; False once building failed


def native(say: Callable[[str], None] = lambda msg: None):
    """The C++ check (`Marks`), built on first use; None where it cannot be built (no compiler or ninja)."""
    global _native
    if _native is None:
        digest = hashlib.sha1((_SOURCE + torch.__version__).encode()).hexdigest()[:12]
        say("loading the C++ weight check (built once per machine: ~40 s)")
        try:
            from torch.utils.cpp_extension import load_inline
            _native = load_inline(f"cofx_weight_marks_{digest}", cpp_sources=_SOURCE, extra_cflags=["-O2"])
        except Exception as error:  # noqa: BLE001 -- any build failure: the Python check does the same
            say(f"the C++ weight check could not be built ({type(error).__name__}); checking in Python")
            _native = False
    return _native or None


class WeightMarks:
    """Every parameter and buffer slot of a module (what a recording baked in), checked in one pass.

    A slot has changed when it holds another tensor (replaced, or added where there was
    None), or its tensor was written in place (version) or given other memory (`.data =`).
    A write that bypasses version counting (through `.data` or `.detach()`) is not seen:
    call `co.compile_steps()` again after one. BatchNorm's `num_batches_tracked` is marked too:
    a training-mode forward updates the running statistics without counting a version of
    theirs, and counts it up.
    `python_only` skips the C++ check.
    """

    def __init__(self, module: torch.nn.Module, python_only: bool = False,
                 say: Callable[[str], None] = lambda msg: None):
        self.slots, self.names = [], []
        for m in module.modules():
            for d in (m._parameters, m._buffers):
                names = list(d)
                self.slots.extend([d] * len(names))
                self.names.extend(names)
        self.tensors = list(map(dict.get, self.slots, self.names))
        self.present = [t for t in self.tensors if t is not None]
        # held, so that no tensor can be given this memory while it is marked: a `.data =` swap could
        # otherwise land a later tensor at the address it left, and look unchanged
        self.storages = [t.untyped_storage() for t in self.present]
        built = None if python_only else native(say)
        # the C++ marks take the versions and memory themselves; the Python check keeps its own
        self.marks: Optional[object] = built.Marks(self.slots, self.names, self.tensors) if built else None
        if self.marks is None:
            self.versions = list(map(_version, self.present))
            self.memory = list(map(_data_ptr, self.present))

    def unchanged(self) -> bool:
        if self.marks is not None:
            return self.marks.unchanged()
        return (all(map(operator.is_, map(dict.get, self.slots, self.names), self.tensors))
                and list(map(_version, self.present)) == self.versions
                and list(map(_data_ptr, self.present)) == self.memory)


_version = operator.attrgetter("_version")
_data_ptr = torch.Tensor.data_ptr
