"""onnx-gptq: GPTQ weight-only quantization of ONNX models."""

from onnx_gptq.config import Algo, CalibConfig, Format, QuantConfig
from onnx_gptq.errors import CalibrationError, ConfigError, ModelError, OutputError, UserError
from onnx_gptq.qweight import QuantizedWeight

__all__ = [
    "Algo", "CalibConfig", "Format", "QuantConfig", "QuantizedWeight",
    "UserError", "ModelError", "CalibrationError", "ConfigError", "OutputError",
]
__version__ = "0.1.0"
