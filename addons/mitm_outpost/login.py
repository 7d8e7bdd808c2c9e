"""Browser login, shared by /start, the callback and forward auth.

Login binds three things together: a signed, expiring `state` (HS256 JWT) naming a
server-side pending login; that pending login, used once; and a pre-login cookie held by
the browser that started it. A state that is forged, expired, replayed or carried to
another browser ends the login with a reason, never a session.
"""

import hashlib
import logging
import time
from dataclasses import dataclass

import jwt
from mitmproxy import http

from . import names, pages
from .decision import Exchange
from .identity import build_session
from .oidc import TokenError
from .provider import Provider
from .registry import Registry
from .sessions import LOGIN_TTL, LoginRefused, PendingLogin, new_id

logger = logging.getLogger("mitm_outpost")

LOGIN_COOKIE_LENGTH = 43  # secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class LoginFailed:
    """Why a callback could not complete a login: a reason code (metrics) and the sentence (user, log)."""

    code: str
    message: str


_OTHER_BROWSER = LoginFailed("other_browser", "the login was started in another browser")


def _binding(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


async def begin_login(registry: Registry, exchange: Exchange, provider: Provider, redirect: str) -> http.Response:
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
    redirect_uri = (provider.legacy_redirect_uri if exchange.path.startswith(names.LEGACY_PREFIX)
                    else provider.redirect_uri)
    login = provider.idp.login_request(redirect_uri, provider.scope, state)
    await registry.store.put_login(
        state_id,
        PendingLogin(provider.name, _binding(binding_cookie), login.nonce, login.code_verifier, redirect, redirect_uri),
    )
    return pages.redirect(login.url)



async def finish_login(registry: Registry, exchange: Exchange, provider: Provider,
                       params: dict[str, str]) -> str | LoginFailed:
    """Complete the login: the session is stored and its cookie queued; returns where to go next."""
    state, code = params.get("state", ""), params.get("code", "")
    if not state or not code:
        return LoginFailed("incomplete_callback", "the callback lacks its state or code")
    try:
        claims = jwt.decode(
            state, provider.state_key, algorithms=["HS256"],
            issuer=f"goauthentik.io/outpost/{provider.client_id}", options={"require": ["exp", "state"]},
        )
    except jwt.ExpiredSignatureError:
        return LoginFailed("state_expired", "the login took too long; its state has expired")
    except jwt.PyJWTError:
        return LoginFailed("state_invalid", "the login state is not valid")
    if not exchange.login_cookie:  # nothing to match: the store is not even asked
        return _OTHER_BROWSER
    # The binding is checked as the pending login is taken, not after: a callback replayed from
    # elsewhere leaves it for the browser that started the login.
    login = await registry.store.take_login(str(claims["state"]), provider.name, _binding(exchange.login_cookie))
    if login is LoginRefused.OTHER_BROWSER:
        return _OTHER_BROWSER
    if login is LoginRefused.UNKNOWN:
        return LoginFailed("state_used", "the login state was already used or has expired")
    try:
        token = await provider.idp.exchange_code(code, login.code_verifier, login.redirect_uri)
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise TokenError("the token response has no id_token")
        verified = await provider.idp.verify_id_token(id_token, login.nonce)
    except TokenError as e:
        logger.warning("provider %s: login failed: %s", provider.name, e)
        return LoginFailed("token_unverified", "the identity provider's answer could not be verified")
    access_token = str(token.get("access_token") or "")
    raw_token = access_token if access_token.count(".") == 2 else id_token
    session = build_session(provider, verified, raw_token, id_token, registry.legacy_headers)
    if exchange.session_cookie:  # never carry a pre-login session over (fixation)
        await registry.store.delete(provider.name, exchange.session_cookie)
    session_id = new_id()
    await registry.store.put(session_id, session)
    exchange.session = session
    exchange.set_cookies.append(provider.set_cookie(provider.cookie_name, session_id, provider.session_lifetime))
    return login.redirect
