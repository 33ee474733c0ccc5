"""Export a causal LM to ONNX: ``input_ids`` (+ ``attention_mask``) in, ``logits`` out.

The float model that onnx-gptq quantizes usually comes from here. The exporter
is torch.onnx's dynamo exporter (``torch.export`` + onnxscript); when it cannot
trace a model, the TorchScript exporter takes over, with a warning saying why.
The KV cache is switched off (``use_cache=False``) so the graph has exactly one
output, and the batch and sequence axes are dynamic.

Before returning, the exported file is run through onnxruntime (CPU) on a sample
and its logits are compared with torch's; a mismatch raises
:class:`ExportCheckError`.

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

import numpy as np

from onnx_gptq.errors import ConfigError, ModelError, OutputError, first_line

logger = logging.getLogger(__name__)

#: Initializer bytes above which weights go to an external data file (protobuf caps a
#: file at 2 GiB; staying well below leaves room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

DTYPES = ("float32", "float16")
EXPORTERS = ("auto", "dynamo", "torchscript")


class ExportCheckError(ModelError):
    """The exported graph's logits differ from torch's beyond tolerance."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """How closely onnxruntime reproduced torch on the check inputs.

    Args:
        max_abs_diff: largest |onnxruntime - torch| over all logits compared.
        tolerance: the bound `max_abs_diff` had to stay under.
        shapes: the (batch, sequence) shapes that were run.
    """

    max_abs_diff: float
    tolerance: float
    shapes: tuple[tuple[int, int], ...]


def _logits_wrapper(model: Any, *, hf: bool, takes_mask: bool) -> Any:
    """Wrap `model` so that forward(input_ids[, attention_mask]) returns logits only.

    Args:
        model: a torch.nn.Module; for transformers models the KV cache is disabled.
        hf: `model` is a transformers model (called with keywords, ``use_cache=False``).
        takes_mask: forward receives an attention mask.

    Returns:
        A torch.nn.Module whose output is a float tensor [batch, sequence, vocab].
    """
    import torch

    class _LogitsOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
            if hf:
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False)
            elif takes_mask:
                out = self.inner(input_ids, attention_mask=attention_mask)
            else:
                out = self.inner(input_ids)
            return _pick_logits(out)

    return _LogitsOnly(model).eval()


def _pick_logits(out: Any) -> Any:
    """The logits tensor out of whatever a model returns (tensor, ModelOutput, tuple, dict)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(f"model output of type {type(out).__name__} holds no logits tensor")


def _is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def _vocab_size(model: Any, hf: bool) -> int:
    """Vocabulary size: the config's for transformers models, else the first embedding's."""
    import torch

    if hf:
        size = getattr(model.config, "vocab_size", None)
        if size:
            return int(size)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return int(module.num_embeddings)
    raise ModelError(f"{type(model).__name__}: no torch.nn.Embedding found, so the token "
                     "vocabulary is unknown; export needs a model that takes input_ids")


def _max_positions(model: Any, hf: bool) -> int | None:
    if not hf:
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_causal_lm(source: str | os.PathLike[str], *, gguf_file: str | None = None,
                   dtype: str = "float32") -> Any:
    """Load a transformers causal LM from local files, in evaluation mode.

    Args:
        source: a transformers model directory, or a ``.gguf`` file.
        gguf_file: name of a GGUF file inside the directory `source`.
        dtype: "float32" or "float16".

    Returns:
        The torch.nn.Module (a transformers PreTrainedModel).

    Raises:
        ModelError: the path is missing or transformers cannot load it.
    """
    import torch

    path = Path(source).expanduser()
    if not path.exists():
        raise ModelError(f"model: {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model: {path} is a file but not a .gguf; pass a transformers "
                             "model directory or a GGUF file")
        directory, gguf_file = path.parent, path.name
    else:
        directory = path
        if gguf_file is not None and not (directory / gguf_file).is_file():
            raise ModelError(f"model: GGUF file {directory / gguf_file} does not exist")
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ModelError(f"model: loading {path} needs transformers (install onnx-gptq[llm])"
                         ) from exc
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    logger.info("loading %s%s as %s", directory, f" ({gguf_file})" if gguf_file else "", dtype)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds on bad input
        first = first_line(exc)
        raise ModelError(f"model: transformers cannot load {path}: {first}") from exc
    finally:
        hf_logging.set_verbosity(level)
    return model.eval()


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


