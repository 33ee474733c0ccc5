"""Calibration data to onnxruntime batches: windows, rows and feeds for one model.

Accepted sources (see :func:`make_batches`):

* text: a text file (any extension but ``.npy``/``.jsonl``), a ``.jsonl`` file of
  ``{"text": ...}`` lines, a ``datasets.Dataset`` with a text column, or an
  iterable of strings; cut into ``windows`` of one token stream or into
  ``samples`` (one per string / paragraph, with special tokens) by
  `calibrate.text_split`, the split chosen by model kind
  (`calibrate.model_kind`) unless ``CalibConfig.split`` names one.
* token ids: a ``.npy`` integer array, a ``.jsonl`` file of ``{"input_ids": [...]}``
  lines, or an ``np.ndarray``. A 2-D array / the jsonl lines are *rows*: the
  first ``num_samples`` non-empty rows are used, each cut to ``seq_len``.
  A 1-D array is a token stream, cut into windows like text.

Rows of unequal length (samples, id rows) are padded at the end to the longest
of their batch (to a static sequence dim) with ``attention_mask = 0``, where
the model takes an ``attention_mask``; calibration then keeps padded positions
out of the Hessians (`calibrate.taps`). A model without a mask input batches
only rows of equal length (padding would change what its real tokens see),
and with a static sequence dim drops shorter rows with a warning.
* feeds: an iterable of dicts (input name -> array), used as given, one dict
  per onnxruntime run; missing inputs that can be derived (attention mask,
  position ids, empty past key/values...) are filled in.

Sources are read by `calibrate.sources`; model inputs other than
``input_ids`` are derived by `calibrate.model_inputs.ModelInputs`, which also
reads the vocabulary size (ids are checked against it) and a learned position
table's length (``seq_len`` is clipped to it) from the graph.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnx_gptq.calibrate import text_split
from onnx_gptq.calibrate.model_inputs import ModelInputs
from onnx_gptq.calibrate.model_kind import choose_split
from onnx_gptq.calibrate.sources import Feeds, Rows, Stream, Text, read_source, tokenizer_of
from onnx_gptq.calibrate.text_split import TEXT_SEPARATOR
from onnx_gptq.config import CalibConfig
from onnx_gptq.errors import CalibrationError

logger = logging.getLogger(__name__)

#: Where padded batches say which positions are real (1) and which are padding (0).
MASK_INPUT = "attention_mask"


def _cut_rows(rows: list[np.ndarray], origin: str, config: CalibConfig, seq_len: int,
              exact: bool) -> list[np.ndarray]:
    """The first `num_samples` usable rows, each cut to `seq_len` tokens."""
    out: list[np.ndarray] = []
    short = 0
    for row in rows:
        if row.size == 0 or (exact and row.size < seq_len):
            short += row.size > 0
            continue
        out.append(row[:seq_len])
        if len(out) == config.num_samples:
            break
    if short:
        logger.warning("%s: dropped %d rows shorter than the model's fixed sequence length %d",
                       origin, short, seq_len)
    if not out:
        raise CalibrationError(f"{origin} has no usable rows (all empty"
                               f"{f' or shorter than {seq_len} tokens' if exact else ''})")
    if len(out) < config.num_samples:
        logger.info("%s: %d rows available, fewer than num_samples=%d; using all of them",
                    origin, len(out), config.num_samples)
    return out


def _check_vocab(ids: np.ndarray, vocab: int | None, origin: str) -> None:
    if vocab is None or ids.size == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        first = ids[bad].flat[0]
        raise CalibrationError(f"{origin}: token id {int(first)} is outside the model's vocabulary "
                               f"[0, {vocab}) (wrong tokenizer?)")


def _mask_spec(inputs: ModelInputs) -> Any:
    """The model's [batch, seq] attention-mask input, or None when it takes none."""
    return next((spec for spec in inputs.others if spec.name == MASK_INPUT and len(spec.dims) == 2), None)


