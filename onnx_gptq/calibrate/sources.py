"""Calibration sources: files, datasets, strings, feed dicts, or data a tool generates.

Each reader returns one of four shapes, told apart by :mod:`calibrate.batching`:
text to tokenize, rows of token ids, one stream of token ids, or ready feeds.
A *generated* source (:class:`GeneratedSource`, e.g. the name ``"self"``:
sequences sampled from the float model by `tools.self_calib`) is resolved into
token rows by :func:`resolve_generated` before any of that.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from onnx_gptq.config import CalibConfig
from onnx_gptq.errors import CalibrationError

#: Names that stand for a generated source: name -> (module, class), imported when used.
NAMED_SOURCES = {"self": ("onnx_gptq.tools.self_calib", "SelfCalibration")}


@runtime_checkable
class GeneratedSource(Protocol):
    """Calibration data made from the model itself rather than read from a file."""

    def generate(self, model_path: Path, config: CalibConfig) -> np.ndarray:
        """int64 [num_samples, seq_len] token ids for the model at `model_path`."""


def resolve_generated(source: Any, model_path: Path | None, config: CalibConfig) -> Any:
    """`source`, with a named or generated source replaced by the token rows it makes.

    Args:
        source: any calibration source; a name in :data:`NAMED_SOURCES` or a
            :class:`GeneratedSource` is generated, anything else returned as is.
        model_path: the float model's file (generated sources run it); None for
            models given in memory, where a named source is left to the readers.
        config: samples, sequence length, seed and providers.
    """
    if isinstance(source, str) and source in NAMED_SOURCES and model_path is not None:
        module, name = NAMED_SOURCES[source]
        source = getattr(importlib.import_module(module), name)()
    if isinstance(source, GeneratedSource) and model_path is not None:
        return source.generate(model_path, config)
    return source


@dataclasses.dataclass
class Text:
    """Text to tokenize.

    Attributes:
        texts: the strings.
        origin: what they came from, for messages.
        whole_file: True when `texts` is one file's content, whose samples are
            its paragraphs or lines; False when each string is one sample
            (strings, a dataset column, jsonl lines).
    """

    texts: list[str]
    origin: str
    whole_file: bool = False


@dataclasses.dataclass
class Rows:
    rows: list[np.ndarray]  # 1-D int64 each
    origin: str


@dataclasses.dataclass
class Stream:
    ids: np.ndarray  # 1-D int64
    origin: str


@dataclasses.dataclass
class Feeds:
    feeds: list[dict[str, np.ndarray]]
    origin: str


def read_source(source: Any) -> Text | Rows | Stream | Feeds:
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source))
    if isinstance(source, np.ndarray):
        return _ids_array(source, "calibration ids array")
    if _is_dataset(source):
        return _dataset_texts(source)
    if isinstance(source, Mapping):
        raise CalibrationError("calibration data: a single dict was given; pass an iterable of feed dicts")
    if isinstance(source, Iterable):
        items = list(source)
        if not items:
            raise CalibrationError("calibration data: the iterable is empty")
        if all(isinstance(item, str) for item in items):
            return Text(items, "calibration strings")
        if all(isinstance(item, Mapping) for item in items):
            return Feeds([{str(k): np.asarray(v) for k, v in item.items()} for item in items], "calibration feeds")
        kinds = sorted({type(item).__name__ for item in items})
        raise CalibrationError(f"calibration data: an iterable must hold only strings or only dicts of arrays, "
                               f"got {', '.join(kinds)}")
    raise CalibrationError(f"calibration data: unsupported source of type {type(source).__name__} "
                           "(give a file path, a datasets.Dataset, strings, feed dicts or an ids array)")


def _read_path(path: Path) -> Text | Rows | Stream:
    if not path.exists():
        raise CalibrationError(f"calibration file '{path}' does not exist")
    if path.is_dir():
        raise CalibrationError(f"calibration file '{path}' is a directory")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises several types for corrupt files
            raise CalibrationError(f"calibration file '{path}' is not a readable .npy array ({exc})") from None
        return _ids_array(array, f"calibration file '{path}'")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"calibration file '{path}' is not UTF-8 text") from None
    except OSError as exc:
        raise CalibrationError(f"calibration file '{path}' cannot be read ({exc.strerror})") from None
    return Text([text], f"calibration file '{path}'", whole_file=True)


def _read_jsonl(path: Path) -> Text | Rows:
    origin = f"calibration file '{path}'"
    texts: list[str] = []
    rows: list[np.ndarray] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as exc:
        raise CalibrationError(f"{origin} cannot be read as UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{origin}, line {number}: not valid JSON ({exc.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("input_ids"), list):
            ids = record["input_ids"]
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise CalibrationError(f"{origin}, line {number}: input_ids must be a list of integers")
            rows.append(np.asarray(ids, dtype=np.int64))
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        else:
            raise CalibrationError(f'{origin}, line {number}: expected {{"input_ids": [...]}} or {{"text": "..."}}')
    if not texts and not rows:
        # Say so here: an empty list of texts would be reported as "needs a tokenizer".
        raise CalibrationError(f"{origin} is empty (no JSON lines)")
    if texts and rows:
        raise CalibrationError(f"{origin} mixes text lines and input_ids lines; use one kind")
    if rows:
        return Rows(rows, origin)
    return Text(texts, origin)


def _ids_array(array: np.ndarray, origin: str) -> Rows | Stream:
    if array.dtype.kind not in "iu":
        raise CalibrationError(f"{origin}: token ids must be integers, got dtype {array.dtype}")
    if array.ndim == 1:
        return Stream(array.astype(np.int64), origin)
    if array.ndim == 2:
        return Rows([row.astype(np.int64) for row in array], origin)
    raise CalibrationError(f"{origin}: token ids must be [samples, tokens] (or a 1-D stream), "
                           f"got shape {list(array.shape)}")


def _is_dataset(source: Any) -> bool:
    return type(source).__module__.split(".")[0] == "datasets" and hasattr(source, "column_names")


def _dataset_texts(dataset: Any) -> Text:
    """The text column of a Dataset (or a streaming IterableDataset), as a list of strings."""
    columns = dataset.column_names
    if isinstance(columns, dict):  # a DatasetDict
        raise CalibrationError(f"calibration dataset: a DatasetDict with splits {sorted(columns)}; "
                               "pass one split, e.g. dataset['train']")
    rows = None
    if columns is None:  # streaming datasets may not know their columns before the first row
        rows = iter(dataset)
        first = next(rows, None)
        if first is None:
            raise CalibrationError("calibration dataset is empty")
        columns = list(first)
        kinds = {c: "string" if isinstance(first[c], str) else "other" for c in columns}
        rows = [first, *rows]
    else:
        features = getattr(dataset, "features", None) or {}
        kinds = {c: getattr(features.get(c), "dtype", None) for c in columns}
    if "text" in columns:
        column = "text"
    else:
        strings = [c for c in columns if kinds.get(c) in ("string", "large_string")]
        if len(strings) != 1:
            raise CalibrationError(f"calibration dataset: no 'text' column and {len(strings)} string columns "
                                   f"among {list(columns)}; give a dataset with one text column")
        column = strings[0]
    values = [row[column] for row in rows] if rows is not None else dataset[column]
    return Text([str(t) for t in values if t is not None], f"calibration dataset column '{column}'")


def tokenizer_of(tokenizer: Any, origin: str) -> Any:
    if tokenizer is None:
        raise CalibrationError(f"{origin} is text and needs a tokenizer (--tokenizer: a tokenizer.json "
                               "or a transformers tokenizer directory)")
    from onnx_gptq.tools.tokenizer import as_tokenizer, load_tokenizer

    if not isinstance(tokenizer, (str, os.PathLike)) and hasattr(tokenizer, "encode"):
        return as_tokenizer(tokenizer)  # an already-loaded tokenizer (a str path has .encode too)
    return load_tokenizer(tokenizer)


__all__ = ["Feeds", "GeneratedSource", "NAMED_SOURCES", "Rows", "Stream", "Text", "read_source",
           "resolve_generated", "tokenizer_of"]
