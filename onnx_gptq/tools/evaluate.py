"""Perplexity and fidelity of an ONNX causal LM, measured through onnxruntime.

* **Perplexity** on a text: the text is tokenized (no special tokens), cut into
  non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window
  is dropped), and ``exp(mean NLL)`` is taken over every next-token prediction
  inside the windows (``seq_len - 1`` per window).
* **Fidelity** against a reference (the float model) on the same windows and
  positions: mean ``KL(reference || model)`` of the next-token distributions,
  in nats, and the fraction of positions whose argmax token agrees (top-1).

Logits are read one window batch at a time and reduced in row chunks, so memory
stays at one logits tensor per session plus a few chunk-sized temporaries
(49152-token vocabularies make a 512-token window's logits 100 MB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_gptq.errors import ConfigError, ModelError, UserError
from onnx_gptq.tools.logits import LogitsRunner, open_session

logger = logging.getLogger(__name__)

#: Logit rows reduced at a time (a chunk of a [T, V] float32 tensor).
ROW_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        perplexity: exp of the mean next-token negative log-likelihood.
        kl: mean KL(reference || model) over next-token positions, in nats;
            None without a reference.
        top1: fraction of positions where the model's argmax equals the
            reference's; None without a reference.
        n_tokens: predictions scored (windows x (seq_len - 1)).
        windows: windows evaluated.
        seq_len: tokens per window.
        seconds: wall time of the onnxruntime runs and reductions.
    """

    perplexity: float
    kl: float | None
    top1: float | None
    n_tokens: int
    windows: int
    seq_len: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: perplexity, and KL/top-1 when a reference was given."""
        line = (f"perplexity {self.perplexity:.4f} over {self.n_tokens} tokens "
                f"({self.windows} windows of {self.seq_len})")
        if self.kl is not None and self.top1 is not None:
            line += f"; KL {self.kl:.5f} nats, top-1 agreement {100 * self.top1:.2f}%"
        return line


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of a float32 [rows, vocab] chunk."""
    x = x.astype(np.float32, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


class _Totals:
    """Running sums over the scored positions: NLL and KL in nats, top-1 agreements, positions."""

    def __init__(self) -> None:
        self.nll = self.kl = 0.0
        self.agree = self.count = 0


def _score_row(logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None,
               totals: _Totals) -> None:
    """Accumulate NLL (and KL, top-1) of one window.

    Args:
        logits: [T-1, V] the model's logits at positions predicting `targets`.
        targets: [T-1] the next tokens.
        ref_logits: [T-1, V] the reference's logits at the same positions, or None.
        totals: running sums, updated in place.
    """
    for start in range(0, len(targets), ROW_CHUNK):
        stop = min(start + ROW_CHUNK, len(targets))
        logq = _log_softmax(logits[start:stop])
        rows = np.arange(stop - start)
        totals.nll -= float(logq[rows, targets[start:stop]].astype(np.float64).sum())
        if ref_logits is not None:
            logp = _log_softmax(ref_logits[start:stop])
            kl = (np.exp(logp) * (logp - logq)).sum(axis=-1, dtype=np.float64)
            totals.kl += float(kl.sum())
            totals.agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        totals.count += stop - start


def evaluate_ids(model: str | os.PathLike[str], windows: np.ndarray, *,
                 reference: str | os.PathLike[str] | None = None, batch_size: int = 1,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 custom_ops: bool = True) -> EvalResult:
    """Perplexity (and fidelity vs `reference`) on given token windows.

    Args:
        model: the .onnx model to score.
        windows: int [num_windows, seq_len] token ids; each row is run on its
            own (no state carries across rows) and scored on its seq_len - 1
            next-token predictions.
        reference: the float .onnx model to compare with, or None.
        batch_size: windows per onnxruntime run.
        providers: onnxruntime execution providers.
        custom_ops: register the onnx_gptq custom-op library when needed.

    Returns:
        An :class:`EvalResult`.

    Raises:
        ConfigError: `windows` is not a 2-D array of at least 2 tokens per row.
        ModelError: a model cannot be loaded or its logits do not fit the ids.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ConfigError(f"windows: expected ids [num_windows >= 1, seq_len >= 2], got shape "
                          f"{list(windows.shape)}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise ConfigError(f"windows: expected integer token ids, got {windows.dtype}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: {batch_size} must be positive")
    runner = LogitsRunner(Path(model).expanduser(), providers, custom_ops)
    ref = LogitsRunner(Path(reference).expanduser(), providers, custom_ops) if reference else None
    for r in (runner, ref):
        if r is not None and r.inputs.vocab_size and int(windows.max()) >= r.inputs.vocab_size:
            raise ModelError(f"model: token id {int(windows.max())} is outside {r.path}'s "
                             f"vocabulary of {r.inputs.vocab_size}; wrong tokenizer?")
    totals = _Totals()
    start = time.perf_counter()
    for first in range(0, len(windows), batch_size):
        ids = windows[first:first + batch_size].astype(np.int64)
        logits = runner.logits(ids)
        ref_logits = ref.logits(ids) if ref is not None else None
        if ref_logits is not None and ref_logits.shape[-1] != logits.shape[-1]:
            raise ModelError(f"reference: {ref.path} has {ref_logits.shape[-1]} logits per token, "  # type: ignore[union-attr]
                             f"the model {logits.shape[-1]}")
        for b in range(len(ids)):
            _score_row(logits[b, :-1], ids[b, 1:],
                       None if ref_logits is None else ref_logits[b, :-1], totals)
        del logits, ref_logits
        logger.debug("window %d/%d: running perplexity %.4f", first + len(ids), len(windows),
                     float(np.exp(totals.nll / totals.count)))
    seconds = time.perf_counter() - start
    has_ref = ref is not None
    return EvalResult(perplexity=float(np.exp(totals.nll / totals.count)),
                      kl=totals.kl / totals.count if has_ref else None,
                      top1=totals.agree / totals.count if has_ref else None,
                      n_tokens=totals.count, windows=len(windows), seq_len=int(windows.shape[1]),
                      seconds=seconds)


def read_texts(text: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """The documents of `text`: a path (str or PathLike) is read as UTF-8; a sequence is taken as is.

    Raises:
        UserError: the file is missing or unreadable, or the sequence is empty.
    """
    if isinstance(text, (str, os.PathLike)):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(f"text: {path} does not exist (pass a file path, or a list of strings)")
        try:
            return [path.read_text(encoding="utf-8", errors="replace")]
        except OSError as exc:
            raise UserError(f"text: cannot read {path}: {exc.strerror}") from exc
    texts = [str(t) for t in text]
    if not texts:
        raise UserError("text: the list of documents is empty")
    return texts


def text_windows(text: str | os.PathLike[str] | Sequence[str], tokenizer: Any, seq_len: int,
                 max_windows: int | None = None) -> np.ndarray:
    """Tokenize `text` and cut it into consecutive, non-overlapping windows.

    Args:
        text: a file path, or a sequence of documents (joined with a blank line).
        tokenizer: a spec for :func:`onnx_gptq.tools.tokenizer.load_tokenizer`, or an
            object with ``encode(str) -> list[int]``.
        seq_len: tokens per window.
        max_windows: keep only the first this many windows.

    Returns:
        int64 [num_windows, seq_len].

    Raises:
        UserError: the text has fewer than `seq_len` tokens.
    """
    from onnx_gptq.tools.tokenizer import load_tokenizer

    if seq_len < 2:
        raise ConfigError(f"seq_len: {seq_len} must be at least 2")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows: {max_windows} must be positive")
    # A str has .encode too: paths are loaded, anything else must be a tokenizer object.
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    ids = np.asarray(tok.encode("\n\n".join(read_texts(text))), dtype=np.int64)
    count = len(ids) // seq_len
    if count == 0:
        origin = text if isinstance(text, (str, os.PathLike)) else "the given documents"
        raise UserError(f"text: {origin} has {len(ids)} tokens, fewer than one window of "
                        f"seq_len {seq_len}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[:count * seq_len].reshape(count, seq_len)


def evaluate(model: str | os.PathLike[str], text: str | os.PathLike[str] | Sequence[str],
             tokenizer: Any, *, reference: str | os.PathLike[str] | None = None,
             seq_len: int = 512, max_windows: int | None = None, batch_size: int = 1,
             providers: Sequence[str] = ("CPUExecutionProvider",),
             custom_ops: bool = True) -> EvalResult:
    """Perplexity of `model` on `text`, and its fidelity to `reference`, via onnxruntime.

    Args:
        model: the .onnx model to score (quantized or not), or its model folder.
        text: a text file path, or a sequence of documents (strings).
        tokenizer: tokenizer.json, a tokenizer directory, a .gguf file, or a
            loaded tokenizer (anything with ``encode``); None: the model folder's.
        reference: the float .onnx model (or folder); adds mean KL(reference || model) and
            top-1 agreement on the same windows.
        seq_len: tokens per window.
        max_windows: evaluate only the first this many windows.
        batch_size: windows per onnxruntime run.
        providers: onnxruntime execution providers.
        custom_ops: register the onnx_gptq custom-op library when the model needs it.

    Returns:
        An :class:`EvalResult`.
    """
    if tokenizer is None:
        from onnx_gptq.model_folder import resolve

        tokenizer = resolve(model).tokenizer
        if tokenizer is None:
            raise UserError(f"tokenizer: none given and '{model}' has no tokenizer.json or tokenizer folder "
                            "beside it; pass --tokenizer")
    windows = text_windows(text, tokenizer, seq_len, max_windows)
    logger.info("evaluating %s on %d windows of %d tokens", model, len(windows), seq_len)
    return evaluate_ids(model, windows, reference=reference, batch_size=batch_size,
                        providers=providers, custom_ops=custom_ops)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``onnx-gptq eval`` arguments to `parser`."""
    parser.add_argument("model", help="the .onnx model (or model folder) to evaluate")
    parser.add_argument("--text", required=True, help="UTF-8 text file to compute perplexity on")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json, a tokenizer directory, or a .gguf file (default: the model folder's)")
    parser.add_argument("--reference", default=None,
                        help="float .onnx model or folder: also report KL divergence and top-1 agreement")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate only the first N windows")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per run (default 1)")
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="onnxruntime execution providers, comma separated")
    parser.add_argument("--json", dest="json_path", default=None,
                        help="also write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-gptq eval`` with parsed `args`; prints one summary line, returns 0."""
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    result = evaluate(args.model, args.text, args.tokenizer, reference=args.reference,
                      seq_len=args.seq_len, max_windows=args.max_windows,
                      batch_size=args.batch_size, providers=providers)
    print(result.summary())  # the command's output
    if args.json_path:
        try:
            Path(args.json_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        except OSError as exc:
            raise UserError(f"--json: cannot write {args.json_path}: {exc.strerror}") from exc
    return 0


__all__ = ["EvalResult", "LogitsRunner", "configure_parser", "evaluate", "evaluate_ids", "open_session",
           "read_texts", "run", "text_windows"]
