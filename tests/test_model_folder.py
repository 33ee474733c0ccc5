"""Model folders in, complete folders out, for every kind of ONNX LLM folder (issue 11: 1, 2).

Each kind is built from one tiny random-weight Llama (tests/folder_models.py):
onnxruntime-genai's builder (fp32, fp16), Optimum's text-generation-with-past
export (in its own venv), and our own export. The plain CLI quantizes each
folder with the folder's tokenizer, and the output folder loads and generates
in the client the input was made for, with logits close to the float model's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_gptq.cli import main
from onnx_gptq.model_folder import GENAI_CONFIG, copied_files, resolve, updated_genai_config
from onnx_gptq.runtime.custom_ops import LIBRARY_NAME
from onnx_gptq.tools.evaluate import evaluate
from tests import folder_models
from tests.test_cli import TEXT

SMALL = ["--num-samples", "4", "--seq-len", "32", "--group-size", "32", "-q"]


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(TEXT)
    return path


def _quantize(folder: Path, out: Path, text: Path, *extra: str) -> Path:
    assert main([str(folder), "--calib", str(text), "-o", str(out), *SMALL, *extra]) == 0
    return out


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_builder_folder_quantizes_and_generates_in_genai(genai_folder: Path, text: Path, tmp_path: Path) -> None:
    out = _quantize(genai_folder, tmp_path / "out", text)  # the output dir is created
    assert _files(out) - {"model.onnx.data"} == _files(genai_folder) - {"model.onnx.data"}
    assert json.loads((out / GENAI_CONFIG).read_text())["model"]["decoder"]["filename"] == "model.onnx"
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    float_tokens, float_logits = folder_models.genai_greedy(genai_folder)
    tokens, logits = folder_models.genai_greedy(out)
    assert len(tokens) == len(float_tokens) == 4
    assert len(set(float_tokens)) > 1  # the tiny model is not degenerate: its greedy text moves
    # onnxruntime-genai runs exactly the written model, and it is close to the float one (4-bit
    # weights of std 0.2 through two layers: about 0.2 relative error in the logits).
    assert folder_models.relative_error(logits, folder_models.onnxruntime_logits(out)) < 1e-2
    assert folder_models.relative_error(float_logits, folder_models.onnxruntime_logits(genai_folder)) < 1e-4
    assert folder_models.relative_error(logits, float_logits) < 0.3


def test_default_output_and_model_file_inside_a_folder(genai_folder: Path, text: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-genai"
    shutil.copytree(genai_folder, folder)
    assert main([str(folder), "--calib", str(text), *SMALL]) == 0  # no -o: <folder>-q4 beside it
    assert (tmp_path / "tiny-genai-q4" / GENAI_CONFIG).is_file()
    # A model file inside a folder, -o without .onnx: a complete folder too; with .onnx: one file.
    _quantize(folder / "model.onnx", tmp_path / "from-file", text)
    assert _files(tmp_path / "from-file") == _files(tmp_path / "tiny-genai-q4")
    _quantize(folder / "model.onnx", tmp_path / "single.onnx", text)
    assert (tmp_path / "single.onnx").is_file()
    assert _files(tmp_path) == {"tiny-genai", "tiny-genai-q4", "from-file", "single.onnx"}


def test_builder_fp16_folder_quantizes(hf_llama_folder: Path, text: Path, tmp_path: Path) -> None:
    # onnxruntime-genai 0.18 cannot decode the CPU builder's fp16 graph even unquantized (a Cast's
    # buffer reuse fails on the second step), so the fp16 output is scored by onnxruntime directly.
    fp16 = folder_models.run_builder(hf_llama_folder, tmp_path / "fp16", "fp16")
    out = _quantize(fp16, tmp_path / "out", text)
    result = evaluate(out, [TEXT], None, reference=fp16, seq_len=32, max_windows=2)
    # The default 4-bit head and embedding of a random-weight 256-token model cost most of this KL (under 0.1
    # with both float).
    assert result.kl is not None and 0 < result.kl < 0.5 and result.top1 > 0.5


def test_custom_op_folder_runs_in_genai(genai_folder: Path, text: Path, tmp_path: Path) -> None:
    out = _quantize(genai_folder, tmp_path / "out", text, "--bits", "3", "--format", "custom")
    assert (out / LIBRARY_NAME).is_file()
    options = json.loads((out / GENAI_CONFIG).read_text())["model"]["decoder"]["session_options"]
    assert options["custom_ops_library"] == LIBRARY_NAME
    _, float_logits = folder_models.genai_greedy(genai_folder)
    tokens, logits = folder_models.genai_greedy(out)
    assert len(tokens) == 4
    assert folder_models.relative_error(logits, folder_models.onnxruntime_logits(out)) < 1e-2
    assert folder_models.relative_error(logits, float_logits) < 0.5
    # A folder made from that one without GptqMatMul gets neither the library nor its config entry.
    again = resolve(out)
    assert LIBRARY_NAME not in {p.name for p in copied_files(again, [again.model])}
    config = updated_genai_config(again.genai_config, "model.onnx")
    assert "custom_ops_library" not in config["model"]["decoder"]["session_options"]
    assert again.decoder["session_options"]["custom_ops_library"] == LIBRARY_NAME  # the input is not changed


needs_optimum = pytest.mark.skipif(not folder_models.optimum_available(), reason="needs `make optimum-venv`")


@pytest.fixture(scope="module")
def optimum_folder(hf_llama_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return folder_models.optimum_export(hf_llama_folder, tmp_path_factory.mktemp("optimum") / "tiny-optimum")


@needs_optimum
def test_optimum_folder_quantizes_and_generates_in_optimum(optimum_folder: Path, text: Path, tmp_path: Path) -> None:
    exported = optimum_folder
    out = _quantize(exported, tmp_path / "out", text)
    assert _files(out) == _files(exported)
    (float_tokens, float_logits), (tokens, logits) = folder_models.optimum_greedy(exported, out)
    assert len(tokens) == len(float_tokens) == 4
    assert folder_models.relative_error(logits, folder_models.onnxruntime_logits(out)) < 1e-2
    assert folder_models.relative_error(logits, float_logits) < 0.3
    assert int(np.argmax(float_logits)) == float_tokens[0]


@needs_optimum
def test_optimum_custom_op_folder_generates_with_the_library_registered(optimum_folder: Path, text: Path,
                                                                        tmp_path: Path) -> None:
    out = _quantize(optimum_folder, tmp_path / "out", text, "--bits", "3", "--format", "custom")
    assert _files(out) == _files(optimum_folder) | {LIBRARY_NAME}
    [(tokens, logits)] = folder_models.optimum_greedy(out)
    assert len(tokens) == 4
    assert folder_models.relative_error(logits, folder_models.onnxruntime_logits(out)) < 1e-2


@pytest.fixture(scope="module")
def own_folder(hf_llama_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return folder_models.own_export(hf_llama_folder, tmp_path_factory.mktemp("own") / "tiny-own")


def test_own_export_folder_quantizes_and_evaluates(own_folder: Path, text: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    exported = own_folder
    out = _quantize(exported, tmp_path / "out", text)
    assert _files(out) >= {"model.onnx", "config.json", "tokenizer.json"}
    capsys.readouterr()
    # eval on folders: the folder's tokenizer by default, the float folder as the reference.
    assert main(["eval", str(out), "--text", str(text), "--reference", str(exported), "--seq-len", "32",
                 "--max-windows", "2"]) == 0
    line = capsys.readouterr().out
    kl = float(line.split("KL ")[1].split()[0])
    assert 0 < kl < 0.5, line  # the default 4-bit head and embedding cost most of it (as above)


def test_eval_feeds_an_empty_past_to_kv_cache_models(genai_folder: Path, own_folder: Path) -> None:
    """A KV-cache model scores as the same weights exported without a cache: the past is fed empty."""
    result = evaluate(genai_folder, [TEXT], None, seq_len=32, max_windows=2)  # the folder's tokenizer
    plain = evaluate(own_folder, [TEXT], None, seq_len=32, max_windows=2, reference=genai_folder)
    assert result.n_tokens == plain.n_tokens == 2 * 31
    assert result.perplexity == pytest.approx(plain.perplexity, rel=1e-3)
    assert plain.kl is not None and plain.kl < 1e-4 and plain.top1 == 1.0


def test_resolve_reads_builder_folder(genai_folder: Path) -> None:
    folder = resolve(genai_folder)
    assert folder.model == genai_folder / "model.onnx"
    assert folder.tokenizer == genai_folder / "tokenizer.json"
    assert folder.decoder is not None and folder.decoder["head_size"] == 16
    assert resolve(genai_folder / "model.onnx").folder == genai_folder


# --- bad input: one line, exit code 2, nothing written -------------------------------------------------


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("onnx-gptq: error:"), err
    for word in words:
        assert word in err, err
    return err


def test_folder_without_model_is_refused(tmp_path: Path, text: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    _refused([str(folder), "--calib", str(text), "-o", str(tmp_path / "out"), *SMALL], capsys,
             str(folder), "no .onnx model")
    _refused(["eval", str(folder), "--text", str(text)], capsys, str(folder), "no .onnx model")
    assert _files(tmp_path) == {"empty"} and _files(folder) == {"config.json"}


@pytest.mark.parametrize(("key", "value", "words"), [
    ("head_size", 32, ("model.decoder.head_size is 32", "16")),
    ("num_key_value_heads", 4, ("model.decoder.num_key_value_heads is 4", "2")),
    ("num_hidden_layers", 3, ("model.decoder.num_hidden_layers is 3", "2 layers")),
    ("filename", "missing.onnx", ("'missing.onnx' is not a file",)),
])
def test_genai_config_disagreeing_with_graph_is_refused(genai_folder: Path, text: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], key: str,
                                                        value: object, words: tuple[str, ...]) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(genai_folder, folder)
    config = json.loads((folder / GENAI_CONFIG).read_text())
    config["model"]["decoder"][key] = value
    (folder / GENAI_CONFIG).write_text(json.dumps(config))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    _refused([str(folder), "--calib", str(text), "-o", str(tmp_path / "out"), *SMALL], capsys,
             GENAI_CONFIG, *words)
    _refused(["eval", str(folder), "--text", str(text)], capsys, GENAI_CONFIG, *words)
    assert not (tmp_path / "out").exists()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_output_folder_that_is_the_input_is_refused(genai_folder: Path, text: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    shutil.copytree(genai_folder, folder)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    for output in (folder, tmp_path / "." / "in"):
        _refused([str(folder), "--calib", str(text), "-o", str(output), *SMALL], capsys, "is the input folder")
    link = tmp_path / "link"
    os.symlink(folder, link)
    _refused([str(folder), "--calib", str(text), "-o", str(link), *SMALL], capsys, "is the input folder")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_output_folder_parent_missing_is_refused(genai_folder: Path, text: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _refused([str(genai_folder), "--calib", str(text), "-o", str(tmp_path / "no" / "out"), *SMALL], capsys,
             "parent", "does not exist")
    assert not (tmp_path / "no").exists()


def test_kv_cache_model_without_past_sizes_is_refused(tmp_path: Path, text: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A past input with a symbolic head size that neither a config nor the graph explains."""
    from tests.test_past_shapes import opaque_past_model

    folder = tmp_path / "opaque"
    folder.mkdir()
    onnx.save(opaque_past_model(), folder / "model.onnx")
    _refused([str(folder / "model.onnx"), "--calib", str(text), "--tokenizer", str(_word_tokenizer(tmp_path)),
              "-o", str(tmp_path / "out.onnx"), *SMALL], capsys,
             "'past_key_values.0.key'", "head size", "missing")
    assert _files(tmp_path) == {"opaque", "tok.json"}


