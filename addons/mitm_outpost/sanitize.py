"""The Sanitize addon: the upstream never sees what a client forged, what the outpost owns,
or what belongs to the client's own connection.

Identity and forwarding headers sent by the client (every `X-authentik-*`, `X-Forwarded-*` and
`X-Auth-Request-*`, and the legacy names) are dropped in every spelling (any case, `_` for `-`);
the outpost's cookies are taken out of `Cookie` (their values kept on the
exchange for the session check); hop-by-hop fields (RFC 9110 §7.6.1) are dropped: the
client's `Connection` and every field it names (so a next hop that honours `Connection` can
never delete the identity the outpost adds), `Keep-Alive`, `Proxy-Connection`, `TE`,
`Trailer`, and `Upgrade` unless the request is a WebSocket handshake. Any other upgrade
(h2c, say) would turn the connection into a tunnel that no check sees. This runs before any
decision, and Upstream applies `forwardable()` again as the last gate. A forward-auth check
is answered by the outpost and its fields go nowhere: only the outpost's cookies are taken from it.
"""

from mitmproxy import http

from . import names
from .decision import Exchange, embedded_undecided, note, undecided

_PROTECTED = frozenset(k.encode() for k in names.PROTECTED_HEADER_KEYS)
_PREFIXES = tuple(prefix.encode() for prefix in names.PROTECTED_HEADER_PREFIXES)
CLIENT_CERTIFICATE = frozenset(name.encode() for name in names.CLIENT_CERTIFICATE_HEADERS)  # Upstream decides
_COOKIE_PREFIX = names.COOKIE_PREFIX.encode()
HOP_BY_HOP = frozenset(name.encode() for name in names.HOP_BY_HOP_HEADERS)
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})  # tokens that name no field
# The message's own framing and target: a client that names them in Connection must not make the
# outpost drop them (a body without its Content-Length would reach the app as a second request).
_NEVER_NAMED = frozenset({b"content-length", b"transfer-encoding", b"host"})
WEBSOCKET_UPGRADE = ((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"))


def is_protected(name: bytes) -> bool:
    key = name.strip().lower().replace(b"_", b"-")
    return key in _PROTECTED or (key.startswith(_PREFIXES) and key not in CLIENT_CERTIFICATE)


_classes: dict[bytes, tuple[bytes, bool]] = {}  # a field name as sent -> its folded key, and whether it is protected


def _classify(name: bytes) -> tuple[bytes, bool]:
    """A request names a dozen fields, mostly the same dozen: each name is folded and judged once."""
    found = _classes.get(name)
    if found is None:
        found = (name.lower().replace(b"_", b"-"), is_protected(name))
        if len(_classes) < 4096:  # beyond, names a client made up are judged each time, not kept
            _classes[name] = found
    return found


def is_websocket_handshake(request: http.Request) -> bool:
    """RFC 6455 §4.1: a GET with `Upgrade: websocket` alone and `upgrade` among the Connection tokens."""
    headers = request.headers
    return (request.method == "GET" and request.http_version == "HTTP/1.1"
            and [v.strip().lower() for v in headers.get_all("Upgrade")] == ["websocket"]
            and "upgrade" in {t.strip().lower() for v in headers.get_all("Connection") for t in v.split(",")})


def forwardable(request: http.Request) -> tuple[tuple[bytes, bytes], ...]:
    """The client's fields that may travel on: no identity or forwarding names, no hop-by-hop
    fields (WebSocket handshakes keep their `Connection: Upgrade` and `Upgrade: websocket`)."""
    classified = [(field, *_classify(field[0])) for field in request.headers.fields]
    named = {t.strip().lower().replace(b"_", b"-")
             for (_, value), key, _ in classified if key == b"connection" for t in value.split(b",")}
    drop = HOP_BY_HOP | (named - _CONNECTION_OPTIONS - _NEVER_NAMED) if named else HOP_BY_HOP
    kept = tuple(field for field, key, protected in classified if not protected and key not in drop)
    return kept + WEBSOCKET_UPGRADE if is_websocket_handshake(request) else kept


class Sanitize:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        exchange = undecided(flow) or embedded_undecided(flow)
        if exchange is None:
            return
        fields = flow.request.headers.fields
        if exchange.forward is not None:  # a forward-auth check: answered here, its fields travel nowhere
            self._take_cookies_of_check(flow, exchange)
            return
        forward = forwardable(flow.request)
        kept = []
        for name, value in forward:
            if _COOKIE_PREFIX in value and name.lower() == b"cookie":
                value = self._take_cookies(value, exchange)
                if not value:
                    continue
            kept.append((name, value))
        if tuple(kept) != fields:
            flow.request.headers.fields = tuple(kept)
        if forward != fields:  # fields were dropped, not only the outpost's cookies taken
            left = {n.lower() for n, _ in kept} | {b"cookie"}
            dropped = {n.decode("latin-1") for n, _ in fields if n.lower() not in left}
            if dropped:
                note(flow, stripped_headers=", ".join(sorted(dropped)))

    def _take_cookies_of_check(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        """Only the outpost's cookies are taken out (and kept on the exchange): never shown or saved with the flow."""
        fields = flow.request.headers.fields
        kept, changed = [], False
        for field in fields:
            name, value = field
            if _COOKIE_PREFIX in value and name.lower() == b"cookie":
                changed = True
                if value := self._take_cookies(value, exchange):
                    kept.append((name, value))
            else:
                kept.append(field)
        if changed:
            flow.request.headers.fields = tuple(kept)

    @staticmethod
    def _take_cookies(value: bytes, exchange: Exchange) -> bytes:
        provider = exchange.provider
        kept = []
        for part in value.split(b";"):
            name, _, cookie_value = part.strip().partition(b"=")
            if not name.startswith(_COOKIE_PREFIX):
                kept.append(part.strip())
            elif provider is None:
                continue  # embedded mode, a request for the authentik server: the outpost's cookies stay home
            elif name == provider.cookie_name.encode():
                exchange.session_cookie = cookie_value.decode("latin-1")
            elif name == provider.login_cookie_name.encode():
                exchange.login_cookie = cookie_value.decode("latin-1")
        return b"; ".join(kept)