def _batched(samples: list[np.ndarray], inputs: ModelInputs, batch_size: int, origin: str,
             pad_id: int) -> list[dict[str, np.ndarray]]:
    """Samples stacked `batch_size` at a time: padded with mask 0 where the model takes a
    mask, else only equal-length ones together (in order of first appearance)."""
    mask_spec = _mask_spec(inputs)
    if mask_spec is None:
        by_length: dict[int, list[np.ndarray]] = {}
        for sample in samples:
            by_length.setdefault(int(sample.size), []).append(sample)
        groups = list(by_length.values())
    else:
        groups = [samples]
    batches = []
    dropped = padded = 0
    for group in groups:
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            if inputs.static_batch is not None and len(chunk) < inputs.static_batch:
                dropped += len(chunk)
                continue
            if mask_spec is None:
                batches.append(inputs.feeds(np.stack(chunk)))
                continue
            width = inputs.static_seq_len or max(row.size for row in chunk)
            ids = np.full((len(chunk), width), pad_id, np.int64)
            mask = np.zeros((len(chunk), width), mask_spec.dtype)
            for r, row in enumerate(chunk):
                ids[r, :row.size] = row
                mask[r, :row.size] = 1
            padded += int(ids.size - sum(row.size for row in chunk))
            batches.append(inputs.feeds(ids, {MASK_INPUT: mask}))
    if padded:
        logger.info("%s: %d padding positions (attention_mask 0, kept out of the Hessians)", origin, padded)
    if dropped:
        logger.warning("%s: dropped %d sequences that do not fill the model's fixed batch of %d",
                       origin, dropped, inputs.static_batch)
    if not batches:
        raise CalibrationError(f"{origin}: no complete batch of {inputs.static_batch} sequences")
    return batches


