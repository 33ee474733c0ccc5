"""Export a transformers causal LM with its KV cache, as a folder onnxruntime-genai loads.

The graph takes ``input_ids`` [batch, sequence], ``attention_mask`` [batch,
past + sequence], ``position_ids`` [batch, sequence] and per layer
``past_key_values.N.key`` / ``.value`` [batch, kv_heads, past, head_size]; it
returns ``logits`` [batch, sequence, vocab] and ``present.N.key`` / ``.value``
[batch, kv_heads, past + sequence, head_size]: the names onnxruntime-genai's
builder and Optimum use. An empty past (length 0) is the prefill.

Inside, a wrapper module turns the past tensors into a transformers
``DynamicCache`` and back, so the model's own attention code is traced. The
folder gets ``model.onnx``, ``genai_config.json`` (see `genai_config`),
``config.json``, ``generation_config.json`` and the tokenizer files, staged
beside the output and published at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from onnx_gptq.errors import ConfigError
from onnx_gptq.tools.export_check import ExportCheckError
from onnx_gptq.tools.genai_config import genai_config, head_size, kv_heads, kv_names

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
#: Tokenizer files a transformers folder may hold; each present one is copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
#: Past length of the tracing sample (not 0 or 1: torch.export would specialise those).
_TRACE_PAST = 3


def cache_wrapper(model: Any) -> Any:
    """Wrap a transformers causal LM as forward(input_ids, attention_mask, position_ids, past) -> (logits, *present).

    Args:
        model: a transformers PreTrainedModel with a KV cache.
    Returns:
        A torch.nn.Module; `past` is a tuple of 2 x layers tensors (key, value per
        layer) [batch, kv_heads, past, head_size], and the present tensors come
        back in the same order with past + sequence positions.
    """
    import torch
    from transformers import DynamicCache

    config = model.config
    layers = int(config.num_hidden_layers)
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class _WithCache(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)],
                                 config=config)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{keyword: cache})
            present = getattr(out, "cache", None)
            if present is None:
                present = out.past_key_values
            tensors: list[torch.Tensor] = []
            for layer in present.layers:
                tensors += [layer.keys, layer.values]
            return (out.logits, *tensors)

    return _WithCache(model).eval()


def graph_io(layers: int) -> Any:
    """The KV-cache graph's names and dynamic axes (an `export.GraphIO`)."""
    from onnx_gptq.tools.export import GraphIO

    past, present = kv_names(layers)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"},
                                       "attention_mask": {0: "batch", 1: "total_sequence"},
                                       "position_ids": {0: "batch", 1: "sequence"},
                                       "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present})
    return GraphIO(("input_ids", "attention_mask", "position_ids", *past), ("logits", *present), axes)


def sample_args(model: Any, *, batch: int, seq_len: int, past_len: int, seed: int = 0) -> tuple[Any, ...]:
    """Inputs for `cache_wrapper(model)`: random ids, a full mask, positions after the past, a random past."""
    import torch

    config = model.config
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, int(config.vocab_size), (batch, seq_len), generator=generator)
    mask = torch.ones(batch, past_len + seq_len, dtype=torch.int64)
    positions = torch.arange(past_len, past_len + seq_len).expand(batch, seq_len).contiguous()
    shape = (batch, kv_heads(config), past_len, head_size(config))
    past = tuple(torch.randn(shape, generator=generator).to(dtype) for _ in range(2 * config.num_hidden_layers))
    return ids, mask, positions, past


@dataclasses.dataclass(frozen=True)
class KvCheckResult:
    """How closely onnxruntime reproduced torch, logits and present key/values.

    Attributes:
        max_abs_diff: largest |onnxruntime - torch| over every output compared.
        tolerance: the bound it had to stay under.
        cases: the (batch, sequence, past) shapes run.
    """

    max_abs_diff: float
    tolerance: float
    cases: tuple[tuple[int, int, int], ...]


def check_kv_export(wrapped: Any, model: Any, path: Path, *, seq_len: int, dtype: str) -> KvCheckResult:
    """Compare onnxruntime with torch on a prefill (empty past), a decode step and a batch with a past.

    Raises:
        ExportCheckError: an output differs beyond 1e-4 (float16: 2e-2) x max(1, max |output|).
    """
    import torch

    from onnx_gptq.runtime import sessions

    session = sessions.make_session(path, custom_ops=False, what=f"the exported model {path}",
                                    error=ExportCheckError)
    names = graph_io(int(model.config.num_hidden_layers)).inputs
    relative = 1e-4 if dtype == "float32" else 2e-2
    cases = ((1, seq_len, 0), (1, 1, seq_len), (3, 4, 5))
    worst = bound_seen = 0.0
    for seed, (batch, length, past_len) in enumerate(cases):
        args = sample_args(model, batch=batch, seq_len=length, past_len=past_len, seed=seed + 1)
        with torch.no_grad():
            expected = [t.float().numpy() for t in wrapped(*args)]
        flat = [*args[:3], *args[3]]
        feeds = {name: tensor.numpy() for name, tensor in zip(names, flat)}
        got = session.run(None, feeds, context=f"{path}: batch {batch}, sequence {length}, past {past_len}",
                          error=ExportCheckError)
        for name, have, want in zip(session.output_names, got, expected):
            if have.shape != want.shape:
                raise ExportCheckError(f"{path}: '{name}' has shape {list(have.shape)} in onnxruntime, "
                                       f"{list(want.shape)} in torch")
            diff = float(np.max(np.abs(have.astype(np.float32) - want))) if want.size else 0.0
            bound = relative * max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
            if diff > bound:
                raise ExportCheckError(f"{path}: onnxruntime's '{name}' differs from torch's by {diff:.3g} "
                                       f"(> {bound:.3g}) at batch {batch}, sequence {length}, past {past_len}")
            worst, bound_seen = max(worst, diff), max(bound_seen, bound)
    return KvCheckResult(worst, bound_seen, cases)


