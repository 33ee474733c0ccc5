"""The export check: onnxruntime's logits for an exported file against torch's."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from onnx_gptq.errors import ModelError, first_line


class ExportCheckError(ModelError):
    """The exported graph's logits differ from torch's beyond tolerance."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """How closely onnxruntime reproduced torch on the check inputs.

    Args:
        max_abs_diff: largest |onnxruntime - torch| over all logits compared.
        tolerance: the bound `max_abs_diff` had to stay under.
        shapes: the (batch, sequence) shapes that were run.
    """

    max_abs_diff: float
    tolerance: float
    shapes: tuple[tuple[int, int], ...]


def describe_error(exc: BaseException) -> str:
    """An exporter's or onnxruntime's failure in one line: its type, then its first line."""
    return f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"


def check_export(wrapped: Any, path: Path, *, vocab: int, seq_len: int, takes_mask: bool,
                 dtype: str, max_positions: int | None = None) -> CheckResult:
    """Compare onnxruntime's logits for `path` with torch's on two input shapes.

    The second shape differs from the traced one in both batch and sequence, so a
    graph whose axes were frozen fails here.

    Args:
        wrapped: the module that was exported (returns logits).
        path: the exported .onnx file.
        vocab: token ids are drawn from [0, vocab).
        seq_len: the traced sequence length.
        takes_mask: the graph has an attention_mask input.
        dtype: "float32" (tolerance 1e-4 x max(1, max|logits|)) or "float16" (2e-2 x).
        max_positions: the model's position limit, if any.

    Returns:
        The largest difference seen and the tolerance applied.

    Raises:
        ExportCheckError: the difference exceeds the tolerance, or the file does not run.
    """
    import torch

    from onnx_gptq.runtime import sessions

    other = seq_len + 5 if max_positions is None else min(seq_len + 5, max_positions)
    shapes = ((2, seq_len), (3, other))
    session = sessions.make_session(path, providers=["CPUExecutionProvider"], custom_ops=False,
                                    what=f"the exported model {path}", error=ExportCheckError)
    relative = 1e-4 if dtype == "float32" else 2e-2
    worst, tolerance = 0.0, 0.0
    generator = torch.Generator().manual_seed(1)
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            expected = (wrapped(ids, mask) if takes_mask else wrapped(ids)).float().numpy()
        feeds = {"input_ids": ids.numpy()}
        if takes_mask:
            feeds["attention_mask"] = mask.numpy()
        got = session.run(["logits"], feeds, context=f"{path}: input shape [{batch}, {length}]",
                          error=ExportCheckError)[0].astype(np.float32)
        if got.shape != expected.shape:
            raise ExportCheckError(f"{path}: logits shape {list(got.shape)} from onnxruntime, "
                                   f"{list(expected.shape)} from torch")
        diff = float(np.max(np.abs(got - expected)))
        bound = relative * max(1.0, float(np.max(np.abs(expected))))
        if diff > bound:
            raise ExportCheckError(f"{path}: onnxruntime's logits differ from torch's by "
                                   f"{diff:.3g} (> {bound:.3g}) on input shape [{batch}, {length}]")
        worst, tolerance = max(worst, diff), max(tolerance, bound)
    return CheckResult(max_abs_diff=worst, tolerance=tolerance, shapes=shapes)


__all__ = ["CheckResult", "ExportCheckError", "check_export", "describe_error"]
