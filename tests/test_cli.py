"""The command line: a real run with text calibration, and every bad-input case.

Bad input must give exit code 2 and one line on stderr naming the problem, no
traceback, no output file, and an unchanged input file.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_gptq.cli import main
from tests import tiny_models

TEXT = ("the quick brown fox jumps over the lazy dog and the cat sat on the mat while "
        "a bird sang in the tree near the river bank under the blue sky ") * 40


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer.json whose ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(TEXT.split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_calibration_run_writes_model_and_report(tiny_llama_onnx, word_tokenizer, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code, stdout, stderr = run_cli(capsys, tiny_llama_onnx, "--calib", text, "--tokenizer", word_tokenizer,
                                   "-o", out, "--num-samples", 4, "--seq-len", 32, "--group-size", 32,
                                   "--report", report, "-q")
    assert code == 0, stderr
    model = onnx.load(out)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 15  # 14 and the head (--head 4)
    assert json.loads(report.read_text())["layers"][0]["calibration_rows"] == 4 * 32


def test_summary_is_printed(tiny_gpt2_onnx, calib_ids, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, tiny_gpt2_onnx, "--calib", calib_ids, "-o", tmp_path / "q.onnx",
                              "--num-samples", 4, "--seq-len", 16, "--bits", 8, "--group-size", -1, "-v")
    assert code == 0
    assert "quantized 9 weight(s)" in stdout and "skipped" in stdout and "smaller" in stdout  # 8 + head


def _nothing_to_quantize(path: Path) -> Path:
    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph), path)
    return path


def _bad_cases(model: Path, tmp: Path, tokenizer: Path, ids: Path) -> dict[str, tuple[list, str]]:
    (tmp / "not_onnx.onnx").write_text("this is not a protobuf")
    (tmp / "corrupt.onnx").write_bytes(model.read_bytes()[: len(model.read_bytes()) // 3])
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("the quick brown fox")
    (tmp / "text.txt").write_text(TEXT)
    np.save(tmp / "big_ids.npy", np.full((4, 32), tiny_models.VOCAB + 5, dtype=np.int64))
    np.save(tmp / "empty.npy", np.zeros((0, 32), dtype=np.int64))
    nothing = _nothing_to_quantize(tmp / "nothing.onnx")
    out = tmp / "out.onnx"
    common = ["--num-samples", "4", "--seq-len", "32"]
    return {
        "missing model": ([tmp / "nope.onnx", "--calib", ids, "-o", out], "does not exist"),
        "not onnx": ([tmp / "not_onnx.onnx", "--calib", ids, "-o", out], "not a readable ONNX model"),
        "corrupt onnx": ([tmp / "corrupt.onnx", "--calib", ids, "-o", out], "not a readable ONNX model"),
        "nothing to quantize": ([nothing, "--calib", ids, "-o", out], "nothing to quantize"),
        "empty text": ([model, "--calib", tmp / "empty.txt", "--tokenizer", tokenizer, "-o", out, *common],
                       "empty"),
        "short text": ([model, "--calib", tmp / "short.txt", "--tokenizer", tokenizer, "-o", out, *common],
                       "too short"),
        "empty ids": ([model, "--calib", tmp / "empty.npy", "-o", out, *common], "empty"),
        "text without tokenizer": ([model, "--calib", tmp / "text.txt", "-o", out, *common], "needs a tokenizer"),
        "ids outside vocab": ([model, "--calib", tmp / "big_ids.npy", "-o", out, *common], "vocabulary"),
        "missing calib file": ([model, "--calib", tmp / "nope.txt", "-o", out], "does not exist"),
        "no calib for gptq": ([model, "-o", out], "--calib is required"),
        "unsupported bits": ([model, "--calib", ids, "-o", out, "--bits", "5"], "bits: 5"),
        "group size for ort": ([model, "--calib", ids, "-o", out, "--format", "ort", "--group-size", "100"],
                               "group_size: 100"),
        "3 bits as qdq": ([model, "--calib", ids, "-o", out, "--format", "qdq", "--bits", "3"], "bits: 3"),
        "output is input": ([model, "--calib", ids, "-o", model], "is the input model"),
        "output dir missing": ([model, "--calib", ids, "-o", tmp / "no" / "such" / "dir.onnx"], "does not exist"),
        "output parent is a file": ([model, "--calib", ids, "-o", tmp / "text.txt" / "x.onnx"], "does not exist"),
        "unknown provider": ([model, "--calib", ids, "-o", out, "--providers", "NopeExecutionProvider"],
                             "NopeExecutionProvider"),
    }


CASES = ["missing model", "not onnx", "corrupt onnx", "nothing to quantize", "empty text", "short text",
         "empty ids", "text without tokenizer", "ids outside vocab", "missing calib file", "no calib for gptq",
         "unsupported bits", "group size for ort", "3 bits as qdq", "output is input", "output dir missing",
         "output parent is a file", "unknown provider"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, tiny_llama_onnx, word_tokenizer, calib_ids, tmp_path, capsys):
    args, expected = _bad_cases(tiny_llama_onnx, tmp_path, word_tokenizer, calib_ids)[case]
    before = digest(tiny_llama_onnx)
    listing = sorted(p.name for p in tiny_llama_onnx.parent.iterdir())
    code, stdout, stderr = run_cli(capsys, *args, "-q")
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-gptq: error:"), stderr
    assert expected in lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "out.onnx").exists()
    assert not any(p.name.startswith(".onnx-gptq-") for p in tmp_path.iterdir())
    assert digest(tiny_llama_onnx) == before
    assert sorted(p.name for p in tiny_llama_onnx.parent.iterdir()) == listing


def test_console_script_exit_code(tmp_path):
    """The real process: exit status 2 and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "onnx_gptq.cli", str(tmp_path / "missing.onnx"), "--algo", "rtn",
                           "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"onnx-gptq: error: model '{tmp_path / 'missing.onnx'}' does not exist"
