"""The fast lane: the production runner serves the outpost's ports itself, and answers the
requests the outpost answers itself without mitmproxy's connection and layer machinery.

A forward-auth check proxies nothing, yet through mitmproxy it pays for a connection handler,
a layer stack and eight hook dispatches: about 0.85 ms of CPU of the 0.92 ms a check cost
(issue 17), where the outpost's own code takes about 60 µs. So `python -m mitm_outpost` binds
9000 and 9443 here. On 9000 each request head is held to the edge's rules (`edge_rules`, the
same limits and reason codes as the strict layer), parsed with httptools, and then:

- a forward-auth check (`/outpost.goauthentik.io/auth/*`, `/akprox/auth*`) or one of the
  outpost's endpoints (start, callback, sign_out, ping, backchannel_logout) is answered here,
  by the same chain of addons every request goes through (one decision path: the chain's
  request hooks, its Turns, its response hooks, so the metrics, access log and decision
  record are the same);
- anything else (a request to proxy, a WebSocket, a chunked or large body, `Expect`) is handed
  to mitmproxy on the same connection, with the bytes already read, and goes on exactly as in
  mitmdump. The connection stays with mitmproxy from then on.

9443 (TLS) is handed to mitmproxy at once. Under mitmdump and mitmweb there is no fast lane:
every request stays a flow a person can inspect. `outpost_fast_lane=false` turns it off here too.
"""

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_servers import ServerInstance

from . import pages, workers
from .decision import Outcome, decide, note, where
from .edge import Edge
from .edge_rules import Limits, Refusal
from .lane_connection import Connection
from .listeners import PLACEHOLDER_TARGET

logger = logging.getLogger("mitm_outpost")

SLICE = 0.0005  # seconds of lane work per event-loop iteration, at least one request (see FastLane.run)
SWEEP_INTERVAL = 1.0  # seconds between the checks of heads in pieces and idle connections


class HandedOver(asyncio.Protocol):
    """A connection that is mitmproxy's from its first byte: 9443 (mitmproxy terminates TLS), and
    9000 with `outpost_fast_lane` off."""

    def __init__(self, lane: "FastLane") -> None:
        self.lane = lane

    # A TCP listener's: a stream transport (uvloop's is not a subclass of asyncio.Transport).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2 ** 16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        self.lane.hand_to_mitmproxy(reader, asyncio.StreamWriter(transport, protocol, reader, loop))


