"""onnx_gptq.tools.export: tiny transformers models and plain modules to ONNX, checked vs torch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnx_gptq.tools import export
from onnx_gptq.errors import ConfigError, ModelError, OutputError
from tests import tiny_models


def _run(path: Path, ids: np.ndarray, with_mask: bool = True) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids}
    if with_mask:
        feeds["attention_mask"] = np.ones_like(ids)
    return session.run(["logits"], feeds)[0]


def _torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()


def _graph_io(path: Path) -> tuple[list[str], list[str], list[str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d.dim_param or str(d.dim_value) for d in graph.input[0].type.tensor_type.shape.dim]
    return [i.name for i in graph.input], [o.name for o in graph.output], dims


@pytest.mark.parametrize("build", [tiny_models.build_llama, tiny_models.build_gpt2],
                         ids=["llama", "gpt2"])
def test_tiny_transformers_models_round_trip(build, tmp_path: Path) -> None:
    model = build()
    path = export.export_model(model, tmp_path / "model.onnx", seq_len=8)

    assert path == tmp_path / "model.onnx"
    assert not (tmp_path / "model.onnx.data").exists()  # small models stay one file
    inputs, outputs, dims = _graph_io(path)
    assert inputs == ["input_ids", "attention_mask"]
    assert outputs == ["logits"]
    assert not any(d.isdigit() for d in dims)  # batch and sequence are symbolic
    # A shape that differs from the traced one in both axes.
    ids = np.random.default_rng(3).integers(0, tiny_models.VOCAB, size=(3, 29), dtype=np.int64)
    got = _run(path, ids)
    want = _torch_logits(model, ids)
    assert got.shape == (3, 29, tiny_models.VOCAB)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_local_directory_float16(tmp_path: Path) -> None:
    source = tmp_path / "llama"
    tiny_models.build_llama().save_pretrained(source)
    path = export.export_model(str(source), tmp_path / "fp16" / "model.onnx", dtype="float16")

    graph = onnx.load(str(path)).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    ids = np.random.default_rng(4).integers(0, tiny_models.VOCAB, size=(2, 12), dtype=np.int64)
    reference = tiny_models.build_llama()  # same seed, float32
    want = _torch_logits(reference, ids)
    got = _run(path, ids).astype(np.float32)
    # fp16 rounding of weights and activations; logits are O(1) in this model.
    assert np.max(np.abs(got - want)) < 2e-2
    assert np.max(np.abs(got - want)) > 0  # really float16, not a float32 copy


class _NoMask(torch.nn.Module):
    """Embedding -> tanh -> Linear: a plain module whose forward takes ids only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.tanh(self.embed(input_ids))
        return self.head(hidden), hidden


def test_plain_module_without_mask(tmp_path: Path) -> None:
    module = _NoMask()
    path = export.export_model(module, tmp_path / "plain.onnx")

    inputs, outputs, _ = _graph_io(path)
    assert inputs == ["input_ids"] and outputs == ["logits"]
    ids = np.arange(35, dtype=np.int64).reshape(5, 7) % 50
    with torch.no_grad():
        want = module(torch.from_numpy(ids))[0].numpy()
    np.testing.assert_allclose(_run(path, ids, with_mask=False), want, atol=1e-5)


def test_falls_back_to_torchscript_with_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("data-dependent control flow\nsecond line")

    monkeypatch.setattr(export, "_export_dynamo", broken)
    model = tiny_models.build_llama()
    with caplog.at_level(logging.WARNING, logger="onnx_gptq.tools.export"):
        path = export.export_model(model, tmp_path / "ts.onnx")

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("RuntimeError: data-dependent control flow" in w and "dynamo=False" in w
               for w in warnings)
    ids = np.random.default_rng(5).integers(0, tiny_models.VOCAB, size=(2, 9), dtype=np.int64)
    np.testing.assert_allclose(_run(path, ids), _torch_logits(model, ids), atol=1e-4)

    with pytest.raises(ModelError, match="dynamo exporter failed: RuntimeError"):
        export.export_model(model, tmp_path / "strict.onnx", exporter="dynamo")


def test_check_catches_a_mismatch(tmp_path: Path) -> None:
    path = export.export_model(tiny_models.build_llama(seed=0), tmp_path / "a.onnx",
                               exporter="torchscript")
    other = export.logits_wrapper(tiny_models.build_llama(seed=1), hf=True, takes_mask=True)
    with pytest.raises(export.ExportCheckError, match="differ from torch's"):
        export.check_export(other, path, vocab=tiny_models.VOCAB, seq_len=8, takes_mask=True,
                            dtype="float32")


def test_external_data_above_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = tiny_models.build_llama()
    path = export.export_model(model, tmp_path / "big.onnx", exporter="torchscript")

    data = tmp_path / "big.onnx.data"
    assert data.exists() and data.stat().st_size > 4 * tiny_models.VOCAB * tiny_models.HIDDEN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    ids = np.random.default_rng(6).integers(0, tiny_models.VOCAB, size=(1, 10), dtype=np.int64)
    np.testing.assert_allclose(_run(path, ids), _torch_logits(model, ids), atol=1e-4)


def test_bad_arguments_name_the_option(tmp_path: Path) -> None:
    model = tiny_models.build_llama()
    with pytest.raises(ConfigError, match="dtype: 'bfloat8'"):
        export.export_model(model, tmp_path / "m.onnx", dtype="bfloat8")
    with pytest.raises(ConfigError, match="exporter"):
        export.export_model(model, tmp_path / "m.onnx", exporter="jit")
    with pytest.raises(ConfigError, match="seq_len: 1000 exceeds"):
        export.export_model(model, tmp_path / "m.onnx", seq_len=1000)
    with pytest.raises(ModelError, match="does-not-exist"):
        export.export_model(str(tmp_path / "does-not-exist"), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="not a .gguf"):
        (tmp_path / "weights.bin").write_bytes(b"x")
        export.export_model(str(tmp_path / "weights.bin"), tmp_path / "m.onnx")
    with pytest.raises(OutputError, match="is a file; give a folder"):
        export.export_model(model, tmp_path / "weights.bin")
    with pytest.raises(ModelError, match="no torch.nn.Embedding"):
        export.export_model(torch.nn.Linear(4, 4), tmp_path / "m.onnx")


def test_cli_parser_and_run(tmp_path: Path) -> None:
    import argparse

    source = tmp_path / "gpt2"
    tiny_models.build_gpt2().save_pretrained(source)
    parser = argparse.ArgumentParser()
    export.configure_parser(parser)
    args = parser.parse_args([str(source), "-o", str(tmp_path / "cli.onnx"),
                              "--exporter", "torchscript", "--seq-len", "6"])
    assert args.check is True and args.dtype == "float32"
    assert export.run(args) == 0
    ids = np.random.default_rng(7).integers(0, tiny_models.VOCAB, size=(2, 6), dtype=np.int64)
    np.testing.assert_allclose(_run(tmp_path / "cli.onnx", ids),
                               _torch_logits(tiny_models.build_gpt2(), ids), atol=1e-4)
