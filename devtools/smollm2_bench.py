"""The SmolLM2-135M set-up the perplexity benches share (bench/smollm2_*.py).

Tokenizer, calibration and evaluation text that never overlap (State of the
Union addresses before / from 2000), a work folder in the cache and the fp32
ONNX export there, made once.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from devtools import assets
from onnx_gptq.tools import export

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SmolLM2Bench:
    """Inputs of one SmolLM2 bench.

    Attributes:
        tokenizer: the SmolLM2 GGUF file (tokenizer and weights).
        calib: calibration text file.
        evaluation: evaluation text file.
        work: the bench's folder in the cache.
        reference: the fp32 ONNX model in `work`.
    """

    tokenizer: str
    calib: str
    evaluation: str
    work: Path
    reference: Path


#: The real decoders a bench can run on: name -> the `devtools.assets` function fetching its GGUF.
MODELS = {"smollm2": assets.smollm2_gguf, "gemma3": assets.gemma3_gguf}


def prepare(work_name: str, model: str = "smollm2") -> SmolLM2Bench:
    """Fetches the assets and exports the fp32 model into the cache folder `work_name` once.

    Args:
        work_name: folder under the asset cache for this bench's files.
        model: a key of `MODELS` (SmolLM2-135M, or Gemma 3 270M: another architecture).

    Returns:
        The bench's inputs.
    """
    if model not in MODELS:
        raise SystemExit(f"model {model!r}: choose one of {', '.join(MODELS)}")
    tokenizer = str(MODELS[model]())
    calib, evaluation = (str(p) for p in assets.sotu_split_files())
    work = assets.cache_root() / work_name
    work.mkdir(parents=True, exist_ok=True)
    reference = work / f"{model}.onnx"
    if not reference.exists():
        logger.info("exporting %s to %s", tokenizer, reference)
        export.export_model(tokenizer, reference)
    return SmolLM2Bench(tokenizer, calib, evaluation, work, reference)
