"""onnx-gptq generate / onnx_gptq.generate: greedy equals transformers and a no-cache loop, sampling obeys
its settings, the chat template is applied, text streams, bad input gets one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import onnx_gptq
from onnx_gptq.cli import main
from onnx_gptq.errors import ConfigError, ModelError
from onnx_gptq.tools import export
from onnx_gptq.tools.sampling import Sampler, Sampling, candidates
from tests import folder_models, tiny_models
from tests.test_export_kv import PROMPT, genai_greedy, no_cache_greedy, torch_greedy

TEXT_PROMPT = "t5 t17 t99 t3 t42"


def test_greedy_equals_transformers_genai_and_a_no_cache_model(kv_folder: Path, chatty_llama_dir: Path,
                                                              tmp_path: Path) -> None:
    result = onnx_gptq.generate(kv_folder, PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert result.cached and result.stop_reason == "max_new_tokens"
    assert result.token_ids == torch_greedy(PROMPT, 16) == genai_greedy(kv_folder, PROMPT, 16)
    plain = export.export_model(str(chatty_llama_dir), tmp_path / "plain.onnx", seq_len=6)
    no_cache = onnx_gptq.generate(plain, PROMPT, max_new_tokens=16, stop_at_eos=False)
    assert not no_cache.cached and no_cache.token_ids == result.token_ids
    assert result.first_token_s > 0 and result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0


def test_gptq_matmul_folder_gets_the_custom_op_library(kv_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "q3"
    assert main([str(kv_folder), "-o", str(out), "--algo", "rtn", "--bits", "3", "--format", "custom",
                 "--group-size", "32", "-q"]) == 0
    result = onnx_gptq.generate(out, PROMPT, max_new_tokens=10, stop_at_eos=False)
    assert result.cached and result.token_ids == no_cache_greedy(out / "model.onnx", PROMPT, 10)


def test_text_prompt_streams(kv_folder: Path) -> None:
    pieces: list[str] = []
    result = onnx_gptq.generate(kv_folder, TEXT_PROMPT, max_new_tokens=12, stream=pieces.append)
    assert result.prompt_ids == PROMPT  # the tokenizer adds no BOS
    assert "".join(pieces) == result.text == " ".join(f"t{i}" for i in result.token_ids)


def test_eos_id_ends_generation(kv_folder: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "eos"
    shutil.copytree(kv_folder, folder)
    expected = onnx_gptq.generate(folder, PROMPT, max_new_tokens=8, stop_at_eos=False).token_ids
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = expected[3]
    (folder / "genai_config.json").write_text(json.dumps(config))
    result = onnx_gptq.generate(folder, PROMPT, max_new_tokens=8)
    assert result.stop_reason == "eos" and result.token_ids == expected[:expected.index(expected[3]) + 1]


def test_sampling_is_seeded_and_stays_within_top_k(kv_folder: Path) -> None:
    settings = {"max_new_tokens": 12, "do_sample": True, "top_k": 3, "temperature": 1.5, "stop_at_eos": False}
    first = onnx_gptq.generate(kv_folder, PROMPT, seed=7, **settings)
    again = onnx_gptq.generate(kv_folder, PROMPT, seed=7, **settings)
    other = onnx_gptq.generate(kv_folder, PROMPT, seed=8, **settings)
    assert first.token_ids == again.token_ids != other.token_ids
    model = tiny_models.build_chatty_llama()
    ids = list(PROMPT)
    with torch.no_grad():
        for token in first.token_ids:
            logits = model(torch.tensor([ids])).logits[0, -1]
            assert token in torch.topk(logits, 3).indices.tolist()
            ids.append(token)


def test_candidates_top_k_top_p_and_temperature() -> None:
    logits = np.log(np.array([0.1, 0.5, 0.15, 0.25]))
    ids, probs = candidates(logits, Sampling(do_sample=True))
    assert ids.tolist() == [1, 3, 2, 0]
    np.testing.assert_allclose(probs, [0.5, 0.25, 0.15, 0.1])
    ids, probs = candidates(logits, Sampling(do_sample=True, top_p=0.7))  # 0.5 < 0.7 <= 0.75
    assert ids.tolist() == [1, 3]
    np.testing.assert_allclose(probs, [2 / 3, 1 / 3])
    ids, probs = candidates(logits, Sampling(do_sample=True, top_k=3, top_p=0.5))
    assert ids.tolist() == [1] and probs.tolist() == [1.0]
    _, probs = candidates(logits, Sampling(do_sample=True, temperature=0.5))  # p^2, renormalised
    np.testing.assert_allclose(probs, np.array([0.25, 0.0625, 0.0225, 0.01]) / 0.345)
    draws = [Sampler(Sampling(do_sample=True, top_p=0.7, seed=s))(logits) for s in range(200)]
    assert set(draws) == {1, 3} and 0.55 < draws.count(1) / 200 < 0.8
    assert Sampler(Sampling())(logits) == 1


def test_chat_template_is_applied(kv_folder: Path) -> None:
    chat = onnx_gptq.generate(kv_folder, "t5 t6", chat=True, max_new_tokens=3, stop_at_eos=False)
    assert chat.prompt_ids == [1, 5, 6, 7]  # "<s> t5 t6 t7", from tiny_models.CHAT_TEMPLATE
    plain = onnx_gptq.generate(kv_folder, "t5 t6", max_new_tokens=3, stop_at_eos=False)
    assert plain.prompt_ids == [5, 6]


def test_cli_json_and_stream(kv_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(kv_folder), "--prompt", TEXT_PROMPT, "--max-new-tokens", "5", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["prompt_ids"] == PROMPT and len(result["token_ids"]) <= 5 and result["cached"] is True
    assert "decode" in err and "tok/s" in err
    assert main(["generate", str(kv_folder), "--prompt", TEXT_PROMPT, "--max-new-tokens", "5", "--do-sample",
                 "--seed", "1", "--top-p", "0.9"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().startswith("t") and "first token" in err


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0"], "temperature: 0.0 must be a positive number"),
    (["--top-p", "1.5"], "top_p: 1.5 must be in (0, 1]"),
    (["--top-k", "-1"], "top_k: -1 must be"),
    (["--max-new-tokens", "0"], "max_new_tokens: 0 must be"),
    (["--prompt", " ".join(["t5"] * 130)], "130 tokens leave no room in the model's context of 128"),
    (["--chat", "--tokenizer", "TOKENIZER_JSON_ONLY"], "has no chat template"),
])
def test_cli_bad_input_is_one_line_exit_2(kv_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          args: list[str], message: str) -> None:
    if "TOKENIZER_JSON_ONLY" in args:
        (tmp_path / "tok").mkdir()
        (tmp_path / "tok" / "tokenizer.json").write_bytes((kv_folder / "tokenizer.json").read_bytes())
        args = [str(tmp_path / "tok" / "tokenizer.json") if a == "TOKENIZER_JSON_ONLY" else a for a in args]
    argv = ["generate", str(kv_folder), "--prompt", TEXT_PROMPT, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_model_and_no_tokenizer(tmp_path: Path, kv_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ModelError, match="does not exist"):
        onnx_gptq.generate(tmp_path / "nope", "hi")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((kv_folder / "model.onnx").read_bytes())
    assert main(["generate", str(bare), "--prompt", "t5"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="token id 300 is outside"):
        onnx_gptq.generate(bare, [300])


def test_builder_folder_generates_as_genai(genai_folder: Path) -> None:
    want, _ = folder_models.genai_greedy(genai_folder, 8)
    result = onnx_gptq.generate(genai_folder, folder_models.PROMPT, max_new_tokens=8, stop_at_eos=False)
    assert result.cached and result.token_ids == want


@pytest.mark.skipif(not folder_models.optimum_available(), reason="Optimum's venv is missing (make optimum-venv)")
def test_optimum_folder_generates_as_ort_model_for_causal_lm(hf_llama_folder: Path, tmp_path: Path) -> None:
    folder = folder_models.optimum_export(hf_llama_folder, tmp_path / "optimum")
    [(want, _)] = folder_models.optimum_greedy(folder, new_tokens=8)
    result = onnx_gptq.generate(folder, folder_models.PROMPT, max_new_tokens=8, stop_at_eos=False)
    assert result.cached and result.token_ids == want


@pytest.mark.slow
def test_builder_folder_greedy_equals_genai() -> None:
    from devtools import llm_folders

    folder = llm_folders.builder_folder("fp32")
    from onnx_gptq.tools.tokenizer import load_tokenizer

    ids = load_tokenizer(folder / "tokenizer.json").encode("The capital of France is")
    result = onnx_gptq.generate(folder, ids, max_new_tokens=12, stop_at_eos=False)
    assert result.cached and result.token_ids == genai_greedy(folder, ids, 12)
