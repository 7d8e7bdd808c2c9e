"""The Metrics addon: a second listener (authentik's port 9300) with `/metrics` and `/ping`.

It is a separate small asyncio server, not a mitmproxy mode, so scrapes never show up as
flows and never walk the addon chain. Label values come from configuration only.
"""

import asyncio
import logging
import time

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from . import __version__, names
from .configuration import Registry
from .listeners import listen_env

logger = logging.getLogger("mitm_outpost")

OUTPOST_LABELS = ("outpost_name", "outpost_type", "uuid", "version", "build")
PING_PATHS = frozenset(prefix + names.PING for prefix in names.ENDPOINT_PREFIXES)


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.prometheus = CollectorRegistry()
        self.info = Gauge("authentik_outpost_info", "Outpost info", OUTPOST_LABELS, registry=self.prometheus)
        self.last_update = Gauge("authentik_outpost_last_update", "Time of the last provider update", OUTPOST_LABELS, registry=self.prometheus)
        self.server: asyncio.Server | None = None
        registry.on_change.append(self.providers_changed)

    def load(self, loader: Loader) -> None:
        host, port = listen_env("AUTHENTIK_LISTEN__METRICS", 9300)
        loader.add_option("metrics_port", int, port, "Port of the metrics listener: /metrics and /outpost.goauthentik.io/ping "
                          "(0 turns it off; env AUTHENTIK_LISTEN__METRICS).")
        loader.add_option("metrics_listen_host", str, host, "Address of the metrics listener (empty: all interfaces).")

    def providers_changed(self) -> None:
        labels = (self.registry.outpost_name, "proxy", self.registry.outpost_uuid, __version__, "")
        self.info.clear()
        self.last_update.clear()
        self.info.labels(*labels).set(1)
        self.last_update.labels(*labels).set(time.time())

    async def running(self) -> None:
        if ctx.options.metrics_port:
            self.server = await asyncio.start_server(self.handle, ctx.options.metrics_listen_host or None, ctx.options.metrics_port)
            logger.info("metrics listening at %s:%d", ctx.options.metrics_listen_host or "*", ctx.options.metrics_port)

    def done(self) -> None:
        if self.server is not None:
            self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.split()
            path = parts[1].decode("latin-1").partition("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.prometheus)
            elif path in PING_PATHS:
                status, content_type, body = ("204 No Content" if self.registry.ready else "503 Service Unavailable"), "text/plain", b""
            else:
                status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
