"""The SessionCheck addon: cookie -> opaque id -> session from the store."""

import logging
from collections.abc import Coroutine
from typing import Any

from mitmproxy import http

from . import pages
from .decision import Exchange, Outcome, decide, note, undecided
from .provider import Provider
from .registry import Registry
from .sessions import NotCached, Session

MAX_COOKIE_LENGTH = 128


def session_from_cache(registry: Registry, exchange: Exchange) -> bool:
    """Fill `exchange.session` when the store can tell without I/O; False when it must be asked (`load_session`)."""
    cookie = exchange.session_cookie
    provider = exchange.provider
    if not cookie or provider is None or exchange.session is not None:
        return True
    found = registry.store.cached(provider.name, cookie) if len(cookie) <= MAX_COOKIE_LENGTH else None
    if isinstance(found, NotCached):
        return False
    _settle(exchange, provider, found)
    return True


async def load_session(registry: Registry, exchange: Exchange) -> None:
    """Fill `exchange.session`; an unknown, expired or foreign cookie is cleared in the answer."""
    if not session_from_cache(registry, exchange):
        assert exchange.provider is not None
        _settle(exchange, exchange.provider, await registry.store.get(exchange.provider.name, exchange.session_cookie))


def _settle(exchange: Exchange, provider: Provider, session: Session | None) -> None:
    if session is None:
        exchange.session_cookie = ""
        exchange.set_cookies.append(provider.clear_cookie(provider.cookie_name))
    else:
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

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """At once when the store knows without I/O; else a coroutine that asks it."""
        if (exchange := undecided(flow)) is None:
            return None
        had_cookie = bool(exchange.session_cookie)
        if not session_from_cache(self.registry, exchange):
            return self._load(flow, exchange, had_cookie)
        record(flow, exchange, had_cookie)
        return None

    async def _load(self, flow: http.HTTPFlow, exchange: Exchange, had_cookie: bool) -> None:
        await load_session(self.registry, exchange)
        record(flow, exchange, had_cookie)


def record(flow: http.HTTPFlow, exchange: Exchange, had_cookie: bool) -> None:
    if exchange.session is not None:
        note(flow, session="valid", user=exchange.session.username, uid=exchange.session.sub)
    else:
        note(flow, session="unknown or expired cookie" if had_cookie else "none")
