"""The real process: SIGINT, SIGTERM and SIGHUP mid-run, stale staging directories, held warnings.

A wrapper script slows the solver down (or makes the run fail after a
RuntimeWarning), so the signal arrives while the staging directory exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from onnx_gptq import staging
from onnx_gptq.cli import main
from tests.conftest import _exported

WRAPPER = textwrap.dedent('''
    import os, signal, sys, time, warnings
    import onnx_gptq.solve, onnx_gptq.targets
    from onnx_gptq.cli import main
    from onnx_gptq.errors import ModelError

    # As in a terminal: a job started in the background by a non-interactive
    # shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    real_solve = onnx_gptq.solve.solve

    def slow_solve(*args, **kwargs):
        open(os.environ["SOLVING_MARK"], "w").close()  # the staging directory exists now
        time.sleep(60)
        return real_solve(*args, **kwargs)

    def warn_then_fail(*args, **kwargs):
        warnings.warn("invalid value encountered in divide", RuntimeWarning)
        raise ModelError("model 'x.onnx': the real error")

    if os.environ.get("MODE") == "fail":
        onnx_gptq.targets.find_targets = warn_then_fail
    else:
        onnx_gptq.solve.solve = slow_solve
    sys.exit(main())
''')


@pytest.fixture
def wrapper(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wrapper script, a directory holding model.onnx); one exporter is enough here."""
    tiny_llama_onnx = _exported(tmp_path_factory, "llama", True)
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    work = tmp_path / "work"
    work.mkdir()
    onnx.save(onnx.load(tiny_llama_onnx), work / "model.onnx")
    return script, work


def _environment(**extra: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root, **extra}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_mid_run_removes_staging(signum, wrapper, tmp_path):
    script, work = wrapper
    mark = tmp_path / "solving"
    proc = subprocess.Popen([sys.executable, str(script), str(work / "model.onnx"), "-o", str(work / "q.onnx"),
                             "--algo", "rtn", "--group-size", "32"],
                            env=_environment(SOLVING_MARK=str(mark)), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not mark.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        assert any(p.name.startswith(".onnx-gptq-") for p in work.iterdir())
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx"]  # no staging dir, no output
    # On a line of its own, even after a progress bar.
    expected = "interrupted (SIGINT)" if signum == signal.SIGINT else f"stopped by {signum.name}"
    assert f"onnx-gptq: {expected}; nothing was written" in stderr.splitlines()


def test_runtime_warnings_do_not_precede_the_error(wrapper):
    script, work = wrapper
    proc = subprocess.run([sys.executable, str(script), str(work / "model.onnx"), "-o", str(work / "q.onnx"),
                           "--algo", "rtn"], env=_environment(MODE="fail"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "onnx-gptq: error: model 'x.onnx': the real error"


def _staging(directory: Path, name: str, owner: str | None) -> Path:
    path = directory / f"{staging.STAGING_PREFIX}{name}"
    path.mkdir()
    (path / "packed_weights.bin").write_bytes(b"\0" * 64)
    if owner is not None:
        (path / staging.OWNER_FILE).write_text(owner)
    return path


def test_stale_staging_of_dead_owners_is_removed(tiny_llama_onnx, tmp_path, capsys):
    import socket

    import psutil

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    me = psutil.Process(os.getpid())
    stale = _staging(tmp_path, "dead", f"{dead_pid} 1.0 {host}\n")
    reused = _staging(tmp_path, "reused", f"{os.getpid()} {me.create_time() - 1000} {host}\n")  # pid reused since
    live = _staging(tmp_path, "live", f"{os.getpid()} {me.create_time()} {host}\n")
    elsewhere = _staging(tmp_path, "elsewhere", f"{dead_pid} 1.0 {host}-other-machine\n")
    unknown = _staging(tmp_path, "unknown", None)
    if psutil.pid_exists(dead_pid):
        pytest.skip("the dead process's pid was reused already")
    code = main([str(tiny_llama_onnx), "-o", str(tmp_path / "q.onnx"), "--algo", "rtn", "--group-size", "32", "-q"])
    assert code == 0, capsys.readouterr().err
    assert not stale.exists() and not reused.exists()
    assert live.exists() and elsewhere.exists() and unknown.exists()
    assert (tmp_path / "q.onnx").exists()


def test_staging_records_its_owner(tmp_path):
    import psutil

    with staging.staging_dir(tmp_path / "out.onnx") as directory:
        pid, started, _ = (directory / staging.OWNER_FILE).read_text().split()
        assert int(pid) == os.getpid()
        assert abs(float(started) - psutil.Process().create_time()) < 1e-3
        assert staging.remove_stale_staging(tmp_path) == []
    assert not directory.exists()
