"""The Endpoints addon: the outpost's own paths (start, callback, sign_out).

Login binds three things together: a signed, expiring `state` (HS256 JWT) naming a
server-side pending login; that pending login, used once; and a pre-login cookie held by
the browser that started it. A state that is forged, expired, replayed or carried to
another browser ends in a 400 and a log line.
"""

import hashlib
import hmac
import logging
import time
import urllib.parse

import jwt
from mitmproxy import http

from . import names, pages
from .configuration import Registry
from .decision import Exchange, Outcome, decide, note, undecided
from .identity import kept_claims, user_headers
from .forwarded import ProxyKind
from .names import Mode
from .oidc import TokenError
from .provider import Provider
from .session_check import load_session
from .sessions import LOGIN_TTL, PendingLogin, Session, new_id

logger = logging.getLogger("mitm_outpost")

ENDPOINT_PATHS = {prefix + name: name for prefix in names.ENDPOINT_PREFIXES for name in names.ENDPOINTS - {names.PING}}
LOGIN_COOKIE_LENGTH = 43  # secrets.token_urlsafe(32)
EMPTY_IDENTITY = {name: "" for name in (*names.IDENTITY_HEADERS, *names.LEGACY_HEADERS)}


class LoginFailed(str):
    """Why a callback could not complete a login (shown to the user and logged)."""


def _binding(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


def _query(exchange: Exchange) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(exchange.query, keep_blank_values=True))


def _rd(query: str) -> str:
    """`rd` from /start's query. nginx's documented sign-in location appends the original URL
    unencoded (`?rd=http://app/page?a=1&b=2`), so a raw URL there is taken whole."""
    if query.startswith(("rd=http://", "rd=https://", "rd=/")):
        return query[3:]
    return dict(urllib.parse.parse_qsl(query, keep_blank_values=True)).get("rd", "")


