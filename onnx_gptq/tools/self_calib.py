"""Calibration without data: token sequences sampled from the float model itself.

For users with no representative text (``--calib self``), the float ONNX model
generates its own calibration set through onnxruntime. Sampling is exactly
autoregressive: token ``t`` is drawn from the model's next-token distribution
given tokens ``0..t-1`` (softmax of logits / temperature, optionally restricted
to the top k), via the Gumbel-max trick.

Cost. An exported model has no KV cache, so every step re-runs the whole prefix:
a chain of L tokens costs about L^2 / 2 token forwards instead of L. To keep
this affordable, each calibration row of ``seq_len`` tokens is a concatenation
of independent chains of ``chain_len`` tokens (default 64, or ``seq_len`` when
shorter), each starting from BOS (when given) or a uniformly random token,
the way text calibration windows run across document boundaries. Total cost
is about ``num_samples * seq_len * (chain_len + 1) / 2`` token forwards; all
chains advance together in batches sized to bound the logits memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnx_gptq.config import CalibConfig
from onnx_gptq.errors import CalibrationError, ConfigError

logger = logging.getLogger(__name__)

#: Default tokens per independently sampled chain (see the module docstring for the cost).
DEFAULT_CHAIN_LEN = 64
#: Upper bound on the float32 logits held per onnxruntime run, in bytes.
MAX_LOGITS_BYTES = 256 * 1024 * 1024


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float,
            top_k: int | None) -> np.ndarray:
    """One token per row of `logits` [rows, vocab] (float32), via Gumbel-max.

    argmax(logits / T + Gumbel noise) is distributed as softmax(logits / T); with
    top_k, everything below the k-th largest logit is excluded first.
    """
    scores = logits.astype(np.float32) / np.float32(temperature)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores >= kth, scores, -np.inf)
    scores += rng.gumbel(size=scores.shape).astype(np.float32)
    return scores.argmax(axis=-1)


def generate_calibration(model_path: str | os.PathLike[str], *, num_samples: int, seq_len: int,
                         seed: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
                         temperature: float = 1.0, top_k: int | None = None,
                         vocab_size: int | None = None, bos_id: int | None = None,
                         chain_len: int | None = None, custom_ops: bool = True) -> np.ndarray:
    """Sample calibration token ids from the float ONNX model through onnxruntime.

    Args:
        model_path: the float .onnx causal LM (input ``input_ids`` with a
            dynamic sequence axis; ``logits`` [batch, sequence, vocab] out).
        num_samples: rows to return.
        seq_len: tokens per row.
        seed: seed for the first tokens and the sampling noise.
        providers: onnxruntime execution providers.
        temperature: softmax temperature (> 0); 1.0 samples the model's own distribution.
        top_k: sample only among the k most likely tokens; None for all.
        vocab_size: first tokens are drawn from [0, vocab_size); default: the
            model's embedding rows or logits width. Sampled tokens always stay
            inside the logits width.
        bos_id: start every chain with this token instead of a random one.
        chain_len: tokens per independently sampled chain; rows concatenate
            chains. Default min(seq_len, 64). Cost grows with chain_len (see module doc).
        custom_ops: register the onnx_gptq custom-op library when the model needs it.

    Returns:
        int64 [num_samples, seq_len] token ids, to be fed to calibration as
        pre-tokenized rows.

    Raises:
        ConfigError: a non-positive size, temperature or top_k.
        CalibrationError: the model's sequence axis is static, or it has no input_ids.
    """
    from onnx_gptq.tools.logits import LogitsRunner

    for name, value in (("num_samples", num_samples), ("seq_len", seq_len)):
        if value < 1:
            raise ConfigError(f"{name}: {value} must be positive")
    if not temperature > 0:
        raise ConfigError(f"temperature: {temperature} must be positive")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k: {top_k} must be positive")
    if chain_len is not None and chain_len < 1:
        raise ConfigError(f"chain_len: {chain_len} must be positive")
    chain = min(seq_len, chain_len or DEFAULT_CHAIN_LEN)

    path = Path(model_path).expanduser()
    runner = LogitsRunner(path, providers, custom_ops)
    if runner.inputs.static_seq_len is not None:
        raise CalibrationError(f"--calib self: {path} has a static sequence length of "
                               f"{runner.inputs.static_seq_len}; sampling needs a dynamic one")
    width = runner.logits(np.zeros((1, 1), np.int64)).shape[-1]  # logits per token
    vocab = int(vocab_size or runner.inputs.vocab_size or width)
    if bos_id is not None and not 0 <= bos_id < vocab:
        raise ConfigError(f"bos_id: {bos_id} is outside the vocabulary of {vocab}")

    chains_per_row = math.ceil(seq_len / chain)
    total = num_samples * chains_per_row
    batch = max(1, min(total, MAX_LOGITS_BYTES // (chain * width * 4)))
    forwards = total * chain * (chain + 1) // 2
    logger.info("self-calibration: sampling %d chains of %d tokens from %s (%d per run, "
                "about %.3g token forwards)", total, chain, path.name, batch, forwards)

    rng = np.random.default_rng(seed)
    chains = np.empty((total, chain), np.int64)
    if bos_id is not None:
        chains[:, 0] = bos_id
    else:
        chains[:, 0] = rng.integers(0, vocab, size=total)
    start = time.perf_counter()
    for first in range(0, total, batch):
        ids = chains[first:first + batch]
        for t in range(1, chain):
            last = runner.logits(ids[:, :t])[:, -1, :]
            ids[:, t] = _sample(last, rng, temperature, top_k)
        logger.debug("self-calibration: %d/%d chains after %.1f s", first + len(ids), total,
                     time.perf_counter() - start)
    logger.info("self-calibration: %d tokens sampled in %.1f s", total * chain,
                time.perf_counter() - start)
    rows = chains.reshape(num_samples, chains_per_row * chain)[:, :seq_len]
    return np.ascontiguousarray(rows)


@dataclasses.dataclass(frozen=True)
class SelfCalibration:
    """The calibration source ``"self"``: sequences sampled from the float model itself.

    Plugged into calibration through `calibrate.sources.NAMED_SOURCES`; pass an
    instance as `calibration` to change how it samples.

    Args:
        temperature: softmax temperature (> 0).
        top_k: sample among the k most likely tokens; None for all.
        chain_len: tokens per independently sampled chain (default min(seq_len, 64)).
    """

    temperature: float = 1.0
    top_k: int | None = None
    chain_len: int | None = None

    def generate(self, model_path: Path, config: CalibConfig) -> np.ndarray:
        """int64 [num_samples, seq_len] ids sampled from the model at `model_path`.

        Args:
            model_path: the float .onnx model.
            config: samples, sequence length, seed and providers (default: CUDA when present).
        Returns:
            The token rows, fed to calibration as pre-tokenized rows.
        """
        from onnx_gptq.runtime.sessions import default_providers

        return generate_calibration(model_path, num_samples=config.num_samples, seq_len=config.seq_len,
                                    seed=config.seed, providers=config.providers or default_providers(),
                                    temperature=self.temperature, top_k=self.top_k, chain_len=self.chain_len)


__all__ = ["SelfCalibration", "generate_calibration"]
