"""Paths a run writes, option values and external data: all refused before any work.

Each case: exit code 2, one line on stderr naming the option or file, nothing
written anywhere (same directory listing), inputs byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_gptq import model_io
from onnx_gptq.cli import main
from tests.conftest import _exported


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with its sha256 (links by their target's content)."""
    return {str(p.relative_to(directory)): digest(p) if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


@pytest.fixture
def work(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """tmp_path holding model.onnx (embedded weights) and ext.onnx + ext.weights (external data)."""
    tiny_llama_onnx = _exported(tmp_path_factory, "llama", True)  # one exporter is enough here
    proto = onnx.load(tiny_llama_onnx)
    onnx.save(proto, tmp_path / "model.onnx")
    onnx.save(proto, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.weights", size_threshold=0)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 256, size=(4, 16), dtype=np.int64))
    os.symlink(tmp_path / "model.onnx", tmp_path / "link.onnx")
    return tmp_path


def _external_to(path: Path, location: str) -> None:
    """Rewrite every external data location of `path` (the weights themselves stay put)."""
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)


RTN = ["--algo", "rtn", "--group-size", "32"]


def _report(path: str, model: str = "model.onnx") -> list[str]:
    return [model, "-o", "out.onnx", *RTN, "--report", path]


CASES = {
    "report is the input": (_report("model.onnx"), "report 'model.onnx' is the input model"),
    "report links to the input": (_report("link.onnx"), "report 'link.onnx' is the input model"),
    "report is the output": (_report("out.onnx"), "report 'out.onnx' is the output model"),
    "report is the output's data": (_report("out.onnx.data"), "report 'out.onnx.data' is the output's data file"),
    "report is the input's data": (_report("ext.weights", "ext.onnx"),
                                   "report 'ext.weights' is the input's external data"),
    "report in a missing directory": (_report("no/r.json"), "report directory 'no' does not exist"),
    "report is a directory": (_report("."), "report '.' is a directory"),
    "output links to the input": (["model.onnx", "-o", "link.onnx", *RTN], "is the input model"),
    "output is the input's data": (["ext.onnx", "-o", "ext.weights", *RTN],
                                   "output 'ext.weights' is the input's external data"),
    "invalid include": (["model.onnx", "-o", "out.onnx", *RTN, "--include", "["],
                        "include: '[' is not a valid regular expression"),
    "invalid exclude": (["model.onnx", "-o", "out.onnx", *RTN, "--exclude", "(?P<"],
                        "exclude: '(?P<' is not a valid regular expression"),
    "unknown device": (["model.onnx", "-o", "out.onnx", *RTN, "--device", "tpu9"],
                       "device: 'tpu9' is not a torch device"),
    "negative seed": (["model.onnx", "-o", "out.onnx", "--calib", "ids.npy", "--seed", "-1"],
                      "seed: -1 must be zero or positive"),
    "no jobs": (["model.onnx", "-o", "out.onnx", *RTN, "--jobs", "0"], "jobs: 0 must be a positive integer"),
    "include matches nothing": (["model.onnx", "-o", "out.onnx", *RTN, "--include", "no_such_layer"],
                                "include: 'no_such_layer' matched no layer"),
    "empty jsonl": (["model.onnx", "-o", "out.onnx", "--calib", "empty.jsonl"],
                    "calibration file 'empty.jsonl' is empty"),
    "external data missing": (["ext.onnx", "-o", "out.onnx", *RTN], "external data file 'gone.bin'"),
    "external data outside": (["ext.onnx", "-o", "out.onnx", *RTN], "points outside the model's directory"),
    "external data truncated": (["ext.onnx", "-o", "out.onnx", *RTN], "is shorter than tensor"),
}
if not __import__("torch").cuda.is_available():
    CASES["cuda without a GPU"] = (["model.onnx", "-o", "out.onnx", *RTN, "--device", "cuda"],
                                   "device: 'cuda' asked for, but torch sees no CUDA GPU")


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_before_any_work(case, work, capsys, monkeypatch):
    args, expected = CASES[case]
    if case == "external data missing":
        _external_to(work / "ext.onnx", "gone.bin")
    elif case == "external data outside":
        (work.parent / f"{work.name}-outside.bin").write_bytes((work / "ext.weights").read_bytes())
        _external_to(work / "ext.onnx", f"../{work.name}-outside.bin")
    elif case == "external data truncated":
        data = work / "ext.weights"
        data.write_bytes(data.read_bytes()[:1000])
    monkeypatch.chdir(work)
    before = snapshot(work)
    code = main([*args, "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-gptq: error: "), err
    assert expected in lines[0], lines[0]
    assert snapshot(work) == before  # nothing written, inputs unchanged


def test_output_data_never_replaces_the_input_data(work, capsys, monkeypatch):
    """A renamed model quantized back to its old name: its data file is `<output>.data`."""
    proto = onnx.load(work / "model.onnx")
    onnx.save(proto, work / "renamed.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="q.onnx.data", size_threshold=0)
    weights = digest(work / "q.onnx.data")
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 0)  # make the small output external too
    code = main([str(work / "renamed.onnx"), "-o", str(work / "q.onnx"), *RTN, "-q"])
    assert code == 0, capsys.readouterr().err
    assert digest(work / "q.onnx.data") == weights
    out = onnx.load(work / "q.onnx", load_external_data=False)
    locations = {e.value for t in out.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"q.onnx.1.data"}
    onnx.load(work / "renamed.onnx")  # the input still loads, weights and all
    assert not any(p.name.startswith(".onnx-gptq-") for p in work.iterdir())


def test_report_is_written_when_paths_are_fine(work, capsys):
    code = main([str(work / "ext.onnx"), "-o", str(work / "out.onnx"), *RTN, "--report", str(work / "r.json"),
                 "-q"])
    assert code == 0, capsys.readouterr().err
    assert (work / "r.json").read_text().startswith("{") and (work / "out.onnx").exists()


def test_package_exports_quantize(work):
    import onnx_gptq

    out = onnx_gptq.quantize(str(work / "model.onnx"), config=onnx_gptq.QuantConfig(algo="rtn", group_size=32),
                             output=str(work / "api.onnx"))
    assert Path(out) == work / "api.onnx" and (work / "api.onnx").exists()
    result, report = onnx_gptq.quantize_with_report(onnx.load(work / "model.onnx"),
                                                    config=onnx_gptq.QuantConfig(algo="rtn", group_size=32))
    assert isinstance(result, onnx.ModelProto) and len(report.layers) == 15  # with the head
