"""The responses the outpost writes itself: short, escaped, never a traceback."""

import html
import json
import time
from typing import Any, TypeVar

from mitmproxy import http

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;color:#222}}
h1{{font-size:1.4rem}}a{{color:#fd4b2d}}</style></head>
<body><h1>{title}</h1><p>{message}</p>{link}</body></html>
"""

NO_STORE = {"Cache-Control": "no-store"}


def page(status: int, title: str, message: str, link: tuple[str, str] | None = None) -> http.Response:
    anchor = f'<p><a href="{html.escape(link[0])}">{html.escape(link[1])}</a></p>' if link else ""
    body = _PAGE.format(title=html.escape(title), message=html.escape(message), link=anchor)
    return http.Response.make(status, body, {"Content-Type": "text/html; charset=utf-8", **NO_STORE})


def json_error(status: int, message: str, **details: str) -> http.Response:
    body = json.dumps({"message": message, **details}, indent="\t")
    return http.Response.make(status, body, {"Content-Type": "application/json", **NO_STORE})


def redirect(location: str, status: int = 302) -> http.Response:
    return http.Response.make(status, b"", {"Location": location, **NO_STORE})


_EMPTY: dict[int, dict[str, Any]] = {}  # status -> the fields of its empty answer's data
D = TypeVar("D", http.RequestData, http.ResponseData)


def unchecked(data_class: type[D], **fields: Any) -> D:
    """A mitmproxy message's data from fields already of the right types. mitmproxy type-checks
    every field of a new message unless Python runs with -O: about 20 µs a message, more than a
    forward-auth decision costs."""
    data = object.__new__(data_class)
    data.__dict__.update(fields)
    return data


def empty(status: int) -> http.Response:
    """An empty answer (ping, forward-auth verdicts: the hottest responses the outpost writes),
    copied from a prototype."""
    prototype = _EMPTY.get(status)
    # The prototype: a copy of the data's attributes (the live __dict__ of a discarded object did not stay put).
    if prototype is None:
        prototype = _EMPTY[status] = dict(vars(http.Response.make(status, b"", NO_STORE).data))
    headers = object.__new__(http.Headers)
    headers.fields = prototype["headers"].fields  # a tuple: every change to the headers assigns a new one
    data = object.__new__(http.ResponseData)
    fields = data.__dict__
    fields.update(prototype)
    fields["headers"] = headers
    fields["timestamp_start"] = fields["timestamp_end"] = time.time()
    response = object.__new__(http.Response)
    response.data = data
    return response


# The sign-out confirmation loads nothing and may not be framed: the click on it must be the user's own.
# No Referrer-Policy: with `no-referrer` a browser sends `Origin: null` on the form's POST, which reads as
# foreign; no form-action: Chromium applies it to the POST's redirect to the IdP too.
_CONFIRM_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}


def confirm_sign_out(action: str) -> http.Response:
    """The page a cross-site sign-out gets instead of the sign-out: a POST form to `action` (a sign-out
    URL that reaches the outpost on any path, through any proxy), which the browser sends same-origin."""
    form = (f'<form method="post" action="{html.escape(action)}"><p><button type="submit">Sign out</button> '
            '<a href="/">Stay signed in</a></p></form>')
    message = "Another site sent you here to sign out. Signing out ends your sessions on every device."
    body = _PAGE.format(title="Sign out?", message=html.escape(message), link=form)
    return http.Response.make(200, body, {"Content-Type": "text/html; charset=utf-8", **NO_STORE, **_CONFIRM_HEADERS})


def server_starting(wants_json: bool) -> http.Response:
    """What authentik's own server answers while its core is down or starting (embedded mode)."""
    if wants_json:
        response = http.Response.make(503, json.dumps({"error": "authentik starting"}),
                                      {"Content-Type": "application/json", **NO_STORE})
    else:
        response = page(503, "authentik is starting",
                        "The authentik server is not reachable right now. Try again in a moment.")
    response.headers["Retry-After"] = "5"
    return response
