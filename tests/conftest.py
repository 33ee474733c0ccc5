"""Shared fixtures: tiny exported models and calibration ids, built once per session."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_models

logging.getLogger("torch.onnx").setLevel(logging.ERROR)


_EXPORTS: dict[tuple[str, bool], Path] = {}
_BUILDERS = {"llama": tiny_models.build_llama, "gpt2": tiny_models.build_gpt2}


def _exported(factory: pytest.TempPathFactory, name: str, dynamo: bool) -> Path:
    """Export each (architecture, exporter) once per test session."""
    key = (name, dynamo)
    if key not in _EXPORTS:
        directory = factory.mktemp(f"{name}_{'dynamo' if dynamo else 'torchscript'}")
        _EXPORTS[key] = tiny_models.export(_BUILDERS[name](), directory / "model.onnx", dynamo=dynamo)
    return _EXPORTS[key]


@pytest.fixture(scope="session", params=[True, False], ids=["dynamo", "torchscript"])
def tiny_llama_onnx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama-style model (MatMul weights, tied head), exported both ways."""
    return _exported(tmp_path_factory, "llama", request.param)


@pytest.fixture(scope="session", params=[True, False], ids=["dynamo", "torchscript"])
def tiny_gpt2_onnx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2-style model (Gemm weights with bias), exported both ways."""
    return _exported(tmp_path_factory, "gpt2", request.param)


@pytest.fixture(scope="session", params=[("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)],
                ids=["llama-dynamo", "llama-torchscript", "gpt2-dynamo", "gpt2-torchscript"])
def tiny_lm_onnx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Every tiny architecture with every exporter: (architecture, path)."""
    name, dynamo = request.param
    return name, _exported(tmp_path_factory, name, dynamo)


@pytest.fixture(scope="session")
def calib_ids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 x 32 random token ids in the tiny models' vocabulary, as .npy."""
    path = tmp_path_factory.mktemp("calib") / "ids.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, tiny_models.VOCAB, size=(16, 32), dtype=np.int64))
    return path


@pytest.fixture(scope="session")
def hf_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama as a transformers folder (see tests/folder_models.py)."""
    from tests import folder_models

    return folder_models.write_hf_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="session")
def genai_folder(hf_llama_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`hf_llama_folder` through onnxruntime-genai's model builder (fp32, CPU), once per session."""
    from tests import folder_models

    return folder_models.run_builder(hf_llama_folder, tmp_path_factory.mktemp("genai") / "tiny-genai")


@pytest.fixture(scope="session")
def chatty_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_models.build_chatty_llama` saved as a transformers folder with a chat-template tokenizer."""
    directory = tmp_path_factory.mktemp("chatty_llama")
    tiny_models.build_chatty_llama().save_pretrained(directory)
    tiny_models.save_chatty_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def kv_folder(chatty_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`chatty_llama_dir` exported with its KV cache: a folder onnxruntime-genai loads."""
    from onnx_gptq.tools.export import export_model

    return export_model(str(chatty_llama_dir), tmp_path_factory.mktemp("kv") / "folder", seq_len=8)
