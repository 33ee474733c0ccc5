"""Reading and writing models: clear errors, lazy weights, atomic output.

Weights stay lazy: `onnx_ir.load` memory-maps external data, so a tensor is
read only when the solver asks for it or the writer copies it. Packed weights
go to disk as the solver produces them (`PackedWeightFile`, in the output's
staging directory), so neither side of a large model is ever held in memory
whole; `save_atomic` then copies both into the output file by file ranges.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_gptq.errors import ConfigError, ModelError, OutputError
from onnx_gptq.staging import staging_dir

logger = logging.getLogger(__name__)

# Protobuf cannot hold more than 2 GiB; above this, tensors go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def files_size(path: Path) -> int:
    """Bytes of an .onnx file plus the external data files it refers to."""
    total = path.stat().st_size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - size is informative only
        return total
    seen: set[str] = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                data = path.parent / entry.value
                if data.exists():
                    total += data.stat().st_size
    return total


def load(path: Path) -> tuple[ir.Model, int]:
    """Load an ONNX model lazily. Returns the model and its size on disk in bytes."""
    if not path.exists():
        raise ModelError(f"model file '{path}' does not exist")
    if path.is_dir():
        raise ModelError(f"model path '{path}' is a directory, not an .onnx file")
    try:
        model = ir.load(path)
    except FileNotFoundError as exc:
        raise ModelError(f"model '{path}': external data file missing ({exc.filename or exc})") from None
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise ModelError(f"'{path}' is not a readable ONNX model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'corrupt protobuf'})") from None
    if len(model.graph) == 0:
        raise ModelError(f"'{path}' has an empty graph (is it an ONNX model?)")
    return model, files_size(path)


def base_dir(model: ir.Model) -> Path | None:
    """The directory the model's external tensors live in, if any."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            return Path(tensor.base_dir)
    return None


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """A ModelProto of `model`; external tensors stay references (nothing is read)."""
    return ir.serde.serialize_model(model)


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def with_opset(model: ir.Model, version: int) -> ir.Model:
    """`model` if its default-domain opset is at least `version`, else a converted copy.

    Uses onnx's version converter; external tensors stay references to the
    same files.
    """
    current = default_opset(model)
    if current >= version:
        return model
    import onnx.version_converter

    directory = base_dir(model)
    try:
        converted = onnx.version_converter.convert_version(to_proto(model), version)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise ConfigError(f"format 'qdq' needs opset >= {version} and converting the model from opset "
                          f"{current} failed ({str(exc).splitlines()[0]}); use --format ort or custom") from None
    result = ir.serde.deserialize_model(converted)
    if directory is not None:
        ir.external_data.set_base_dir(result.graph, directory)
    logger.info("converted the model from opset %d to %d for blocked DequantizeLinear", current, version)
    return result


def input_files(source: Path, model: ir.Model) -> list[Path]:
    """The files a run reads: the model file and every external data file it uses.

    Refuses (before any work) external data that is missing, shorter than a
    tensor needs, or outside the model's directory: onnx-ir reads it lazily,
    so without this check the run would fail only when that weight is solved.

    Args:
        source: the .onnx file `model` was loaded from.
        model: the lazily loaded model.
    Returns:
        `source` followed by the distinct external data files.
    """
    directory = source.parent.resolve()
    files = [source]
    seen: set[str] = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = Path(tensor.location)
        data = (Path(tensor.base_dir) / location).resolve()
        if location.is_absolute() or directory not in (data, *data.parents):
            raise ModelError(f"model '{source}': external data '{tensor.location}' of tensor '{value.name}' "
                             "points outside the model's directory")
        if not data.is_file():
            raise ModelError(f"model '{source}': external data file '{tensor.location}' of tensor "
                             f"'{value.name}' is missing")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if data.stat().st_size < end:
            raise ModelError(f"model '{source}': external data file '{tensor.location}' is shorter than "
                             f"tensor '{value.name}' needs ({data.stat().st_size} < {end} bytes)")
        if str(data) not in seen:
            seen.add(str(data))
            files.append(Path(tensor.base_dir) / location)
    return files


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same path, through links (symbolic or hard)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def data_file_name(output: Path, avoid: Sequence[Path] = ()) -> str:
    """The external data file name for `output`: `<name>.data`, unless that is one of `avoid`.

    A model renamed and quantized back to its old name reads `<output>.data`;
    writing there would replace its weights, so take `<name>.<n>.data` instead.
    """
    directory = output.parent if str(output.parent) else Path(".")
    name, number = f"{output.name}.data", 0
    while any(same_file(directory / name, path) for path in avoid):
        number += 1
        name = f"{output.name}.{number}.data"
    return name


