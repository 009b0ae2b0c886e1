"""mxqn-onnx: MXQN mixed fixed-point / logarithmic post-training quantization of ONNX CNNs."""

__version__ = "0.1.0"

from .api import QuantResult, quantize  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .errors import MxqnError  # noqa: E402
from .integer_c import export_c  # noqa: E402

__all__ = ["quantize", "QuantConfig", "QuantResult", "MxqnError", "export_c", "__version__"]
