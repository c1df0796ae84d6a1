"""cofx: turn PyTorch clip models into continual (streaming) models automatically.

>>> model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.ReLU()).eval()
>>> clip = torch.randn(1, 2, 8)                    # (B, C, T)
>>> co = cofx.convert(model, example_input=clip)
>>> stream = torch.randn(1, 2, 3).unbind(2)        # frames (B, C), one at a time
>>> for frame in stream:
...     y = co.forward_step(frame)      # None until the first output is ready
...     print(None if y is None else tuple(y.shape))
None
(1, 4)
(1, 4)
"""
from .api import convert
from .errors import ConversionError, StreamError
from .modes import call_mode
from .module import ContinualModule
from .onnx_export import export_onnx
from .saving import load, save
from .verify import verify

__version__ = "0.1.0"
__all__ = ["convert", "ConversionError", "StreamError", "call_mode", "ContinualModule", "export_onnx", "load",
           "save", "verify", "__version__"]
