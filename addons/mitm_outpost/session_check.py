"""The SessionCheck addon: cookie -> opaque id -> session from the store."""

import logging

from mitmproxy import http

from . import pages
from .decision import Exchange, Outcome, decide, note, undecided
from .registry import Registry

MAX_COOKIE_LENGTH = 128


async def load_session(registry: Registry, exchange: Exchange) -> None:
    """Fill `exchange.session`; an unknown, expired or foreign cookie is cleared in the answer."""
    cookie = exchange.session_cookie
    provider = exchange.provider
    if not cookie or provider is None or exchange.session is not None:
        return
    session = await registry.store.get(provider.name, cookie) if len(cookie) <= MAX_COOKIE_LENGTH else None
    if session is None:
        exchange.session_cookie = ""
        exchange.set_cookies.append(provider.clear_cookie(provider.cookie_name))
        return
    exchange.session = session


def store_unavailable(flow: http.HTTPFlow, error: Exception) -> None:
    """Fail closed: without the store nobody can be checked, so nobody passes."""
    flow.response = pages.page(503, "Service unavailable",
                               "Sessions cannot be checked right now. Try again in a moment.")
    flow.response.headers["Retry-After"] = "5"
    decide(flow, Outcome.DENIED, "store_unavailable", f"session store unavailable: {error}", logging.WARNING)


class SessionCheck:
    failure_status = 503  # a failure here is the store's (see Chain)

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if (exchange := undecided(flow)) is None:
            return
        had_cookie = bool(exchange.session_cookie)
        await load_session(self.registry, exchange)
        if exchange.session is not None:
            note(flow, session="valid", user=exchange.session.username, uid=exchange.session.sub)
        else:
            note(flow, session="unknown or expired cookie" if had_cookie else "none")