def _export_dynamo(wrapped: Any, args: tuple[Any, ...], output: Path, *, input_names: list[str],
                   opset: int, external: bool) -> None:
    import torch

    dims = {0: "batch", 1: "sequence"}
    dynamic_shapes = {name: dims for name in input_names}
    with _quiet():
        program = torch.onnx.export(wrapped, args, None, dynamo=True, opset_version=opset,
                                    input_names=input_names, output_names=["logits"],
                                    dynamic_shapes=dynamic_shapes, external_data=external,
                                    verbose=False)
        program.save(str(output), external_data=external)


def _export_torchscript(wrapped: Any, args: tuple[Any, ...], output: Path, *,
                        input_names: list[str], opset: int, external: bool) -> None:
    import onnx
    import torch

    axes = {0: "batch", 1: "sequence"}
    dynamic_axes = {name: axes for name in [*input_names, "logits"]}
    # The TorchScript exporter writes one file per tensor for large models; export into a
    # scratch directory and re-save with a single data file next to `output`.
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        tmp = Path(scratch) / "model.onnx"
        with _quiet():
            torch.onnx.export(wrapped, args, str(tmp), dynamo=False,
                              opset_version=min(opset, 17), input_names=input_names,
                              output_names=["logits"], dynamic_axes=dynamic_axes)
        proto = onnx.load(str(tmp), load_external_data=True)
        _save(proto, output, external)


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
                 check: bool = True, exporter: str = "auto") -> Path:
    """Export a causal LM to an ONNX file with dynamic batch and sequence axes.

    Args:
        model: a torch.nn.Module taking token ids [batch, sequence] (a transformers
            causal LM, or any module returning logits, a ModelOutput or a tuple
            whose first item is the logits), or the path of a local transformers
            model directory or ``.gguf`` file.
        output: the .onnx file to write. Weights go to ``<output>.data`` when they
            exceed ~1.8 GB; smaller models stay a single file.
        dtype: "float32" or "float16" weights and activations. A module passed
            in is put in eval mode and converted to `dtype` in place.
        gguf_file: name of a GGUF file inside the directory `model`.
        seq_len: tokens per row of the sample used for tracing and checking.
        opset: ONNX opset for the dynamo exporter (the TorchScript fallback caps it at 17).
        check: run the file through onnxruntime on two input shapes and compare its
            logits with torch's before returning.
        exporter: "auto" (dynamo, falling back to TorchScript with a warning),
            "dynamo" or "torchscript".

    Returns:
        The path of the written .onnx file. Inputs: ``input_ids`` int64
        [batch, sequence] and, when the model takes one, ``attention_mask`` int64
        [batch, sequence]; output: ``logits`` [batch, sequence, vocab].

    Raises:
        ConfigError: bad dtype, exporter or seq_len.
        ModelError: the model cannot be loaded or exported by either exporter.
        ExportCheckError: onnxruntime's logits differ from torch's.
        OutputError: `output` cannot be written.
    """
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter: {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if seq_len < 2:
        raise ConfigError(f"seq_len: {seq_len} must be at least 2")
    output = Path(output).expanduser()
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = Path(model).expanduser()
        _check_paths(output, source)
        model = load_causal_lm(source, gguf_file=gguf_file, dtype=dtype)
    else:
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"model: expected a torch.nn.Module or a path, got "
                             f"{type(model).__name__}")
        _check_paths(output, None)
        model = model.eval()
        if dtype == "float16":
            model = model.to(torch.float16)
        elif dtype == "float32":
            model = model.to(torch.float32)

    hf = _is_transformers_model(model)
    if hf:
        takes_mask = True
    else:
        takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
    vocab = _vocab_size(model, hf)
    max_pos = _max_positions(model, hf)
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"seq_len: {seq_len} exceeds the model's {max_pos} positions")
    wrapped = _logits_wrapper(model, hf=hf, takes_mask=takes_mask)
    input_names = ["input_ids", "attention_mask"] if takes_mask else ["input_ids"]

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, seq_len), generator=generator)
    args: tuple[Any, ...] = (ids, torch.ones_like(ids)) if takes_mask else (ids,)
    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD

    start = time.perf_counter()
    used = exporter
    with torch.no_grad():
        if exporter in ("auto", "dynamo"):
            try:
                _export_dynamo(wrapped, args, output, input_names=input_names, opset=opset,
                               external=external)
                used = "dynamo"
            except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
                reason = _first_line(exc)
                if exporter == "dynamo":
                    raise ModelError(f"model: the dynamo exporter failed: {reason}") from exc
                logger.warning("the dynamo exporter failed (%s); falling back to the "
                               "TorchScript exporter (dynamo=False)", reason)
                used = "torchscript"
        if used == "torchscript":
            try:
                _export_torchscript(wrapped, args, output, input_names=input_names,
                                    opset=opset, external=external)
            except Exception as exc:  # noqa: BLE001
                raise ModelError(f"model: the TorchScript exporter failed: {_first_line(exc)}"
                                 ) from exc
    logger.info("exported %s with the %s exporter in %.1f s%s", output, used,
                time.perf_counter() - start, " (external data)" if external else "")

    if check:
        result = check_export(wrapped, output, vocab=vocab, seq_len=seq_len,
                              takes_mask=takes_mask, dtype=dtype, max_positions=max_pos)
        logger.info("onnxruntime matches torch: max |diff| %.3g (tolerance %.3g) on shapes %s",
                    result.max_abs_diff, result.tolerance, result.shapes)
    return output


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"


