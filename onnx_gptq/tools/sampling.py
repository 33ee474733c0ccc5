"""Choosing the next token from a logits row: greedy, or sampled with temperature, top-k and top-p.

The order is transformers': logits divided by the temperature, then the top-k
most likely tokens kept, then the smallest set of those whose probabilities
add up to top-p (the most likely token always stays), then a draw from what
remains, renormalised. A seed makes the draws reproducible.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from onnx_gptq.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
        do_sample: draw from the filtered distribution; False: the most likely token (greedy).
        temperature: logits are divided by it (> 0; below 1 sharpens).
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the most likely tokens whose probabilities sum to top_p (0 < top_p <= 1; 1: all).
        seed: seed of the draws (None: a fresh one each run).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"temperature: {self.temperature} must be a positive number")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k: {self.top_k!r} must be a whole number >= 0 (0: no limit)")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p: {self.top_p} must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise ConfigError(f"seed: {self.seed!r} must be a whole number >= 0")

    def to_dict(self) -> dict[str, object]:
        """The settings as a JSON-ready dict."""
        return dataclasses.asdict(self)


def candidates(logits: np.ndarray, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a draw may pick and their probabilities.

    Args:
        logits: float [vocab], one position's logits.
        sampling: temperature, top_k and top_p to apply.
    Returns:
        (token ids int64 [n], probabilities float64 [n] summing to 1), most likely first.
    """
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k:
        order = order[:sampling.top_k]
    kept = scaled[order]
    probs = np.exp(kept - kept[0])
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        # Keep a token while the mass before it is still short of top_p (so the first always stays).
        before = np.cumsum(probs) - probs
        keep = before < sampling.top_p
        order, probs = order[keep], probs[keep]
        probs = probs / probs.sum()
    return order.astype(np.int64), probs


class Sampler:
    """Picks tokens one logits row at a time, with its own random generator."""

    def __init__(self, sampling: Sampling) -> None:
        """Args:
            sampling: the settings; its seed seeds the generator.
        """
        self.sampling = sampling
        self._rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token for `logits` (float [vocab])."""
        if not self.sampling.do_sample:
            return int(np.argmax(logits))
        ids, probs = candidates(logits, self.sampling)
        return int(ids[self._rng.choice(len(ids), p=probs)])


__all__ = ["Sampler", "Sampling", "candidates"]
