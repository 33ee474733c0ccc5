"""Calibration text to token sequences: windows of one stream, or one sample per paragraph.

* ``windows`` (causal LMs): every text joined with ``"\\n\\n"``, tokenized once
  without special tokens, and `num_samples` windows drawn at seeded random
  offsets, as the reference GPTQ does with wikitext. Each window starts with
  the tokenizer's BOS where it puts one (Llama's ``<s>``), then holds
  ``seq_len - 1`` stream tokens; without a BOS, ``seq_len`` stream tokens.
* ``samples`` (encoders): one sample per string of a list / dataset column /
  jsonl file, and per paragraph of a text file (blank-line separated; per line
  when the file has no blank line), each tokenized on its own with the
  tokenizer's special tokens ([CLS] ... [SEP]) and truncated to ``seq_len``, as
  Keras' and AutoGPTQ's calibration lists are. With more samples than
  `num_samples`, a seeded random choice of them is used, in file order.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from onnx_gptq.calibrate.sources import Text
from onnx_gptq.config import CalibConfig, CalibSplit
from onnx_gptq.errors import CalibrationError

logger = logging.getLogger(__name__)

TEXT_SEPARATOR = "\n\n"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def windows(ids: np.ndarray, origin: str, config: CalibConfig, seq_len: int,
            bos: int | None = None) -> list[np.ndarray]:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets of the stream `ids`.

    Args:
        ids: int64 [tokens], the stream.
        origin: for messages.
        config: num_samples and seed.
        seq_len: tokens per window, the BOS included.
        bos: put first in every window (None: no BOS).
    """
    if ids.size == 0:
        raise CalibrationError(f"{origin} is empty")
    body = seq_len - (bos is not None)
    if ids.size < body:
        raise CalibrationError(f"{origin} is too short: {ids.size} tokens, fewer than one sequence of "
                               f"{seq_len} (add text or lower seq_len)")
    rng = np.random.default_rng(config.seed)
    starts = rng.integers(0, ids.size - body + 1, size=config.num_samples)
    if bos is None:
        return [ids[s:s + seq_len] for s in starts]
    head = np.array([bos], np.int64)
    return [np.concatenate([head, ids[s:s + body]]) for s in starts]


def sample_texts(data: Text) -> list[str]:
    """The samples of `data`: its strings, or a file's paragraphs (lines without blank lines)."""
    if not data.whole_file:
        return [t.strip() for t in data.texts if t.strip()]
    out: list[str] = []
    for text in data.texts:
        parts = _BLANK_LINE.split(text) if _BLANK_LINE.search(text) else text.splitlines()
        out.extend(p.strip() for p in parts if p.strip())
    return out


def samples(texts: list[str], tokenizer: Any, origin: str, config: CalibConfig, seq_len: int) -> list[np.ndarray]:
    """One token row per sample text (a seeded choice of `num_samples`), special tokens included.

    Args:
        texts: the sample texts (non-empty).
        tokenizer: our wrapper (`encode_sample`), or any object with ``encode``
            (used as it is: it then decides the special tokens itself).
        origin: for messages.
        config: num_samples and seed.
        seq_len: the most tokens per row.
    """
    if not texts:
        raise CalibrationError(f"{origin} is empty")
    chosen = texts
    if len(texts) > config.num_samples:
        rng = np.random.default_rng(config.seed)
        chosen = [texts[i] for i in sorted(rng.choice(len(texts), size=config.num_samples, replace=False))]
    elif len(texts) < config.num_samples:
        logger.info("%s: %d samples, fewer than num_samples=%d; using all of them",
                    origin, len(texts), config.num_samples)
    encode_sample = getattr(tokenizer, "encode_sample", None)
    if encode_sample is None:
        logger.info("%s: the tokenizer object has no encode_sample; samples are its encode() output", origin)
        rows = [np.asarray(tokenizer.encode(t), np.int64)[:seq_len] for t in chosen]
    else:
        rows = [np.asarray(encode_sample(t, seq_len), np.int64) for t in chosen]
    rows = [r for r in rows if r.size]
    if not rows:
        raise CalibrationError(f"{origin}: no sample has any token")
    return rows


def tokenize(data: Text, tokenizer: Any, split: CalibSplit, config: CalibConfig,
             seq_len: int) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """Text to (stream, []) for windows, or (None, rows) for samples; logs what was done."""
    if split is CalibSplit.SAMPLES:
        rows = samples(sample_texts(data), tokenizer, data.origin, config, seq_len)
        lengths = [r.size for r in rows]
        logger.info("%s: %d samples of %d-%d tokens (split 'samples')", data.origin, len(rows),
                    min(lengths), max(lengths))
        return None, rows
    text = TEXT_SEPARATOR.join(data.texts)
    if not text.strip():
        raise CalibrationError(f"{data.origin} is empty")
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    logger.info("%s: %d tokens, cut into windows (split 'windows')", data.origin, ids.size)
    return ids, []


__all__ = ["TEXT_SEPARATOR", "sample_texts", "samples", "tokenize", "windows"]
