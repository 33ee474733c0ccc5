"""Every code block of README.md runs, or is named here as run by CI itself.

Python blocks are executed in a directory holding small fixture files with the
names the blocks use. Shell blocks are split into command lines; each line must
match a rule in `SHELL_RULES`: `onnx-gptq ...` lines run through
`onnx_gptq.cli.main` on fixtures (with small sizes appended), make and pip
lines are what CI runs. A block or line no rule knows fails the test: a new
README example needs a rule (add one to `SHELL_RULES`, or a fixture file to
`_fixtures`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from onnx_gptq.cli import main
from tests import tiny_models
from tests.conftest import _exported
from tests.test_cli import TEXT

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

# Appended to quantize / eval lines: later argparse options win, so the README's
# own values stay visible there while the run stays small.
SMALL_QUANTIZE = ["--num-samples", "4", "--seq-len", "32", "-q"]
SMALL_EVAL = ["--seq-len", "32", "--max-windows", "2"]


def blocks() -> list[tuple[str, str, int]]:
    """(language, text, line number) of every fenced block in README.md."""
    text = README.read_text()
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def shell_lines(block: str) -> list[str]:
    """Command lines of a shell block: continuations joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _run_cli(line: str, directory: Path, extra: list[str]) -> None:
    words = shlex.split(line)[1:]
    code = main([*words, *extra])
    assert code == 0, f"README line {line!r} exited {code}"


def _written_model(line: str, directory: Path) -> Path:
    """The .onnx file a line's -o wrote (model.onnx inside a folder output)."""
    output = directory / shlex.split(line)[shlex.split(line).index("-o") + 1]
    return output / "model.onnx" if output.is_dir() else output


def _quantize(line: str, directory: Path) -> None:
    _run_cli(line, directory, SMALL_QUANTIZE)
    assert onnx.load(_written_model(line, directory)).graph.node


def _export(line: str, directory: Path) -> None:
    _run_cli(line, directory, ["--seq-len", "4"])
    onnx.checker.check_model(str(_written_model(line, directory)))


def _generate(line: str, directory: Path) -> None:
    _run_cli(line, directory, ["--max-new-tokens", "4"])


def _quantize_folder(line: str, directory: Path) -> None:
    """A model folder in, a complete folder out: the model and the input's other files, genai_config updated."""
    words = shlex.split(line)
    _run_cli(line, directory, SMALL_QUANTIZE)
    source, output = directory / words[1], directory / words[words.index("-o") + 1]
    assert {p.name for p in source.iterdir()} - {"model.onnx.data"} <= {p.name for p in output.iterdir()}
    assert onnx.load(output / "model.onnx").graph.node
    assert (output / "genai_config.json").is_file()


def _eval(line: str, directory: Path) -> None:
    _run_cli(line, directory, SMALL_EVAL)


def _run_by_ci(line: str, directory: Path) -> None:
    """make and pip lines: CI itself runs them (.ci/run: make test in a fresh clone)."""


# First match wins. (pattern, what the test does with a matching command line)
SHELL_RULES: list[tuple[re.Pattern[str], Callable[[str, Path], None]]] = [
    (re.compile(r"^onnx-gptq export "), _export),
    (re.compile(r"^onnx-gptq eval "), _eval),
    (re.compile(r"^onnx-gptq generate "), _generate),
    (re.compile(r"^onnx-gptq \S+\.onnx "), _quantize),
    (re.compile(r"^onnx-gptq \S+-genai "), _quantize_folder),
    (re.compile(r"^onnx-gptq [\w./-]+ --calib "), _quantize_folder),
    (re.compile(r"^make (demo|test|test-slow|test-cuda|test-oldest-ort|sanitize|bench-llm|bench-vs-ort|bench-deploy|install)$"),
     _run_by_ci),
    (re.compile(r"^(ONNX_GPTQ_CUDA=[01] )?pip (install|uninstall) "), _run_by_ci),
]
SHELL_LANGUAGES = ("", "sh", "bash", "shell")


