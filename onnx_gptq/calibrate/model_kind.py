"""Encoder or causal LM: what decides how calibration text is cut.

A causal LM reads running text, so it is calibrated on windows of one token
stream; an encoder reads one sentence or passage at a time between its special
tokens, so it is calibrated on one sample per line or paragraph
(`config.CalibSplit`). The kind is read, in this order, from the model folder's
``config.json`` (transformers' ``architectures``, ``is_decoder``), then from
the graph: a KV cache (``past_key_values.*`` inputs, ``present.*`` outputs) means
a causal LM; ``token_type_ids`` or encoder outputs (``last_hidden_state``,
``pooler_output``, sentence embeddings) without ``logits`` mean an encoder.
"""

from __future__ import annotations

import enum
import json
import logging
from pathlib import Path

import onnx
import onnx_ir as ir

from onnx_gptq.config import CalibSplit

logger = logging.getLogger(__name__)


class ModelKind(str, enum.Enum):
    """What the model does with a sequence."""

    CAUSAL_LM = "causal-lm"
    ENCODER = "encoder"
    UNKNOWN = "unknown"


_CAUSAL_ARCH = ("ForCausalLM", "LMHeadModel")
_ENCODER_ARCH = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                 "ForMultipleChoice", "ForNextSentencePrediction", "ForPreTraining", "BertModel",
                 "RobertaModel", "DistilBertModel", "XLMRobertaModel", "MPNetModel", "ElectraModel",
                 "DebertaModel", "DebertaV2Model", "AlbertModel", "CamembertModel", "NomicBertModel")
_ENCODER_TYPES = {"bert", "roberta", "distilbert", "xlm-roberta", "mpnet", "electra", "deberta", "deberta-v2",
                  "albert", "camembert", "modernbert", "nomic_bert", "e5", "bge"}
_ENCODER_OUTPUTS = ("last_hidden_state", "pooler_output", "sentence_embedding", "token_embeddings",
                    "embeddings", "text_embeds")


def kind_from_config(folder: Path | None) -> ModelKind:
    """The kind named by ``config.json`` in `folder` (UNKNOWN when absent or silent)."""
    if folder is None or not (folder / "config.json").is_file():
        return ModelKind.UNKNOWN
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.info("model kind: %s/config.json is unreadable (%s); using the graph", folder, exc)
        return ModelKind.UNKNOWN
    if not isinstance(config, dict):
        return ModelKind.UNKNOWN
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith(_CAUSAL_ARCH) for a in architectures) or config.get("is_decoder") is True:
        return ModelKind.CAUSAL_LM
    if any(a.endswith(_ENCODER_ARCH) for a in architectures) or config.get("model_type") in _ENCODER_TYPES:
        return ModelKind.ENCODER
    return ModelKind.UNKNOWN


def kind_from_graph(model: ir.Model | onnx.ModelProto) -> ModelKind:
    """The kind the graph's input and output names show (UNKNOWN when they show none)."""
    if isinstance(model, onnx.ModelProto):
        inputs = [v.name for v in model.graph.input]
        outputs = [v.name for v in model.graph.output]
    else:
        inputs = [v.name or "" for v in model.graph.inputs]
        outputs = [v.name or "" for v in model.graph.outputs]
    if any(n.startswith("past") for n in inputs) or any(n.startswith("present") for n in outputs):
        return ModelKind.CAUSAL_LM
    if "token_type_ids" in inputs or ("logits" not in outputs and any(n in _ENCODER_OUTPUTS for n in outputs)):
        return ModelKind.ENCODER
    if "logits" in outputs:
        return ModelKind.CAUSAL_LM
    return ModelKind.UNKNOWN


def model_kind(model: ir.Model | onnx.ModelProto, folder: Path | None) -> tuple[ModelKind, str]:
    """The model's kind and where it was read ("config.json", "graph" or "default")."""
    kind = kind_from_config(folder)
    if kind is not ModelKind.UNKNOWN:
        return kind, "config.json"
    kind = kind_from_graph(model)
    return kind, "graph" if kind is not ModelKind.UNKNOWN else "default"


def choose_split(split: CalibSplit | None, model: ir.Model | onnx.ModelProto,
                 folder: Path | None) -> tuple[CalibSplit, str]:
    """The text split to use and why.

    Args:
        split: the user's choice; None chooses by model kind.
        model: the model being calibrated.
        folder: the model's directory (its config.json is read), or None.

    Returns:
        (split, reason): `split` as given, else SAMPLES for an encoder and
        WINDOWS otherwise (causal LMs, and unknown kinds as before).
    """
    if split is not None:
        return split, "asked for"
    kind, source = model_kind(model, folder)
    chosen = CalibSplit.SAMPLES if kind is ModelKind.ENCODER else CalibSplit.WINDOWS
    return chosen, f"model kind {kind.value} (from {source})"


__all__ = ["ModelKind", "choose_split", "kind_from_config", "kind_from_graph", "model_kind"]
