"""A model's next-token logits through onnxruntime, fed from token ids alone.

Shared by evaluation (`tools.evaluate`) and self-calibration (`tools.self_calib`):
inputs other than ``input_ids`` are derived from the graph by
:class:`onnx_gptq.calibrate.ModelInputs`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_gptq.errors import ModelError

logger = logging.getLogger(__name__)


def open_session(model: str | os.PathLike[str], *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 custom_ops: bool = True) -> Any:
    """An onnxruntime session for `model`, with our custom-op library when it needs it.

    Args:
        model: path of an .onnx file.
        providers: execution providers, in order of preference.
        custom_ops: register the ``onnx_gptq`` custom-op library when the graph
            holds nodes of that domain.

    Returns:
        An ``onnxruntime.InferenceSession``.

    Raises:
        ModelError: the file is missing or onnxruntime cannot load it; the
            message names the file.
    """
    import onnx

    from onnx_gptq.runtime import sessions

    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelError(f"model: {path} does not exist")
    try:
        needs_library = custom_ops and sessions.uses_custom_ops(onnx.load(str(path), load_external_data=False))
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others
        raise ModelError(f"model: {path} is not a readable ONNX file: {exc}") from exc
    # A missing library raises CustomOpsLibraryError (a UserError) saying how to build it.
    return sessions.make_session(path, providers=list(providers), what=str(path),
                                 custom_ops=needs_library).session


class LogitsRunner:
    """A session plus what it takes to feed it token ids and read its logits.

    Inputs other than ``input_ids`` (attention mask, position ids, empty past
    key/values) are derived by :class:`onnx_gptq.calibrate.ModelInputs`.

    Args:
        path: an .onnx file or a model folder (see `onnx_gptq.model_folder.resolve`;
            its genai_config.json gives past key/value sizes the graph leaves symbolic).
        providers: onnxruntime execution providers.
        custom_ops: register our custom-op library when the model needs it.
    """

    def __init__(self, path: Path, providers: Sequence[str], custom_ops: bool) -> None:
        import onnx

        from onnx_gptq.calibrate import ModelInputs
        from onnx_gptq.model_folder import resolve

        folder = resolve(path)
        self.path = path = folder.model
        self.session = open_session(path, providers=providers, custom_ops=custom_ops)
        self.inputs = ModelInputs.from_model(onnx.load(str(path), load_external_data=False), folder=folder.folder)
        if self.inputs.input_ids is None:
            raise ModelError(f"model: {path} has no 'input_ids' input")
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "logits" if "logits" in outputs else outputs[0]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] (model dtype) for int ids [batch, seq]."""
        out = self.session.run([self.output], self.inputs.feeds(ids))[0]
        if out.ndim != 3 or out.shape[:2] != ids.shape:
            raise ModelError(f"model: {self.path} output '{self.output}' has shape "
                             f"{list(out.shape)}; expected [batch, sequence, vocab] for ids "
                             f"{list(ids.shape)}")
        return out


__all__ = ["LogitsRunner", "open_session"]
