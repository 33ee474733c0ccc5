"""Model folders: an .onnx model with the files a runtime needs beside it.

onnxruntime-genai's model builder writes ``model.onnx`` (+ ``model.onnx.data``),
``genai_config.json`` and the tokenizer files; Optimum's exporter writes
``model.onnx``, ``config.json``, ``generation_config.json`` and the tokenizer.
:func:`resolve` finds the model in such a folder (or takes a model file and
looks at the folder around it) and reads its configs; :func:`write_folder`
publishes a quantized model as a complete folder of the same kind, every other
file copied and ``genai_config.json`` updated, all at once.

Used by quantization (``onnx-gptq FOLDER -o OUTDIR``), evaluation and
generation: they take ``ModelFolder.model`` as the .onnx file,
``ModelFolder.tokenizer`` as the default tokenizer and ``ModelFolder.folder``
as the directory whose configs describe it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnx_gptq.errors import ModelError, OutputError
from onnx_gptq.runtime.custom_ops import LIBRARY_NAME
from onnx_gptq.staging import STAGING_PREFIX

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"
#: Files that make a directory a tokenizer folder for transformers.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")
#: Model and weight files: never copied into an output folder (the quantized model replaces them).
_MODEL_SUFFIXES = (".onnx", ".onnx.data", ".onnx_data", ".data")
#: onnx-gptq's custom-op library in an input folder (an earlier output): copied only when the new model needs it.
_OUR_LIBRARY = LIBRARY_NAME


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None when there is no such file.

    Raises:
        ModelError: the file is unreadable or not a JSON object; the message names it.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"'{path}' is not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ModelError(f"'{path}' holds a JSON {type(data).__name__}, not an object")
    return data


def read_genai_config(folder: Path) -> dict[str, Any] | None:
    """``genai_config.json`` of `folder` (None when absent); ModelError when malformed."""
    config = _read_json(folder / GENAI_CONFIG)
    if config is not None and not isinstance(config.get("model", {}).get("decoder", {}), dict):
        raise ModelError(f"'{folder / GENAI_CONFIG}': model.decoder is not an object")
    return config


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A model file and the folder it lives in.

    Attributes:
        model: the .onnx file.
        folder: its directory.
        given_as_folder: the user named the directory (not the file): its
            output is a folder too by default.
        genai_config: ``genai_config.json``, if the folder has one.
        hf_config: transformers' ``config.json``, if the folder has one.
        tokenizer: what :func:`onnx_gptq.tools.tokenizer.load_tokenizer` reads:
            the folder's ``tokenizer.json``, else the folder itself when it
            holds a transformers tokenizer, else None.
    """

    model: Path
    folder: Path
    given_as_folder: bool
    genai_config: dict[str, Any] | None
    hf_config: dict[str, Any] | None
    tokenizer: Path | None

    @property
    def is_model_folder(self) -> bool:
        """Whether the folder holds runtime files (a config or a tokenizer), so an output folder is worth writing."""
        return self.given_as_folder or self.genai_config is not None or self.hf_config is not None

    @property
    def decoder(self) -> dict[str, Any] | None:
        """``genai_config.json``'s ``model.decoder`` section, or None."""
        return None if self.genai_config is None else self.genai_config.get("model", {}).get("decoder")


