"""mxqn-onnx: MXQN mixed fixed-point / logarithmic post-training quantization of ONNX CNNs."""

from ._version import __version__
from .api import QuantResult, quantize
from .config import QuantConfig
from .errors import MxqnError

__all__ = ["quantize", "QuantConfig", "QuantResult", "MxqnError", "__version__"]