class Endpoints:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        exchange = undecided(flow)
        if exchange is None:
            return
        if exchange.forward is not None:
            await self.forward_auth(flow, exchange, exchange.provider)
        else:
            endpoint = ENDPOINT_PATHS.get(exchange.path)
            if endpoint is None:
                return
            note(flow, endpoint=endpoint)
            handler = {names.START: self.start, names.CALLBACK: self.callback, names.SIGN_OUT: self.sign_out}[endpoint]
            await handler(flow, exchange, exchange.provider)
        for cookie in exchange.set_cookies:
            flow.response.headers.add("Set-Cookie", cookie)  # type: ignore[union-attr]

    async def forward_auth(self, flow: http.HTTPFlow, exchange: Exchange, provider: Provider) -> None:
        """Answer a reverse proxy's question. Only a session or a matching rule gives a 2xx;
        every failure, expected or not, is a 401/403 (the CVE-2026-25748 class is fail-open)."""
        try:
            await self._forward_auth(flow, exchange, provider)
        except Exception:
            logger.exception("provider %s: forward-auth decision failed; denying", provider.name)
            exchange.set_cookies.clear()
            flow.response = pages.empty(403)
            decide(flow, Outcome.DENIED, "the decision failed (see the log); denied")

    async def _forward_auth(self, flow: http.HTTPFlow, exchange: Exchange, provider: Provider) -> None:
        assert exchange.forward is not None
        kind, original = exchange.forward
        await load_session(self.registry, exchange)
        session = exchange.session
        if session is not None:
            flow.response = pages.empty(200)
            flow.response.headers.fields += session.headers + provider.static_headers
            note(flow, session="valid", user=session.username, uid=session.sub)
            decide(flow, Outcome.ALLOWED, f"{kind.value} check: session of {session.username}")
            return
        target = original.origin_url if provider.mode is Mode.FORWARD_DOMAIN else (original.path or "")
        if provider.is_skipped(target):
            # Every identity header present and empty, so no proxy can pass on the client's own copy.
            flow.response = pages.empty(200)
            flow.response.headers.update(EMPTY_IDENTITY)
            decide(flow, Outcome.SKIPPED, f"{kind.value} check: {target} matches an unauthenticated-path rule")
            return
        redirect = provider.safe_redirect(original.url) if original.url else None
        if kind is ProxyKind.NGINX or redirect is None:
            flow.response = pages.page(401, "Unauthenticated", "unauthorized request")
            why = "no session" if redirect or kind is ProxyKind.NGINX else "no session, and the original URL is unknown or not this provider's"
            decide(flow, Outcome.DENIED, f"{kind.value} check: {why}")
            return
        flow.response = await self.begin_login(exchange, provider, redirect)
        decide(flow, Outcome.REDIRECTED, f"{kind.value} check: no session: sent to the identity provider, back to {redirect}")

    async def start(self, flow: http.HTTPFlow, exchange: Exchange, provider: Provider) -> None:
        rd = _rd(exchange.query)
        redirect = provider.safe_redirect(rd) if rd else None
        if rd and redirect is None:
            logger.warning("provider %s: refused rd=%r (not on %s)", provider.name, rd[:200], provider.external_origin)
        redirect = redirect or provider.external_origin + "/"
        flow.response = await self.begin_login(exchange, provider, redirect)
        decide(flow, Outcome.ENDPOINT, f"start: sent to the identity provider, back to {redirect}" + (" (rd refused)" if rd and not redirect.startswith(rd) else ""))

    async def begin_login(self, exchange: Exchange, provider: Provider, redirect: str) -> http.Response:
        """A 302 to the IdP's authorize endpoint, with the pending login stored and bound to this browser."""
        binding_cookie = exchange.login_cookie
        if len(binding_cookie) != LOGIN_COOKIE_LENGTH:
            binding_cookie = new_id()
            exchange.set_cookies.append(provider.set_cookie(provider.login_cookie_name, binding_cookie, LOGIN_TTL))
        state_id = new_id()
        now = int(time.time())
        state = jwt.encode(
            {"iss": f"goauthentik.io/outpost/{provider.client_id}", "state": state_id, "iat": now, "exp": now + LOGIN_TTL},
            provider.state_key, algorithm="HS256",
        )
        redirect_uri = provider.legacy_redirect_uri if exchange.path.startswith(names.LEGACY_PREFIX) else provider.redirect_uri
        login = provider.idp.login_request(redirect_uri, provider.scope, state)
        await self.registry.store.put_login(
            state_id,
            PendingLogin(provider.name, _binding(binding_cookie), login.nonce, login.code_verifier, redirect, redirect_uri),
        )
        return pages.redirect(login.url)

    async def callback(self, flow: http.HTTPFlow, exchange: Exchange, provider: Provider) -> None:
        params = _query(exchange)
        retry = (provider.external_origin + names.START_PATH, "Sign in again")
        if "error" in params:
            reason = f"the identity provider refused the login: {params['error']} {params.get('error_description', '')}".strip()
            flow.response = pages.page(403, "Sign-in refused", reason, retry)
            decide(flow, Outcome.DENIED, reason[:200], logging.WARNING)
            return
        redirect = await self.finish_login(exchange, provider, params)
        if isinstance(redirect, LoginFailed):
            flow.response = pages.page(400, "Sign-in failed", str(redirect), retry)
            decide(flow, Outcome.DENIED, f"callback: {redirect}", logging.WARNING)
            return
        assert exchange.session is not None
        flow.response = pages.redirect(redirect)
        decide(flow, Outcome.ENDPOINT, f"callback: signed in as {exchange.session.username}, back to {redirect}", logging.INFO)

    async def finish_login(self, exchange: Exchange, provider: Provider, params: dict[str, str]) -> "str | LoginFailed":
        """Complete the login: the session is stored and its cookie queued; returns where to go next."""
        state, code = params.get("state", ""), params.get("code", "")
        if not state or not code:
            return LoginFailed("the callback lacks its state or code")
        try:
            claims = jwt.decode(
                state, provider.state_key, algorithms=["HS256"],
                issuer=f"goauthentik.io/outpost/{provider.client_id}", options={"require": ["exp", "state"]},
            )
        except jwt.ExpiredSignatureError:
            return LoginFailed("the login took too long; its state has expired")
        except jwt.PyJWTError:
            return LoginFailed("the login state is not valid")
        login = await self.registry.store.take_login(str(claims["state"]))
        if login is None or login.provider != provider.name:
            return LoginFailed("the login state was already used or has expired")
        if not exchange.login_cookie or not hmac.compare_digest(_binding(exchange.login_cookie), login.browser_binding):
            return LoginFailed("the login was started in another browser")
        try:
            token = await provider.idp.exchange_code(code, login.code_verifier, login.redirect_uri)
            id_token = token.get("id_token")
            if not isinstance(id_token, str):
                raise TokenError("the token response has no id_token")
            verified = await provider.idp.verify_id_token(id_token, login.nonce)
        except TokenError as e:
            logger.warning("provider %s: login failed: %s", provider.name, e)
            return LoginFailed("the identity provider's answer could not be verified")
        access_token = str(token.get("access_token") or "")
        raw_token = access_token if access_token.count(".") == 2 else id_token
        claims = kept_claims(verified)
        session = Session(
            provider=provider.name,
            sub=str(verified["sub"]),
            headers=user_headers(claims, raw_token, self.registry.legacy_headers),
            expires_at=time.time() + provider.session_lifetime,
            idp_sid=str(verified.get("sid") or ""),
            id_token=id_token,
            claims=claims,
        )
        if exchange.session_cookie:  # never carry a pre-login session over (fixation)
            await self.registry.store.delete(exchange.session_cookie)
        session_id = new_id()
        await self.registry.store.put(session_id, session)
        exchange.session = session
        exchange.set_cookies.append(provider.set_cookie(provider.cookie_name, session_id, provider.session_lifetime))
        return login.redirect

    async def sign_out(self, flow: http.HTTPFlow, exchange: Exchange, provider: Provider) -> None:
        await load_session(self.registry, exchange)
        session = exchange.session
        exchange.set_cookies.append(provider.clear_cookie(provider.cookie_name))
        if session is None:
            flow.response = pages.page(200, "Signed out", "You are signed out.")
            decide(flow, Outcome.ENDPOINT, "sign_out: no session")
            return
        ended = await self.registry.store.delete_user(provider.name, session.sub)
        if provider.idp.end_session_endpoint:
            flow.response = pages.redirect(provider.idp.end_session_url(session.id_token))
        else:
            flow.response = pages.page(200, "Signed out", "You are signed out.")
        decide(flow, Outcome.ENDPOINT, f"sign_out: ended {ended} session(s) of {session.username}", logging.INFO)
