"""cofx: turn PyTorch clip models into continual (streaming) models automatically.

>>> co = cofx.convert(model, example_input=clip)
>>> for frame in stream:
...     y = co.forward_step(frame)      # None until the first output is ready
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
