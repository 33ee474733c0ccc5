"""onnx-gptq: GPTQ weight-only quantization of ONNX models.

`onnx_gptq.quantize(...)` and `onnx_gptq.quantize_with_report(...)` are the
entry points. They shadow the module of the same name as a package attribute;
`from onnx_gptq.quantize import quantize_model` (or anything else in that
module) still works, since imports go through `sys.modules`.
"""

from onnx_gptq.config import Algo, CalibConfig, Format, QuantConfig
from onnx_gptq.errors import CalibrationError, ConfigError, ModelError, OutputError, UserError
from onnx_gptq.qweight import QuantizedWeight

__version__ = "0.1.0"

from onnx_gptq.quantize import quantize, quantize_with_report  # noqa: E402 - after __version__: cli imports it

__all__ = [
    "Algo", "CalibConfig", "Format", "QuantConfig", "QuantizedWeight",
    "UserError", "ModelError", "CalibrationError", "ConfigError", "OutputError",
    "quantize", "quantize_with_report",
]
