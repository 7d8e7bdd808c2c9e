"""The supervisor of `python -m mitm_outpost --workers N`: N worker processes on the same ports.

Each worker is the production runner started again with the same arguments and
`MITM_OUTPOST_WORKER` set (workers.py): it binds the outpost's ports with SO_REUSEPORT, so the
kernel spreads connections over the workers, and sessions are shared through the configured
store (Redis). The supervisor serves no traffic. It restarts a worker that dies (after a pause
that doubles while restarts keep failing), passes SIGHUP on (each worker reloads), and on
SIGTERM (or Ctrl-C) passes SIGTERM on and waits while the workers drain. A worker that fails
before the outpost was ever up is a configuration error: everything stops with its exit code
instead of restarting in a loop.

Metrics: the workers write theirs to files in a directory made for this supervisor
(prometheus-client's multiprocess mode), and the supervisor serves the metrics port for all of
them; its /ping answers 204 only while every worker is alive and reports itself ready.
"""

import asyncio
import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from mitmproxy import certs, exceptions
from mitmproxy.options import CONF_BASENAME, Options
from mitmproxy.optmanager import OptManager
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from . import metrics, workers
from .file_source import FileSource
from .listeners import Listeners
from .prometheus_metrics import WORKER_READY
from .registry import Registry

logger = logging.getLogger("mitm_outpost")

FIRST_RESTART_DELAY = 0.5  # seconds before a dead worker's replacement; doubled while they keep failing
MAX_RESTART_DELAY = 30.0
STABLE = 30.0  # seconds a worker must have run for the next restart to wait FIRST_RESTART_DELAY again
START_CHECK = 0.2  # seconds between the checks that every worker is ready, until the outpost is up
PORTS = ("outpost_http_port", "outpost_https_port", "metrics_port")
READY_METRIC = WORKER_READY.describe()[0].name


def options(setoptions: list[str]) -> OptManager:
    """The options the supervisor reads, parsed from the `--set` arguments as the workers will parse
    them (the others wait, unparsed, for the workers)."""
    opts = OptManager()
    loader: Any = opts  # add_option is all of a Loader these declarations use
    registry = Registry()  # a throwaway one: only the addons' option declarations are used
    for addon in (workers.Workers(), FileSource(registry), Listeners(registry)):
        addon.load(loader)
    metrics.add_options(loader)
    opts.set(*setoptions, defer=True)
    for name in PORTS:
        if not 0 <= getattr(opts, name) <= 65535:
            raise exceptions.OptionsError(f"{name}: a port number from 0 (off) to 65535")
    return opts


def check_ports_free(host: str, ports: list[int]) -> None:
    """Raises OSError (EADDRINUSE) when something listens on one of the ports already. Workers bind
    with SO_REUSEPORT, which would let a second outpost's workers join the first's silently."""
    for port in filter(None, ports):
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's listeners do
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)


def make_certificate_authority(setoptions: list[str]) -> None:
    """mitmproxy makes its CA in `confdir` at the first start. N workers starting at once would each write
    it, and one could read another's half-written key ("Unable to load PEM file"): the supervisor makes it
    once, as mitmproxy would, before any worker starts."""
    opts = Options()
    opts.set(*setoptions, defer=True)  # the outpost's own options wait, unparsed
    certs.CertStore.from_store(path=os.path.expanduser(opts.confdir), basename=CONF_BASENAME,
                               key_size=opts.key_size,
                               passphrase=opts.cert_passphrase.encode() if opts.cert_passphrase else None)


