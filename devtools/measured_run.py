"""Child processes the benchmarks time and weigh: wall time and peak RSS of one command.

A benchmark row runs each measured step (a quantizer, a builder, a timing
loop) in a process of its own, so one row's memory never counts against the
next. :func:`run_measured` waits for the child with ``os.wait4``, whose
``ru_maxrss`` belongs to that child alone (``getrusage(RUSAGE_CHILDREN)`` keeps
the largest of all children so far). A Python child that wants to report
numbers prints one line marked with :data:`RESULT_MARK` (:func:`emit_result`),
since libraries may print to stdout too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Prefix of the one stdout line a child reports its numbers on.
RESULT_MARK = "@@bench result: "


def peak_rss_mb() -> float:
    """This process's peak resident set, in MiB.

    VmHWM belongs to the address space created at exec, whereas getrusage's
    ru_maxrss survives exec and would report the parent's peak if it was larger.

    Returns:
        MiB.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def emit_result(values: Mapping[str, Any]) -> None:
    """Print `values` as the child's marked result line (stdout is the child's report channel)."""
    sys.stdout.write(RESULT_MARK + json.dumps(dict(values)) + "\n")
    sys.stdout.flush()


class ChildFailed(RuntimeError):
    """A child exited non-zero or reported nothing; `reason` is the last line of its stderr."""

    def __init__(self, what: str, stderr: str) -> None:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        self.reason = lines[-1].strip() if lines else "no output"
        super().__init__(f"{what} failed:\n{stderr[-3000:]}")


@dataclasses.dataclass(frozen=True)
class MeasuredRun:
    """What one child did.

    Attributes:
        returncode: its exit status.
        seconds: wall time from start to exit.
        peak_rss_mb: its ``ru_maxrss`` (MiB) as ``wait4`` reports it.
        stdout: everything it printed.
        stderr: everything it logged.
    """

    returncode: int
    seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str

    def result(self, what: str) -> dict[str, Any]:
        """The marked result line of a child that used :func:`emit_result`.

        Args:
            what: the step, for the error message.
        Returns:
            The decoded values.
        Raises:
            ChildFailed: it exited non-zero or printed no result line.
        """
        if self.returncode != 0:
            raise ChildFailed(what, self.stderr or self.stdout)
        lines = [ln[len(RESULT_MARK):] for ln in self.stdout.splitlines() if ln.startswith(RESULT_MARK)]
        if not lines:
            raise ChildFailed(what, f"no result line in its output:\n{self.stdout[-2000:]}\n{self.stderr}")
        return json.loads(lines[-1])

    def check(self, what: str) -> MeasuredRun:
        """Self, or ChildFailed when the child exited non-zero."""
        if self.returncode != 0:
            raise ChildFailed(what, self.stderr or self.stdout)
        return self


#: Runs argv[2:] and writes its ru_maxrss (KiB) to the file argv[1]. The measured command is
#: started from this small process, not from the benchmark: a child's ru_maxrss starts from
#: the address space it was spawned from, and the benchmark's may be far larger.
_TRAMPOLINE = """import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(command: Sequence[str], *, env: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> MeasuredRun:
    """Run `command` to its end, measuring its wall time and peak RSS.

    Args:
        command: argv of the child (found on PATH when not a path).
        env: its environment (default: ours).
        timeout: seconds before it and its children are killed (returncode then non-zero).
    Returns:
        A :class:`MeasuredRun`.
    """
    with tempfile.TemporaryDirectory(prefix="measured-") as scratch:
        rss_file = os.path.join(scratch, "maxrss")
        out_path, err_path = os.path.join(scratch, "out"), os.path.join(scratch, "err")
        with open(out_path, "w") as out, open(err_path, "w") as err:
            start = time.perf_counter()
            child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _TRAMPOLINE, rss_file, *command],
                                     stdout=out, stderr=err, env=None if env is None else dict(env),
                                     start_new_session=True)
            try:
                child.wait(timeout=timeout)
            except BaseException as exc:  # a timeout, or Ctrl-C (which reaches our group, not the child's)
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                if not isinstance(exc, subprocess.TimeoutExpired):
                    raise
            seconds = time.perf_counter() - start
        peak = float(Path(rss_file).read_text()) / 1024.0 if os.path.exists(rss_file) else 0.0
        return MeasuredRun(child.returncode, seconds, peak, Path(out_path).read_text(errors="replace"),
                           Path(err_path).read_text(errors="replace"))


def python_env(*paths: str) -> dict[str, str]:
    """Our environment with `paths` put in front of PYTHONPATH (a child imports this checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


__all__ = ["ChildFailed", "MeasuredRun", "RESULT_MARK", "emit_result", "peak_rss_mb", "python_env",
           "run_measured"]
