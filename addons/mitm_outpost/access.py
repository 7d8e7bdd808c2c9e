"""The Access addon: what happens to a request without a session.

Unauthenticated-path rules let it through without identity; otherwise a browser is sent
to log in (302 to /start, as authentik does) and an API client or XHR gets a 401 it can act on.
"""

import logging
import urllib.parse

from mitmproxy import http

from . import names, pages
from .decision import Outcome, decide, undecided
from .forwarded import normalise_path
from .names import Mode

logger = logging.getLogger("mitm_outpost")


def wants_login_page(request: http.Request) -> bool:
    """A browser navigation, not a script or an API client (which cannot follow a login)."""
    if request.headers.get("X-Requested-With", "").lower() == "xmlhttprequest":
        return False
    accept = request.headers.get("Accept")
    return accept is None or "text/html" in accept or "*/*" in accept


class Access:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        exchange = undecided(flow)
        if exchange is None:
            return
        provider = exchange.provider
        if provider.mode is not Mode.PROXY:
            flow.response = pages.page(404, "Not found", "This host is protected in forward-auth mode; only the outpost endpoints answer here.")
            decide(flow, Outcome.DENIED, "not an outpost endpoint (forward-auth provider)")
        elif exchange.session is not None:
            return
        elif provider.is_skipped(normalise_path(exchange.path) or ""):
            exchange.skipped = True
            decide(flow, Outcome.SKIPPED, "path matches an unauthenticated-path rule; no identity sent")
            return
        elif exchange.header_auth_failed and provider.intercept_header_auth:
            flow.response = pages.page(
                401, "Unauthenticated",
                "The Authorization header did not authenticate, and 'Receive header authentication' is on, so no redirect is performed.",
            )
            flow.response.headers["WWW-Authenticate"] = provider.www_authenticate
            decide(flow, Outcome.DENIED, "Authorization header did not authenticate")
        elif not wants_login_page(flow.request):
            flow.response = pages.page(401, "Unauthenticated", "Sign in first; this request cannot follow a login redirect.")
            decide(flow, Outcome.DENIED, "no session, and the client cannot follow a login redirect")
        else:
            target = provider.external_origin + flow.request.path
            location = f"{provider.external_origin}{names.START_PATH}?rd={urllib.parse.quote(target, safe='')}"
            flow.response = pages.redirect(location)
            decide(flow, Outcome.REDIRECTED, f"no session: sent to sign in, back to {flow.request.path[:200]}")
        for cookie in exchange.set_cookies:
            flow.response.headers.add("Set-Cookie", cookie)
