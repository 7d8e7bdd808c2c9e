"""The Metrics addon: a second listener (authentik's port 9300) with `/metrics` and `/ping`.

It is a separate small asyncio server, not a mitmproxy mode, so scrapes never show up as
flows and never walk the addon chain. Label values come from configuration only.

A worker of `--workers N` binds no metrics port: the supervisor serves one for all workers
(`serve`, here) from their multiprocess files, and /ping there needs every worker ready. So a
worker writes its gauges that are read rather than counted (sessions, readiness) every
`REFRESH` seconds, and hands its request counts (prometheus_metrics.TALLY) to its file as often.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__, names, workers
from .decision import METADATA_KEY, where
from .listeners import listen_env
from .prometheus_metrics import (
    CALLBACK_FAILURES,
    DECISIONS,
    INFO,
    LAST_UPDATE,
    LOGINS,
    PROMETHEUS,
    REQUESTS,
    ROUTES,
    SESSIONS,
    TALLY,
    UPSTREAM,
    WORKER_READY,
)
from .registry import Registry

# Label values come from configuration or from short fixed lists, never from client input.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_METHOD_LABELS = {method.encode(): method for method in METHODS}  # the request's bytes as sent -> its label


logger = logging.getLogger("mitm_outpost")

PING_PATHS = frozenset(prefix + names.PING for prefix in names.ENDPOINT_PREFIXES)
REFRESH = 0.5  # seconds between a worker's gauge updates


def host_labels(registry: Registry) -> dict[str, str]:
    """Provider name -> the host label of its requests (its external host), made once per provider set."""
    return {p.name: p.external_origin.partition("//")[2] for p in registry.providers}


def add_options(loader: Loader) -> None:
    """The listener's options: the addon's, and the supervisor's, which serves the port for its workers."""
    host, port = listen_env("AUTHENTIK_LISTEN__METRICS", 9300)
    loader.add_option("metrics_port", int, port,
                      "Port of the metrics listener: /metrics and /outpost.goauthentik.io/ping "
                      "(0 turns it off; env AUTHENTIK_LISTEN__METRICS).")
    loader.add_option("metrics_listen_host", str, host, "Address of the metrics listener (empty: all interfaces).")


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        if not workers.is_worker():  # multiprocess files hold values, not functions: a worker refreshes them
            SESSIONS.set_function(lambda: registry.store.count())
        self.server: asyncio.Server | None = None
        self.refresher: asyncio.Task[None] | None = None
        self.info_labels: tuple[str, ...] = ()
        self.children: dict[tuple[Any, ...], Any] = {}  # labels() is slow; label sets are few and fixed
        self.per_request: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}  # see labelled()
        self.hosts = host_labels(registry)
        registry.on_change.append(self.providers_changed)

    def load(self, loader: Loader) -> None:
        add_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "metrics_port" in updated and not 0 <= ctx.options.metrics_port <= 65535:
            raise exceptions.OptionsError("metrics_port: a port number from 0 (off) to 65535")

    def providers_changed(self) -> None:
        labels = (self.registry.outpost_name, "proxy", self.registry.outpost_uuid, __version__, "")
        if not workers.is_worker():
            INFO.clear()
            LAST_UPDATE.clear()
        elif self.info_labels not in ((), labels):  # a worker's file keeps every label set it had: the old one reads 0
            INFO.labels(*self.info_labels).set(0)
        self.info_labels = labels
        INFO.labels(*labels).set(1)
        LAST_UPDATE.labels(*labels).set(time.time())
        self.children.clear()
        self.per_request.clear()
        self.hosts = host_labels(self.registry)

    def child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*labels)
        return found

    def labelled(self, provider_name: str, method: str, kind: str, outcome: str) -> tuple[Any, Any, Any]:
        """The request histogram's and the decision counter's children for these labels, and the provider:
        made once per label set and provider set (a request asks for them, not for `labels()` each time)."""
        key = (provider_name, method, kind, outcome)
        found = self.per_request.get(key)
        if found is None:
            provider = self.registry.by_name.get(provider_name)
            requests = self.child(REQUESTS, self.registry.outpost_name, method, self.hosts.get(provider_name, ""), kind)
            decisions = self.child(DECISIONS, provider.name, outcome) if provider is not None else None
            found = self.per_request[key] = (requests, decisions, provider)
        return found

    def response(self, flow: http.HTTPFlow) -> None:
        record = flow.metadata.get(METADATA_KEY)
        if not record:
            return
        method = _METHOD_LABELS.get(flow.request.data.method, "OTHER")
        outcome = record.get("outcome", "")
        response = flow.response
        end = response.data.timestamp_end if response and response.data.timestamp_end else time.time()
        code = record.get("code", "")
        requests, decisions, provider = self.labelled(
            record.get("provider", ""), method, "ping" if code in names.HEALTH else "app", outcome)
        TALLY.observe(requests, end - flow.request.data.timestamp_start)
        if route := record.get("route"):
            TALLY.inc(self.child(ROUTES, route))
        if provider is not None:
            TALLY.inc(decisions)
            if code == "signed_in":
                LOGINS.labels(provider.name).inc()
            elif record.get("endpoint") == names.CALLBACK and outcome == "denied":
                CALLBACK_FAILURES.labels(provider.name, code).inc()
            upstream = provider.backend  # None in the forward-auth modes: a check the outpost answered went nowhere
            if (upstream is not None and outcome in ("allowed", "skipped") and response and response.timestamp_start
                    and flow.request.timestamp_end):
                host = self.hosts.get(provider.name, "")
                TALLY.observe(self.child(UPSTREAM, self.registry.outpost_name, method, upstream.scheme, host,
                                         upstream.host_header),
                              response.timestamp_start - flow.request.timestamp_end)

    async def running(self) -> None:
        if workers.is_worker():
            self.refresher = asyncio.get_running_loop().create_task(self.refresh())
        elif ctx.options.metrics_port:
            self.server = await serve(ctx.options.metrics_listen_host, ctx.options.metrics_port,
                                      lambda: generate_latest(PROMETHEUS), self.registry.is_ready)

    def done(self) -> None:
        TALLY.flush()  # a worker's last counts reach its file
        if self.server is not None:
            self.server.close()
        if self.refresher is not None:
            self.refresher.cancel()

    async def refresh(self) -> None:
        """A first report after one period: by then every addon's `running` (the listeners) is done."""
        while True:
            await asyncio.sleep(REFRESH)
            try:
                TALLY.flush()
                SESSIONS.set(self.registry.store.count())
                WORKER_READY.set(1 if self.registry.is_ready() else 0)
            except Exception as e:  # readiness must not go stale: the supervisor's /ping reads it
                logger.error("metrics: a worker's refresh failed (%s); reported not ready", where(e))
                WORKER_READY.set(0)


async def serve(host: str, port: int, metrics: Callable[[], bytes], ready: Callable[[], bool]) -> asyncio.Server:
    """The metrics listener: `/metrics` and `/ping` (204 when `ready()`, else 503)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.split()
            path = parts[1].decode("latin-1").partition("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, metrics()
            elif path in PING_PATHS:
                status, content_type, body = (("204 No Content" if ready() else "503 Service Unavailable"),
                                              "text/plain", b"")
            else:
                status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host or None, port)
    logger.info("metrics listening at %s:%d", host or "*", port)
    return server