class FastLane:
    """The addon (production runner only): owns the listening sockets of the outpost's ports."""

    def __init__(self) -> None:
        self.chain: Any = None  # the outpost's Chain (set by chain.build): its hooks answer every request here
        self.limits = Limits()
        self.connections: set[Connection] = set()
        self.servers: list[asyncio.Server] = []
        self.bound: tuple[str, int, int] | None = None
        self.instance: ServerInstance | None = None  # mitmproxy's reverse-mode server, used for hand-overs only
        self.handed: set[asyncio.Task[None]] = set()
        self.sweeper: asyncio.Task[None] | None = None
        self._server = connection.Server(address=None)
        self.run_queue: collections.deque[Connection] = collections.deque()  # connections with bytes to take
        self.scheduled = False

    def load(self, loader: Loader) -> None:
        loader.add_option("outpost_fast_lane", bool, True,
                          "Production runner: answer forward-auth checks and the outpost's endpoints without "
                          "mitmproxy's layers (everything else still goes through mitmproxy). Off: every request "
                          "is a mitmproxy flow, as under mitmdump.")

    def configure(self, updated: set[str]) -> None:
        edge = next((m for m in self.chain.members if isinstance(m, Edge)), None)
        if edge is not None:
            self.limits = edge.limits
        if self.servers and updated & {"outpost_http_port", "outpost_https_port", "outpost_listen_host",
                                       "outpost_fast_lane"}:
            asyncio.ensure_future(self.listen())

    async def running(self) -> None:
        await self.listen()
        self.sweeper = asyncio.ensure_future(self.sweep())

    def done(self) -> None:
        self.close_listeners()
        if self.sweeper is not None:
            self.sweeper.cancel()

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.run)

    def run(self) -> None:
        """The lane's work for one event-loop iteration: connections in turn, one request each, for
        about SLICE seconds. A connection answered here is at once ready for its next request, so
        without a bound a flood on a few keep-alive connections (say of /start) would take each whole
        iteration, and a request that mitmproxy serves, in several iterations, would wait behind all
        of it at every step (BENCHMARKS.md, issue 14: its p99 25x, with 16 flooding connections)."""
        self.scheduled = False
        until = time.perf_counter() + SLICE
        queue = self.run_queue
        try:
            while queue:
                conn = queue.popleft()
                try:
                    conn.take_turn()
                except Exception as e:  # a bug of ours: fail closed for that connection, and go on with the others
                    logger.error("fast lane: a request failed (%s); refused", where(e))
                    conn.busy = False
                    conn.refuse(Refusal(403, "step_failed"))
                if time.perf_counter() >= until:
                    break
        finally:
            if queue:
                self.schedule()

    def server_placeholder(self) -> connection.Server:
        return self._server

    def answer(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """The chain's request hooks, then its response hooks, as mitmproxy would call them: at once while
        no step waits (a signed-in check), else the coroutine that goes on from the step that does."""
        if (pending := self.chain.requestheaders(flow)) is not None:
            return self._answer_after(flow, pending, requested=False)
        if flow.response is None and (pending := self.chain.request(flow)) is not None:
            return self._answer_after(flow, pending, requested=True)
        self._respond(flow)
        return None

    async def _answer_after(self, flow: http.HTTPFlow, pending: Coroutine[Any, Any, None], requested: bool) -> None:
        await pending
        if not requested and flow.response is None and (pending := self.chain.request(flow)) is not None:
            await pending
        self._respond(flow)

    def _respond(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:  # cannot happen for the paths above; if it does, nothing is proxied from here
            flow.response = pages.page(403, "Forbidden", "The outpost could not decide about this request.")
            decide(flow, Outcome.DENIED, "step_failed", "fast lane: no step answered an outpost endpoint",
                   logging.ERROR)
        note(flow, lane="fast")
        now = time.time()
        flow.response.timestamp_start = flow.response.timestamp_start or now
        flow.response.timestamp_end = now
        self.chain.response(flow)

    def hand_to_mitmproxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.instance is None:
            self.instance = ServerInstance.make(f"reverse:{PLACEHOLDER_TARGET}", ctx.master.addons.get("proxyserver"))
        task = asyncio.ensure_future(self.instance.handle_stream(reader, writer))
        self.handed.add(task)
        task.add_done_callback(self.handed.discard)

    def ports(self) -> tuple[str, int, int]:
        return ctx.options.outpost_listen_host, ctx.options.outpost_http_port, ctx.options.outpost_https_port

    async def listen(self) -> None:
        wanted = self.ports()
        if wanted == self.bound and self.servers:
            return
        self.close_listeners()
        host, http_port, https_port = wanted
        loop = asyncio.get_running_loop()
        plain: Callable[[], asyncio.Protocol] = (lambda: Connection(self)) if ctx.options.outpost_fast_lane \
            else (lambda: HandedOver(self))
        for port, factory in ((http_port, plain), (https_port, lambda: HandedOver(self))):
            if port:
                server = await loop.create_server(factory, host or None, port, reuse_port=workers.reuse_port() or None)
                self.servers.append(server)
                logger.info("outpost listening at %s:%d (%s)", host or "*", port,
                            "fast lane" if factory is plain and ctx.options.outpost_fast_lane else "mitmproxy")
        self.bound = wanted

    def close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []
        self.bound = None

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for conn in list(self.connections):
                try:
                    conn.overdue(now)
                except Exception as e:
                    logger.error("fast lane: the timeout sweep failed for a connection (%s)", where(e))
                    conn.close()
