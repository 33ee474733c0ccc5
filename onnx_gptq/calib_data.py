"""Calibration data: from text, token ids or ready feeds to onnxruntime batches.

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

Model inputs other than ``input_ids`` are derived from the graph's declared
inputs by :class:`ModelInputs`, which also reads the vocabulary size (ids are
checked against it) and a learned position table's length (``seq_len`` is
clipped to it) from the graph.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnx_gptq.config import CalibConfig
from onnx_gptq.errors import CalibrationError

logger = logging.getLogger(__name__)

TEXT_SEPARATOR = "\n\n"

_BATCH_DIM = re.compile(r"batch", re.IGNORECASE)
_SEQ_DIM = re.compile(r"past|seq|len|cache|total", re.IGNORECASE)
# Where batch and sequence sit in a past key/value whose dims are not named
# usefully, by rank: [batch, heads, seq, head_dim] and GPT-2's [2, batch, heads, seq, head_dim].
_PAST_LAYOUT = {4: (0, 2), 5: (1, 3)}
# Ops between input_ids and the embedding Gather that keep the ids' values.
_ID_PASSTHROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One declared model input.

    Attributes:
        name: input name.
        dtype: numpy dtype of its element type.
        dims: per dimension, an int (static), a str (symbolic name) or None (unknown).
    """

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]

    @classmethod
    def from_value_info(cls, value: onnx.ValueInfoProto) -> "InputSpec":
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise CalibrationError(f"model input '{value.name}' is not a tensor; it cannot be filled "
                                   "automatically (pass feeds as dicts)")
        dims: list[int | str | None] = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        return cls(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), tuple(dims))


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """What a model needs fed, and how to derive everything but the token ids.

    Attributes:
        input_ids: the token-id input, or None when the model has none.
        others: the remaining inputs, each one `feeds` knows how to fill.
        vocab_size: rows of the embedding table (or the logits' last dim), if found.
        static_seq_len: a static sequence dim of input_ids, if any.
        static_batch: a static batch dim of input_ids, if any.
        max_positions: rows of a learned position-embedding table, if found
            (sequences longer than this would index past its end).
    """

    input_ids: InputSpec | None
    others: tuple[InputSpec, ...]
    vocab_size: int | None
    static_seq_len: int | None
    static_batch: int | None
    max_positions: int | None = None

    @classmethod
    def from_model(cls, model: onnx.ModelProto, *, check_fillable: bool = True) -> "ModelInputs":
        """Read and classify the model's graph inputs.

        Args:
            model: the model (external data need not be loaded).
            check_fillable: raise for an input `feeds` cannot derive (only
                checked when the model has an input_ids input).

        Raises:
            CalibrationError: an input is neither input_ids nor one that can be
                filled automatically; the message names it.
        """
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        specs = [InputSpec.from_value_info(v) for v in graph.input if v.name not in inits]
        ids = next((s for s in specs if s.name == "input_ids"), None)
        others = tuple(s for s in specs if s is not ids)
        if check_fillable and ids is not None:
            for spec in others:
                _filler(spec)  # raises for an input nobody can fill
        static_seq = static_batch = None
        if ids is not None:
            if len(ids.dims) != 2:
                raise CalibrationError(f"model input 'input_ids' has rank {len(ids.dims)}; "
                                       "calibration expects [batch, sequence]")
            if isinstance(ids.dims[0], int) and ids.dims[0] > 0:
                static_batch = ids.dims[0]
            if isinstance(ids.dims[1], int) and ids.dims[1] > 0:
                static_seq = ids.dims[1]
        return cls(ids, others, _vocab_size(model), static_seq, static_batch, _max_positions(model))

    def feeds(self, input_ids: np.ndarray, given: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A complete feed dict for one run.

        Args:
            input_ids: int [batch, seq] token ids.
            given: inputs already provided (kept as they are).

        Returns:
            input name -> array: input_ids in the declared dtype, then every
            other input taken from `given` or derived (attention_mask ones
            [B, T], position_ids arange [B, T], token_type_ids zeros, empty past
            key/values with sequence dim 0, cache_position arange [T]).
        """
        given = dict(given or {})
        batch, seq = input_ids.shape
        out: dict[str, np.ndarray] = {}
        if self.input_ids is not None:
            out[self.input_ids.name] = np.ascontiguousarray(input_ids, dtype=self.input_ids.dtype)
        for spec in self.others:
            if spec.name in given:
                out[spec.name] = np.asarray(given.pop(spec.name))
            else:
                out[spec.name] = _filler(spec)(batch, seq)
        out.update(given)
        return out


def _filler(spec: InputSpec) -> Any:
    """A function (batch, seq) -> array for an input, or CalibrationError naming it."""
    name, dtype, rank = spec.name, spec.dtype, len(spec.dims)
    lower = name.lower()
    if lower == "attention_mask" and rank == 2:
        return lambda b, t: np.ones((b, t), dtype)
    if lower == "position_ids" and rank in (1, 2):
        if rank == 1:
            return lambda b, t: np.arange(t, dtype=dtype)
        return lambda b, t: np.ascontiguousarray(np.broadcast_to(np.arange(t, dtype=dtype), (b, t)))
    if lower == "cache_position" and rank == 1:
        return lambda b, t: np.arange(t, dtype=dtype)
    if lower == "token_type_ids" and rank == 2:
        return lambda b, t: np.zeros((b, t), dtype)
    if lower.startswith("past"):
        roles = _past_roles(spec)
        return lambda b, t: np.zeros(tuple(b if r == "batch" else 0 if r == "seq" else r for r in roles), dtype)
    raise CalibrationError(f"model input '{name}' (shape {list(spec.dims)}) cannot be filled automatically "
                           "for calibration; pass feeds as dicts that include it")


def _past_roles(spec: InputSpec) -> list[int | str]:
    """Per dim of an empty past key/value: a static size, "batch" or "seq"."""
    layout = _PAST_LAYOUT.get(len(spec.dims))
    roles: list[int | str] = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int) and dim > 0:
            roles.append(dim)
        elif isinstance(dim, str) and _BATCH_DIM.search(dim):
            roles.append("batch")
        elif isinstance(dim, str) and _SEQ_DIM.search(dim):
            roles.append("seq")
        elif layout is not None and axis == layout[0]:
            roles.append("batch")
        elif layout is not None and axis == layout[1]:
            roles.append("seq")
        else:
            raise CalibrationError(f"model input '{spec.name}' (shape {list(spec.dims)}): cannot tell the size "
                                   f"of dimension {axis} of an empty past key/value; pass feeds as dicts")
    return roles


def _vocab_size(model: onnx.ModelProto) -> int | None:
    """Rows of the embedding table read by input_ids, else the logits' static last dim."""
    graph = model.graph
    inits = {t.name: list(t.dims) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    frontier, seen = ["input_ids"], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in consumers.get(name, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
                axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
                rows = _table_rows(node.input[0], inits, producers) if axis == 0 else None
                if rows:
                    return rows
            elif node.op_type in _ID_PASSTHROUGH and node.input[0] == name:
                frontier.extend(o for o in node.output if o)
    for value in graph.output:
        if value.name == "logits" and value.type.tensor_type.shape.dim:
            last = value.type.tensor_type.shape.dim[-1]
            if last.HasField("dim_value") and last.dim_value > 0:
                return int(last.dim_value)
    return None


def _table_rows(name: str, inits: dict[str, list[int]], producers: dict[str, onnx.NodeProto]) -> int | None:
    """First dim of a constant 2-D table, following Identity/Cast/DequantizeLinear back to it."""
    for _ in range(3):
        if name in inits:
            return int(inits[name][0]) if len(inits[name]) == 2 else None
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return int(value.dims[0]) if value is not None and len(value.dims) == 2 else None
        if node is None or node.op_type not in ("Identity", "Cast", "DequantizeLinear") or not node.input:
            return None
        name = node.input[0]
    return None


def _max_positions(model: onnx.ModelProto) -> int | None:
    """Rows of a learned position-embedding table (GPT-2's wpe), if the graph has one.

    A position table is a constant 2-D Gather table whose indices derive from a
    ``position_ids`` input or from Range/CumSum, and not from the values of
    input_ids or token_type_ids (their *shape* may be involved: Shape stops the search).
    """
    graph = model.graph
    inits = {t.name: list(t.dims) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {v.name for v in graph.input}
    found: list[int] = []
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        if next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0) != 0:
            continue
        rows = _table_rows(node.input[0], inits, producers)
        if rows is None:
            continue
        positional = token_valued = False
        stack, seen = [node.input[1]], set()
        while stack and len(seen) < 64:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in inputs:
                positional |= name == "position_ids"
                token_valued |= name in ("input_ids", "token_type_ids")
                continue
            parent = producers.get(name)
            if parent is None or parent.op_type == "Shape":
                continue
            positional |= parent.op_type in ("Range", "CumSum")
            stack.extend(i for i in parent.input if i)
        if positional and not token_valued:
            found.append(rows)
    return min(found) if found else None


# ---------------------------------------------------------------------------
# Sources


@dataclasses.dataclass
class _Text:
    texts: list[str]
    origin: str


@dataclasses.dataclass
class _Rows:
    rows: list[np.ndarray]  # 1-D int64 each
    origin: str


@dataclasses.dataclass
class _Stream:
    ids: np.ndarray  # 1-D int64
    origin: str


@dataclasses.dataclass
class _Feeds:
    feeds: list[dict[str, np.ndarray]]
    origin: str


def _read_source(source: Any) -> _Text | _Rows | _Stream | _Feeds:
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
            return _Text(items, "calibration strings")
        if all(isinstance(item, Mapping) for item in items):
            return _Feeds([{str(k): np.asarray(v) for k, v in item.items()} for item in items], "calibration feeds")
        kinds = sorted({type(item).__name__ for item in items})
        raise CalibrationError(f"calibration data: an iterable must hold only strings or only dicts of arrays, "
                               f"got {', '.join(kinds)}")
    raise CalibrationError(f"calibration data: unsupported source of type {type(source).__name__} "
                           "(give a file path, a datasets.Dataset, strings, feed dicts or an ids array)")


def _read_path(path: Path) -> _Text | _Rows | _Stream:
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
    return _Text([text], f"calibration file '{path}'")


def _read_jsonl(path: Path) -> _Text | _Rows:
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
        return _Rows(rows, origin)
    return _Text(texts, origin)


def _ids_array(array: np.ndarray, origin: str) -> _Rows | _Stream:
    if array.dtype.kind not in "iu":
        raise CalibrationError(f"{origin}: token ids must be integers, got dtype {array.dtype}")
    if array.ndim == 1:
        return _Stream(array.astype(np.int64), origin)
    if array.ndim == 2:
        return _Rows([row.astype(np.int64) for row in array], origin)
    raise CalibrationError(f"{origin}: token ids must be [samples, tokens] (or a 1-D stream), "
                           f"got shape {list(array.shape)}")


def _is_dataset(source: Any) -> bool:
    return type(source).__module__.split(".")[0] == "datasets" and hasattr(source, "column_names")


def _dataset_texts(dataset: Any) -> _Text:
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
    return _Text([str(t) for t in values if t is not None], f"calibration dataset column '{column}'")


def _tokenizer_of(tokenizer: Any, origin: str) -> Any:
    if tokenizer is None:
        raise CalibrationError(f"{origin} is text and needs a tokenizer (--tokenizer: a tokenizer.json "
                               "or a transformers tokenizer directory)")
    if not isinstance(tokenizer, (str, os.PathLike)) and hasattr(tokenizer, "encode"):
        return tokenizer  # an already-loaded tokenizer (a str path has .encode too)
    from onnx_gptq.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer)


# ---------------------------------------------------------------------------
# Samples and batches


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


def make_batches(source: Any, model: onnx.ModelProto, config: CalibConfig, *,
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
    data = _read_source(source)
    if isinstance(data, _Feeds):
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

    if isinstance(data, _Text):
        tok = _tokenizer_of(tokenizer, data.origin)
        text = TEXT_SEPARATOR.join(data.texts)
        if not text.strip():
            raise CalibrationError(f"{data.origin} is empty")
        data = _Stream(np.asarray(tok.encode(text), dtype=np.int64), data.origin)
        logger.info("%s: %d tokens", data.origin, data.ids.size)
    if isinstance(data, _Stream):
        _check_vocab(data.ids, inputs.vocab_size, data.origin)
        samples = _windows(data.ids, data.origin, config, seq_len)
    else:
        samples = _cut_rows(data.rows, data.origin, config, seq_len, exact=inputs.static_seq_len is not None)
        for sample in samples:
            _check_vocab(sample, inputs.vocab_size, data.origin)
    return _batched(samples, inputs, batch_size, data.origin)


def _feeds_as_given(data: _Feeds, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
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
