"""The HeaderAuth addon: `Authorization: Bearer|Basic` for API clients (authentik's header auth).

Bearer tokens are introspected at the IdP (or, when the provider enables it, verified
locally as JWTs) and accepted only when issued to this provider's client (CVE-2024-47077).
Basic `user:app-password` is authentik's client_credentials grant; the user name
`goauthentik.io/token` means the password is a bearer token. The header is consumed: the
upstream never sees it. No session cookie is issued, so a revoked token stops working when
its cache entry ends.

Every header is a call the outpost would make to the IdP, so anyone could use the outpost to
flood the IdP or to guess app passwords. Hence, per provider and SHA-256 of the header value:
successes are remembered (`header_auth_cache_ttl`), refusals briefly too (`header_auth_failure_ttl`),
and identical checks in flight at once share one IdP call. A check that must ask the IdP holds
one of its client address's tokens (`header_auth_client_burst`, regained at
`header_auth_client_rate` per second; IPv6 counts by /64), given back unless the IdP refused
the credential; and each provider makes at most `header_auth_idp_rate` IdP calls per second.
A request over either limit gets 429 with Retry-After, and the IdP is not asked. Neither the
header nor its hash is ever logged.
"""

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache
from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from . import pages
from .decision import Exchange, Outcome, decide, note, undecided
from .identity import build_session
from .oidc import IdPUnavailable, TokenError
from .provider import Provider
from .registry import Registry
from .sessions import Session

logger = logging.getLogger("mitm_outpost")

TOKEN_USERNAME = "goauthentik.io/token"
CLIENTS_TRACKED = 100_000  # client addresses with a bucket that is not full (the oldest go first)
LONGEST_CHECK = 60.0  # seconds a check can take at the IdP's timeouts: how long it may hold a client's token
BUDGET_WARNING_INTERVAL = 10.0  # seconds between two log lines about a provider's spent IdP budget


@dataclass(frozen=True)
class Limits:
    """The header_auth_* options (whole numbers: mitmproxy options have no float)."""

    cache_ttl: int = 60
    cache_size: int = 10_000
    failure_ttl: int = 10
    client_burst: int = 5
    client_rate: int = 1
    idp_rate: int = 20


OPTIONS = {  # option -> (Limits field, help)
    "header_auth_cache_ttl": ("cache_ttl", "Seconds a successful header authentication is remembered; a revoked token "
                                           "works until then."),
    "header_auth_cache_size": ("cache_size", "Header authentications remembered per provider, successes and failures "
                                             "each."),
    "header_auth_failure_ttl": ("failure_ttl", "Seconds a refused Authorization header is remembered: sent again, "
                                               "it is refused without asking the IdP."),
    "header_auth_client_burst": ("client_burst", "Header authentications the IdP refuses that one client address "
                                                 "(IPv6: its /64) may cause in a row; then it gets 429 beyond "
                                                 "header_auth_client_rate."),
    "header_auth_client_rate": ("client_rate", "Refused header authentications per second a client address regains "
                                               "after its burst."),
    "header_auth_idp_rate": ("idp_rate", "IdP calls per second, per provider, that header authentication may make; "
                                         "checks beyond get 429."),
}


class RateLimited(Exception):
    """A limit stopped the check before the IdP was asked."""

    def __init__(self, wait: float, reason: str) -> None:
        super().__init__(reason)
        self.retry_after = max(1, math.ceil(wait))  # whole seconds, as Retry-After wants


class TokenBucket:
    """`capacity` tokens, regained at `rate` per second; counted on the monotonic clock, when asked."""

    __slots__ = ("capacity", "rate", "tokens", "stamp")

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity, self.rate = capacity, rate
        self.tokens, self.stamp = capacity, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def give_back(self) -> None:
        self._refill()
        self.tokens = min(self.capacity, self.tokens + 1)


@dataclass
class Guard:
    """One provider's memory of header authentications, its checks in flight and its IdP budget."""

    provider: Provider  # the one it was made for: a provider rebuilt (reload, authentik update) starts afresh
    successes: TTLCache[str, Session]
    failures: TTLCache[str, bool]
    budget: TokenBucket
    flights: dict[str, asyncio.Task[Session]] = field(default_factory=dict)
    warned_at: float = -BUDGET_WARNING_INTERVAL


