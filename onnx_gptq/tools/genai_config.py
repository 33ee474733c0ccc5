"""``genai_config.json`` for a KV-cache export, so that ``onnxruntime_genai.Model(folder)`` loads it.

The fields are the ones onnxruntime-genai's model builder writes for a
decoder-only model (``model.decoder``: file name, head size, hidden size,
heads, key/value heads, layers, input and output names; ``model``: token ids,
context length, vocabulary, type; ``search``: generation defaults), read off
the transformers config of the exported model. Our graph concatenates the past
with the new keys and values (no shared buffer), so
``search.past_present_share_buffer`` is false.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from onnx_gptq.errors import ModelError

logger = logging.getLogger(__name__)

PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """The past inputs and present outputs of a `layers`-layer cache, key then value per layer."""
    past = [pattern % i for i in range(layers) for pattern in (PAST_KEY, PAST_VALUE)]
    present = [pattern % i for i in range(layers) for pattern in (PRESENT_KEY, PRESENT_VALUE)]
    return past, present


def _first_id(value: Any) -> int | None:
    """A token id out of a config value that may be an int, a list of ints or None."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def head_size(config: Any) -> int:
    """Features per attention head: ``head_dim`` when the config has one, else hidden / heads."""
    size = getattr(config, "head_dim", None)
    return int(size) if size else int(config.hidden_size) // int(config.num_attention_heads)


def kv_heads(config: Any) -> int:
    """Key/value heads (``num_key_value_heads``; the attention heads when the config has none)."""
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def context_length(config: Any) -> int:
    """The longest sequence the model was trained for.

    Raises:
        ModelError: the config has no position limit.
    """
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(f"config of {type(config).__name__}: no max_position_embeddings, so the context length "
                     "for genai_config.json is unknown")


def genai_config(config: Any, generation: Mapping[str, Any] | None = None, *, filename: str = "model.onnx",
                 position_ids: bool = True) -> dict[str, Any]:
    """The genai_config.json contents for an exported decoder.

    Args:
        config: the model's transformers config (``model_type``, sizes, token ids).
        generation: the generation config as a dict (``do_sample``, ``temperature``,
            ``top_k``, ``top_p``; token ids it sets win over the config's), or None.
        filename: the model file's name in the folder.
        position_ids: the graph has a ``position_ids`` input.
    Returns:
        A JSON-ready dict.
    """
    generation = {key: value for key, value in (generation or {}).items() if value is not None}
    layers = int(config.num_hidden_layers)
    eos = _first_id(generation.get("eos_token_id", getattr(config, "eos_token_id", None)))
    bos = _first_id(generation.get("bos_token_id", getattr(config, "bos_token_id", None)))
    pad = _first_id(generation.get("pad_token_id", getattr(config, "pad_token_id", None)))
    context = context_length(config)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names=PAST_KEY, past_value_names=PAST_VALUE)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": head_size(config),
        "hidden_size": int(config.hidden_size),
        "inputs": inputs,
        "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
        "num_attention_heads": int(config.num_attention_heads),
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads(config),
    }
    model = {
        "bos_token_id": bos if bos is not None else 0,
        "context_length": context,
        "decoder": decoder,
        "eos_token_id": eos if eos is not None else 0,
        "pad_token_id": pad if pad is not None else (eos if eos is not None else 0),
        "type": str(config.model_type),
        "vocab_size": int(config.vocab_size),
    }
    search = {
        "do_sample": bool(generation.get("do_sample", False)),
        "max_length": context,
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
        "temperature": float(generation.get("temperature", 1.0)),
        "top_k": int(generation.get("top_k", 50)),
        "top_p": float(generation.get("top_p", 1.0)),
    }
    return {"model": model, "search": search}


__all__ = ["PAST_KEY", "PAST_VALUE", "PRESENT_KEY", "PRESENT_VALUE", "context_length", "genai_config",
           "head_size", "kv_heads", "kv_names"]
