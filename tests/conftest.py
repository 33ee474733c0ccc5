"""Shared fixtures: tiny exported models and calibration ids, built once per session."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_models

logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _exported(factory: pytest.TempPathFactory, name: str, build, dynamo: bool) -> Path:
    directory = factory.mktemp(f"{name}_{'dynamo' if dynamo else 'torchscript'}")
    return tiny_models.export(build(), directory / "model.onnx", dynamo=dynamo)


@pytest.fixture(scope="session", params=[True, False], ids=["dynamo", "torchscript"])
def tiny_llama_onnx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama-style model (MatMul weights, tied head), exported both ways."""
    return _exported(tmp_path_factory, "llama", tiny_models.build_llama, request.param)


@pytest.fixture(scope="session", params=[True, False], ids=["dynamo", "torchscript"])
def tiny_gpt2_onnx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2-style model (Gemm weights with bias), exported both ways."""
    return _exported(tmp_path_factory, "gpt2", tiny_models.build_gpt2, request.param)


@pytest.fixture(scope="session")
def calib_ids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 x 32 random token ids in the tiny models' vocabulary, as .npy."""
    path = tmp_path_factory.mktemp("calib") / "ids.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, tiny_models.VOCAB, size=(16, 32), dtype=np.int64))
    return path