def client_key(peer: str) -> str:
    """What a client is limited by: its address, or for IPv6 its /64 (one site's usual share)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def parse(scheme: str, credentials: str) -> tuple[str | None, str]:
    """(user, app password) of Basic, (None, token) of Bearer or of Basic with authentik's token
    user name. Raises TokenError when there is nothing the IdP could accept."""
    if scheme == "basic":
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise TokenError("Basic credentials are not base64 user:password") from None
        if user != TOKEN_USERNAME:
            return user, password
        credentials = password
    if not credentials:
        raise TokenError("empty token")
    return None, credentials


def verified_locally(provider: Provider, token: str) -> bool:
    """A JWT of a provider that verifies them itself: no IdP call (but for a new signing key)."""
    return provider.verify_bearer_jwt_locally and token.count(".") == 2


class HeaderAuth:
    failure_status = 503  # a failure here is the IdP's (see Chain)

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.limits = Limits()
        self.guards: dict[str, Guard] = {}
        self.clients: TTLCache[str, TokenBucket] = self._client_table()

    def load(self, loader: Loader) -> None:
        for option, (name, help_text) in OPTIONS.items():
            loader.add_option(option, int, getattr(self.limits, name), help_text)

    def configure(self, updated: set[str]) -> None:
        if not updated & OPTIONS.keys():
            return
        for option in OPTIONS:
            if (value := getattr(ctx.options, option)) < 1:
                raise exceptions.OptionsError(f"{option} must be a whole number of at least 1, not {value}")
        self.limits = Limits(**{name: getattr(ctx.options, option) for option, (name, _) in OPTIONS.items()})
        self.clients = self._client_table()
        self.guards = {}  # new limits: nothing carried over

    def _client_table(self) -> TTLCache[str, TokenBucket]:
        """A bucket left alone until it is full again is forgotten: a new one is the same."""
        limits = self.limits
        return TTLCache(CLIENTS_TRACKED, limits.client_burst / limits.client_rate + LONGEST_CHECK)

    def _guard(self, provider: Provider) -> Guard:
        guard = self.guards.get(provider.name)
        if guard is None or guard.provider is not provider:
            limits = self.limits
            guard = self.guards[provider.name] = Guard(
                provider,
                TTLCache(limits.cache_size, limits.cache_ttl),
                TTLCache(limits.cache_size, limits.failure_ttl),
                TokenBucket(limits.idp_rate, limits.idp_rate),
            )
        return guard

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """A coroutine only for a request that carries Bearer or Basic credentials: most carry none."""
        exchange = undecided(flow)
        if exchange is None or exchange.session is not None:
            return None
        authorization = flow.request.headers.get("Authorization", "")
        scheme = authorization.partition(" ")[0].lower()
        if scheme not in ("bearer", "basic"):
            return None
        del flow.request.headers["Authorization"]
        return self.take_credentials(flow, exchange, scheme, authorization)

    async def take_credentials(self, flow: http.HTTPFlow, exchange: Exchange, scheme: str, authorization: str) -> None:
        provider = exchange.provider
        assert provider is not None
        try:
            session = await self.check(provider, flow.client_conn.peername[0], authorization)
        except RateLimited as e:
            flow.response = pages.page(429, "Too many requests", "Too many header authentications; try again later.")
            flow.response.headers["Retry-After"] = str(e.retry_after)
            decide(flow, Outcome.DENIED, "header_auth_rate_limited", str(e))
            return
        except IdPUnavailable:
            raise  # the Chain answers 503: nothing is known about the credential
        except TokenError:
            exchange.header_auth_failed = True
            note(flow, session=f"{scheme} header refused")
            return
        exchange.session = session
        exchange.by_header = True
        note(flow, session=f"{scheme} header", user=session.username, uid=session.sub)

    async def check(self, provider: Provider, peer: str, authorization: str) -> Session:
        """The session of this header: remembered, or from the one check in flight for it, or from
        a new check if the limits allow it. Raises TokenError, RateLimited."""
        guard = self._guard(provider)
        key = hashlib.sha256(authorization.encode()).hexdigest()
        session = guard.successes.get(key)
        if session is not None and session.expires_at > time.time():
            return session
        if key in guard.failures:
            raise TokenError("refused a moment ago")
        flight = guard.flights.get(key)
        if flight is None:
            scheme, _, credentials = authorization.partition(" ")
            user, secret = parse(scheme.lower(), credentials.strip())
            bucket = None if user is None and verified_locally(provider, secret) else self.reserve(peer)
            flight = guard.flights[key] = asyncio.create_task(self._ask(guard, provider, key, bucket, user, secret))
            flight.add_done_callback(lambda done: self._landed(guard, key, done))
        return await asyncio.shield(flight)  # a client that leaves does not cancel the check the others wait for

    def reserve(self, peer: str) -> TokenBucket:
        """A token of this client's bucket for a check that asks the IdP, or RateLimited."""
        client = client_key(peer)
        bucket = self.clients.get(client)
        if bucket is None:
            bucket = TokenBucket(self.limits.client_burst, self.limits.client_rate)
        wait = bucket.take()
        self.clients[client] = bucket  # (again: its time to be forgotten starts now)
        if wait:
            raise RateLimited(wait, f"client {client}: too many refused header authentications")
        return bucket

    @staticmethod
    def _landed(guard: Guard, key: str, flight: asyncio.Task[Session]) -> None:
        guard.flights.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # retrieved here even when every waiting client has gone

    async def _ask(self, guard: Guard, provider: Provider, key: str, bucket: TokenBucket | None, user: str | None,
                   secret: str) -> Session:
        """One check, remembered when it ends in a success or a refusal; only a refusal keeps the client's token."""
        refused = False
        try:
            session = await self.authenticate(guard, provider, user, secret)
        except IdPUnavailable as e:
            logger.warning("provider %s: header authentication not checked: %s", provider.name, e)
            raise
        except TokenError as e:
            refused = True
            guard.failures[key] = True
            scheme = "bearer" if user is None else "basic"
            logger.warning("provider %s: %s header refused: %s", provider.name, scheme, e)
            raise
        finally:
            if bucket is not None and not refused:
                bucket.give_back()
        guard.successes[key] = session
        return session

    def spend(self, guard: Guard, provider: Provider) -> None:
        """One IdP call from this provider's budget, or RateLimited."""
        wait = guard.budget.take()
        if not wait:
            return
        now = time.monotonic()
        if now - guard.warned_at >= BUDGET_WARNING_INTERVAL:
            guard.warned_at = now
            logger.warning("provider %s: header authentication is at its IdP budget (header_auth_idp_rate=%d/s); "
                           "checks beyond it get 429", provider.name, self.limits.idp_rate)
        raise RateLimited(wait, f"provider {provider.name}: the IdP budget of header authentication is spent")

    async def authenticate(self, guard: Guard, provider: Provider, user: str | None, secret: str) -> Session:
        """`user` None: `secret` is a bearer token; else an app password (authentik's client_credentials)."""
        if user is not None:
            self.spend(guard, provider)
            answer = await provider.idp.client_credentials(user, secret, provider.scope)
            claims = await provider.idp.verify_id_token(answer["id_token"], None)
            return self._session(provider, claims, answer["id_token"])
        return self._session(provider, await self.bearer_claims(guard, provider, secret), secret)

    async def bearer_claims(self, guard: Guard, provider: Provider, token: str) -> dict[str, Any]:
        idp = provider.idp
        if verified_locally(provider, token):
            return await idp.verify_id_token(token, None)  # the IdP only for an unseen key id, at most once a second
        self.spend(guard, provider)
        answer = await idp.introspect(token)
        if answer.get("active") is not True:
            raise TokenError("the token is not active")
        audience = answer.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if answer.get("client_id") != idp.client_id and idp.client_id not in audiences:
            raise TokenError(f"the token was issued to another client ({answer.get('client_id')!r})")
        if not isinstance(answer.get("sub"), str) or not answer["sub"]:
            raise TokenError("the token names no user (sub)")
        if idp.userinfo_endpoint and not answer.get("preferred_username"):
            self.spend(guard, provider)
            userinfo = await idp.userinfo(token)
            if userinfo.get("sub") == answer["sub"]:
                answer = {**userinfo, **{k: v for k, v in answer.items() if k not in userinfo}}
        return answer

    def _session(self, provider: Provider, claims: dict[str, Any], raw_token: str) -> Session:
        """Remembered for the cache time, or until the token expires if that is sooner."""
        lifetime = float(self.limits.cache_ttl)
        if isinstance(claims.get("exp"), (int, float)):
            lifetime = min(lifetime, claims["exp"] - time.time())
        if lifetime <= 0:
            raise TokenError("the token has expired")
        return build_session(provider, claims, raw_token, "", self.registry.legacy_headers, lifetime=lifetime)
