"""Load a tokenizer from a local file or directory, offline.

Three kinds of spec are accepted, all local (no hub access):

* a ``tokenizer.json`` file, read with the ``tokenizers`` library;
* a transformers tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``
  / sentencepiece files), read with ``AutoTokenizer(local_files_only=True)``;
* a ``.gguf`` model file, whose embedded tokenizer transformers extracts.

`encode` gives ids *without* special tokens (callers cut long token streams
into windows and start each with `bos_token_id`); `encode_sample` gives one
sample as the model sees it in use: with the tokenizer's own special tokens
(BERT's [CLS] ... [SEP], Llama's <s> ...), truncated so that they survive.
Which special tokens a tokenizer adds is read off how it encodes a probe text,
so one rule covers tokenizers.json post-processors and transformers tokenizers.
"""

from __future__ import annotations

import functools
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
        """The token the tokenizer itself puts first in a sequence, or None when it puts none."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens skipped)."""
        ...


#: Text whose encodings with and without special tokens tell which ones a tokenizer adds.
_PROBE = "a"
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class _Wrapped:
    """Special-token handling shared by the two wrappers (subclasses give `_encode` and `vocab_size`)."""

    def __init__(self, tok: Any, source: Path | str) -> None:
        self._tok = tok
        self.source = source

    def _encode(self, text: str, special: bool) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        return self._encode(text, False)

    @functools.cached_property
    def special_tokens(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix, suffix): the ids the tokenizer adds before and after a text's own ids."""
        plain, full = self._encode(_PROBE, False), self._encode(_PROBE, True)
        for start in range(len(full) - len(plain) + 1):
            if plain and full[start:start + len(plain)] == plain:
                return tuple(full[:start]), tuple(full[start + len(plain):])
        return (), ()  # the specials change the text's own ids: treat as adding none

    @property
    def bos_token_id(self) -> int | None:
        prefix = self.special_tokens[0]
        return prefix[0] if prefix else None

    def encode_sample(self, text: str, max_len: int) -> list[int]:
        """Ids of one sample with the tokenizer's special tokens, at most `max_len` of them.

        Long texts lose their end, not their special tokens (as transformers'
        ``truncation=True`` does for one sequence).
        """
        prefix, suffix = self.special_tokens
        room = max(max_len - len(prefix) - len(suffix), 0)
        return ([*prefix, *self.encode(text)[:room], *suffix])[:max_len]


class _FastTokenizer(_Wrapped):
    """A ``tokenizers.Tokenizer`` read from a tokenizer.json file."""

    def __init__(self, tok: Any, source: Path | str) -> None:
        padding = tok.padding
        self._pad = None if padding is None else int(padding["pad_id"])
        if padding is not None or tok.truncation is not None:
            # A tokenizer.json may pad or truncate every encoding (sentence-transformers'
            # pad to 128): calibration cuts and pads itself, so use a copy that does neither.
            tok = type(tok).from_str(tok.to_str())
            tok.no_padding()
            tok.no_truncation()
        super().__init__(tok, source)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def pad_token_id(self) -> int | None:
        """The id batches are padded with (None: the tokenizer names none)."""
        if self._pad is not None:
            return self._pad
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return next((int(vocab[name]) for name in _PAD_NAMES if name in vocab), None)

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=special).ids)


class _HFTokenizer(_Wrapped):
    """A transformers tokenizer (directory or GGUF)."""

    @property
    def vocab_size(self) -> int:
        return int(len(self._tok))

    @property
    def pad_token_id(self) -> int | None:
        """The id batches are padded with (None: the tokenizer names none)."""
        pad = getattr(self._tok, "pad_token_id", None)
        return None if pad is None else int(pad)

    def _encode(self, text: str, special: bool) -> list[int]:
        with warnings.catch_warnings():
            # "Token indices sequence length is longer than the specified maximum"
            # is irrelevant: the ids are cut into windows afterwards.
            warnings.simplefilter("ignore")
            verbosity = _quiet_transformers()
            try:
                return list(self._tok.encode(text, add_special_tokens=special))
            finally:
                _restore_transformers(verbosity)


def as_tokenizer(tokenizer: Any) -> Any:
    """A loaded tokenizer object in our wrapper where we know its kind.

    A ``tokenizers.Tokenizer`` or a transformers tokenizer gets the wrapper
    (so it encodes without special tokens, and `encode_sample` adds its own);
    any other object with ``encode(text)`` is returned as it is.
    """
    module = type(tokenizer).__module__.split(".")[0]
    if module == "tokenizers" and hasattr(tokenizer, "get_vocab_size"):
        return _FastTokenizer(tokenizer, "a tokenizers.Tokenizer")
    if module == "transformers" and hasattr(tokenizer, "add_special_tokens"):
        return _HFTokenizer(tokenizer, type(tokenizer).__name__)
    return tokenizer


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


__all__ = ["Tokenizer", "as_tokenizer", "load_tokenizer"]
