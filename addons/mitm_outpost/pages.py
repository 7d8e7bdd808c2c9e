"""The responses the outpost writes itself: short, escaped, never a traceback."""

import html
import json

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


def redirect(location: str, set_cookies: list[str] = ()) -> http.Response:  # type: ignore[assignment]
    response = http.Response.make(302, b"", {"Location": location, **NO_STORE})
    for cookie in set_cookies:
        response.headers.add("Set-Cookie", cookie)
    return response


def empty(status: int) -> http.Response:
    return http.Response.make(status, b"", NO_STORE)
