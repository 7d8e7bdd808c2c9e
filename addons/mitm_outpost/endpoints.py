"""The Endpoints addon: the outpost's own paths (start, callback, sign_out, backchannel_logout).

As authentik, a query marker (`X-authentik-auth-callback=true`, `X-authentik-logout=true`, see
`names.MARKERS`) makes any path of a provider's host the callback or the sign-out, and so does one
in the original URL of a forward-auth check: that is how the IdP's redirect back is recognised
behind a proxy that sends no path to the outpost directly. A marked request is answered here, never
passed on. A check is answered as the proxy relays it to the browser: never 2xx, which would let
the request through to the app; nginx, which cannot relay a redirect from auth_request, gets a 403.

A failed callback (forged, expired, replayed or foreign state; an IdP answer that does not
verify) ends in a 400 page saying why, and a log line. Back-channel logout is the one
endpoint that reads a body: at most BACKCHANNEL_BODY_LIMIT bytes (the edge answers 413
beyond), and it is answered here, never proxied. A sign-out that another site sent gets a
confirmation page instead (see `sent_cross_site`); that page's POST form has no fields, and a
sign_out POST is answered from its head, its body never read (the edge discards it).
"""

import logging
import urllib.parse
from collections.abc import Coroutine
from typing import Any

import ada_url
from cachetools import TTLCache
from mitmproxy import http

from . import names, pages
from .decision import Exchange, Outcome, decide, exchange_of, note, printable, undecided, without_query
from .forwarded import ProxyKind
from .login import LoginFailed, begin_login, finish_login
from .oidc import TokenError
from .provider import Provider
from .registry import Registry
from .session_check import load_session
from .urls import origin

logger = logging.getLogger("mitm_outpost")

ENDPOINT_PATHS = {prefix + name: name for prefix in names.ENDPOINT_PREFIXES for name in names.ENDPOINTS - names.HEALTH}
BACKCHANNEL_BODY_LIMIT = 64 * 1024  # a logout_token is a few KiB
# `none`: typed or bookmarked; `same-site`: a host of the same registrable domain (SameSite trusts it already).
OWN_SITE_FETCHES = frozenset({"same-origin", "same-site", "none"})
SITE_HEADERS = ("Sec-Fetch-Site", "Origin", "Referer")  # what says which site sent a request


def marker(query: str) -> tuple[str, str] | None:
    """The marker a query carries and the endpoint it names, or None.

    As authentik (`strings.EqualFold(query.Get(key), "true")`): the key's first value, `true` in any
    case; the callback's marker before the sign-out's."""
    if "%" not in query and names.AUTHENTIK_PREFIX not in query:  # nearly every query: not even parsed
        return None
    first: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        first.setdefault(key, value)
    return next(((key, endpoint) for key, endpoint in names.MARKERS if first.get(key, "").lower() == "true"), None)


def _rd(query: str) -> str:
    """`rd` from /start's query. nginx's documented sign-in location appends the original URL
    unencoded (`?rd=http://app/page?a=1&b=2`), so a raw URL there is taken whole."""
    if query.startswith(("rd=http://", "rd=https://", "rd=/")):
        return query[3:]
    return dict(urllib.parse.parse_qsl(query, keep_blank_values=True)).get("rd", "")


def sent_cross_site(request: http.Request, provider: Provider) -> str | None:
    """The header saying another site sent this request, or None.

    SameSite=Lax sends the session cookie on a top-level navigation from any site, and sign-out
    ends every session of the user, so a foreign page must not trigger it. Sec-Fetch-Site, when
    sent, decides: browsers set it and pages cannot (any value but those of OWN_SITE_FETCHES is
    foreign). Without it (older browsers), an Origin or Referer outside the provider's site is
    foreign. A request with none of them (curl, old clients) is not: nothing says where it came from.
    """
    if fetch_sites := request.headers.get_all("Sec-Fetch-Site"):
        return None if all(v.strip().lower() in OWN_SITE_FETCHES for v in fetch_sites) else "Sec-Fetch-Site"
    for name in ("Origin", "Referer"):
        if not all(_on_site(value, provider) for value in request.headers.get_all(name)):
            return name
    return None


def _on_site(url: str, provider: Provider) -> bool:
    """Is `url` on the provider's site: its origin, or for domain level a host of the cookie domain
    with the external scheme? Exactly where a login may return to (`safe_redirect`)."""
    try:
        parsed = ada_url.URL(url)  # absolute only: `null` (an opaque origin) or a relative value is foreign
    except ValueError:
        return False
    return provider.safe_redirect(origin(parsed)) is not None


