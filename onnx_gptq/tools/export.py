"""Export a causal LM to ONNX: an .onnx file without KV cache, or a model folder with one.

The float model that onnx-gptq quantizes usually comes from here. The exporter
is torch.onnx's dynamo exporter (``torch.export`` + onnxscript); when it cannot
trace a model, the TorchScript exporter takes over, with a warning saying why.
An .onnx output is ``input_ids`` (+ ``attention_mask``) in, ``logits`` out
(``use_cache=False``: what evaluation wants); a folder output gets the KV-cache
graph and the files runtimes read beside it (see `export_kv`). Batch and
sequence axes are dynamic.

Before returning, the exported file is run through onnxruntime (CPU) and its
outputs are compared with torch's; a mismatch raises :class:`ExportCheckError`.

Models load from local files only: a transformers directory, or a GGUF file
(dequantized to float by transformers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onnx_gptq.errors import ConfigError, ModelError, OutputError
from onnx_gptq.tools.causal_lm import (is_transformers_model, load_causal_lm, logits_wrapper, max_positions,
                                       vocab_size)
from onnx_gptq.tools.export_check import CheckResult, ExportCheckError, check_export, describe_error

logger = logging.getLogger(__name__)

#: Initializer bytes above which weights go to an external data file (protobuf caps a
#: file at 2 GiB; staying well below leaves room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

DTYPES = ("float32", "float16")
EXPORTERS = ("auto", "dynamo", "torchscript")


#: Loggers of the exporter stack whose INFO/WARNING chatter (rewrite rules applied,
#: constant folding skipped, torchvision missing) says nothing actionable to a user.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and log chatter."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _initializer_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """The names and dynamic axes of an exported graph.

    Attributes:
        inputs: graph input names, in the order of the flattened tracing arguments.
        outputs: graph output names, in the order the wrapped module returns them.
        axes: input or output name -> {axis: symbolic dimension name}.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    axes: dict[str, dict[int, str]]


def logits_io(input_names: list[str]) -> GraphIO:
    """The no-cache graph: every input and the logits dynamic in batch and sequence."""
    dims = {0: "batch", 1: "sequence"}
    return GraphIO(tuple(input_names), ("logits",), {name: dims for name in [*input_names, "logits"]})


def _dynamic_shapes(args: Any, names: Iterator[str], axes: dict[str, dict[int, str]]) -> Any:
    """`args`'s nesting (tensors in tuples) with each tensor replaced by its axes (torch.export's form)."""
    if isinstance(args, (tuple, list)):
        return tuple(_dynamic_shapes(item, names, axes) for item in args)
    return axes.get(next(names))


def _export_dynamo(wrapped: Any, args: tuple[Any, ...], output: Path, *, graph_io: GraphIO, opset: int,
                   external: bool) -> None:
    import torch

    dynamic_shapes = _dynamic_shapes(args, iter(graph_io.inputs), graph_io.axes)
    with _quiet():
        program = torch.onnx.export(wrapped, args, None, dynamo=True, opset_version=opset,
                                    input_names=list(graph_io.inputs), output_names=list(graph_io.outputs),
                                    dynamic_shapes=dynamic_shapes, external_data=external,
                                    verbose=False)
        program.save(str(output), external_data=external)


def _export_torchscript(wrapped: Any, args: tuple[Any, ...], output: Path, *, graph_io: GraphIO, opset: int,
                        external: bool) -> None:
    import onnx
    import torch

    # The TorchScript exporter writes one file per tensor for large models; export into a
    # scratch directory and re-save with a single data file next to `output`.
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        tmp = Path(scratch) / "model.onnx"
        with _quiet():
            torch.onnx.export(wrapped, args, str(tmp), dynamo=False,
                              opset_version=min(opset, 17), input_names=list(graph_io.inputs),
                              output_names=list(graph_io.outputs), dynamic_axes=graph_io.axes)
        proto = onnx.load(str(tmp), load_external_data=True)
        _save(proto, output, external)