def check_export(wrapped: Any, path: Path, *, vocab: int, seq_len: int, takes_mask: bool,
                 dtype: str, max_positions: int | None = None) -> CheckResult:
    """Compare onnxruntime's logits for `path` with torch's on two input shapes.

    The second shape differs from the traced one in both batch and sequence, so a
    graph whose axes were frozen fails here.

    Args:
        wrapped: the module that was exported (returns logits).
        path: the exported .onnx file.
        vocab: token ids are drawn from [0, vocab).
        seq_len: the traced sequence length.
        takes_mask: the graph has an attention_mask input.
        dtype: "float32" (tolerance 1e-4 x max(1, max|logits|)) or "float16" (2e-2 x).
        max_positions: the model's position limit, if any.

    Returns:
        The largest difference seen and the tolerance applied.

    Raises:
        ExportCheckError: the difference exceeds the tolerance, or the file does not run.
    """
    import torch

    from onnx_gptq.runtime import sessions

    other = seq_len + 5 if max_positions is None else min(seq_len + 5, max_positions)
    shapes = ((2, seq_len), (3, other))
    session = sessions.make_session(path, providers=["CPUExecutionProvider"], custom_ops=False,
                                    what=f"the exported model {path}", error=ExportCheckError)
    relative = 1e-4 if dtype == "float32" else 2e-2
    worst, tolerance = 0.0, 0.0
    generator = torch.Generator().manual_seed(1)
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            expected = (wrapped(ids, mask) if takes_mask else wrapped(ids)).float().numpy()
        feeds = {"input_ids": ids.numpy()}
        if takes_mask:
            feeds["attention_mask"] = mask.numpy()
        got = session.run(["logits"], feeds, context=f"{path}: input shape [{batch}, {length}]",
                          error=ExportCheckError)[0].astype(np.float32)
        if got.shape != expected.shape:
            raise ExportCheckError(f"{path}: logits shape {list(got.shape)} from onnxruntime, "
                                   f"{list(expected.shape)} from torch")
        diff = float(np.max(np.abs(got - expected)))
        bound = relative * max(1.0, float(np.max(np.abs(expected))))
        if diff > bound:
            raise ExportCheckError(f"{path}: onnxruntime's logits differ from torch's by "
                                   f"{diff:.3g} (> {bound:.3g}) on input shape [{batch}, {length}]")
        worst, tolerance = max(worst, diff), max(tolerance, bound)
    return CheckResult(max_abs_diff=worst, tolerance=tolerance, shapes=shapes)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``onnx-gptq export`` arguments to `parser`."""
    parser.add_argument("model", help="local transformers model directory, or a .gguf file")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
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
                        exporter=args.exporter)
    logger.info("wrote %s", path)
    return 0


__all__ = ["CheckResult", "ExportCheckError", "check_export", "configure_parser",
           "export_model", "load_causal_lm", "run"]
