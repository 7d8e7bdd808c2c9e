"""The Sanitize addon: the upstream never sees what a client forged or what the outpost owns.

Identity and forwarding headers sent by the client are dropped in every spelling (any case,
`_` for `-`), and the outpost's cookies are taken out of `Cookie` (their values kept on the
exchange for the session check). This runs before any decision, so it holds on every path.
"""

from mitmproxy import http

from . import names
from .decision import note, undecided

_PROTECTED = frozenset(k.encode() for k in names.PROTECTED_HEADER_KEYS)
_PREFIX = names.PROTECTED_HEADER_PREFIX.encode()
_COOKIE_PREFIX = names.COOKIE_PREFIX.encode()


def is_protected(name: bytes) -> bool:
    key = name.strip().lower().replace(b"_", b"-")
    return key in _PROTECTED or key.startswith(_PREFIX)


class Sanitize:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        exchange = undecided(flow)
        if exchange is None:
            return
        headers = flow.request.headers
        kept = []
        stripped = []
        changed = False
        for name, value in headers.fields:
            if is_protected(name):
                stripped.append(name.decode("latin-1"))
                changed = True
                continue
            if name.lower() == b"cookie" and _COOKIE_PREFIX in value:
                value = self._take_cookies(value, exchange)
                changed = True
                if not value:
                    continue
            kept.append((name, value))
        if changed:
            headers.fields = tuple(kept)
        if stripped:
            note(flow, stripped_headers=", ".join(stripped))

    @staticmethod
    def _take_cookies(value: bytes, exchange) -> bytes:  # type: ignore[no-untyped-def]
        provider = exchange.provider
        kept = []
        for part in value.split(b";"):
            name, _, cookie_value = part.strip().partition(b"=")
            if not name.startswith(_COOKIE_PREFIX):
                kept.append(part.strip())
            elif name == provider.cookie_name.encode():
                exchange.session_cookie = cookie_value.decode("latin-1")
            elif name == provider.login_cookie_name.encode():
                exchange.login_cookie = cookie_value.decode("latin-1")
        return b"; ".join(kept)
