"""One causal-LM session stepped token by token, its KV cache fed back.

Whatever the graph asks for is fed: ``input_ids``; ``attention_mask`` over
past + new tokens (onnxruntime-genai builder graphs read the total length from
it); ``position_ids`` and ``cache_position`` counting on from the past;
``use_cache_branch`` of Optimum's merged decoders; per layer the past
keys/values, empty (length 0, their feature sizes from the graph or
genai_config.json, see `calibrate.past_shapes`) for the prefill and the
previous run's ``present*`` outputs after it. A graph without past inputs is
run on the whole sequence at every step (slow, but the same tokens).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnx_gptq.errors import CalibrationError, ModelError

logger = logging.getLogger(__name__)


def present_name(past: str, outputs: Sequence[str]) -> str | None:
    """The output that holds the next cache of input `past` (``past_key_values.0.key`` -> ``present.0.key``)."""
    for prefix in ("past_key_values", "past"):
        if past.startswith(prefix):
            candidate = "present" + past[len(prefix):]
            if candidate in outputs:
                return candidate
    return None


class CachedDecoder:
    """A causal LM's onnxruntime session, fed one chunk of tokens at a time.

    Attributes:
        path: the .onnx file.
        max_positions: the longest sequence the model takes (genai_config.json's
            context length or its position table), None when unknown.
        has_cache: the graph takes past key/values.
    """

    def __init__(self, path: str | os.PathLike[str], *, folder: Path | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        """Open the session and work out the feeds.

        Args:
            path: the .onnx model.
            folder: its folder, whose genai_config.json sizes a symbolic past.
            providers: onnxruntime execution providers.
        Raises:
            ModelError: onnxruntime cannot load the model, it has no input_ids or
                logits, an input cannot be fed, or a past input has no present output.
        """
        import onnx

        from onnx_gptq.calibrate.model_inputs import ModelInputs
        from onnx_gptq.calibrate.past_shapes import is_past
        from onnx_gptq.runtime import sessions

        self.path = Path(path)
        what = f"model '{self.path}'"
        proto = onnx.load(str(self.path), load_external_data=False)
        try:
            self._inputs = ModelInputs.from_model(proto, check_fillable=False, folder=folder)
        except CalibrationError as exc:
            raise ModelError(f"{what}: {exc}") from None
        if self._inputs.input_ids is None:
            raise ModelError(f"{what} has no input_ids input; generation needs a causal LM")
        self._session = sessions.make_session(self.path, providers=list(providers), what=what)
        outputs = self._session.output_names
        self._logits = "logits" if "logits" in outputs else outputs[0]
        self._dtypes = {spec.name: spec.dtype for spec in self._inputs.others}
        self._past = [spec.name for spec in self._inputs.others if is_past(spec.name)]
        self._present: dict[str, str] = {}
        for name in self._past:
            found = present_name(name, outputs)
            if found is None:
                raise ModelError(f"{what}: past input '{name}' has no matching present output "
                                 f"(outputs: {', '.join(outputs[:6])}...)")
            self._present[name] = found
        self.has_cache = bool(self._past)
        self.max_positions = self._inputs.max_positions
        self.vocab_size = self._inputs.vocab_size
        self._cache: dict[str, np.ndarray] = {}
        self._ids: list[int] = []
        self._feeds(np.zeros((1, 1), np.int64), 0)  # an input nobody can feed fails now, not mid-generation

    @property
    def providers(self) -> list[str]:
        """The session's execution providers."""
        return self._session.providers()

    @property
    def length(self) -> int:
        """Tokens seen so far (the cache's length)."""
        return len(self._ids)

    def reset(self) -> None:
        """Forget the cache: the next `forward` is a prefill."""
        self._cache, self._ids = {}, []

    def _feeds(self, ids: np.ndarray, past_len: int) -> dict[str, np.ndarray]:
        new = ids.shape[1]
        given: dict[str, np.ndarray] = {}
        total = past_len + new
        if "attention_mask" in self._dtypes:
            given["attention_mask"] = np.ones((1, total), self._dtypes["attention_mask"])
        for name in ("position_ids", "cache_position"):
            if name in self._dtypes:
                positions = np.arange(past_len, total, dtype=self._dtypes[name])
                given[name] = positions if name == "cache_position" else positions[None, :]
        if "use_cache_branch" in self._dtypes:
            given["use_cache_branch"] = np.array([past_len > 0], dtype=self._dtypes["use_cache_branch"])
        given.update(self._cache)
        try:
            return self._inputs.feeds(ids, given)
        except CalibrationError as exc:
            raise ModelError(f"model '{self.path}': {str(exc).replace(' for calibration', '')}") from None

    def forward(self, new_ids: Sequence[int]) -> np.ndarray:
        """Run the model on `new_ids` after everything fed since the last `reset`.

        Args:
            new_ids: token ids (at least one).
        Returns:
            float32 [vocab]: the logits at the last new position.
        """
        if self.has_cache:
            ids = np.asarray([list(new_ids)], dtype=np.int64)
            past_len = len(self._ids)
        else:
            ids = np.asarray([[*self._ids, *new_ids]], dtype=np.int64)
            past_len = 0
        feeds = self._feeds(ids, past_len)
        wanted = [self._logits, *self._present.values()]
        context = f"model '{self.path}': {ids.shape[1]} tokens after {past_len}"
        results = self._session.run(wanted, feeds, context=context, error=ModelError)
        self._cache = {name: value for name, value in zip(self._present, results[1:])}
        self._ids.extend(int(i) for i in new_ids)
        logits = results[0]
        return np.asarray(logits[0, -1] if logits.ndim == 3 else logits[-1], dtype=np.float32)


__all__ = ["CachedDecoder", "present_name"]
