"""The Upstream addon: where an allowed request goes, and what identity it carries.

The request is re-targeted to the provider's internal host, `Host` becomes the backend's
(seed 000), the X-Forwarded-* headers are ours alone, and an authenticated request gets the
identity headers computed at login plus the provider's static ones.
"""

import logging

from mitmproxy import ctx, http, tls
from OpenSSL import SSL

from . import names, pages
from .configuration import Registry
from .decision import Outcome, decide, exchange_of

logger = logging.getLogger("mitm_outpost")

_COOKIE_PREFIX = names.COOKIE_PREFIX.lower()
HOST_ONLY = frozenset({b"host"})


class Upstream:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        exchange = exchange_of(flow)
        if exchange is not None and exchange.deferred:
            return
        # The last gate: nothing leaves without a session or a matching rule, even if an
        # earlier addon failed with an exception (mitmproxy logs it and goes on).
        upstream = exchange.provider.upstream if exchange and exchange.provider else None
        if exchange is None or upstream is None or not (exchange.session or exchange.skipped):
            flow.response = pages.page(403, "Forbidden", "The outpost reached no decision about this request.")
            decide(flow, Outcome.DENIED, "no decision was reached (an earlier step failed); refused", logging.ERROR)
            return
        session = exchange.session
        scheme, host, port, host_header = upstream.scheme, upstream.host, upstream.port, upstream.host_header
        if session is not None and (session.backend or session.backend_error):
            if session.backend_error:
                flow.response = pages.page(502, "Bad Gateway", "The backend chosen for this user is not valid.")
                decide(flow, Outcome.DENIED, f"ak_proxy claims of {session.username}: {session.backend_error}", logging.WARNING)
                return
            assert session.backend is not None
            if session.backend[0]:
                scheme, host, port = session.backend[:3]
                if not upstream.verify_tls:
                    self.registry.unverified_upstreams.add((host, port))
            host_header = session.backend[3] or host_header
        request = flow.request
        original_host = request.host_header or ""
        # Straight to the request's data: the property setters would rewrite Host (twice), which
        # the one rebuild below does anyway.
        data = request.data
        data.scheme, data.host, data.port = scheme.encode(), host, port
        if data.authority:  # HTTP/2 from the client: :authority towards the upstream, as Host
            data.authority = host_header.encode()
        exchange.proxied = True
        # One rebuild of the header tuple: Sanitize already removed every identity name.
        drop = session.replaces if session is not None else HOST_ONLY
        fields = tuple(f for f in request.headers.fields if f[0].lower() not in drop) + (
            (b"Host", host_header.encode()),
            (b"X-Forwarded-Host", original_host.encode("utf-8", "surrogateescape")),
            (b"X-Forwarded-Proto", b"https" if flow.client_conn.tls_established else b"http"),
            (b"X-Forwarded-For", flow.client_conn.peername[0].encode()),
        )
        if session is not None:
            fields += session.headers + exchange.provider.static_headers
        request.headers.fields = fields
        if session is not None:
            decide(flow, Outcome.ALLOWED, f"session of {session.username}")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The upstream may not plant outpost cookies (fixation); pending cookie changes go out."""
        exchange = exchange_of(flow)
        if exchange is None or not exchange.proxied or exchange.provider is None or flow.response is None:
            return
        response_headers = flow.response.headers
        if "Set-Cookie" in response_headers:
            cookies = response_headers.get_all("Set-Cookie")
            kept = [c for c in cookies if not c.lstrip().lower().startswith(_COOKIE_PREFIX)]
            if len(kept) != len(cookies):
                response_headers.set_all("Set-Cookie", kept)
                logger.warning("provider %s: dropped an outpost cookie set by the upstream", exchange.provider.name)
        if exchange.session is None:  # e.g. a stale cookie on an unauthenticated path
            for cookie in exchange.set_cookies:
                response_headers.add("Set-Cookie", cookie)

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        """Per-provider `internal_host_ssl_validation` (mitmproxy's own switch is global).

        Script addons run before mitmproxy's TlsConfig, so we let it build its usual context
        first and then relax verification on that one connection."""
        address = tls_start.conn.address
        if tls_start.ssl_conn is not None or address is None or (address[0], address[1]) not in self.registry.unverified_upstreams:
            return
        ctx.master.addons.get("tlsconfig").tls_start_server(tls_start)
        tls_start.ssl_conn.set_verify(SSL.VERIFY_NONE)  # type: ignore[union-attr]