def site_unknown(request: http.Request) -> bool:
    """A forward-auth sign-out that cannot say which site sent it: the proxy passed none of SITE_HEADERS
    (Envoy's documented config passes none of them), so their absence proves nothing there, unlike a
    request from curl. A POST is not asked again: Envoy keeps the method, and SameSite=Lax keeps the
    session cookie off a POST that another site sends."""
    return request.method != "POST" and not any(name in request.headers for name in SITE_HEADERS)


class Endpoints:
    failure_status = 503  # a failure here is the store's or the IdP's (see Chain)

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.seen_logout_tokens: TTLCache[str, bool] = TTLCache(maxsize=100_000, ttl=3600)  # jti replay guard

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """A coroutine only for a request to one of the endpoints: nearly every request is not."""
        exchange = undecided(flow)
        if exchange is None:
            return None
        check = exchange.forward
        query = check[1].query if check else exchange.query
        marked = marker(query)
        endpoint = marked[1] if marked else (ENDPOINT_PATHS.get(exchange.path) if check is None else None)
        if endpoint is None:
            return None
        return self.answer(flow, exchange, endpoint, marked)

    async def answer(self, flow: http.HTTPFlow, exchange: Exchange, endpoint: str,
                     marked: tuple[str, str] | None) -> None:
        check = exchange.forward
        query = check[1].query if check else exchange.query
        note(flow, endpoint=endpoint)
        if marked:
            note(flow, marker=marked[0])
            if check and check[0] is ProxyKind.NGINX:
                flow.response = pages.page(403, "Forbidden", "nginx cannot pass this answer on; sign in and out "
                                           "under /outpost.goauthentik.io/, sent to the outpost.")
                decide(flow, Outcome.DENIED, f"{endpoint}_marker", f"nginx check: the original URL carries "
                       f"{marked[0]}, and auth_request cannot relay a redirect (send /outpost.goauthentik.io/ to the "
                       "outpost)")
                return
        if endpoint == names.BACKCHANNEL_LOGOUT:
            length = flow.request.headers.get("Content-Length", "0")
            if not length.isdigit() or int(length) > BACKCHANNEL_BODY_LIMIT:
                flow.response = pages.json_error(413, "invalid_request",
                                                 detail=f"the body may hold at most {BACKCHANNEL_BODY_LIMIT} bytes")
                decide(flow, Outcome.DENIED, "body_too_large", "back-channel logout refused: body too large",
                       logging.WARNING)
                return
            exchange.deferred = True  # its logout_token is in the body: answered in request()
            exchange.body_limit = BACKCHANNEL_BODY_LIMIT
            return
        provider = exchange.provider
        assert provider is not None
        if endpoint == names.START:
            await self.start(flow, exchange, provider)
        elif endpoint == names.CALLBACK:
            await self.callback(flow, exchange, provider, query)
        else:  # the confirmation's form posts the marker again: the path may be the app's, reached through a proxy
            await self.sign_out(flow, exchange, provider, f"?{names.LOGOUT_QUERY}" if marked else exchange.path)
        response = flow.response
        assert response is not None
        if check and response.status_code < 300:  # a page for the browser, not "let it through to the app"
            response.status_code, response.reason = 403, "Forbidden"
        for cookie in exchange.set_cookies:
            response.headers.add("Set-Cookie", cookie)

    async def request(self, flow: http.HTTPFlow) -> None:
        exchange = exchange_of(flow)
        if flow.response is not None or exchange is None or not exchange.deferred or exchange.provider is None:
            return
        exchange.deferred = False
        await self.backchannel_logout(flow, exchange.provider)

    async def backchannel_logout(self, flow: http.HTTPFlow, provider: Provider) -> None:
        """The IdP ends sessions server to server: every session of that `sid`, or of that user."""
        if flow.request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            # mitmproxy would decompress without a bound: 169 bytes of bz2 become hundreds of MB.
            flow.response = pages.json_error(415, "unsupported_media_type",
                                             detail="send the logout_token without Content-Encoding")
            decide(flow, Outcome.DENIED, "content_encoding", "back-channel logout with a Content-Encoding refused",
                   logging.WARNING)
            return
        form = flow.request.urlencoded_form if flow.request.method == "POST" else None
        token = form.get("logout_token", "") if form is not None else ""
        try:
            claims = await provider.idp.verify_logout_token(token)
            jti = f"{provider.name}:{claims['jti']}"
            if jti in self.seen_logout_tokens:
                raise TokenError("logout_token replayed (jti seen before)")
            self.seen_logout_tokens[jti] = True
        except TokenError as e:
            flow.response = pages.json_error(400, "invalid_request", detail=str(e))
            decide(flow, Outcome.DENIED, "logout_token_refused", f"back-channel logout refused: {e}", logging.WARNING)
            return
        if claims.get("sid"):
            ended = await self.registry.store.delete_idp_session(str(claims["sid"]))
        else:
            ended = await self.registry.store.delete_user(provider.name, str(claims["sub"]))
        flow.response = pages.empty(200)
        decide(flow, Outcome.ENDPOINT, "backchannel_logout", f"back-channel logout: ended {ended} session(s)",
               logging.INFO)

    async def start(self, flow: http.HTTPFlow, exchange: Exchange, provider: Provider) -> None:
        rd = _rd(exchange.query)
        redirect = provider.safe_redirect(rd) if rd else None
        if rd and redirect is None:
            logger.warning("provider %s: refused rd=%r (not on %s)", provider.name, printable(without_query(rd)),
                           provider.external_origin)
        refused = " (rd refused)" if rd and redirect is None else ""
        redirect = redirect or provider.external_origin + "/"
        flow.response = await begin_login(self.registry, exchange, provider, redirect)
        decide(flow, Outcome.ENDPOINT, "start",
               f"start: sent to the identity provider, back to {without_query(redirect)}{refused}")

    async def callback(self, flow: http.HTTPFlow, exchange: Exchange, provider: Provider, query: str) -> None:
        """`query`: the request's, or the original URL's for a check. A check's retry link is the host's root,
        which the proxy checks again: /start may not reach the outpost there."""
        params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        retry = (provider.external_origin + names.START_PATH if exchange.forward is None else "/", "Sign in again")
        if "error" in params:
            # The error code goes to the record (and the log line, escaped); its free-text description,
            # which anyone can write into a URL, only to the page.
            error = printable(params["error"], 80)
            description = params.get("error_description", "")
            flow.response = pages.page(403, "Sign-in refused",
                                       f"The identity provider refused the login: {error} {description}".strip(), retry)
            decide(flow, Outcome.DENIED, "idp_refused", f"callback: the identity provider refused the login: {error}",
                   logging.WARNING)
            return
        redirect = await finish_login(self.registry, exchange, provider, params)
        if isinstance(redirect, LoginFailed):
            flow.response = pages.page(400, "Sign-in failed", redirect.message, retry)
            decide(flow, Outcome.DENIED, redirect.code, f"callback: {redirect.message}", logging.WARNING)
            return
        assert exchange.session is not None
        flow.response = pages.redirect(redirect)
        decide(flow, Outcome.ENDPOINT, "signed_in",
               f"callback: signed in as {exchange.session.username}, back to {without_query(redirect)}", logging.INFO)

    async def sign_out(self, flow: http.HTTPFlow, exchange: Exchange, provider: Provider, action: str) -> None:
        """`action`: where the confirmation's form posts, the URL that signs out."""
        header = sent_cross_site(flow.request, provider)
        if header or (exchange.forward is not None and site_unknown(flow.request)):
            why = f"{header} says another site sent it" if header else "the proxy passed nothing saying which site"
            flow.response = pages.confirm_sign_out(action)
            decide(flow, Outcome.ENDPOINT, "sign_out_confirm", f"sign_out: {why}; asked to confirm, no session ended",
                   logging.INFO)
            return
        await load_session(self.registry, exchange)
        session = exchange.session
        exchange.set_cookies.append(provider.clear_cookie(provider.cookie_name))
        if session is None:
            flow.response = pages.page(200, "Signed out", "You are signed out.")
            decide(flow, Outcome.ENDPOINT, "sign_out", "sign_out: no session")
            return
        ended = await self.registry.store.delete_user(provider.name, session.sub)
        if provider.idp.end_session_endpoint:
            status = 303 if flow.request.method == "POST" else 302  # after the confirmation form: GET at the IdP
            flow.response = pages.redirect(provider.idp.end_session_url(session.id_token_hint), status)
        else:
            flow.response = pages.page(200, "Signed out", "You are signed out.")
        decide(flow, Outcome.ENDPOINT, "sign_out", f"sign_out: ended {ended} session(s) of {session.username}",
               logging.INFO)
