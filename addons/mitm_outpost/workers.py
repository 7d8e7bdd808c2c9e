"""The worker side of `python -m mitm_outpost --workers N` (the supervisor is supervisor.py).

A worker is the ordinary production runner, started by the supervisor with `MITM_OUTPOST_WORKER`
set. Only there do the outpost's listeners use SO_REUSEPORT, so that N workers share one port and
the kernel spreads connections over them; a single process binds without it, and a second outpost
started by mistake on the same port still fails with EADDRINUSE.

The Workers addon declares `outpost_workers` and keeps what N processes need true: they share
sessions only through a shared store, so a memory store is refused at start and on every reload.
"""

import asyncio
import logging
import os
import signal
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from . import config_schema

logger = logging.getLogger("mitm_outpost")

WORKER_ENV = "MITM_OUTPOST_WORKER"  # set by the supervisor: the worker's number, from 1
PARENT_CHECK = 1.0  # seconds between checks that the supervisor is still there


def is_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def reuse_port() -> bool:
    """SO_REUSEPORT for the outpost's listeners: in a worker only (see the module docstring)."""
    return is_worker()


def count(value: str) -> int:
    """`outpost_workers` as a number of processes: a positive integer, or `auto` (one per usable core)."""
    if value == "auto":
        return getattr(os, "process_cpu_count", os.cpu_count)() or 1
    if not value.isdigit() or int(value) < 1:
        raise exceptions.OptionsError(f"outpost_workers: a number of processes (1 or more) or auto, not {value!r}")
    return int(value)


def require_shared_store(config: str, workers: int) -> None:
    """Raises OptionsError when the configuration would give each of the workers its own sessions.

    A file that does not parse is FileSource's to report, with its own message."""
    path = Path(config).expanduser()
    if os.environ.get("AUTHENTIK_HOST") and not path.exists():
        store = "memory"  # providers from authentik only: the default store
    else:
        try:
            store = config_schema.load(path).session_store
        except config_schema.ConfigError:
            return
    if store == "memory":
        raise exceptions.OptionsError(
            f"outpost_workers: {workers} worker processes need a shared session store, and the session store is memory "
            f"(each worker would keep its own sessions): set `session_store: redis://...` in the outpost section of "
            f"{path}, or run one worker")


class Workers:
    """Before FileSource in the chain: a reload to a memory store is refused before it is read."""

    def __init__(self) -> None:
        self.watch: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option("outpost_workers", str, "1",
                          "Processes of the production runner serving the same ports: a number, or auto (one per "
                          "core). More than 1 needs a shared session store (session_store: redis://...).")

    def configure(self, updated: set[str]) -> None:
        if updated & {"outpost_workers", "outpost_config"} and (n := count(ctx.options.outpost_workers)) > 1:
            require_shared_store(ctx.options.outpost_config, n)

    def running(self) -> None:
        if is_worker():
            self.watch = asyncio.get_running_loop().create_task(self.watch_supervisor(os.getppid()))

    def done(self) -> None:
        if self.watch is not None:
            self.watch.cancel()

    async def watch_supervisor(self, parent: int) -> None:
        """Workers run in their own process group (a terminal's Ctrl-C goes to the supervisor, which
        drains them): one whose supervisor was killed outright drains and exits instead of
        holding the port alone."""
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_CHECK)
        logger.error("the supervisor (pid %d) is gone: this worker drains and exits", parent)
        os.kill(os.getpid(), signal.SIGTERM)
