"""The bench's children and what /proc says of them. `Processes` keeps every child of a run, so that one
`stop_all` in a `finally` leaves nothing behind; CPU time and RSS are read from /proc because the figures are
the process under test's, not the bench's."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, Self, TypeVar

from mitm_outpost.testing.processes import Child, wait_for_http

from . import ROOT

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

S = TypeVar("S", bound="Server")


class Server(Protocol):
    """A child, or a server with a runner of its own (the dev IdP)."""

    def start(self) -> Self: ...

    def stop(self) -> None: ...


class Processes:
    """Every process the run starts, stopped by `stop_all`: each `Child` in its own session (stopping it also
    stops its children, nginx's and Apache's workers), its log in the run's temp dir, cwd the checkout."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Server] = []

    def start(self, what: str, argv: list[str], env: Mapping[str, str] | None = None,
              port: int | None = None) -> Child:
        """Start `argv` (and, given `port`, wait until it listens)."""
        return self.adopt(Child(what, argv, port=port, cwd=ROOT, env=env, log_dir=self.log_dir))

    def adopt(self, server: S) -> S:
        """Start `server`, to be stopped with the others; the bench ends with its log's tail if it cannot."""
        self.children.append(server)
        try:
            return server.start()
        except RuntimeError as e:
            sys.exit(str(e))

    def stop(self, server: Server) -> None:
        server.stop()
        if server in self.children:
            self.children.remove(server)

    def stop_all(self) -> None:
        for server in reversed(self.children[:]):
            self.stop(server)


def wait_http(url: str, child: Child, expect: int = 200, timeout: float = 30) -> None:
    """Poll until `url` answers `expect`; the bench ends early, with the child's log, if it died."""
    try:
        wait_for_http(url, expect, proc=child.proc, what=child.what, log=child.log, timeout=timeout)
    except RuntimeError as e:
        sys.exit(str(e))


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (fields[1] is the parent's pid), None once it has gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of all its descendants: utime + stime, and cutime + cstime of the children
    it has reaped. Apache's work is done by the children of its master; a single-process server (mitmdump,
    the runner) has none, so for it this is its own time. (No /proc/<pid>/task/*/children here: /proc is
    walked.)"""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if fields := _stat_fields(p):
            total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
            todo += parents.get(p, [])
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
