"""The HeaderAuth addon: `Authorization: Bearer|Basic` for API clients (authentik's header auth).

Bearer tokens are introspected at the IdP (or, when the provider enables it, verified
locally as JWTs) and accepted only when issued to this provider's client (CVE-2024-47077).
Basic `user:app-password` is authentik's client_credentials grant; the user name
`goauthentik.io/token` means the password is a bearer token. Successes are cached briefly
per provider and header value; failures never are. The header is consumed: the upstream
never sees it. No session cookie is issued, so a revoked token stops working when its
cache entry ends.
"""

import base64
import binascii
import hashlib
import logging
import time
from typing import Any

from cachetools import TTLCache
from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from .configuration import Registry
from .decision import note, undecided
from .identity import build_session
from .oidc import TokenError
from .provider import Provider
from .sessions import Session

logger = logging.getLogger("mitm_outpost")

TOKEN_USERNAME = "goauthentik.io/token"


class HeaderAuth:
    failure_status = 503  # a failure here is the IdP's (see Chain)

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.caches: dict[str, TTLCache[str, Session]] = {}

    def load(self, loader: Loader) -> None:
        loader.add_option("header_auth_cache_ttl", int, 60, "Seconds a successful header authentication is remembered.")
        loader.add_option("header_auth_cache_size", int, 10_000, "Successful header authentications remembered per provider.")

    def configure(self, updated: set[str]) -> None:
        if updated & {"header_auth_cache_ttl", "header_auth_cache_size", "outpost_config"}:
            self.caches = {}  # new providers or limits: nothing carried over

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        exchange = undecided(flow)
        if exchange is None or exchange.session is not None:
            return
        authorization = flow.request.headers.get("Authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() not in ("bearer", "basic"):
            return
        del flow.request.headers["Authorization"]
        provider = exchange.provider
        cache = self.caches.get(provider.name)
        if cache is None:
            cache = self.caches[provider.name] = TTLCache(ctx.options.header_auth_cache_size, ctx.options.header_auth_cache_ttl)
        key = hashlib.sha256(authorization.encode()).hexdigest()
        session = cache.get(key)
        if session is None or session.expires_at <= time.time():
            try:
                session = await self.authenticate(provider, scheme.lower(), credentials.strip())
            except TokenError as e:
                exchange.header_auth_failed = True
                note(flow, session=f"{scheme.lower()} header refused")
                logger.warning("provider %s: %s header refused: %s", provider.name, scheme.lower(), e)
                return
            cache[key] = session
        exchange.session = session
        exchange.by_header = True
        note(flow, session=f"{scheme.lower()} header", user=session.username, uid=session.sub)

    async def authenticate(self, provider: Provider, scheme: str, credentials: str) -> Session:
        if scheme == "basic":
            try:
                user, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise TokenError("Basic credentials are not base64 user:password") from None
            if user != TOKEN_USERNAME:
                answer = await provider.idp.client_credentials(user, password, provider.scope)
                claims = await provider.idp.verify_id_token(answer["id_token"], None)
                return self._session(provider, claims, answer["id_token"])
            credentials = password
        return self._session(provider, await self.bearer_claims(provider, credentials), credentials)

    async def bearer_claims(self, provider: Provider, token: str) -> dict[str, Any]:
        if not token:
            raise TokenError("empty token")
        idp = provider.idp
        if provider.verify_bearer_jwt_locally and token.count(".") == 2:
            return await idp.verify_id_token(token, None)
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
            userinfo = await idp.userinfo(token)
            if userinfo.get("sub") == answer["sub"]:
                answer = {**userinfo, **{k: v for k, v in answer.items() if k not in userinfo}}
        return answer

    def _session(self, provider: Provider, claims: dict[str, Any], raw_token: str) -> Session:
        """Remembered for the cache time, or until the token expires if that is sooner."""
        lifetime = float(ctx.options.header_auth_cache_ttl)
        if isinstance(claims.get("exp"), (int, float)):
            lifetime = min(lifetime, claims["exp"] - time.time())
        if lifetime <= 0:
            raise TokenError("the token has expired")
        return build_session(provider, claims, raw_token, "", self.registry.legacy_headers, lifetime=lifetime)
