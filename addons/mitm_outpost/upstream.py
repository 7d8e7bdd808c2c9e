"""The Upstream addon: where an allowed request goes, and what identity it carries.

The last gate: a request leaves only with the Gate's ALLOW or SKIP verdict, whatever an
earlier step did, and its fields are filtered again (`sanitize.forwardable`) right before it
leaves, in `requestheaders` and again in `request` (deferred or buffered flows, and anything
that changed the request in between). The request is re-targeted to the provider's internal
host, `Host` becomes the backend's (seed 000), the X-Forwarded-* headers are ours alone, and
an authenticated request gets the identity headers computed at login plus the provider's
static ones.
"""

import logging

from mitmproxy import ctx, http, tls
from mitmproxy.addonmanager import Loader
from OpenSSL import SSL

from . import names, pages
from .decision import Exchange, Outcome, decide, exchange_of
from .provider import Backend
from .registry import Registry
from .sanitize import CLIENT_CERTIFICATE, forwardable, is_websocket_handshake
from .strict_http import UNVERIFIED
from .verdict import Action, Reason

logger = logging.getLogger("mitm_outpost")

_COOKIE_PREFIX = names.COOKIE_PREFIX.lower()
_FORWARDED_HOST = names.FORWARDED_HOST.encode()
_FORWARDED_PROTO = names.FORWARDED_PROTO.encode()
_FORWARDED_FOR = names.FORWARDED_FOR.encode()
_CLIENT_CERT = names.FORWARDED_CLIENT_CERT.encode()
_CLIENT_CERT_KEY = _CLIENT_CERT.lower()
HOST_ONLY = frozenset({b"host"})

POWERED_BY = "goauthentik.io"
CHUNKED = ((b"Transfer-Encoding", b"chunked"),)
GOES_UPSTREAM = frozenset({Action.ALLOW, Action.SKIP})


def target(exchange: Exchange) -> Backend | None:
    """Where this request may go: its provider's internal host, or in embedded mode the authentik server."""
    if exchange.embedded is not None:
        return exchange.embedded.backend
    return exchange.provider.backend if exchange.provider is not None else None


def authority(scheme: str, host: str, port: int) -> str:
    """host[:port] as a Host header names it (the port only when it is not the scheme's own)."""
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"