def _find_model(folder: Path, genai: dict[str, Any] | None) -> Path:
    decoder = (genai or {}).get("model", {}).get("decoder") or {}
    named = decoder.get("filename")
    if genai is not None and named is not None:
        if not isinstance(named, str) or not (folder / named).is_file():
            raise ModelError(f"'{folder / GENAI_CONFIG}': model.decoder.filename {named!r} is not a file in "
                             f"'{folder}'")
        return folder / named
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    found = sorted(p for p in folder.glob("*.onnx") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelError(f"folder '{folder}' holds no .onnx model")
    raise ModelError(f"folder '{folder}' holds {len(found)} .onnx models ({', '.join(p.name for p in found[:4])}) "
                     "and no genai_config.json or model.onnx says which; give the file")


def _tokenizer_of(folder: Path) -> Path | None:
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    return folder if any((folder / name).is_file() for name in TOKENIZER_FILES) else None


def resolve(path: str | os.PathLike[str], *, check: bool = True) -> ModelFolder:
    """The model and folder `path` names.

    Args:
        path: a model folder (holding ``model.onnx``, exactly one ``*.onnx``, or
            the file its ``genai_config.json`` names), or an .onnx file (its
            directory is the folder).
        check: check genai_config.json against the graph (past inputs per
            layer, head size, key/value heads); reads the graph, not its weights.
    Returns:
        A :class:`ModelFolder`.
    Raises:
        ModelError: the path is missing, the folder holds no model (or several
            and nothing says which), the config names a missing file, or the
            config disagrees with the graph; the message names the file.
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise ModelError(f"model '{given}' does not exist")
    as_folder = given.is_dir()
    folder = given if as_folder else given.parent
    genai = read_genai_config(folder)
    model = _find_model(folder, genai) if as_folder else given
    result = ModelFolder(model=model, folder=folder, given_as_folder=as_folder, genai_config=genai,
                         hf_config=_read_json(folder / HF_CONFIG), tokenizer=_tokenizer_of(folder))
    if check and genai is not None:
        check_genai_config(result)
    return result


def check_genai_config(folder: ModelFolder) -> None:
    """Refuse a genai_config.json whose decoder section disagrees with the model's graph.

    Raises:
        ModelError: naming the config field and what the graph has instead.
    """
    import onnx
    import onnx_ir as ir

    from onnx_gptq.calibrate.past_shapes import past_dims

    origin = str(folder.folder / GENAI_CONFIG)
    named = (folder.decoder or {}).get("filename")
    if folder.genai_config is not None and named is None and folder.decoder is not None:
        raise ModelError(f"'{origin}': model.decoder.filename is missing")
    if named is not None and not folder.given_as_folder and Path(named).name != folder.model.name:
        logger.info("%s names '%s', not the given '%s': checking it against the given model anyway",
                    origin, named, folder.model.name)
    try:
        proto = onnx.load(str(folder.model), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise ModelError(f"'{folder.model}' is not a readable ONNX model ({type(exc).__name__})") from None
    past_dims(ir.serde.deserialize_model(proto).graph, folder.decoder, origin)


def default_output(path: str | os.PathLike[str], bits: int) -> Path:
    """Where a run writes by default: ``<folder>-q<bits>`` beside a folder, ``<stem>.q<bits>.onnx`` beside a file."""
    given = Path(path)
    if given.is_dir():
        return given.with_name(f"{given.resolve().name}-q{bits}")
    return given.with_name(f"{given.stem}.q{bits}.onnx")


def writes_folder(folder: ModelFolder, output: Path) -> bool:
    """Whether `output` is to be a complete folder: the input is a model folder and `output` no .onnx file."""
    return folder.is_model_folder and (output.is_dir() or output.suffix.lower() != ".onnx")


def copied_files(folder: ModelFolder, inputs: Sequence[Path]) -> list[Path]:
    """The files of `folder` an output folder gets copies of: all but model and weight files.

    Args:
        folder: the input folder.
        inputs: the files the model reads (the model and its external data).
    Returns:
        Regular files directly in the folder, sorted; subdirectories, other
        .onnx models and their data, and staging directories are left out.
    """
    read = {p.resolve() for p in inputs}
    files = []
    for item in sorted(folder.folder.iterdir()):
        if item.name.startswith(STAGING_PREFIX) or item.resolve() in read:
            continue
        if not item.is_file():
            logger.info("output folder: '%s' is not a plain file; not copied", item)
            continue
        if item.name.endswith(_MODEL_SUFFIXES) or item.name == _OUR_LIBRARY:
            logger.info("output folder: '%s' looks like another model's file; not copied", item)
            continue
        files.append(item)
    return files


def check_output_folder(folder: ModelFolder, output: Path, *, report: Path | None = None) -> Path:
    """Validate an output folder before any work.

    Raises:
        OutputError: `output` is a file, is (or links to) the input folder, its
            parent is missing or not writable, or `report` would be one of the
            files written into it.
    """
    if output.exists() and not output.is_dir():
        raise OutputError(f"output folder '{output}' is a file; give a directory (or an .onnx path)")
    if output.exists() and os.path.samefile(output, folder.folder):
        raise OutputError(f"output folder '{output}' is the input folder; choose another")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"output folder's parent '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder's parent '{parent}' is not writable")
    if report is not None and report.resolve().parent == output.resolve():
        written = {p.name for p in copied_files(folder, [folder.model])} | {folder.model.name, GENAI_CONFIG}
        if report.name in written or report.name.startswith(folder.model.name):
            raise OutputError(f"report '{report}' would be overwritten by the output folder's "
                              f"'{report.name}'; choose another path")
    return output


def updated_genai_config(config: dict[str, Any], model_name: str, *, custom_ops_library: str | None = None
                         ) -> dict[str, Any]:
    """`config` for the quantized model: decoder filename set to `model_name`.

    Args:
        config: the input's genai_config.json.
        model_name: the quantized model's file name in the output folder.
        custom_ops_library: the file name, in the output folder, of onnx-gptq's
            custom-op library when the model holds onnx_gptq.GptqMatMul nodes:
            named in ``model.decoder.session_options.custom_ops_library``, which
            onnxruntime-genai registers before loading the model (it accepts
            only paths inside the model folder).
    Returns:
        A new dict; `config` is not changed.
    """
    updated = json.loads(json.dumps(config))
    decoder = updated.setdefault("model", {}).setdefault("decoder", {})
    decoder["filename"] = model_name
    options = decoder.setdefault("session_options", {})
    if custom_ops_library is not None:
        options["custom_ops_library"] = custom_ops_library
    elif options.get("custom_ops_library") == _OUR_LIBRARY:  # an earlier output's, no longer needed
        del options["custom_ops_library"]
    return updated


def _copy_custom_ops_library(tree: Path) -> str:
    """Copy onnx-gptq's custom-op library into `tree`; returns its file name there."""
    from onnx_gptq.runtime.custom_ops import library_path

    library = library_path()
    shutil.copy2(library, tree / library.name)
    logger.info("output folder: the model uses onnx_gptq.GptqMatMul; copied '%s' beside it", library)
    return library.name


def write_folder(folder: ModelFolder, tree: Path, output: Path, *, inputs: Sequence[Path],
                 custom_ops: bool = False) -> list[Path]:
    """Complete the staged output folder `tree` (which holds the quantized model) and publish it as `output`.

    Every file :func:`copied_files` names is copied into `tree`, and the
    custom-op library when the model needs it, genai_config.json rewritten by
    :func:`updated_genai_config`; then `tree` is published by :func:`publish_tree`.

    Args:
        folder: the input folder.
        tree: the staging directory holding the quantized model (same file system as `output`).
        output: the output folder.
        inputs: the files the input model reads (not copied).
        custom_ops: the model needs onnx-gptq's custom-op library (copied in).
    Returns:
        The published files, in `output`.
    """
    for item in copied_files(folder, inputs):
        if item.name == GENAI_CONFIG and folder.genai_config is not None:
            continue
        shutil.copy2(item, tree / item.name)
    library = _copy_custom_ops_library(tree) if custom_ops else None
    if folder.genai_config is not None:
        config = updated_genai_config(folder.genai_config, folder.model.name, custom_ops_library=library)
        (tree / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return publish_tree(tree, output, folder.model.name)


def publish_tree(tree: Path, output: Path, model_name: str) -> list[Path]:
    """Publish the complete staged folder `tree` as `output`.

    `tree` is renamed to `output` when that does not exist (one rename: all or
    nothing), else its files are moved into `output` one rename each, the
    model last, so it appears only with its configs and data beside it.

    Args:
        tree: the staged folder (same file system as `output`).
        output: the output folder.
        model_name: the model file's name in `tree`.
    Returns:
        The published files, in `output`.
    Raises:
        OutputError: a rename failed.
    """
    names = sorted((p.name for p in tree.iterdir()), key=lambda n: (n == model_name, n))
    try:
        if not output.exists():
            os.rename(tree, output)
        else:
            for name in names:
                os.replace(tree / name, output / name)
    except OSError as exc:
        raise OutputError(f"cannot write output folder '{output}': {exc.strerror or exc}") from None
    logger.info("wrote folder '%s' (%d files)", output, len(names))
    return [output / name for name in names]


__all__ = ["GENAI_CONFIG", "HF_CONFIG", "ModelFolder", "check_genai_config", "check_output_folder",
           "copied_files", "default_output", "publish_tree", "read_genai_config", "resolve", "updated_genai_config",
           "write_folder", "writes_folder"]