def _check_writable_file(path: Path, option: str) -> None:
    if path.is_dir():
        raise OutputError(f"{option} '{path}' is a directory; give a file path")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"{option} directory '{directory}' does not exist")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"{option} directory '{directory}' is not writable")


def check_report_path(report: Path) -> Path:
    """Validate the report path before any work: a file in an existing, writable directory."""
    _check_writable_file(report, "report")
    return report


def check_output_path(source: Path, output: Path, *, inputs: Sequence[Path] = (),
                      report: Path | None = None) -> Path:
    """Validate every path a run will write, before any work is done.

    Args:
        source: the input model file.
        output: the output model path.
        inputs: every file the run reads (see `input_files`); default just `source`.
        report: the JSON report path, if any.
    Returns:
        `output`.
    Raises:
        OutputError: a path is a directory, its directory is missing or not
            writable, or it is (or links to) an input file or another output.
    """
    read = list(inputs) or [source]
    _check_writable_file(output, "output")
    refuse_inputs("output", output, source, read)
    if report is None:
        return output
    check_report_path(report)
    directory = output.parent if str(output.parent) else Path(".")
    written = {"the output model": output, "the output's data file": directory / data_file_name(output, read)}
    for what, path in written.items():
        if same_file(report, path):
            raise OutputError(f"report '{report}' is {what}; choose another path")
    refuse_inputs("report", report, source, read)
    return output


def refuse_inputs(option: str, path: Path, source: Path, read: Sequence[Path]) -> None:
    """Raise OutputError when the written `path` is (or links to) one of the files the run reads."""
    for input_path in read:
        if input_path.exists() and same_file(path, input_path):
            what = "the input model" if input_path == source else f"the input's external data '{input_path}'"
            raise OutputError(f"{option} '{path}' is {what}; choose another path")


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


class WrittenFileMismatch(RuntimeError):
    """The saved output does not hold the packed tensors that were produced (an internal bug)."""


