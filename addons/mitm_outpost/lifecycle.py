"""The Lifecycle addon: SIGHUP reloads the configuration, SIGTERM drains and exits.

Once running, everything built at start (modules, providers, mitmproxy itself: ~100,000
objects) is moved out of the garbage collector's sight with `gc.freeze()`: it lives as long
as the process, and every full collection would otherwise walk it again, about 0.1 ms per
request under load (BENCHMARKS.md).

A reload that finds a bad file is refused with a log line and the old configuration keeps
serving. SIGTERM stops accepting connections, lets the requests in flight finish (up to
`outpost_drain_timeout` seconds), then shuts down.
"""

import asyncio
import gc
import logging
import signal

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from .registry import Registry

logger = logging.getLogger("mitm_outpost")


class Lifecycle:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.draining = False
        self.signals_installed = False

    def load(self, loader: Loader) -> None:
        loader.add_option("outpost_drain_timeout", int, 30, "Seconds SIGTERM waits for requests in flight.")

    def configure(self, updated: set[str]) -> None:
        """Signals are ours from the first configure on: a SIGHUP that came before `running`
        would otherwise end the process."""
        if "outpost_drain_timeout" in updated and ctx.options.outpost_drain_timeout < 0:
            raise exceptions.OptionsError("outpost_drain_timeout: seconds, 0 or more")
        if self.signals_installed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # configured outside an event loop (unit tests)
            return
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(self.drain()))
        self.signals_installed = True

    def running(self) -> None:
        gc.collect()
        gc.freeze()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.in_flight += 1
        self.idle.clear()

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished()

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished()

    def _finished(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if not self.in_flight:
            self.idle.set()

    def reload(self) -> None:
        logger.info("SIGHUP: reloading %s", ctx.options.outpost_config)
        try:
            ctx.options.update(outpost_config=ctx.options.outpost_config)
        except exceptions.OptionsError as e:
            logger.error("reload refused, the previous configuration keeps serving: %s", e)

    async def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        logger.info("SIGTERM: no new connections; waiting for %d request(s) in flight", self.in_flight)
        # Closes the listeners (mitmproxy's, and the production runner's own); open connections go on.
        ctx.options.update(mode=[], outpost_http_port=0, outpost_https_port=0)
        if self.in_flight:
            try:
                await asyncio.wait_for(self.idle.wait(), ctx.options.outpost_drain_timeout)
            except TimeoutError:
                logger.warning("drain timeout: %d request(s) cut off", self.in_flight)
        ctx.master.shutdown()
