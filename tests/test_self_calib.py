"""onnx_gptq.tools.self_calib: sampled calibration ids follow the model's own distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_gptq.errors import CalibrationError, ConfigError
from onnx_gptq.tools.self_calib import generate_calibration
from tests import tiny_models

V = 6


def _bigram(path: Path, table: np.ndarray, seq: int | str = "sequence") -> Path:
    """logits[b, t] = table[ids[b, t]]: the next-token distribution depends on the last token."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)], "bigram",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", seq, V])],
        [numpy_helper.from_array(table.astype(np.float32), "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 1.5, size=(V, V))


@pytest.fixture(scope="module")
def bigram(tmp_path_factory: pytest.TempPathFactory, table: np.ndarray) -> Path:
    return _bigram(tmp_path_factory.mktemp("bigram") / "bigram.onnx", table)


def _transitions(ids: np.ndarray, chain: int) -> np.ndarray:
    """Empirical P(next | previous) over pairs inside chains (not across their joins)."""
    counts = np.zeros((V, V))
    for start in range(0, ids.shape[1], chain):
        block = ids[:, start:start + chain]
        np.add.at(counts, (block[:, :-1].ravel(), block[:, 1:].ravel()), 1)
    return counts / counts.sum(axis=1, keepdims=True)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_the_model(bigram: Path, table: np.ndarray, temperature: float) -> None:
    ids = generate_calibration(bigram, num_samples=300, seq_len=40, seed=1,
                               temperature=temperature, chain_len=20)

    assert ids.shape == (300, 40) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < V
    # 300 x 2 chains x 19 transitions = 11400 pairs; a binomial sd is at most 0.005/row-share.
    np.testing.assert_allclose(_transitions(ids, 20), _softmax(table / temperature), atol=0.04)


def test_top_k_and_bos(bigram: Path, table: np.ndarray) -> None:
    ids = generate_calibration(bigram, num_samples=50, seq_len=30, seed=2, top_k=2, bos_id=3,
                               chain_len=8)

    assert (ids[:, [0, 8, 16, 24]] == 3).all()  # every chain starts at BOS
    top2 = np.argsort(table, axis=1)[:, -2:]
    prev, nxt = ids[:, :-1].ravel(), ids[:, 1:].ravel()
    inside = (np.arange(1, 30) % 8 != 0)  # pairs not crossing a chain join
    mask = np.tile(inside, 50)
    assert all(n in top2[p] for p, n in zip(prev[mask], nxt[mask]))


def test_seeded_and_reproducible(bigram: Path) -> None:
    a = generate_calibration(bigram, num_samples=4, seq_len=16, seed=5)
    b = generate_calibration(bigram, num_samples=4, seq_len=16, seed=5)
    c = generate_calibration(bigram, num_samples=4, seq_len=16, seed=6)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_greedy_equals_torch_generation(tmp_path: Path) -> None:
    """top_k=1 is greedy decoding: each token is torch's argmax given the whole prefix."""
    model = tiny_models.build_llama()
    path = tiny_models.export(model, tmp_path / "llama.onnx", dynamo=False)
    ids = generate_calibration(path, num_samples=3, seq_len=12, seed=0, top_k=1)

    with torch.no_grad():
        want = torch.from_numpy(ids[:, :1].copy())
        for _ in range(11):
            logits = model(input_ids=want, use_cache=False).logits[:, -1]
            want = torch.cat([want, logits.argmax(-1, keepdim=True)], dim=1)
    np.testing.assert_array_equal(ids, want.numpy())
    assert len(np.unique(ids[:, 0])) > 1  # random first tokens


def test_bad_settings(bigram: Path, tmp_path: Path, table: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="temperature"):
        generate_calibration(bigram, num_samples=1, seq_len=4, temperature=0.0)
    with pytest.raises(ConfigError, match="num_samples: 0"):
        generate_calibration(bigram, num_samples=0, seq_len=4)
    with pytest.raises(ConfigError, match="top_k"):
        generate_calibration(bigram, num_samples=1, seq_len=4, top_k=0)
    with pytest.raises(ConfigError, match="bos_id: 99 is outside the vocabulary of 6"):
        generate_calibration(bigram, num_samples=1, seq_len=4, bos_id=99)
    static = _bigram(tmp_path / "static.onnx", table, seq=8)
    with pytest.raises(CalibrationError, match="static sequence length of 8"):
        generate_calibration(static, num_samples=1, seq_len=8)


def test_self_is_a_calibration_source_like_any_generated_one(bigram: Path) -> None:
    """"self" resolves through calibrate.sources to SelfCalibration, and any object with
    generate(model_path, config) plugs in the same way; other sources pass through."""
    from onnx_gptq.calibrate.sources import GeneratedSource, resolve_generated
    from onnx_gptq.config import CalibConfig
    from onnx_gptq.tools.self_calib import SelfCalibration

    config = CalibConfig(num_samples=3, seq_len=5, seed=4, providers=("CPUExecutionProvider",))
    rows = resolve_generated("self", bigram, config)
    np.testing.assert_array_equal(rows, generate_calibration(bigram, num_samples=3, seq_len=5, seed=4))
    greedy = resolve_generated(SelfCalibration(top_k=1), bigram, config)
    np.testing.assert_array_equal(greedy[:, 1:], np.asarray(table_argmax(bigram))[greedy[:, :-1]])

    class Constant:
        def generate(self, model_path: Path, config: CalibConfig) -> np.ndarray:
            return np.full((config.num_samples, config.seq_len), 2, np.int64)

    assert isinstance(Constant(), GeneratedSource)
    assert resolve_generated(Constant(), bigram, config).tolist() == [[2] * 5] * 3
    assert resolve_generated("self", None, config) == "self"  # an in-memory model: left to the readers
    assert resolve_generated("data.txt", bigram, config) == "data.txt"


def table_argmax(path: Path) -> np.ndarray:
    """The greedy next token of the bigram model for each token."""
    table = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    return table.argmax(axis=-1)
