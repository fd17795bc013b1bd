"""Local server processes: start in their own process group, wait for health, stop by group, never a stranger.

The local stack (SeaweedFS, MLflow) and TorchServe are supervised the same way. Each server starts in a
new session, so its children (uvicorn, java, python workers) share one process group that a stop signals
as a whole, never processes by name. A record keeps the group leader's PID with its kernel start time:
a PID the kernel has handed to another process since is recognised and never signalled. Linux only
(it reads /proc). Standard library only: the test fixtures import it cheaply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "Supervised",
    "SupervisorError",
    "group_members",
    "launch",
    "recycled",
    "running",
    "start_time",
    "stop",
    "tail",
    "wait",
    "wait_ready",
]

log = logging.getLogger(__name__)


class SupervisorError(RuntimeError):
    """A process group survived SIGKILL; the message names the group to inspect."""


@dataclass(frozen=True)
class Supervised:
    """A process group we started: the leader's PID (= the group id) and its kernel start time then."""

    pid: int
    start_time: int | None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state, 2 = pgrp, 19 = starttime)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Kernel start time of a live (non-zombie) process: with the PID it identifies one process for ever."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat and stat[0] not in ("Z", "X") else None


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (zombies excluded: they are gone, only not yet reaped)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[0] not in ("Z", "X") and int(stat[2]) == pgid:
                members.append(int(entry.name))
    return members


def recycled(rec: Supervised) -> bool:
    """The leader's PID now belongs to another process (its start time differs from the recorded one)."""
    now = start_time(rec.pid)
    return now is not None and now != rec.start_time


def running(rec: Supervised) -> bool:
    """Our group still has live members. Members outlive a dead leader only as our own orphans: Linux never
    hands out a PID equal to an existing process group id, so a group without its leader is still ours."""
    return not recycled(rec) and bool(group_members(rec.pid))


def wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Poll ``predicate`` until true (True) or ``timeout`` seconds passed (False): a health check, not a sleep."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, indented, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join("    " + line for line in text)


def launch(
    cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path, append: bool = True
) -> tuple[subprocess.Popen[bytes], Supervised]:
    """Start ``cmd`` in a new session (its own process group), stdout and stderr to ``log``."""
    with open(log, "ab" if append else "wb") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, Supervised(proc.pid, start_time(proc.pid))


def wait_ready(
    healthy: Callable[[], bool], alive: Callable[[], bool], timeout: float
) -> Literal["healthy", "exited", "timeout"]:
    """Wait until the server answers its health check, exits, or ``timeout`` seconds pass."""
    wait(lambda: not alive() or healthy(), timeout, interval=0.5)
    if not alive():
        return "exited"
    return "healthy" if healthy() else "timeout"


def stop(rec: Supervised, name: str, timeout: float = 20.0, child: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM the group, SIGKILL after ``timeout``; True if something of ours was stopped.

    A recycled leader PID is logged and left alone. ``child``: our own Popen of the leader, reaped while
    waiting so it does not linger as a zombie.
    """
    if recycled(rec):
        log.warning("pid %d is no longer our %s (the PID was reused): not signalling it", rec.pid, name)
        return False
    if not group_members(rec.pid):
        return False

    def gone() -> bool:
        if child is not None:
            child.poll()
        return not group_members(rec.pid)

    _signal_group(rec.pid, signal.SIGTERM)
    if not wait(gone, timeout):
        log.warning("%s (pgid %d) ignored SIGTERM for %.0f s: sending SIGKILL", name, rec.pid, timeout)
        _signal_group(rec.pid, signal.SIGKILL)
        if not wait(gone, 10.0):
            raise SupervisorError(f"{name} (process group {rec.pid}) survived SIGKILL; check `ps -g {rec.pid}`")
    log.info("stopped %s (pgid %d)", name, rec.pid)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
