"""The Routing addon: which provider answers this request (by Host), and the health endpoint."""

from mitmproxy import http

from . import names, pages
from .configuration import Registry
from .decision import Outcome, begin, decide, note

PING_PATHS = frozenset(prefix + names.PING for prefix in names.ENDPOINT_PREFIXES)


class Routing:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay:
            return
        path, _, query = flow.request.path.partition("?")
        exchange = begin(flow, path, query)
        if path in PING_PATHS:
            flow.response = pages.empty(204)
            decide(flow, Outcome.ENDPOINT, "ping")
            return
        host = flow.request.host_header or ""
        provider = self.registry.by_host.get(host.lower())
        if provider is None:
            flow.response = pages.json_error(
                400, "no app for hostname", host=host,
                detail=f"Check the outpost settings and make sure '{host}' is included.",
            )
            decide(flow, Outcome.DENIED, f"no provider serves host {host!r}")
            return
        exchange.provider = provider
        # Until Upstream re-targets it, the flow shows (in mitmweb, logs) the address the client used.
        flow.request.data.host, flow.request.data.port = provider.hostname, provider.port
        note(flow, provider=provider.name, mode=provider.mode.value)
