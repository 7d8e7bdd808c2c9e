"""Child processes for tests and benchmarks: free ports, readiness, logs, and stopping every descendant.

Each child runs in its own session with its output in a log file, so that a failure can quote the
log's tail and stopping it also stops what it started (nginx workers, a supervisor's workers).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx2

STOP_TIMEOUT = 5.0


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


EPHEMERAL = _ephemeral_range()
_handed_out: set[int] = set()  # a port is given once per process: two free_port() calls before any bind differ


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (pass "" for every address: an outpost listens on all), from below the
    kernel's ephemeral range: a port the kernel picks for `bind(0)` it may also give, before the child
    binds it, to any outgoing connection (an "address already in use" now and then under load)."""
    for _ in range(200):
        port = random.randrange(max(1024, EPHEMERAL[0] - 20000), EPHEMERAL[0])
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # a crowded range: the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(log: Path, size: int = 4000) -> str:
    """The last `size` characters of `log` (about: read as bytes), "" when it cannot be read."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class NotReady(RuntimeError, TimeoutError):
    """Not ready in time: a RuntimeError like a child's early exit, and a TimeoutError to a caller that
    only asks whether something listens yet."""


def _wait(ready: Any, what: str, goal: str, proc: subprocess.Popen[Any] | None, log: Path | None,
          timeout: float) -> None:
    """Poll `ready()` until it is true; RuntimeError with the log's tail if `proc` exits or time runs out."""
    ending = f":\n{tail(log)}" if log is not None else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before {goal}{ending}")
        if ready():
            return
        time.sleep(0.05)
    raise NotReady(f"{what}: not {goal} after {timeout:g} s{ending}")


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_for_port(port: int, proc: subprocess.Popen[Any] | None = None, what: str = "process",
                  log: Path | None = None, timeout: float = 30.0) -> None:
    """Until something accepts connections on 127.0.0.1:`port`."""
    _wait(lambda: _listens(port), what, f"listening on {port}", proc, log, timeout)


def wait_for_http(url: str, expect: int | Collection[int] = 200, proc: subprocess.Popen[Any] | None = None,
                  what: str = "process", log: Path | None = None, timeout: float = 30.0) -> None:
    """Until a GET of `url` answers `expect` (a status or a set of them): listening is not serving yet."""
    statuses = {expect} if isinstance(expect, int) else set(expect)

    def answers() -> bool:
        try:
            return httpx2.get(url, timeout=1).status_code in statuses
        except httpx2.HTTPError:
            return False

    _wait(answers, what, f"answering {url} with {sorted(statuses)}", proc, log, timeout)


class Child:
    """A process in its own session, stdout and stderr in `log`; `start` waits for `port` when there is one.

    `args`, `port` and `env` (what is added to this process's environment) are read at `start`, so a
    caller may change them in between; a stopped child can be started again, its log goes on.
    """

    def __init__(self, what: str, args: Sequence[str], *, port: int | None = None,
                 cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                 log_dir: str | os.PathLike[str] | None = None) -> None:
        self.what, self.args, self.port, self.cwd, self.env = what, list(args), port, cwd, dict(env or {})
        fd, log = tempfile.mkstemp(prefix=f"outpost-{what.split()[0]}-", suffix=".log", dir=log_dir)
        os.close(fd)
        self.log = Path(log)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> Self:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.cwd, env={**os.environ, **self.env}, start_new_session=True)
        if self.port:
            try:
                wait_for_port(self.port, self.proc, self.what, self.log)
            except BaseException:
                self.stop()
                raise
        return self

    def output(self, size: int = 4000) -> str:
        """The tail of the log."""
        return tail(self.log, size)

    def stop(self) -> None:
        """SIGTERM to the process group; SIGKILL to whatever is left after STOP_TIMEOUT (or outlived the leader)."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):  # the whole group is gone
                break
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self.proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
