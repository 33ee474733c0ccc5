"""Load a tokenizer from a local file or directory, offline.

Three kinds of spec are accepted, all local (no hub access):

* a ``tokenizer.json`` file, read with the ``tokenizers`` library;
* a transformers tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``
  / sentencepiece files), read with ``AutoTokenizer(local_files_only=True)``;
* a ``.gguf`` model file, whose embedded tokenizer transformers extracts.

Text is encoded *without* special tokens: callers cut long token streams into
windows themselves and decide whether a window starts with BOS.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from onnx_gptq.errors import UserError

logger = logging.getLogger(__name__)


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of onnx-gptq needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        ...

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens skipped)."""
        ...


class _FastTokenizer:
    """A ``tokenizers.Tokenizer`` read from a tokenizer.json file."""

    def __init__(self, tok: Any, source: Path) -> None:
        self._tok = tok
        self.source = source
        self._bos = _find_bos(tok.get_vocab(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size})"


class _HFTokenizer:
    """A transformers tokenizer (directory or GGUF)."""

    def __init__(self, tok: Any, source: Path) -> None:
        self._tok = tok
        self.source = source

    @property
    def vocab_size(self) -> int:
        return int(len(self._tok))

    @property
    def bos_token_id(self) -> int | None:
        bos = getattr(self._tok, "bos_token_id", None)
        return None if bos is None else int(bos)

    def encode(self, text: str) -> list[int]:
        with warnings.catch_warnings():
            # "Token indices sequence length is longer than the specified maximum"
            # is irrelevant: the ids are cut into windows afterwards.
            warnings.simplefilter("ignore")
            verbosity = _quiet_transformers()
            try:
                return list(self._tok.encode(text, add_special_tokens=False))
            finally:
                _restore_transformers(verbosity)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size})"


def _find_bos(vocab: dict[str, int]) -> int | None:
    for name in ("<|begin_of_text|>", "<s>", "<|endoftext|>", "<|im_start|>", "<bos>"):
        if name in vocab:
            return int(vocab[name])
    return None


def _quiet_transformers() -> int | None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    return level


def _restore_transformers(level: int | None) -> None:
    if level is None:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(level)


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer from a local tokenizer.json, tokenizer directory or GGUF file.

    Args:
        spec: path to a ``tokenizer.json`` file, to a directory holding a
            transformers tokenizer, or to a ``.gguf`` file with an embedded
            tokenizer.

    Returns:
        An object with ``encode(text) -> list[int]`` (no special tokens added),
        ``decode(ids)``, ``vocab_size`` and ``bos_token_id``.

    Raises:
        UserError: the path does not exist, or no tokenizer can be read from it;
            the message names the path.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"tokenizer: {path} does not exist")
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            return _load_gguf(path)
        if path.is_file():
            return _load_json(path)
        if path.is_dir():
            return _load_dir(path)
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(f"tokenizer: reading {path} needs a missing package ({exc}); "
                        "install onnx-gptq[text]") from exc
    except Exception as exc:  # noqa: BLE001 - any library failure means an unreadable tokenizer
        raise UserError(f"tokenizer: cannot read {path}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    raise UserError(f"tokenizer: {path} is neither a file nor a directory")


def _load_json(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as RawTokenizer

    logger.debug("loading tokenizer.json %s", path)
    return _FastTokenizer(RawTokenizer.from_file(str(path)), path)


def _load_dir(path: Path) -> Tokenizer:
    known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
             "spiece.model", "sentencepiece.bpe.model")
    if not any((path / name).exists() for name in known):
        raise UserError(f"tokenizer: {path} holds no tokenizer files "
                        f"(expected one of {', '.join(known)})")
    from transformers import AutoTokenizer

    logger.debug("loading transformers tokenizer from %s", path)
    verbosity = _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        _restore_transformers(verbosity)
    return _HFTokenizer(tok, path)


def _load_gguf(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    logger.info("extracting the tokenizer embedded in %s", path)
    verbosity = _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                            local_files_only=True)
    finally:
        _restore_transformers(verbosity)
    return _HFTokenizer(tok, path)


__all__ = ["Tokenizer", "load_tokenizer"]