class PackedWeightFile:
    """An append-only file that packed tensors are written to as they are produced.

    Each call stores one array in its ONNX serialized form (int4/uint4 two codes
    per byte, little-endian, as `TensorProto.raw_data` holds it) and returns an
    `onnx_ir.ExternalTensor` reading it back lazily, so packed weights cost
    disk, not memory, until the output is written. The file lives in a staging
    directory (see `staging_dir`). A digest of every staged tensor is kept so
    that :meth:`verify` can check the saved output holds exactly these bytes.
    """

    ALIGN = 64

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.location = "packed_weights.bin"
        self._file = open(directory / self.location, "wb")  # noqa: SIM115 - closed in close()
        self.offset = 0
        #: tensor name -> (dtype, shape, sha256 of the serialized bytes), for `verify`.
        self.digests: dict[str, tuple[ir.DataType, tuple[int, ...], str]] = {}

    def __call__(self, array: np.ndarray, name: str) -> ir.ExternalTensor:
        """Stage `array` as initializer `name`.

        Args:
            array: any dtype onnx_ir maps to an ONNX type (uint8, int32, float16,
                ml_dtypes.bfloat16, ml_dtypes.int4/uint4, ...).
            name: the initializer's name.
        Returns:
            An ExternalTensor of the same dtype and shape reading the staged bytes.
        """
        # onnx_ir serializes exactly as the saved model will: sub-byte types
        # packed (numpy keeps one int4 per byte), fixed little-endian order.
        staged = ir.Tensor(np.ascontiguousarray(array), name=name)
        data = staged.tobytes()
        padding = -self.offset % self.ALIGN
        try:
            if padding:
                self._file.write(bytes(padding))
                self.offset += padding
            offset = self.offset
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            raise OutputError(f"cannot write packed weights to '{self.directory}': "
                              f"{exc.strerror or exc}") from None
        self.offset += len(data)
        self.digests[name] = (staged.dtype, tuple(array.shape), hashlib.sha256(data).hexdigest())
        return ir.ExternalTensor(self.location, offset, len(data), staged.dtype,
                                 shape=ir.Shape(array.shape), name=name, base_dir=str(self.directory))

    def close(self) -> None:
        self._file.close()

    def verify(self, path: Path, names: set[str] | None = None) -> int:
        """Check that the model saved at `path` holds every staged tensor bit for bit.

        One sequential read of the saved files. Tensors staged but no longer in
        the graph (never the case for packed weights) are reported too.

        Args:
            path: the saved .onnx file (its external data beside it).
            names: the staged names expected in the output (default: all).
        Returns:
            The number of tensors checked.
        Raises:
            WrittenFileMismatch: a tensor is missing or its dtype, shape or bytes differ.
        """
        expected = self.digests if names is None else {n: self.digests[n] for n in names}
        saved = ir.load(path)
        initializers = saved.graph.initializers
        for name, (dtype, shape, digest) in expected.items():
            value = initializers.get(name)
            tensor = None if value is None else value.const_value
            if tensor is None:
                raise WrittenFileMismatch(f"'{path}': packed tensor '{name}' is missing from the written model")
            if tensor.dtype != dtype or tuple(tensor.shape.numpy()) != shape:
                raise WrittenFileMismatch(f"'{path}': packed tensor '{name}' was written as {tensor.dtype} "
                                          f"{tuple(tensor.shape.numpy())}, staged as {dtype} {shape}")
            if hashlib.sha256(tensor.tobytes()).hexdigest() != digest:
                raise WrittenFileMismatch(f"'{path}': packed tensor '{name}' differs from what the "
                                          "solver produced")
        return len(expected)


def save_atomic(model: ir.Model, path: Path, staging: Path | None = None, *,
                check: Callable[[Path], object] | None = None, avoid: Sequence[Path] = ()) -> int:
    """Write `model` to `path` all at once: either the whole result appears or nothing.

    Models whose tensors exceed protobuf's 2 GiB limit get an external data file
    `<name>.data` beside them (`<name>.<n>.data` when that is one of `avoid`,
    the files the input is read from). The files are written in `staging` (a
    fresh directory beside `path` when None) and renamed into place.

    Args:
        model: the model to write (tensors still on disk are embedded unless external).
        path: the output .onnx file.
        staging: a private directory beside `path` (a fresh one when None).
        check: called with the written file before it is renamed into place
            (e.g. `PackedWeightFile.verify`); if it raises, nothing appears at `path`.
        avoid: files the output's data file must not replace (the input's).
    Returns:
        The bytes written.
    """
    if staging is None:
        with staging_dir(path) as tmp:
            return save_atomic(model, path, tmp, check=check, avoid=avoid)
    directory = path.parent if str(path.parent) else Path(".")
    external = _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = data_file_name(path, avoid)
    if not external:
        # Tensors still on disk (memory-mapped from the input's data file, or
        # packed weights in the staging directory) must be embedded, or the
        # output would point at files that are not beside it.
        ir.external_data.load_to_model(model)
    out = Path(tempfile.mkdtemp(prefix="out-", dir=staging))
    try:
        tmp_model = out / path.name
        ir.save(model, tmp_model, external_data=data_name if external else None)
        written = tmp_model.stat().st_size
        if external:
            written += (out / data_name).stat().st_size
        if check is not None:
            check(tmp_model)
        if external:
            os.replace(out / data_name, directory / data_name)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise OutputError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return written
