"""A value derived from tensors (folded or rolled weights), rebuilt only when one of them changed.

"Changed" means another tensor object, other memory, or a write in place (the
version counter); a source that is a plain number (an epsilon) changes with its
value. The cache holds its sources, so their memory cannot be freed and reused
by a new tensor that would look like the old one.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


class Derived:
    def __init__(self, make: Callable):
        self.make = make
        self.sources: Optional[tuple] = None
        self.marks: Optional[list] = None
        self.value = None

    def __call__(self, sources: Sequence[Optional[torch.Tensor]]):
        marks = [(t.data_ptr(), t._version) if isinstance(t, torch.Tensor) else t for t in sources]
        if self.sources is None or marks != self.marks or any(a is not b for a, b in zip(sources, self.sources)):
            self.value = self.make(*sources)
            self.sources, self.marks = tuple(sources), marks
        return self.value