def trace(wrapped: Any, args: tuple[Any, ...], output: Path, graph_io: GraphIO, *, exporter: str, opset: int,
          external: bool) -> str:
    """Export `wrapped` called on `args` to `output` with dynamo, or TorchScript when dynamo fails.

    Args:
        wrapped: the module to trace (in eval mode; called under torch.no_grad).
        args: its tracing arguments (tensors, possibly nested in tuples).
        output: the .onnx file to write.
        graph_io: the graph's input and output names and dynamic axes.
        exporter: "auto" (dynamo, falling back to TorchScript with a warning), "dynamo" or "torchscript".
        opset: ONNX opset (the TorchScript exporter caps it at 17).
        external: weights go to ``<output>.data``.
    Returns:
        The exporter that wrote the file: "dynamo" or "torchscript".
    Raises:
        ModelError: the exporter(s) failed; the message says why in one line.
    """
    import torch

    used = exporter
    with torch.no_grad():
        if exporter in ("auto", "dynamo"):
            try:
                _export_dynamo(wrapped, args, output, graph_io=graph_io, opset=opset, external=external)
                used = "dynamo"
            except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
                reason = describe_error(exc)
                if exporter == "dynamo":
                    raise ModelError(f"model: the dynamo exporter failed: {reason}") from exc
                logger.warning("the dynamo exporter failed (%s); falling back to the "
                               "TorchScript exporter (dynamo=False)", reason)
                used = "torchscript"
        if used == "torchscript":
            try:
                _export_torchscript(wrapped, args, output, graph_io=graph_io, opset=opset, external=external)
            except Exception as exc:  # noqa: BLE001
                raise ModelError(f"model: the TorchScript exporter failed: {describe_error(exc)}"
                                 ) from exc
    return used


def _save(proto: Any, output: Path, external: bool) -> None:
    import onnx

    data = output.with_name(output.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(proto, str(output), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(output))


def _check_paths(output: Path, source: Path | None) -> None:
    if output.is_dir():
        raise OutputError(f"output: {output} is a directory; give a .onnx file path")
    if source is not None and output.resolve() == source.resolve():
        raise OutputError(f"output: {output} is the input model itself")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output: cannot create directory {output.parent}: {exc.strerror}"
                          ) from exc
    if not os.access(output.parent, os.W_OK):
        raise OutputError(f"output: directory {output.parent} is not writable")


def export_model(model: Any, output: str | os.PathLike[str], *, dtype: str = "float32",
                 gguf_file: str | None = None, seq_len: int = 16, opset: int = 18,
                 check: bool = True, exporter: str = "auto", kv_cache: bool | None = None) -> Path:
    """Export a causal LM to an ONNX file, or to a model folder with its KV cache.

    Args:
        model: a torch.nn.Module taking token ids [batch, sequence] (a transformers
            causal LM, or any module returning logits, a ModelOutput or a tuple
            whose first item is the logits), or the path of a local transformers
            model directory or ``.gguf`` file.
        output: an .onnx file, or a folder (any other path; created when missing,
            its parent must exist): ``model.onnx``, config.json,
            generation_config.json, the tokenizer files and, with the KV cache,
            genai_config.json for onnxruntime-genai. Weights go to
            ``<model>.data`` when they exceed ~1.8 GB.
        dtype: "float32" or "float16" weights and activations. A module passed
            in is put in eval mode and converted to `dtype` in place.
        gguf_file: name of a GGUF file inside the directory `model`.
        seq_len: tokens per row of the sample used for tracing and checking.
        opset: ONNX opset for the dynamo exporter (the TorchScript fallback caps it at 17).
        check: run the file through onnxruntime and compare its outputs with torch's
            before returning.
        exporter: "auto" (dynamo, falling back to TorchScript with a warning),
            "dynamo" or "torchscript".
        kv_cache: export the KV cache (see `export_kv`); None: exactly when
            `output` is a folder (evaluation wants the .onnx form without one).

    Returns:
        The .onnx file or the folder written. Without the cache the graph's inputs
        are ``input_ids`` int64 [batch, sequence] and, when the model takes one,
        ``attention_mask`` int64 [batch, sequence]; its output ``logits``
        [batch, sequence, vocab].

    Raises:
        ConfigError: bad dtype, exporter or seq_len; a KV cache for a model without one.
        ModelError: the model cannot be loaded or exported by either exporter.
        ExportCheckError: onnxruntime's outputs differ from torch's.
        OutputError: `output` cannot be written.
    """
    import torch

    from onnx_gptq.model_folder import publish_tree
    from onnx_gptq.staging import staging_dir
    from onnx_gptq.tools import export_kv

    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter: {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if seq_len < 2:
        raise ConfigError(f"seq_len: {seq_len} must be at least 2")
    output = Path(output).expanduser()
    folder = output.suffix.lower() != ".onnx"
    kv_cache = folder if kv_cache is None else kv_cache
    source = Path(model).expanduser() if isinstance(model, (str, os.PathLike)) else None
    if folder:
        export_kv.check_folder_output(output, source)
    else:
        _check_paths(output, source)
    if source is not None:
        model = load_causal_lm(source, gguf_file=gguf_file, dtype=dtype)
    else:
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"model: expected a torch.nn.Module or a path, got "
                             f"{type(model).__name__}")
        model = model.eval()
        if dtype == "float16":
            model = model.to(torch.float16)
        elif dtype == "float32":
            model = model.to(torch.float32)
    max_pos = max_positions(model, is_transformers_model(model))
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"seq_len: {seq_len} exceeds the model's {max_pos} positions")
    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not folder:
        _export_graph(model, output, kv_cache=kv_cache, dtype=dtype, seq_len=seq_len, opset=opset, check=check,
                      exporter=exporter, external=external)
        return output
    with staging_dir(output) as stage:
        tree = stage / "folder"
        tree.mkdir()
        _export_graph(model, tree / export_kv.MODEL_FILE, kv_cache=kv_cache, dtype=dtype, seq_len=seq_len,
                      opset=opset, check=check, exporter=exporter, external=external)
        export_kv.write_side_files(model, tree, kv_cache=kv_cache, source=source, gguf_file=gguf_file)
        publish_tree(tree, output, export_kv.MODEL_FILE)
    return output


