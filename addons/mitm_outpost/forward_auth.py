"""The ForwardAuth addon: answers a reverse proxy's question about one request.

It runs after the session and header checks, so it only turns their result into the
answer each proxy understands. Only a session or a matching unauthenticated-path rule
gives a 2xx; every failure, expected or not, is a 401/403 (the CVE-2026-25748 class is
forward auth failing open).
"""

import logging

from mitmproxy import http

from . import names, pages
from .configuration import Registry
from .decision import Exchange, Outcome, decide, undecided
from .forwarded import ProxyKind
from .login import begin_login
from .names import Mode
from .provider import Provider
from .session_check import store_unavailable
from .sessions import StoreUnavailable

logger = logging.getLogger("mitm_outpost")

# On a rule-allowed answer every identity header is present and empty, so no proxy passes on
# the client's own copy.
EMPTY_IDENTITY = tuple((name.encode(), b"") for name in (*names.IDENTITY_HEADERS, *names.LEGACY_HEADERS))


class ForwardAuth:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        exchange = undecided(flow)
        if exchange is None or exchange.forward is None:
            return
        try:
            await self.answer(flow, exchange, exchange.provider)
        except StoreUnavailable as e:
            store_unavailable(flow, e)
            return
        except Exception:
            logger.exception("provider %s: forward-auth decision failed; denying", exchange.provider.name)
            exchange.set_cookies.clear()
            flow.response = pages.empty(403)
            decide(flow, Outcome.DENIED, "the decision failed (see the log); denied")
            return
        for cookie in exchange.set_cookies:
            flow.response.headers.add("Set-Cookie", cookie)  # type: ignore[union-attr]

    async def answer(self, flow: http.HTTPFlow, exchange: Exchange, provider: Provider) -> None:
        assert exchange.forward is not None
        kind, original = exchange.forward
        session = exchange.session
        if session is not None:
            flow.response = pages.empty(200)
            flow.response.headers.fields += session.headers + provider.static_headers
            decide(flow, Outcome.ALLOWED, f"{kind.value} check: session of {session.username}")
            return
        target = original.origin_url if provider.mode is Mode.FORWARD_DOMAIN else (original.path or "")
        if provider.is_skipped(target):
            flow.response = pages.empty(200)
            flow.response.headers.fields += EMPTY_IDENTITY
            decide(flow, Outcome.SKIPPED, f"{kind.value} check: {target} matches an unauthenticated-path rule")
            return
        if exchange.header_auth_failed and provider.intercept_header_auth:
            flow.response = pages.page(401, "Unauthenticated", "The Authorization header did not authenticate.")
            flow.response.headers["WWW-Authenticate"] = provider.www_authenticate
            decide(flow, Outcome.DENIED, f"{kind.value} check: Authorization header did not authenticate")
            return
        redirect = provider.safe_redirect(original.url) if original.url else None
        if kind is ProxyKind.NGINX or redirect is None:
            flow.response = pages.page(401, "Unauthenticated", "unauthorized request")
            why = "no session" if redirect or kind is ProxyKind.NGINX else "no session, and the original URL is unknown or not this provider's"
            decide(flow, Outcome.DENIED, f"{kind.value} check: {why}")
            return
        flow.response = await begin_login(self.registry, exchange, provider, redirect)
        decide(flow, Outcome.REDIRECTED, f"{kind.value} check: no session: sent to the identity provider, back to {redirect}")
