"""onnx_gptq.tools.evaluate: perplexity, KL and top-1 through onnxruntime vs direct torch sums."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from onnx_gptq.tools import evaluate as ev
from onnx_gptq.errors import ConfigError, ModelError, UserError
from tests import tiny_models

TEXT = ("The committee met on Tuesday to discuss the budget. Members argued about "
        "roads, schools and the harbour, and agreed to meet again next week. ") * 40


def _torch_logits(model: torch.nn.Module, windows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        ids = torch.from_numpy(windows)
        return model(input_ids=ids, use_cache=False).logits.double().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _torch_perplexity(model: torch.nn.Module, windows: np.ndarray) -> float:
    logp = _log_softmax(_torch_logits(model, windows))[:, :-1]
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


@pytest.fixture(scope="module")
def second_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with other weights (seed 1), as a 'quantized' stand-in."""
    path = tmp_path_factory.mktemp("eval") / "llama_seed1.onnx"
    return tiny_models.export(tiny_models.build_llama(seed=1), path, dynamo=False)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPE tokenizer.json whose ids stay below the tiny models' 256-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, show_progress=False))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_perplexity_equals_torch(tiny_llama_onnx: Path) -> None:
    windows = np.random.default_rng(0).integers(0, tiny_models.VOCAB, (3, 24), dtype=np.int64)
    result = ev.evaluate_ids(tiny_llama_onnx, windows)

    want = _torch_perplexity(tiny_models.build_llama(), windows)
    assert result.perplexity == pytest.approx(want, rel=1e-4)
    assert 100 < want < 1000  # random weights and ids: near the vocabulary size, not 1
    assert (result.n_tokens, result.windows, result.seq_len) == (3 * 23, 3, 24)
    assert result.kl is None and result.top1 is None


def test_kl_and_top1_against_another_model(tiny_llama_onnx: Path, second_llama: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    windows = np.random.default_rng(1).integers(0, tiny_models.VOCAB, (2, 20), dtype=np.int64)
    logp = _log_softmax(_torch_logits(tiny_models.build_llama(seed=0), windows))[:, :-1]
    logq = _log_softmax(_torch_logits(tiny_models.build_llama(seed=1), windows))[:, :-1]
    want_kl = float((np.exp(logp) * (logp - logq)).sum(-1).mean())
    want_top1 = float((logp.argmax(-1) == logq.argmax(-1)).mean())

    monkeypatch.setattr(ev, "ROW_CHUNK", 7)  # several chunks per window, a ragged last one
    result = ev.evaluate_ids(second_llama, windows, reference=tiny_llama_onnx, batch_size=2)
    assert result.kl == pytest.approx(want_kl, rel=1e-4)
    assert result.kl > 1e-3
    assert result.top1 == pytest.approx(want_top1, abs=1e-9)
    assert result.perplexity == pytest.approx(
        _torch_perplexity(tiny_models.build_llama(seed=1), windows), rel=1e-4)

    same = ev.evaluate_ids(second_llama, windows, reference=second_llama)
    assert same.kl == pytest.approx(0.0, abs=1e-6)
    assert same.top1 == 1.0
    assert same.perplexity == pytest.approx(result.perplexity, rel=1e-6)


def test_text_windows_and_evaluate(second_llama: Path, char_tokenizer: Path, tmp_path: Path) -> None:
    from onnx_gptq.tools.tokenizer import load_tokenizer

    text_file = tmp_path / "speech.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    tok = load_tokenizer(char_tokenizer)
    ids = tok.encode(TEXT)
    windows = ev.text_windows(text_file, char_tokenizer, seq_len=16)

    assert windows.shape == (len(ids) // 16, 16)
    np.testing.assert_array_equal(windows.ravel(), ids[: windows.size])
    assert ev.text_windows([TEXT], tok, seq_len=16, max_windows=3).shape == (3, 16)

    result = ev.evaluate(second_llama, text_file, char_tokenizer, seq_len=16, max_windows=5)
    want = _torch_perplexity(tiny_models.build_llama(seed=1), windows[:5])
    assert result.perplexity == pytest.approx(want, rel=1e-4)
    assert result.windows == 5 and result.n_tokens == 5 * 15


def test_clear_errors(second_llama: Path, char_tokenizer: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing.onnx' does not exist"):
        ev.evaluate_ids(tmp_path / "missing.onnx", np.zeros((1, 4), np.int64))
    with pytest.raises(ModelError, match="not a readable ONNX file"):
        (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
        ev.evaluate_ids(tmp_path / "junk.onnx", np.zeros((1, 4), np.int64))
    with pytest.raises(ModelError, match="token id 300 is outside .* vocabulary of 256"):
        ev.evaluate_ids(second_llama, np.full((1, 4), 300, np.int64))
    with pytest.raises(ConfigError, match="windows"):
        ev.evaluate_ids(second_llama, np.zeros((4,), np.int64))
    with pytest.raises(UserError, match="fewer than one window of seq_len 4096"):
        ev.evaluate(second_llama, [TEXT], char_tokenizer, seq_len=4096)
    with pytest.raises(UserError, match="nope.txt does not exist"):
        ev.evaluate(second_llama, tmp_path / "nope.txt", char_tokenizer)
    with pytest.raises(UserError, match="tokenizer: .*no-tokenizer does not exist"):
        ev.evaluate(second_llama, [TEXT], tmp_path / "no-tokenizer")


def test_cli(second_llama: Path, char_tokenizer: Path, tmp_path: Path,
             capsys: pytest.CaptureFixture[str]) -> None:
    text_file = tmp_path / "speech.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    parser = argparse.ArgumentParser()
    ev.configure_parser(parser)
    args = parser.parse_args([str(second_llama), "--text", str(text_file), "--tokenizer",
                              str(char_tokenizer), "--reference", str(second_llama),
                              "--seq-len", "16", "--max-windows", "2",
                              "--json", str(tmp_path / "r.json")])
    assert ev.run(args) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["windows"] == 2 and saved["top1"] == 1.0 and saved["kl"] < 1e-6
    out = capsys.readouterr().out
    assert f"perplexity {saved['perplexity']:.4f} over 30 tokens" in out
    assert "top-1 agreement 100.00%" in out


def test_custom_op_models_get_the_library(second_llama: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from onnx_gptq.runtime import custom_ops

    graph = helper.make_graph(
        [helper.make_node("GptqMatMul", ["A", "B", "scales"], ["Y"], domain="onnx_gptq")], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", 4])])
    custom = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("onnx_gptq", 1)]),
              str(custom))
    calls: list[object] = []
    real_register = custom_ops.register

    def counting_register(options: ort.SessionOptions) -> ort.SessionOptions:
        calls.append(options)
        return real_register(options)

    monkeypatch.setattr(custom_ops, "register", counting_register)
    with pytest.raises(ModelError, match="onnxruntime cannot load .*custom.onnx: .*'B'"):
        ev.open_session(custom)  # the library is registered; the model itself lacks B
    assert len(calls) == 1
    ev.open_session(second_llama)  # a float model: a plain session
    assert len(calls) == 1
    with pytest.raises(ModelError, match="onnxruntime cannot load .*custom.onnx"):
        ev.open_session(custom, custom_ops=False)
    assert len(calls) == 1
