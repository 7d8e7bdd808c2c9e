"""Signing in the way a browser does: every redirect followed by hand, the IdP's login form answered.

One walker for every IdP the tests and benchmarks run, so that a login is the real authorization-code
flow (the outpost's /start, the IdP, the outpost's callback) and a failure shows each step.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import httpx2

from .. import names

MAX_HOPS = 12  # a login is about six; more means a loop (e.g. a session cookie that never sticks)


class LoginForm(NamedTuple):
    """How an IdP asks for a user: which redirect targets its login form, and what to post there."""

    asks: Callable[[urllib.parse.SplitResult], bool]
    fields: Callable[[str, str | None], dict[str, str]]


FORMS: Mapping[str, LoginForm] = {
    # oidc-provider-mock: its authorize endpoint shows the form and takes `sub` posted to the same URL.
    "mock": LoginForm(lambda url: url.path.endswith("/oauth2/authorize"), lambda user, _: {"sub": user}),
    # panva's oidc-provider with devInteractions (tests/idp/op.mjs grants consent itself): one login prompt.
    "panva": LoginForm(lambda url: url.path.startswith("/interaction/"),
                       lambda user, password: {"prompt": "login", "login": user, "password": password or "x"}),
}


def browser(headers: Mapping[str, str] | None = None, **options: Any) -> httpx2.Client:
    """A client that behaves like a browser navigating: asks for HTML, keeps cookies, and does not
    follow redirects, so that the walk (and a test) sees each one."""
    return httpx2.Client(headers={"Accept": "text/html", **dict(headers or {})},
                         **{"follow_redirects": False, "timeout": 15, **options})


def steps(responses: Iterable[httpx2.Response]) -> str:
    """The walk so far, one step a line: `METHOD url -> status`."""
    return "".join(f"\n  {r.request.method} {r.request.url} -> {r.status_code}" for r in responses)


def login_steps(client: httpx2.Client, url: str, username: str = "alice", *, idp: str = "mock",
                password: str | None = None) -> Iterator[httpx2.Response]:
    """Each answer of the walk from `url`, lazily (a caller may stop before the next request): GET every
    redirect target, POST the IdP's login form once; ends with the first answer that is not a redirect.
    RuntimeError, with the steps so far, when the IdP asks a second time or the hops run out."""
    form = FORMS[idp]
    walked: list[httpx2.Response] = []
    method, data, answered = "GET", None, False
    for _ in range(MAX_HOPS):
        response = client.request(method, url, data=data)
        walked.append(response)
        yield response
        if not response.is_redirect:
            return
        url = urllib.parse.urljoin(str(response.url), response.headers["location"])
        method, data = "GET", None
        if form.asks(urllib.parse.urlsplit(url)):
            if answered:
                raise RuntimeError(f"the IdP asked for {username!r} again: the login was refused{steps(walked)}")
            method, data, answered = "POST", form.fields(username, password), True
    raise RuntimeError(f"login of {username!r}: still redirected after {MAX_HOPS} steps{steps(walked)}")


def sign_in(client: httpx2.Client, url: str, username: str = "alice", *, idp: str = "mock",
            password: str | None = None) -> httpx2.Response:
    """GET `url` and walk the login through to its end (see `login_steps`): the final answer, with every
    earlier one in its `history` (the outpost's callback among them). `idp` names the login form: "mock"
    (oidc-provider-mock) or "panva" (oidc-provider's devInteractions, any password)."""
    *history, final = login_steps(client, url, username, idp=idp, password=password)
    final.history = history
    return final


def _is_callback(url: httpx2.URL) -> bool:
    """The outpost's callback: its redirect_uri carries the marker; seed 002's legacy path may not."""
    return url.params.get(names.CALLBACK_MARKER) == "true" or url.path in (names.CALLBACK_PATH,
                                                                           names.LEGACY_CALLBACK_PATH)


def sign_in_to_callback(client: httpx2.Client, url: str, username: str = "alice", *, idp: str = "mock",
                        password: str | None = None) -> httpx2.Response:
    """`sign_in` up to the outpost's callback, whose answer it returns (the session's Set-Cookie, the
    redirect to the page), earlier ones in its `history`. The page itself is not asked for, so the app
    sees only the requests of the test."""
    walked: list[httpx2.Response] = []
    for response in login_steps(client, url, username, idp=idp, password=password):
        if _is_callback(response.url):
            response.history = walked
            return response
        walked.append(response)
    raise RuntimeError(f"login of {username!r} never reached the outpost's callback{steps(walked)}")
