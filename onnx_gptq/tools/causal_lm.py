"""Causal LMs for export: loading transformers models from local files, and the
logits-only view of any model that the exporters trace."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from onnx_gptq.errors import ModelError, first_line

logger = logging.getLogger(__name__)


def logits_wrapper(model: Any, *, hf: bool, takes_mask: bool) -> Any:
    """Wrap `model` so that forward(input_ids[, attention_mask]) returns logits only.

    Args:
        model: a torch.nn.Module; for transformers models the KV cache is disabled.
        hf: `model` is a transformers model (called with keywords, ``use_cache=False``).
        takes_mask: forward receives an attention mask.

    Returns:
        A torch.nn.Module whose output is a float tensor [batch, sequence, vocab].
    """
    import torch

    class _LogitsOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
            if hf:
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False)
            elif takes_mask:
                out = self.inner(input_ids, attention_mask=attention_mask)
            else:
                out = self.inner(input_ids)
            return _pick_logits(out)

    return _LogitsOnly(model).eval()


def _pick_logits(out: Any) -> Any:
    """The logits tensor out of whatever a model returns (tensor, ModelOutput, tuple, dict)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(f"model output of type {type(out).__name__} holds no logits tensor")


def is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def vocab_size(model: Any, hf: bool) -> int:
    """Vocabulary size: the config's for transformers models, else the first embedding's."""
    import torch

    if hf:
        size = getattr(model.config, "vocab_size", None)
        if size:
            return int(size)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return int(module.num_embeddings)
    raise ModelError(f"{type(model).__name__}: no torch.nn.Embedding found, so the token "
                     "vocabulary is unknown; export needs a model that takes input_ids")


def max_positions(model: Any, hf: bool) -> int | None:
    if not hf:
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_causal_lm(source: str | os.PathLike[str], *, gguf_file: str | None = None,
                   dtype: str = "float32") -> Any:
    """Load a transformers causal LM from local files, in evaluation mode.

    Args:
        source: a transformers model directory, or a ``.gguf`` file.
        gguf_file: name of a GGUF file inside the directory `source`.
        dtype: "float32" or "float16".

    Returns:
        The torch.nn.Module (a transformers PreTrainedModel).

    Raises:
        ModelError: the path is missing or transformers cannot load it.
    """
    import torch

    path = Path(source).expanduser()
    if not path.exists():
        raise ModelError(f"model: {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model: {path} is a file but not a .gguf; pass a transformers "
                             "model directory or a GGUF file")
        directory, gguf_file = path.parent, path.name
    else:
        directory = path
        if gguf_file is not None and not (directory / gguf_file).is_file():
            raise ModelError(f"model: GGUF file {directory / gguf_file} does not exist")
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ModelError(f"model: loading {path} needs transformers (install onnx-gptq[llm])"
                         ) from exc
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    logger.info("loading %s%s as %s", directory, f" ({gguf_file})" if gguf_file else "", dtype)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds on bad input
        first = first_line(exc)
        raise ModelError(f"model: transformers cannot load {path}: {first}") from exc
    finally:
        hf_logging.set_verbosity(level)
    return model.eval()


__all__ = ["is_transformers_model", "load_causal_lm", "logits_wrapper", "max_positions", "vocab_size"]
