"""onnx-gptq: GPTQ weight-only quantization of ONNX models.

`onnx_gptq.quantize(...)` and `onnx_gptq.quantize_with_report(...)` are the
entry points (`onnx_gptq.generate(...)` runs a quantized or float LM); the
pass itself is `onnx_gptq.pipeline.GptqPass`. The package's
layout is described in docs/ARCHITECTURE.md.
"""

from onnx_gptq.config import Algo, CalibConfig, Format, LayerFilter, LayerRule, QuantConfig
from onnx_gptq.errors import CalibrationError, ConfigError, ModelError, OutputError, UserError
from onnx_gptq.qweight import QuantizedWeight

__version__ = "0.1.0"

from onnx_gptq.pipeline import GptqPass, quantize, quantize_with_report  # noqa: E402 - after __version__: cli imports it
from onnx_gptq.tools.generate import GenerationResult, generate  # noqa: E402

__all__ = [
    "Algo", "CalibConfig", "Format", "GptqPass", "LayerFilter", "LayerRule", "QuantConfig", "QuantizedWeight",
    "UserError", "ModelError", "CalibrationError", "ConfigError", "OutputError",
    "quantize", "quantize_with_report", "generate", "GenerationResult",
]
