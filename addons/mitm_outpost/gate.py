"""The Gate addon: the facts the chain gathered, one `verdict()`, and its answer.

For a request to proxy: upstream (Upstream adds the identity), a 308 to the normal path, a
302 to /start for a browser (as authentik does), or a 401 an API client or XHR can act on.
For a forward-auth check: the answer each reverse proxy understands, 2xx with the identity
headers, 401, or a 302 to the identity provider. Only a session, header authentication or a
matching unauthenticated-path rule gives a 2xx (the CVE-2026-25748 class is forward auth
failing open), and a step that fails denies (see Chain).
"""

import logging
import urllib.parse
from collections.abc import Coroutine
from typing import Any

from mitmproxy import http

from . import names, pages
from .decision import Exchange, Outcome, decide, undecided
from .login import begin_login
from .names import Mode
from .registry import Registry
from .verdict import Action, Credential, Facts, Reason, Verdict, verdict

logger = logging.getLogger("mitm_outpost")

# On a rule-allowed answer every identity header is present and empty, so no proxy passes on
# the client's own copy.
EMPTY_IDENTITY = tuple((name.encode(), b"") for name in names.ALL_IDENTITY_HEADERS)
OUTCOMES = {Action.ALLOW: Outcome.ALLOWED, Action.SKIP: Outcome.SKIPPED, Action.LOGIN: Outcome.REDIRECTED,
            Action.REDIRECT: Outcome.REDIRECTED, Action.DENY: Outcome.DENIED}
TEXTS = {
    Reason.FORWARD_AUTH_HOST: "not an outpost endpoint (forward-auth provider)",
    Reason.NON_NORMAL_PATH: "the path is not in normal form (dot segments, encoded dots, repeated slashes): "
                            "sent to its normal form",
    Reason.BACKEND_INVALID: "the user's ak_proxy backend claims are not valid",
    Reason.UNAUTHENTICATED_PATH: "matches an unauthenticated-path rule; no identity sent",
    Reason.HEADER_AUTH_FAILED: "the Authorization header did not authenticate",
    Reason.NOT_A_BROWSER: "no session, and the client cannot follow a login redirect",
    Reason.ORIGINAL_URL_UNKNOWN: "no session, and the original URL is unknown or not this provider's",
    Reason.NO_SESSION: "no session",
}


def wants_login_page(request: http.Request) -> bool:
    """A browser navigation, not a script or an API client (which cannot follow a login)."""
    if request.headers.get("X-Requested-With", "").lower() == "xmlhttprequest":
        return False
    accept = request.headers.get("Accept")
    return accept is None or "text/html" in accept or "*/*" in accept


def facts_of(flow: http.HTTPFlow, exchange: Exchange) -> Facts:
    provider = exchange.provider
    assert provider is not None
    session = exchange.session
    if session is not None:
        credential = Credential.HEADER if exchange.by_header else Credential.SESSION
    else:
        credential = Credential.HEADER_FAILED if exchange.header_auth_failed else Credential.NONE
    if exchange.forward is None:
        normal = exchange.normal_path
        return Facts(provider.mode, None, credential, normal is not None and provider.is_skipped(normal),
                     path_normal=normal is None or normal == exchange.path, browser=wants_login_page(flow.request),
                     intercept_header_auth=provider.intercept_header_auth,
                     backend_valid=session is None or not session.backend_error)
    kind, original = exchange.forward
    # Where a login would return to matters only without a credential: not worth a URL parse per signed-in check.
    needs_return = credential in (Credential.NONE, Credential.HEADER_FAILED)
    return Facts(provider.mode, kind, credential,
                 original.normal and provider.is_skipped(
                     original.origin_url if provider.mode is Mode.FORWARD_DOMAIN else (original.path or "")),
                 intercept_header_auth=provider.intercept_header_auth,
                 return_url_known=not needs_return
                 or bool(original.url) and provider.safe_redirect(original.url) is not None)


def add_cookies(flow: http.HTTPFlow, exchange: Exchange) -> None:
    """The cookies earlier steps asked for (a cleared stale session cookie, say), on the answer."""
    if flow.response is not None:
        for cookie in exchange.set_cookies:
            flow.response.headers.add("Set-Cookie", cookie)


