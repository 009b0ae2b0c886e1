"""mxqn-onnx: MXQN mixed fixed-point / logarithmic post-training quantization of ONNX CNNs."""

from ._version import __version__
from .api import quantize
from .result import QuantResult
from .config import QuantConfig
from .errors import MxqnError
from .integer.c_export import export_c

__all__ = ["quantize", "QuantConfig", "QuantResult", "MxqnError", "export_c", "__version__"]
