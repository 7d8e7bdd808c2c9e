"""The Routing addon: which provider answers this request, and the health endpoint.

Normal requests are routed by `Host`. A forward-auth check is routed by the original
request its reverse proxy describes, and only a trusted proxy may describe one. The
outpost's own endpoints, reached through a trusted proxy that rewrites `Host` (nginx's
`$host` drops the port), may also be routed by X-Forwarded-Host or X-Original-URL.
"""

import logging
import urllib.parse

from mitmproxy import http

from . import names, pages
from .decision import Exchange, Outcome, begin, decide, note, printable
from .edge_rules import fields_violation
from .embedded import EmbeddedBackend, is_backend_path
from .forwarded import auth_kind, normalise_path, original_request, parse_original_url
from .registry import Registry
from .verdict import Action, Reason, Verdict

HEALTH_PATHS = {prefix + name: name for prefix in names.ENDPOINT_PREFIXES for name in names.HEALTH}
OWN_PATHS = frozenset(prefix + name for prefix in names.ENDPOINT_PREFIXES for name in names.ENDPOINTS)
OWN_PREFIXES = tuple(prefix.rstrip("/") for prefix in names.ENDPOINT_PREFIXES)  # the outpost's on any host (seed 003)


def is_own_path(path: str) -> bool:
    """`/outpost.goauthentik.io` and what is under it (and the legacy `/akprox`), never `/outpost.goauthentik.iox`."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OWN_PREFIXES)
TO_BACKEND = Verdict(Action.SKIP, Reason.EMBEDDED_BACKEND, 0)  # upstream without identity, to the authentik server


def to_backend(flow: http.HTTPFlow, exchange: Exchange, embedded: EmbeddedBackend) -> None:
    """Embedded mode: the request is authentik's (its UI, API, files); it goes there through the edge rules."""
    note(flow, route="backend")
    length = flow.request.headers.get("Content-Length", "0")
    if not length.isdigit() or int(length) > embedded.body_limit:
        flow.response = pages.json_error(413, "request body too large", detail=f"at most {embedded.body_limit} bytes")
        decide(flow, Outcome.DENIED, "body_too_large", "to the authentik server: body too large", logging.WARNING)
        return
    exchange.embedded, exchange.body_limit, exchange.verdict = embedded, embedded.body_limit, TO_BACKEND
    if certificates := flow.client_conn.certificate_list:
        pem = certificates[0].to_pem().decode()
        exchange.client_certificate = (f'Hash={certificates[0].fingerprint().hex()};'
                                       f'Cert="{urllib.parse.quote(pem, safe="")}"')
    decide(flow, Outcome.BACKEND, Reason.EMBEDDED_BACKEND, "not the outpost's: to the authentik server")


class Routing:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay:
            return
        if not flow.request.is_http11 and not flow.request.is_http10 and (code := fields_violation(flow.request)):
            flow.response = pages.page(400, "Bad request", f"The request breaks an HTTP rule ({code}).")
            decide(flow, Outcome.DENIED, code, "refused at the edge", logging.WARNING)
            return  # HTTP/1 heads were held to the same rules, byte for byte, by the edge
        path, _, query = flow.request.path.partition("?")
        exchange = begin(flow, path, query)
        if health := HEALTH_PATHS.get(path):
            ready = health == names.LIVE or self.registry.is_ready()
            flow.response = pages.empty(204 if ready else 503)
            decide(flow, Outcome.ENDPOINT, health, health if ready else "ping: providers not loaded yet")
            return
        peer = flow.client_conn.peername[0]
        exchange.trusted_peer = self.registry.is_trusted(peer)
        kind = auth_kind(path, query)
        if kind is not None:
            if not exchange.trusted_peer:
                flow.response = pages.page(403, "Forbidden",
                                           "Forward-auth checks are answered for trusted proxies only.")
                decide(flow, Outcome.DENIED, "untrusted_proxy", f"forward-auth check from untrusted peer {peer}",
                       logging.WARNING)
                return
            original = original_request(kind, flow.request, path, query)
            exchange.forward = (kind, original)
            host = original.host
            provider = self.registry.provider_for(original.host, original.hostname)
            note(flow, check=kind.value, original_url=original.url or "(not sent)")
        else:
            exchange.normal_path = normalise_path(path)  # what the rules judge (a check judges its original URL's)
            host = flow.request.host_header or ""
            provider = self.registry.by_host.get(host.lower())
            if provider is None and path in OWN_PATHS and exchange.trusted_peer:
                headers = flow.request.headers
                host = (headers.get(names.FORWARDED_HOST)
                        or parse_original_url(headers.get(names.ORIGINAL_URL, "")).host or host)
                provider = self.registry.provider_for(host, host.rsplit(":", 1)[0])
            embedded = self.registry.embedded
            if embedded is not None and (is_backend_path(path) or not is_own_path(path) and (
                    provider is None or provider.mode is not names.Mode.PROXY)):
                to_backend(flow, exchange, embedded)
                return
        if self.registry.embedded is not None:
            note(flow, route="outpost")
        if provider is None:
            flow.response = pages.json_error(
                400, "no app for hostname", host=host,
                detail=f"Check the outpost settings and make sure '{host}' is included.",
            )
            decide(flow, Outcome.DENIED, "unknown_host", f"no provider serves host {printable(host)!r}")
            return
        if kind is not None and provider.mode is names.Mode.PROXY:
            flow.response = pages.page(404, "Not found",
                                       "This provider is in proxy mode; it answers no forward-auth checks.")
            decide(flow, Outcome.DENIED, "proxy_mode_check", "forward-auth check for a proxy-mode provider")
            return
        exchange.provider = provider
        # Until Upstream re-targets it, the flow shows (in mitmweb, logs) the address the client used.
        flow.request.data.host, flow.request.data.port = provider.hostname, provider.port
        note(flow, provider=provider.name, mode=provider.mode.value)