class Gate:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """Decides at once; only a check that begins a login waits (for the store), as a coroutine."""
        exchange = undecided(flow)
        if exchange is None:
            return None
        exchange.verdict = decision = verdict(facts_of(flow, exchange))
        if exchange.forward is None:
            self.answer_request(flow, exchange, decision)
        elif decision.action is Action.LOGIN:
            return self.login_for_check(flow, exchange, decision)
        else:
            self.answer_check(flow, exchange, decision)
        add_cookies(flow, exchange)
        return None

    async def login_for_check(self, flow: http.HTTPFlow, exchange: Exchange, decision: Verdict) -> None:
        provider = exchange.provider
        assert provider is not None and exchange.forward is not None
        kind, original = exchange.forward
        redirect = provider.safe_redirect(original.url)
        assert redirect is not None
        flow.response = await begin_login(self.registry, exchange, provider, redirect)
        decide(flow, OUTCOMES[decision.action], decision.reason,
               f"{kind.value} check: no session: sent to the identity provider, back to {original.path}")
        add_cookies(flow, exchange)

    def answer_request(self, flow: http.HTTPFlow, exchange: Exchange, decision: Verdict) -> None:
        provider = exchange.provider
        assert provider is not None
        session = exchange.session
        if decision.action is Action.ALLOW:
            assert session is not None
            return  # Upstream records it once the request is re-targeted
        if decision.action is Action.SKIP:
            decide(flow, Outcome.SKIPPED, decision.reason, "path " + TEXTS[decision.reason])
            return
        if decision.action is Action.REDIRECT:
            query = f"?{exchange.query}" if exchange.query else ""
            flow.response = pages.redirect(f"{exchange.normal_path}{query}", status=308)
            text = f"{TEXTS[decision.reason]} {exchange.normal_path}"
        elif decision.action is Action.LOGIN:
            target = provider.external_origin + flow.request.path
            flow.response = pages.redirect(
                f"{provider.external_origin}{names.START_PATH}?rd={urllib.parse.quote(target, safe='')}")
            text = f"no session: sent to sign in, back to {exchange.path}"
        elif decision.reason is Reason.BACKEND_INVALID:
            assert session is not None
            flow.response = pages.page(502, "Bad Gateway", "The backend chosen for this user is not valid.")
            text = f"ak_proxy claims of {session.username}: {session.backend_error}"
        else:
            flow.response = self.refusal(decision, provider.www_authenticate)
            text = TEXTS[decision.reason]
        level = logging.WARNING if decision.reason is Reason.BACKEND_INVALID else logging.DEBUG
        decide(flow, OUTCOMES[decision.action], decision.reason, text, level)

    def answer_check(self, flow: http.HTTPFlow, exchange: Exchange, decision: Verdict) -> None:
        provider = exchange.provider
        assert provider is not None and exchange.forward is not None
        kind, original = exchange.forward
        session = exchange.session
        if decision.action is Action.ALLOW:
            assert session is not None
            flow.response = pages.empty(200)
            flow.response.headers.fields += session.headers + provider.static_headers
            text = f"{kind.value} check: session of {session.username}"
        elif decision.action is Action.SKIP:
            flow.response = pages.empty(200)
            flow.response.headers.fields += EMPTY_IDENTITY
            text = f"{kind.value} check: {original.path} {TEXTS[decision.reason]}"
        else:  # a login is login_for_check's
            flow.response = self.refusal(decision, provider.www_authenticate)
            text = f"{kind.value} check: {TEXTS[decision.reason]}"
        decide(flow, OUTCOMES[decision.action], decision.reason, text)

    @staticmethod
    def refusal(decision: Verdict, www_authenticate: str) -> http.Response:
        if decision.reason is Reason.HEADER_AUTH_FAILED:
            response = pages.page(401, "Unauthenticated",
                                  "The Authorization header did not authenticate, and 'Receive header "
                                  "authentication' is on, so no redirect is performed.")
            response.headers["WWW-Authenticate"] = www_authenticate
            return response
        if decision.reason is Reason.FORWARD_AUTH_HOST:
            return pages.page(404, "Not found",
                              "This host is protected in forward-auth mode; only the outpost endpoints answer here.")
        return pages.page(decision.status, "Unauthenticated",
                          "Sign in first; this request cannot follow a login redirect.")
