"""The KV-cache export: a folder that onnxruntime-genai loads, float and quantized, equal to transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onnx_gptq.cli import main
from onnx_gptq.errors import ConfigError, OutputError
from onnx_gptq.tools import export
from onnx_gptq.tools.export_kv import cache_wrapper, sample_args
from tests import folder_models, tiny_models

PROMPT = [5, 17, 99, 3, 42]
NEW = 16


def genai_greedy(folder: Path, prompt: list[int], new: int) -> list[int]:
    """Greedy tokens from onnxruntime_genai.Model(folder)."""
    return folder_models.genai_greedy(folder, new, prompt)[0]


def torch_greedy(prompt: list[int], new: int) -> list[int]:
    model = tiny_models.build_chatty_llama()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def no_cache_greedy(model: Path, prompt: list[int], new: int) -> list[int]:
    """Greedy tokens of a KV-cache graph run without its cache: the whole sequence each step, the past empty."""
    from onnx_gptq.runtime import custom_ops

    session = custom_ops.make_session(model, providers=["CPUExecutionProvider"])
    ids = list(prompt)
    for _ in range(new):
        n = len(ids)
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None]}
        feeds.update({i.name: np.zeros((1, 2, 0, 16), np.float32) for i in session.get_inputs()
                      if i.name.startswith("past")})
        ids.append(int(np.argmax(session.run(["logits"], feeds)[0][0, -1])))
    return ids[len(prompt):]


def test_folder_has_cache_graph_configs_and_tokenizer(kv_folder: Path) -> None:
    names = sorted(p.name for p in kv_folder.iterdir())
    for wanted in ("model.onnx", "genai_config.json", "config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json"):
        assert wanted in names
    graph = onnx.load(str(kv_folder / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids",
                                             "past_key_values.0.key", "past_key_values.0.value",
                                             "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                              "present.1.value"]
    past = [d.dim_value or d.dim_param for d in graph.input[3].type.tensor_type.shape.dim]
    assert past[1:2] + past[3:] == [2, 16] and isinstance(past[2], str)  # kv heads, head size; symbolic length
    config = json.loads((kv_folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert (decoder["head_size"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (16, 2, 2)
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert (config["model"]["context_length"], config["model"]["vocab_size"]) == (128, tiny_models.VOCAB)
    assert (config["model"]["bos_token_id"], config["model"]["eos_token_id"]) == (1, 2)
    assert config["search"]["past_present_share_buffer"] is False


def test_genai_greedy_equals_transformers(kv_folder: Path) -> None:
    want = torch_greedy(PROMPT, NEW)
    assert len(set(want)) > 5  # the model does not just repeat a token
    assert genai_greedy(kv_folder, PROMPT, NEW) == want


def test_quantized_folder_runs_in_genai_and_matches_a_no_cache_loop(kv_folder: Path, calib_ids: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "q4"
    assert main([str(kv_folder), "--calib", str(calib_ids), "-o", str(out), "--num-samples", "8", "--seq-len", "32",
                 "--group-size", "32", "-q"]) == 0
    graph = onnx.load(str(out / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 15  # 7 per layer, 2 layers, the head
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"
    assert genai_greedy(out, PROMPT, NEW) == no_cache_greedy(out / "model.onnx", PROMPT, NEW)


def test_logits_and_presents_match_torch(kv_folder: Path) -> None:
    import onnxruntime as ort

    model = tiny_models.build_chatty_llama()
    wrapped = cache_wrapper(model)
    session = ort.InferenceSession(str(kv_folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch, length, past_len in ((1, 7, 0), (2, 1, 9), (3, 5, 4)):
        args = sample_args(model, batch=batch, seq_len=length, past_len=past_len, seed=11)
        with torch.no_grad():
            want = [t.numpy() for t in wrapped(*args)]
        got = session.run(None, dict(zip(names, [a.numpy() for a in (*args[:3], *args[3])])))
        assert got[1].shape == (batch, 2, past_len + length, 16)
        for have, expected in zip(got, want):
            np.testing.assert_allclose(have, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())), rtol=0)


def test_onnx_output_and_no_kv_cache_folder(chatty_llama_dir: Path, tmp_path: Path) -> None:
    plain = export.export_model(str(chatty_llama_dir), tmp_path / "plain.onnx", seq_len=6)
    assert [i.name for i in onnx.load(str(plain)).graph.input] == ["input_ids", "attention_mask"]
    cached = export.export_model(str(chatty_llama_dir), tmp_path / "cached.onnx", seq_len=6, kv_cache=True)
    assert len(onnx.load(str(cached)).graph.output) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cached.onnx", "plain.onnx"]  # no side files
    folder = export.export_model(str(chatty_llama_dir), tmp_path / "nocache", seq_len=6, kv_cache=False)
    assert not (folder / "genai_config.json").exists() and (folder / "config.json").exists()
    assert [o.name for o in onnx.load(str(folder / "model.onnx")).graph.output] == ["logits"]


def test_cli_export_folder_and_bad_outputs(chatty_llama_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(chatty_llama_dir), "-o", str(chatty_llama_dir), "--seq-len", "4"]) == 2
    assert "is the input model folder" in capsys.readouterr().err
    assert main(["export", str(chatty_llama_dir), "-o", str(tmp_path / "missing" / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs a transformers causal LM"):
        export.export_model(torch.nn.Sequential(torch.nn.Embedding(8, 4)), tmp_path / "out", seq_len=4)
    with pytest.raises(OutputError, match="is a file"):
        (tmp_path / "file").write_text("x")
        export.export_model(str(chatty_llama_dir), tmp_path / "file")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_folder_generates_as_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import onnx_gptq
    from devtools import llm_folders
    from onnx_gptq.tools.tokenizer import load_tokenizer

    source = llm_folders.smollm2_hf_folder()
    folder = export.export_model(str(source), tmp_path / "smol", seq_len=8)
    ids = load_tokenizer(folder / "tokenizer.json").encode("The capital of France is")
    model = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert genai_greedy(folder, ids, 12) == want
    assert onnx_gptq.generate(folder, ids, max_new_tokens=12, stop_at_eos=False).token_ids == want
    chat = onnx_gptq.generate(folder, "What is the capital of France?", chat=True, max_new_tokens=12)
    assert chat.prompt_ids[:3] != ids[:3] and chat.text


def test_torchscript_exporter_writes_the_same_cache_graph(chatty_llama_dir: Path, tmp_path: Path) -> None:
    folder = export.export_model(str(chatty_llama_dir), tmp_path / "ts", seq_len=6, exporter="torchscript")
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                              "present.1.value"]
    assert genai_greedy(folder, PROMPT, NEW) == torch_greedy(PROMPT, NEW)