def _write_tokenizer(tree: Path, source: Path | None, gguf_file: str | None) -> None:
    """Copy the source folder's tokenizer files into `tree` (a GGUF's tokenizer is converted)."""
    if source is None:
        logger.warning("no tokenizer written: the model was given as a module; copy its tokenizer files into "
                       "the folder for onnxruntime-genai and 'onnx-gptq generate'")
        return
    directory = source if source.is_dir() else source.parent
    if gguf_file is not None or source.is_file():
        from transformers import AutoTokenizer

        name = gguf_file or source.name
        try:
            AutoTokenizer.from_pretrained(str(directory), gguf_file=name, local_files_only=True).save_pretrained(tree)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            logger.warning("no tokenizer written: transformers cannot read the tokenizer of %s (%s)",
                           directory / name, type(exc).__name__)
        return
    copied = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    for name in copied:
        shutil.copy2(directory / name, tree / name)
    if not copied:
        logger.warning("no tokenizer written: '%s' holds no tokenizer files", directory)


def export_kv_graph(model: Any, path: Path, *, seq_len: int, opset: int, exporter: str, external: bool,
                    check: bool, dtype: str) -> str:
    """Export `model` with its KV cache to the .onnx file `path`, checked against torch.

    Returns:
        The exporter used ("dynamo" or "torchscript").
    Raises:
        ConfigError: the model is not a transformers causal LM taking position_ids.
        ModelError: the export failed; ExportCheckError: onnxruntime disagrees with torch.
    """
    from onnx_gptq.tools.causal_lm import is_transformers_model
    from onnx_gptq.tools.export import trace

    if not is_transformers_model(model) or not hasattr(model.config, "num_hidden_layers"):
        raise ConfigError("kv_cache: a KV-cache export needs a transformers causal LM; pass kv_cache=False "
                          "(or --no-kv-cache) for other modules")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"kv_cache: {type(model).__name__}.forward takes no position_ids; use --no-kv-cache")
    wrapped = cache_wrapper(model)
    layers = int(model.config.num_hidden_layers)
    args = sample_args(model, batch=2, seq_len=seq_len, past_len=_TRACE_PAST)
    used = trace(wrapped, args, path, graph_io(layers), exporter=exporter, opset=opset, external=external)
    if check:
        result = check_kv_export(wrapped, model, path, seq_len=seq_len, dtype=dtype)
        logger.info("onnxruntime matches torch with the KV cache: max |diff| %.3g (tolerance %.3g) on %s",
                    result.max_abs_diff, result.tolerance, result.cases)
    return used


def write_side_files(model: Any, tree: Path, *, kv_cache: bool, source: Path | None,
                     gguf_file: str | None) -> None:
    """Write config.json, generation_config.json, the tokenizer and (with `kv_cache`) genai_config.json into `tree`.

    Args:
        model: the exported model (a transformers model; a plain module gets the tokenizer only).
        tree: the staged output folder holding ``model.onnx``.
        kv_cache: the graph has the KV cache, so onnxruntime-genai can run it.
        source: the model's directory or GGUF file, None for a module passed in.
        gguf_file: the GGUF file inside `source`, if any.
    """
    from onnx_gptq.tools.causal_lm import is_transformers_model

    if is_transformers_model(model):
        model.config.save_pretrained(tree)
        generation: dict[str, Any] = {}
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tree)
            generation = model.generation_config.to_dict()
        if kv_cache:
            config = genai_config(model.config, generation, filename=MODEL_FILE)
            (tree / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    _write_tokenizer(tree, source, gguf_file)


def check_folder_output(output: Path, source: Path | None) -> None:
    """Refuse an output folder that is a file, is the source folder, or whose parent is missing.

    Raises:
        OutputError: naming the path.
    """
    from onnx_gptq.errors import OutputError

    if output.exists() and not output.is_dir():
        raise OutputError(f"output: '{output}' is a file; give a folder (or an .onnx path for a graph without cache)")
    if source is not None and output.exists() and source.is_dir() and output.resolve() == source.resolve():
        raise OutputError(f"output: '{output}' is the input model folder; choose another")
    if not output.resolve().parent.is_dir():
        raise OutputError(f"output: the parent of '{output}' does not exist")


__all__ = ["KvCheckResult", "MODEL_FILE", "cache_wrapper", "check_folder_output", "check_kv_export", "export_kv_graph",
           "graph_io", "sample_args", "write_side_files"]
