"""Calibration data to onnxruntime batches: windows, rows and feeds for one model.

Accepted sources (see :func:`make_batches`):

* text: a text file (any extension but ``.npy``/``.jsonl``), a ``.jsonl`` file of
  ``{"text": ...}`` lines, a ``datasets.Dataset`` with a text column, or an
  iterable of strings. Everything is joined with ``"\\n\\n"``, tokenized once
  (no special tokens), and ``num_samples`` windows of ``seq_len`` tokens are
  drawn at seeded random offsets, as the reference GPTQ does with wikitext.
* token ids: a ``.npy`` integer array, a ``.jsonl`` file of ``{"input_ids": [...]}``
  lines, or an ``np.ndarray``. A 2-D array / the jsonl lines are *rows*: the
  first ``num_samples`` non-empty rows are used, each cut to ``seq_len``. Rows
  shorter than ``seq_len`` are kept at their own length and batched only with
  rows of the same length: padding would put pad tokens' activations into the
  Hessian. (With a static sequence dimension in the model, shorter rows are
  dropped with a warning.) A 1-D array is a token stream, cut into windows like text.
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
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnx_gptq.calibrate.model_inputs import ModelInputs
from onnx_gptq.calibrate.sources import Feeds, Rows, Stream, Text, read_source, tokenizer_of
from onnx_gptq.config import CalibConfig
from onnx_gptq.errors import CalibrationError

logger = logging.getLogger(__name__)

TEXT_SEPARATOR = "\n\n"


def _windows(ids: np.ndarray, origin: str, config: CalibConfig, seq_len: int) -> list[np.ndarray]:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets."""
    if ids.size == 0:
        raise CalibrationError(f"{origin} is empty")
    if ids.size < seq_len:
        raise CalibrationError(f"{origin} is too short: {ids.size} tokens, fewer than one sequence of "
                               f"{seq_len} (add text or lower seq_len)")
    rng = np.random.default_rng(config.seed)
    starts = rng.integers(0, ids.size - seq_len + 1, size=config.num_samples)
    return [ids[s:s + seq_len] for s in starts]


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


def _batched(samples: list[np.ndarray], inputs: ModelInputs, batch_size: int,
             origin: str) -> list[dict[str, np.ndarray]]:
    """Equal-length samples stacked `batch_size` at a time, in order of first appearance."""
    by_length: dict[int, list[np.ndarray]] = {}
    for sample in samples:
        by_length.setdefault(int(sample.size), []).append(sample)
    batches = []
    dropped = 0
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            if inputs.static_batch is not None and len(chunk) < inputs.static_batch:
                dropped += len(chunk)
                continue
            batches.append(inputs.feeds(np.stack(chunk)))
    if dropped:
        logger.warning("%s: dropped %d sequences that do not fill the model's fixed batch of %d",
                       origin, dropped, inputs.static_batch)
    if not batches:
        raise CalibrationError(f"{origin}: no complete batch of {inputs.static_batch} sequences")
    return batches


def make_batches(source: Any, model: ir.Model | onnx.ModelProto, config: CalibConfig, *,
                 tokenizer: str | os.PathLike[str] | Any | None = None) -> list[dict[str, np.ndarray]]:
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
            batch size (set to a static batch dim), seed.
        tokenizer: for text sources: a tokenizer.json, a transformers tokenizer
            directory or .gguf (read by ``onnx_gptq.tokenizer.load_tokenizer``),
            or an object with ``encode(text) -> list[int]``.

    Returns:
        One dict (input name -> array) per run; token-id batches are int
        [batch, seq] with every other input filled in.

    Raises:
        CalibrationError: missing, unreadable, malformed, empty or too-short
            data; text without a tokenizer; token ids outside the model's
            vocabulary; a model input that cannot be filled automatically.
    """
    data = read_source(source)
    if isinstance(data, Feeds):
        return _feeds_as_given(data, model)
    inputs = ModelInputs.from_model(model)
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

    if isinstance(data, Text):
        tok = tokenizer_of(tokenizer, data.origin)
        text = TEXT_SEPARATOR.join(data.texts)
        if not text.strip():
            raise CalibrationError(f"{data.origin} is empty")
        data = Stream(np.asarray(tok.encode(text), dtype=np.int64), data.origin)
        logger.info("%s: %d tokens", data.origin, data.ids.size)
    if isinstance(data, Stream):
        _check_vocab(data.ids, inputs.vocab_size, data.origin)
        samples = _windows(data.ids, data.origin, config, seq_len)
    else:
        samples = _cut_rows(data.rows, data.origin, config, seq_len, exact=inputs.static_seq_len is not None)
        for sample in samples:
            _check_vocab(sample, inputs.vocab_size, data.origin)
    return _batched(samples, inputs, batch_size, data.origin)


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


__all__ = ["InputSpec", "ModelInputs", "make_batches", "TEXT_SEPARATOR"]


__all__ = ["ModelInputs", "TEXT_SEPARATOR", "make_batches"]
