"""Exception types. Each message names the offending file, node, tensor or option.

The CLI turns :class:`UserError` into a one-line message and exit code 2; anything
else is an internal error (exit code 1).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, an option, calibration data or a model."""


class ModelError(UserError):
    """The model file is missing, unreadable, not ONNX, or has nothing to quantize."""


class CalibrationError(UserError):
    """Calibration data is missing, empty, too short, or does not fit the model."""


class ConfigError(UserError, ValueError):
    """An option value, or a combination of options, that cannot be honoured."""


class OutputError(UserError):
    """The output path cannot be written (same as input, unwritable directory...)."""


class NonFiniteError(ModelError):
    """A tensor that would be written (scales, bias, a float weight) holds NaN or Inf."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's and torch's run to
    pages), or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
