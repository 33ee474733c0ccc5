"""The staging directory: where a run writes everything before its output is complete.

One private directory beside the output per run (packed weights, the output
while it is written), removed at the end whatever happens; it records its
owner process so a later run can remove what a killed one left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from onnx_gptq.errors import OutputError

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".onnx-gptq-"
# Who made a staging directory: "pid start-time host", so a later run can tell
# a dead owner's leftovers (SIGKILL, power loss) from a concurrent run's.
OWNER_FILE = "owner"


def _process_start_time(pid: int) -> float | None:
    """When process `pid` started (None: no such process)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # another user's process: alive, start time unknown
        return -1.0


def _owner_is_dead(directory: Path) -> bool:
    """Whether the process recorded in staging `directory` is gone (False when unsure)."""
    try:
        pid_text, started_text, host = (directory / OWNER_FILE).read_text().split(maxsplit=2)
        pid, started = int(pid_text), float(started_text)
    except (OSError, ValueError):
        return False  # not ours, or being created right now: leave it
    if host.strip() != socket.gethostname():
        return False  # a shared filesystem: that host's processes are not visible here
    now_started = _process_start_time(pid)
    # A live pid with another start time is a reused pid: the owner is dead.
    return now_started is None or (now_started >= 0 and abs(now_started - started) > 1.0)


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove staging directories in `directory` whose owner process is dead.

    Returns:
        The directories removed.
    """
    removed = []
    for candidate in directory.glob(f"{STAGING_PREFIX}*"):
        if candidate.is_dir() and not candidate.is_symlink() and _owner_is_dead(candidate):
            shutil.rmtree(candidate, ignore_errors=True)
            logger.info("removed '%s', left behind by a process that is gone", candidate)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def staging_dir(path: Path) -> Iterator[Path]:
    """A private directory beside `path` for everything written before the output is complete.

    Removed on exit, whether the run succeeded or not (the CLI turns SIGTERM
    and SIGHUP into exceptions so that this runs for them too). It records its
    owner process; stale directories of dead owners beside `path` are removed
    first.
    """
    directory = path.parent if str(path.parent) else Path(".")
    remove_stale_staging(directory)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    except OSError as exc:
        raise OutputError(f"cannot write in '{directory}': {exc.strerror or exc}") from None
    try:
        started = _process_start_time(os.getpid())
        (tmp / OWNER_FILE).write_text(f"{os.getpid()} {started} {socket.gethostname()}\n")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["OWNER_FILE", "STAGING_PREFIX", "remove_stale_staging", "staging_dir"]
