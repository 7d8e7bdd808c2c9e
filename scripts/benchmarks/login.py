"""Signing in before the load, and the one-request checks that the load tool's headers do what the row says:
a session (cookie or bearer token) that reaches the upstream as alice, or the redirect a flood row measures."""

from __future__ import annotations

import re
import sys
import urllib.parse

import httpx2

from mitm_outpost import names
from mitm_outpost.testing.login import browser, sign_in, steps

from .shared import USER

SESSION_COOKIE = re.compile(rf"^{names.COOKIE_PREFIX}[0-9a-f]{{8}}$")


def log_in(origin: str, transport: httpx2.BaseTransport | None = None,
           session_cookie: re.Pattern[str] = SESSION_COOKIE) -> str:
    """Sign in as alice like a browser would, at origin/bench (through the outpost's /start, or Apache's own
    redirect, and the dev IdP), and return the `Cookie:` value of the one session cookie (its name matching
    `session_cookie`); the walk must end at /bench answered by the upstream as alice."""
    with browser(transport=transport) as client:
        try:
            final = sign_in(client, origin + "/bench", USER)
        except RuntimeError as e:
            sys.exit(f"login: {e}")
        if final.status_code != 200 or final.text.strip() != f"hello {USER}":
            sys.exit(f"login: ended with {final.status_code} {final.text[:200]!r}, expected 'hello {USER}' from "
                     f"the upstream:{steps([*final.history, final])}")
        cookies = [f"{c.name}={c.value}" for c in client.cookies.jar if session_cookie.match(c.name)]
    if len(cookies) != 1:
        sys.exit(f"login: expected one session cookie {session_cookie.pattern}, got {cookies}")
    return cookies[0]


def id_token(idp: str, client_id: str, client_secret: str = "bench-secret") -> str:
    """An ID token for alice issued by the dev IdP to `client_id`, got by an authorization-code flow by
    hand: POST sub=alice to the authorize endpoint -> 302 redirect_uri?code= -> token endpoint."""
    redirect_uri = "http://127.0.0.1:9/bench-callback"  # never followed
    with httpx2.Client(follow_redirects=False, timeout=10) as client:
        meta = client.get(idp + "/.well-known/openid-configuration").json()
        query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                 "scope": "openid profile email", "state": "bench", "nonce": "bench"}
        r = client.post(meta["authorization_endpoint"], params=query, data={"sub": USER})
        location = r.headers.get("location", "")
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query).get("code", [""])[0]
        if r.status_code != 302 or not location.startswith(redirect_uri) or not code:
            sys.exit(f"id token: authorize answered {r.status_code} -> {location!r}, expected a 302 to "
                     f"{redirect_uri}?code=...\n{r.text[:500]}")
        r = client.post(meta["token_endpoint"], auth=(client_id, client_secret),
                        data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri})
        token = r.json().get("id_token") if r.status_code == 200 else None
        if not token:
            sys.exit(f"id token: token endpoint answered {r.status_code}: {r.text[:500]}")
    return token


def _get(url: str, headers: tuple[str, ...] | list[str]) -> httpx2.Response:
    """One request with exactly the load tool's headers (`Name: value` lines)."""
    return httpx2.get(url, headers=[tuple(h.split(": ", 1)) for h in headers], timeout=10)  # type: ignore[misc]


def check_proxied(url: str, headers: tuple[str, ...] | list[str], user: str = USER) -> None:
    """One request with exactly the load tool's headers (the session cookie, Host) must reach the
    upstream as `user` (not a login redirect)."""
    r = _get(url, headers)
    if r.status_code != 200 or r.text.strip() != f"hello {user}".strip():
        sys.exit(f"session check: {url} {list(headers)} answered {r.status_code} {r.headers.get('location', '')} "
                 f"{r.text[:200]!r}, expected 200 'hello {user}' from the upstream")


def check_redirect(url: str, headers: tuple[str, ...], expect: str) -> None:
    """One request with the load tool's headers must answer 302 to a location containing `expect`:
    the flood rows measure that answer, not an error page."""
    r = _get(url, headers)
    if r.status_code != 302 or expect not in r.headers.get("location", ""):
        sys.exit(f"{url} {list(headers)} answered {r.status_code} {r.headers.get('location', '')!r}, "
                 f"expected a 302 to ...{expect}...")