def supervise(argv: list[str], opts: OptManager, count: int, setoptions: list[str]) -> int:
    """Runs the workers until SIGTERM; the exit status."""
    try:
        workers.require_shared_store(opts.outpost_config, count)  # the workers check it too, at every reload
    except exceptions.OptionsError as e:
        print(f"mitm_outpost: {e}", file=sys.stderr)
        return 2
    try:
        make_certificate_authority(setoptions)
    except (OSError, ValueError, exceptions.OptionsError) as e:
        print(f"mitm_outpost: cannot make or read the certificate authority in confdir: {e}", file=sys.stderr)
        return 1
    try:
        check_ports_free(opts.outpost_listen_host, [opts.outpost_http_port, opts.outpost_https_port])
    except OSError as e:
        print(f"mitm_outpost: cannot listen on the outpost's ports: {e.strerror}", file=sys.stderr)
        return 1
    directory = tempfile.mkdtemp(prefix="mitm-outpost-metrics-")
    try:
        command = [sys.executable, "-m", "mitm_outpost", *argv]
        return asyncio.run(Supervisor(command, count, opts, directory).run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal
        return f"signal {number}"


class Supervisor:
    def __init__(self, command: list[str], count: int, opts: OptManager, directory: str) -> None:
        self.command, self.count, self.opts, self.directory = command, count, opts, directory
        self.running: dict[int, asyncio.subprocess.Process] = {}  # slot -> its live worker
        self.up = False  # every worker has been ready once: from then on a worker that fails is restarted
        self.stopping = asyncio.Event()
        self.status = 0
        self.collected = CollectorRegistry()
        MultiProcessCollector(self.collected, path=directory)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, 0, sig.name)
        server = None
        if self.opts.metrics_port:
            try:
                server = await metrics.serve(self.opts.metrics_listen_host, self.opts.metrics_port,
                                             lambda: generate_latest(self.collected), self.ready)
            except OSError as e:
                print(f"mitm_outpost: cannot listen on metrics_port {self.opts.metrics_port}: {e.strerror}",
                      file=sys.stderr)
                return 1
        logger.info("supervisor: starting %d workers", self.count)
        slots = [loop.create_task(self.keep(slot)) for slot in range(self.count)]
        watch = loop.create_task(self.watch_start())
        await asyncio.gather(*slots)
        watch.cancel()
        if server is not None:
            server.close()
        logger.info("supervisor: every worker has exited")
        return self.status

    async def keep(self, slot: int) -> None:
        """One worker's place: started, waited for, started again, until the supervisor stops."""
        delay = FIRST_RESTART_DELAY
        while not self.stopping.is_set():
            began = time.monotonic()
            env = {**os.environ, workers.WORKER_ENV: str(slot + 1), "PROMETHEUS_MULTIPROC_DIR": self.directory}
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which drains the workers.
            worker = await asyncio.create_subprocess_exec(*self.command, env=env, stdin=subprocess.DEVNULL,
                                                          process_group=0)
            self.running[slot] = worker
            logger.info("worker %d started (pid %d)", slot + 1, worker.pid)
            if self.stopping.is_set():  # the signal came while it was being started
                worker.send_signal(signal.SIGTERM)
            code = await worker.wait()
            del self.running[slot]
            mark_process_dead(worker.pid, self.directory)
            if self.stopping.is_set():
                if code > 0:
                    self.status = self.status or 1
                return
            if code > 0 and not self.up:
                logger.error("worker %d exited with %d before the outpost was up: stopping", slot + 1, code)
                self.stop(code)
                return
            if time.monotonic() - began >= STABLE:
                delay = FIRST_RESTART_DELAY
            how = f"exited with {code}" if code >= 0 else f"was killed by {signal_name(-code)}"
            logger.error("worker %d (pid %d) %s: a new one in %.1f s", slot + 1, worker.pid, how, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)

    async def watch_start(self) -> None:
        while not self.ready():
            await asyncio.sleep(START_CHECK)
        self.up = True
        logger.info("supervisor: %d workers ready", self.count)

    def ready_pids(self) -> set[int]:
        """The workers whose last report says ready (their gauge files; a dead worker's are removed)."""
        files = glob.glob(os.path.join(self.directory, "gauge_liveall_*.db"))
        return {int(sample.labels["pid"]) for metric in MultiProcessCollector.merge(files)
                if metric.name == READY_METRIC for sample in metric.samples if sample.value == 1}

    def ready(self) -> bool:
        if self.stopping.is_set() or len(self.running) < self.count:
            return False
        return {worker.pid for worker in self.running.values()} <= self.ready_pids()

    def signal_all(self, sig: int) -> None:
        for worker in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(sig)

    def reload(self) -> None:
        logger.info("SIGHUP: passed on to %d workers", len(self.running))
        self.signal_all(signal.SIGHUP)

    def stop(self, status: int, why: str = "a worker failed") -> None:
        if self.stopping.is_set():
            return
        logger.info("%s: stopping the workers (%d running)", why, len(self.running))
        self.status = status
        self.stopping.set()
        self.signal_all(signal.SIGTERM)