def _export_graph(model: Any, output: Path, *, kv_cache: bool, dtype: str, seq_len: int, opset: int,
                  check: bool, exporter: str, external: bool) -> None:
    """Trace `model` to the .onnx file `output`, with or without the KV cache, and check it."""
    import torch

    from onnx_gptq.tools import export_kv

    start = time.perf_counter()
    if kv_cache:
        used = export_kv.export_kv_graph(model, output, seq_len=seq_len, opset=opset, exporter=exporter,
                                         external=external, check=check, dtype=dtype)
        logger.info("exported %s with its KV cache (%s exporter) in %.1f s", output, used,
                    time.perf_counter() - start)
        return
    hf = is_transformers_model(model)
    takes_mask = hf or "attention_mask" in inspect.signature(model.forward).parameters
    vocab = vocab_size(model, hf)
    wrapped = logits_wrapper(model, hf=hf, takes_mask=takes_mask)
    input_names = ["input_ids", "attention_mask"] if takes_mask else ["input_ids"]
    ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))
    args: tuple[Any, ...] = (ids, torch.ones_like(ids)) if takes_mask else (ids,)
    used = trace(wrapped, args, output, logits_io(input_names), exporter=exporter, opset=opset,
                 external=external)
    logger.info("exported %s with the %s exporter in %.1f s%s", output, used,
                time.perf_counter() - start, " (external data)" if external else "")
    if check:
        result = check_export(wrapped, output, vocab=vocab, seq_len=seq_len, takes_mask=takes_mask,
                              dtype=dtype, max_positions=max_positions(model, hf))
        logger.info("onnxruntime matches torch: max |diff| %.3g (tolerance %.3g) on shapes %s",
                    result.max_abs_diff, result.tolerance, result.shapes)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``onnx-gptq export`` arguments to `parser`."""
    parser.add_argument("model", help="local transformers model directory, or a .gguf file")
    parser.add_argument("-o", "--output", required=True,
                        help="a folder (model.onnx with its KV cache, genai_config.json, config.json, tokenizer), "
                             "or an .onnx file (no KV cache)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--kv-cache", dest="kv_cache", action="store_true", default=None,
                       help="past_key_values.N.key/value inputs, present.N.key/value outputs (default for a folder)")
    cache.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                       help="input_ids (+ attention_mask) -> logits only (default for an .onnx file)")
    parser.add_argument("--gguf-file", default=None,
                        help="GGUF file name inside the model directory")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weight and activation type (default: float32)")
    parser.add_argument("--seq-len", type=int, default=16,
                        help="tokens per row of the tracing/check sample (default: 16)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto",
                        help="torch.onnx exporter; auto tries dynamo, then TorchScript")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the onnxruntime-vs-torch comparison")


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-gptq export`` with parsed `args`; returns the exit code."""
    path = export_model(args.model, args.output, dtype=args.dtype, gguf_file=args.gguf_file,
                        seq_len=args.seq_len, opset=args.opset, check=args.check,
                        exporter=args.exporter, kv_cache=args.kv_cache)
    logger.info("wrote %s", path)
    return 0


__all__ = ["CheckResult", "ExportCheckError", "check_export", "configure_parser",
           "export_model", "load_causal_lm", "run"]