class Upstream:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.powered_by = True

    def load(self, loader: Loader) -> None:
        loader.add_option("outpost_powered_by", bool, True,
                          "Add `X-Powered-By: goauthentik.io` to proxied responses, as authentik's outpost does.")

    def configure(self, updated: set[str]) -> None:
        if "outpost_powered_by" in updated:
            self.powered_by = ctx.options.outpost_powered_by

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        exchange = exchange_of(flow)
        if exchange is not None and exchange.deferred:
            return  # answered in `request`, where this gate runs again
        if self.refused(flow, exchange):
            return
        assert exchange is not None
        session = exchange.session
        backend = target(exchange)
        assert backend is not None
        request = flow.request
        scheme, host, port = backend.scheme, backend.host, backend.port
        host_header = (request.host_header or backend.host_header) if backend.keep_client_host else backend.host_header
        if session is not None and session.backend:  # ak_proxy: backend_override and/or host_header
            if session.backend[0]:
                scheme, host, port = session.backend[:3]
                if not backend.keep_client_host:
                    host_header = authority(scheme, host, port)
            host_header = session.backend[3] or host_header
        exchange.verify_tls = backend.verify_tls  # this flow's provider decides, for an ak_proxy backend too
        exchange.forwarded = (
            (b"Host", host_header.encode("utf-8", "surrogateescape")),
            (_FORWARDED_HOST, (request.host_header or "").encode("utf-8", "surrogateescape")),
            (_FORWARDED_PROTO, b"https" if flow.client_conn.tls_established else b"http"),
            (_FORWARDED_FOR, flow.client_conn.peername[0].encode()),
        )
        # Straight to the request's data: the property setters would rewrite Host (twice), which
        # the one rebuild below does anyway.
        data = request.data
        data.scheme, data.host, data.port = scheme.encode(), host, port
        if data.authority:  # HTTP/2 from the client: :authority towards the upstream, as Host
            data.authority = host_header.encode("utf-8", "surrogateescape")
        exchange.proxied = True
        self.set_fields(request, exchange)
        if session is not None:
            decide(flow, Outcome.ALLOWED, exchange.verdict.reason if exchange.verdict else Reason.SESSION,
                   f"session of {session.username}")

    def request(self, flow: http.HTTPFlow) -> None:
        """The body is in: the same gate for a flow that is about to leave, deferred ones included."""
        if flow.response is not None:
            return
        exchange = exchange_of(flow)
        if self.refused(flow, exchange):
            return
        assert exchange is not None
        if not exchange.proxied:  # a verdict, but Upstream never re-targeted it (it failed in between)
            flow.response = pages.page(403, "Forbidden", "The outpost reached no decision about this request.")
            decide(flow, Outcome.DENIED, "no_decision", "reached the upstream hook without being re-targeted; refused",
                   logging.ERROR)
            return
        request = flow.request
        if request.headers.fields is not exchange.sent_fields:  # something changed them since requestheaders
            self.set_fields(request, exchange)
        if not (request.is_http11 or request.is_http10) and not request.stream:
            # HTTP/2 towards an HTTP/1 upstream, the whole body known: frame it by its length.
            body = request.raw_content or b""
            request.headers.pop("Transfer-Encoding", None)
            if body:
                request.headers["Content-Length"] = str(len(body))
            exchange.sent_fields = request.headers.fields

    @staticmethod
    def refused(flow: http.HTTPFlow, exchange: Exchange | None) -> bool:
        """Nothing leaves without an ALLOW or SKIP verdict, even if an earlier step failed."""
        if (exchange is not None and target(exchange) is not None
                and exchange.verdict is not None and exchange.verdict.action in GOES_UPSTREAM):
            return False
        flow.response = pages.page(403, "Forbidden", "The outpost reached no decision about this request.")
        decide(flow, Outcome.DENIED, "no_decision", "no decision was reached (an earlier step failed); refused",
               logging.ERROR)
        return True

    @staticmethod
    def set_fields(request: http.Request, exchange: Exchange) -> None:
        """One rebuild of the header tuple: the client's forwardable fields, then ours."""
        session = exchange.session
        drop = session.replaces if session is not None else HOST_ONLY
        if not exchange.trusted_peer:
            drop = drop | CLIENT_CERTIFICATE
        fields = tuple(f for f in forwardable(request) if f[0].lower() not in drop) + exchange.forwarded
        if exchange.client_certificate:  # embedded mode: the certificate the client presented on 9443
            fields = tuple(f for f in fields if f[0].lower() != _CLIENT_CERT_KEY)
            fields += ((_CLIENT_CERT, exchange.client_certificate.encode()),)
        if session is not None:
            assert exchange.provider is not None
            fields += session.headers + exchange.provider.static_headers
        if not (request.is_http11 or request.is_http10) and all(f[0].lower() != b"content-length" for f in fields):
            # An HTTP/2 request needs no length; an HTTP/1 upstream does, or the body reads as a second
            # request. Chunked, in case mitmproxy streams it before `request` (which frames a known body).
            fields += CHUNKED
        request.headers.fields = exchange.sent_fields = fields

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The upstream may not plant outpost cookies (fixation) or switch protocols unasked;
        pending cookie changes go out."""
        exchange = exchange_of(flow)
        if exchange is None or not exchange.proxied or flow.response is None:
            return
        if flow.response.status_code == 101 and not is_websocket_handshake(flow.request):
            flow.response = pages.page(502, "Bad gateway", "The application switched protocols unasked.")
            decide(flow, Outcome.DENIED, "unexpected_upgrade",
                   "the upstream answered 101 to a request that was no WebSocket handshake", logging.WARNING)
            return
        if exchange.provider is None:  # embedded mode: the authentik server's own answer, passed on as it comes
            flow.response.stream = True
            return
        response_headers = flow.response.headers
        if self.powered_by:
            response_headers["X-Powered-By"] = POWERED_BY
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

        The edge's HTTP layer marks a connection it opens for a flow whose provider turned
        validation off (`strict_http.UNVERIFIED`), and never lets another flow reuse it. Script addons
        run before mitmproxy's TlsConfig, so we let it build its usual context first and then
        relax verification on that one connection."""
        if tls_start.ssl_conn is not None or tls_start.conn not in UNVERIFIED:
            return
        ctx.master.addons.get("tlsconfig").tls_start_server(tls_start)
        tls_start.ssl_conn.set_verify(SSL.VERIFY_NONE)  # type: ignore[union-attr]