def _word_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(TEXT.split()))
    tokenizer = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = directory / "tok.json"
    tokenizer.save(str(path))
    return path


@pytest.mark.slow
def test_smollm2_builder_folder_through_the_plain_cli(tmp_path: Path) -> None:
    """SmolLM2-135M through the builder (fp32), the plain CLI, and back into onnxruntime-genai with its tokenizer."""
    import onnxruntime_genai as og

    from devtools import assets, llm_folders

    source = llm_folders.builder_folder("fp32")
    calib, evals = assets.sotu_split_files()
    out = tmp_path / "smollm2-q4"
    assert main([str(source), "--calib", str(calib), "-o", str(out), "--num-samples", "16", "--seq-len", "256",
                 "-q"]) == 0
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 0.4 * sum(p.stat().st_size for p in source.iterdir())  # head and embedding stay fp32
    result = evaluate(out, evals, None, reference=source, seq_len=256, max_windows=4)
    # Measured: perplexity 28.2, KL 0.166, top-1 78% (the fp32 folder: perplexity 24.2).
    assert result.kl is not None and result.kl < 0.25 and result.top1 > 0.7 and result.perplexity < 35

    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=32, do_sample=False)
    generator = og.Generator(model, params)
    prompt = tokenizer.encode("The state of our union is")
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    text = tokenizer.decode(generator.get_sequence(0)[len(prompt):])
    assert len(text.split()) >= 5, text