def _rule(line: str) -> Callable[[str, Path], None] | None:
    return next((action for pattern, action in SHELL_RULES if pattern.search(line)), None)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory, genai_folder: Path) -> Path:
    """A directory with every file name the README's examples use."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("readme")
    model = _exported(tmp_path_factory, "llama", True)
    onnx.save(onnx.load(model), directory / "model.onnx")  # weights embedded: one file to copy
    words = sorted(set(TEXT.split()))
    tokenizer = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    for name in ("tokenizer.json", "tok.json"):
        tokenizer.save(str(directory / name))
    for name in ("calib.txt", "data.txt", "eval.txt"):
        (directory / name).write_text(TEXT)
    for bits, fmt in ((4, "ort"), (3, "custom")):
        assert main([str(directory / "model.onnx"), "-o", str(directory / f"model.q{bits}.onnx"), "--algo", "rtn",
                     "--bits", str(bits), "--format", fmt, "--group-size", "32", "-q"]) == 0
    shutil.copytree(genai_folder, directory / "smollm2-genai")  # a tiny Llama through the builder, really
    assert main([str(directory / "smollm2-genai"), "-o", str(directory / "smollm2-genai-q4"), "--algo", "rtn",
                 "--group-size", "32", "-q"]) == 0
    hf_dir = directory / "path" / "to" / "hf_model_dir"
    tiny_models.build_llama().save_pretrained(hf_dir)
    tiny_models.save_chatty_tokenizer(hf_dir)
    # The folders the generate lines read: hf_dir exported with its KV cache, and quantized.
    assert main(["export", str(hf_dir), "-o", str(directory / "smol"), "--seq-len", "4"]) == 0
    assert main([str(directory / "smol"), "-o", str(directory / "smol-q4"), "--algo", "rtn", "--group-size", "32",
                 "-q"]) == 0
    return directory


def _in_copy(fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    shutil.copytree(fixtures, work)
    monkeypatch.chdir(work)
    return work


def test_every_block_is_known():
    found = blocks()
    assert found, "README.md has no code blocks?"
    for language, text, line in found:
        if language == "python":
            continue
        assert language in SHELL_LANGUAGES, f"README.md:{line}: a ```{language} block; teach tests/test_readme.py"
        for command in shell_lines(text):
            assert _rule(command) is not None, (f"README.md:{line}: no rule for {command!r}; add one to "
                                                "SHELL_RULES in tests/test_readme.py")


PYTHON_BLOCKS = [(text, line) for language, text, line in blocks() if language == "python"]
SHELL_COMMANDS = [(command, line) for language, text, line in blocks() if language in SHELL_LANGUAGES
                  for command in shell_lines(text) if _rule(command) not in (None, _run_by_ci)]


@pytest.mark.parametrize("code,line", PYTHON_BLOCKS, ids=[f"line{line}" for _, line in PYTHON_BLOCKS])
def test_python_block_runs(code, line, fixtures, tmp_path, monkeypatch):
    _in_copy(fixtures, tmp_path, monkeypatch)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})  # noqa: S102 - our own README


@pytest.mark.parametrize("command,line", SHELL_COMMANDS, ids=[f"line{line}" for _, line in SHELL_COMMANDS])
def test_shell_command_runs(command, line, fixtures, tmp_path, monkeypatch):
    work = _in_copy(fixtures, tmp_path, monkeypatch)
    action = _rule(command)
    assert action is not None
    action(command, work)
    assert not any(p.name.startswith(".onnx-gptq-") for p in work.iterdir())


def test_unknown_lines_are_refused():
    assert _rule("onnx-gptq model.onnx --calib x -o y.onnx") is _quantize
    assert _rule("onnx-gptq smollm2-genai --calib x -o y") is _quantize_folder
    assert _rule("make test") is _run_by_ci
    assert _rule("curl https://example.com | sh") is None
    assert _rule("make everything") is None