def make_batches(source: Any, model: ir.Model | onnx.ModelProto, config: CalibConfig, *,
                 tokenizer: str | os.PathLike[str] | Any | None = None,
                 model_dir: str | os.PathLike[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Turn calibration data into onnxruntime feed dicts for `model`.

    Args:
        source: a path (text file; ``.npy`` int ids [samples, tokens] or a 1-D
            stream; ``.jsonl`` of ``{"input_ids": [...]}`` or ``{"text": "..."}``
            lines), a ``datasets.Dataset`` (column "text", or its only string
            column), an iterable of str, an iterable of feed dicts (used as
            given), or an np.ndarray of ids.
        model: the model the feeds are for (its graph inputs and embedding size
            are read; external data need not be loaded).
        config: samples, sequence length (set to a static sequence dim of
            input_ids, and clipped to the rows of a learned position table),
            batch size (set to a static batch dim), seed, and the text split
            (None: chosen by model kind, see `model_kind.choose_split`).
        tokenizer: for text sources: a tokenizer.json, a transformers tokenizer
            directory or .gguf (read by ``onnx_gptq.tokenizer.load_tokenizer``),
            a loaded ``tokenizers``/transformers tokenizer, or any object with
            ``encode(text) -> list[int]``.
        model_dir: the model's folder; its config.json tells the model kind, its
            genai_config.json the past key/value sizes and the context length.

    Returns:
        One dict (input name -> array) per run; token-id batches are int
        [batch, seq] with every other input filled in (``attention_mask`` 0 at
        padded positions).

    Raises:
        CalibrationError: missing, unreadable, malformed, empty or too-short
            data; text without a tokenizer; token ids outside the model's
            vocabulary; a model input that cannot be filled automatically.
    """
    data = read_source(source)
    if isinstance(data, Feeds):
        return _feeds_as_given(data, model)
    inputs = ModelInputs.from_model(model, folder=model_dir)
    if inputs.input_ids is None:
        names = ", ".join(s.name for s in inputs.others)
        raise CalibrationError(f"the model has no 'input_ids' input (inputs: {names}); "
                               "pass calibration feeds as dicts")
    seq_len = config.seq_len
    if inputs.static_seq_len is not None and inputs.static_seq_len != seq_len:
        logger.info("seq_len: the model takes exactly %d tokens; using that instead of %d",
                    inputs.static_seq_len, seq_len)
        seq_len = inputs.static_seq_len
    if inputs.max_positions is not None and seq_len > inputs.max_positions:
        logger.info("seq_len: the model's position table has %d rows; using %d instead of %d",
                    inputs.max_positions, inputs.max_positions, seq_len)
        seq_len = inputs.max_positions
    batch_size = config.batch_size if inputs.static_batch is None else inputs.static_batch

    pad_id, tok = 0, None
    if isinstance(data, Text):
        tok = tokenizer_of(tokenizer, data.origin)
        split, why = choose_split(config.split, model, None if model_dir is None else Path(model_dir))
        logger.info("%s: text split '%s' (%s)", data.origin, split.value, why)
        stream, rows = text_split.tokenize(data, tok, split, config, seq_len)
        data = Stream(stream, data.origin) if stream is not None else Rows(rows, data.origin)
        pad_id = getattr(tok, "pad_token_id", None) or 0
    if isinstance(data, Stream):
        _check_vocab(data.ids, inputs.vocab_size, data.origin)
        bos = getattr(tok, "bos_token_id", None)  # text only: an id stream is taken as it is
        samples = text_split.windows(data.ids, data.origin, config, seq_len, bos=bos)
    else:
        # With a mask, short rows are padded to a static sequence dim; without, they cannot be fed.
        exact = inputs.static_seq_len is not None and _mask_spec(inputs) is None
        samples = _cut_rows(data.rows, data.origin, config, seq_len, exact=exact)
        for sample in samples:
            _check_vocab(sample, inputs.vocab_size, data.origin)
    return _batched(samples, inputs, batch_size, data.origin, pad_id)


def _feeds_as_given(data: Feeds, model: ir.Model | onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    inputs = ModelInputs.from_model(model, check_fillable=False)
    known = {s.name for s in inputs.others} | ({inputs.input_ids.name} if inputs.input_ids else set())
    out = []
    for index, feed in enumerate(data.feeds):
        unknown = sorted(set(feed) - known)
        if unknown:
            raise CalibrationError(f"{data.origin}[{index}]: '{unknown[0]}' is not an input of the model "
                                   f"(inputs: {', '.join(sorted(known))})")
        ids_name = inputs.input_ids.name if inputs.input_ids else None
        if ids_name is None or ids_name not in feed:
            missing = sorted(known - set(feed))
            if missing:
                raise CalibrationError(f"{data.origin}[{index}]: model input '{missing[0]}' is missing "
                                       "(nothing to derive it from without input_ids)")
            out.append(dict(feed))
            continue
        ids = feed[ids_name]
        if ids.dtype.kind not in "iu" or ids.ndim != 2:
            raise CalibrationError(f"{data.origin}[{index}]: input_ids must be an integer [batch, seq] array, "
                                   f"got {ids.dtype} {list(ids.shape)}")
        if ids.size == 0:
            raise CalibrationError(f"{data.origin}[{index}]: input_ids is empty")
        _check_vocab(ids, inputs.vocab_size, f"{data.origin}[{index}]")
        out.append(inputs.feeds(ids, {k: v for k, v in feed.items() if k != ids_name}))
    return out


__all__ = ["MASK_INPUT", "ModelInputs", "TEXT_SEPARATOR", "make_batches", "token_mask"]


def token_mask(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """[batch, seq] 0/1 mask of the real tokens of a padded batch, None when nothing is padded.

    A batch is padded when its ``attention_mask`` has the shape of its
    ``input_ids`` and holds a zero (a mask over past + new tokens is not a
    mask of the tokens calibrated).
    """
    mask, ids = feeds.get(MASK_INPUT), feeds.get("input_ids")
    if mask is None or ids is None or np.shape(mask) != np.shape(ids) or np.ndim(mask) != 2:
        return None
    mask = np.asarray(mask)
    return None if mask.all() else (mask != 0)
