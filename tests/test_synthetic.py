"""The synthetic Llama-shaped benchmark model: onnxruntime runs it and it computes what Llama computes."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from onnx_gptq import targets
from onnx_gptq.calibrate import partition
from onnx_gptq.config import QuantConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import synthetic_llama  # noqa: E402

TINY = synthetic_llama.PRESETS["tiny"]


def _weights(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))  # external data read in (tiny model)
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _hf_logits(shape: synthetic_llama.LlamaShape, weights: dict[str, np.ndarray], ids: np.ndarray,
               mask: np.ndarray) -> np.ndarray:
    """The same weights in transformers' LlamaForCausalLM (MatMul weights are [in, out], Linear's [out, in])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=shape.tied, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    state = {}
    for name, array in weights.items():
        if not name.startswith(("model.", "lm_head")):
            continue
        tensor = torch.from_numpy(array.astype(np.float32))
        state[name] = tensor.T.contiguous() if tensor.ndim == 2 and name != "model.embed_tokens.weight" else tensor
    if shape.tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_matches_transformers_llama(tmp_path: Path, tied: bool, kv_heads: int) -> None:
    shape = dataclasses.replace(TINY, dtype="float32", tied=tied, kv_heads=kv_heads)
    path = synthetic_llama.build(shape, tmp_path / "model.onnx", seed=3)
    assert (tmp_path / "model.onnx.data").stat().st_size >= shape.parameters * 4
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape.vocab, size=(2, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    expected = _hf_logits(shape, _weights(path), ids, mask)
    assert logits.shape == (2, 12, shape.vocab)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_float16_model_runs_and_is_found_by_targets(tmp_path: Path) -> None:
    path = synthetic_llama.build(TINY, tmp_path / "model.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    ids = np.random.default_rng(1).integers(0, TINY.vocab, size=(3, 10), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    assert logits.dtype == np.float16 and np.isfinite(logits).all()
    # Random weights scaled by 1/sqrt(fan_in) keep the logits O(1).
    assert 0.3 < float(logits.astype(np.float32).std()) < 3.0

    model = ir.load(path)
    groups, _ = targets.find_targets(model, QuantConfig(group_size=32, quantize_head=True))
    assert len(groups) == 7 * TINY.layers + 1
    assert [partition.block_key(g) for g in groups[:8]] == [0] * 7 + [1]
    stages = partition.plan_stages(model, groups).stages
    assert [len(s.groups) for s in stages] == [7] * TINY.layers + [1]
    # Residual stream, mask bias, cos, sin enter every block after the first; the head reads hidden states.
    assert [s.crossing_in for s in stages] == [0, 4, 1]


def test_weights_are_page_aligned_external_data(tmp_path: Path) -> None:
    path = synthetic_llama.build(TINY, tmp_path / "model.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    offsets = [int(e.value) for t in proto.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) == 9 * TINY.layers + 3  # 7 projections + 2 norms per layer, embedding, norm, head
    assert all(o % 4096 == 0 for o in offsets)
    assert all(not t.raw_data for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="heads"):
        dataclasses.replace(TINY, heads=3)
    assert synthetic_llama.PRESETS["7b"].parameters == pytest.approx(6.74e9, rel=0.01)
