"""Login, a protected page and sign-out in a real browser (Debian's Chromium, driven by Playwright).

The other end-to-end tests use our own HTTP client, which applies cookie rules as we understand
them. Here Chromium decides: whether the outpost's cookies are stored, sent back after the IdP's
redirect (SameSite), kept to their host (Domain) and allowed over plain http (Secure). Once in proxy
mode, once behind nginx with the documented forward-auth (single application) config.

Chromium is installed with apt when missing and running as root; under CI=true a missing browser
fails the test, elsewhere it skips. `SAVE_SCREENSHOT=1` rewrites docs/whoami.png from the proxy-mode
test (the demo's "who am I" page, signed in as alice).
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mitm_outpost import names
from mitm_outpost.testing.processes import free_port
from tests.support.browser import chromium, chromium_or_skip, new_page, stored_cookies
from tests.support.processes import ROOT, RUNNERS, Outpost, provider_entry
from tests.support.proxies import proxy_for, require_or_skip, standard_values

SCREENSHOT = ROOT / "docs" / "whoami.png"
DOMAIN = "example.test"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(chromium_or_skip()) as browser:
        yield browser


def sign_in(page: Any, url: str, idp: str, user: str = "alice") -> None:
    """Open a protected URL, pick ``user`` on the dev IdP's login page, land back on ``url``."""
    page.goto(url)
    page.wait_for_url(re.compile("^" + re.escape(idp) + "/"))
    page.locator(f"button[name=sub][value={user}]").click()
    page.wait_for_url(url)
    page.get_by_role("heading", name=f"Hello, {user}").wait_for()


def assert_outpost_cookies(page: Any, url: str, client_id: str, host: str) -> None:
    """The session and login-binding cookies as Chromium stored them: HttpOnly, SameSite=Lax,
    not Secure (plain http), host-only (no Domain attribute), Path=/."""
    cookies = stored_cookies(page, url)
    for name in (names.cookie_name(client_id), names.login_cookie_name(client_id)):
        assert name in cookies, f"no {name} for {url}: {sorted(cookies)}"
        cookie = cookies[name]
        assert cookie["httpOnly"] is True, cookie
        assert cookie.get("sameSite") == "Lax", cookie  # CDP omits sameSite when the cookie had none
        assert cookie["secure"] is False, cookie
        assert cookie["domain"] == host, cookie  # no leading dot: no Domain attribute, this host only
        assert cookie["path"] == "/", cookie
    assert names.cookie_name(client_id) not in page.evaluate("document.cookie")  # HttpOnly: scripts never see it


def sign_out(page: Any, url: str, idp: str, client_id: str) -> None:
    """Click "Sign out": the outpost ends the session and sends the browser to the IdP's end-session page."""
    page.get_by_role("link", name="Sign out").click()
    page.wait_for_url(re.compile("^" + re.escape(idp) + "/"))
    assert names.cookie_name(client_id) not in stored_cookies(page, url)
    page.goto(url)  # signed out: the protected page sends the browser to log in again
    page.wait_for_url(re.compile("^" + re.escape(idp) + "/"))
    page.locator("button[name=sub][value=alice]").wait_for()


def test_proxy_mode_login_page_and_sign_out(browser: Any, idp: str, upstream: str) -> None:
    port = free_port()
    entry = provider_entry("browser", port, upstream, idp)
    with Outpost([entry], port) as outpost:
        page = new_page(browser)
        try:
            url = f"{outpost.url}/"
            sign_in(page, url, idp)
            assert page.locator("th:has-text('X-authentik-email') + td").inner_text() == "alice@example.test"
            assert_outpost_cookies(page, url, entry["client_id"], "127.0.0.1")
            # in proxy mode the outpost takes its cookies out of the request: the app never sees them
            assert names.COOKIE_PREFIX not in page.locator("body").inner_text()
            assert page.screenshot()[8:24] == Path(SCREENSHOT).read_bytes()[8:24], "not a PNG of docs/whoami.png's size"
            if os.environ.get("SAVE_SCREENSHOT") == "1":
                page.screenshot(path=str(SCREENSHOT), full_page=False)
            sign_out(page, url, idp, entry["client_id"])
        finally:
            page.context.close()


@pytest.fixture(scope="module", params=RUNNERS, ids=[f"nginx-single.conf-{tool}" for tool in RUNNERS])
def nginx_single(request: pytest.FixtureRequest, idp: str, upstream: str) -> Iterator[tuple[str, str]]:
    """nginx with docs/forward-auth/nginx-single.conf in front of the demo app; (app URL, client_id)."""
    require_or_skip("nginx")
    proxy_port, outpost_port = free_port(), free_port()
    client_id = "browser-fwd-single"
    entry = {
        "name": "browser-fwd-single", "client_id": client_id, "client_secret": "browser-fwd-secret", "issuer": idp,
        "mode": "forward_single", "external_host": f"http://app.{DOMAIN}:{proxy_port}",
    }
    up = urllib.parse.urlsplit(upstream)
    values = standard_values(port=proxy_port, outpost=("127.0.0.1", outpost_port), upstream=(up.hostname, up.port),
                             domain=DOMAIN, cookie_name=names.cookie_name(client_id))
    with Outpost([entry], outpost_port, tool=request.param), \
            proxy_for("nginx-single.conf", tempfile.mkdtemp(prefix="browser-nginx-"), values):
        yield f"http://app.{DOMAIN}:{proxy_port}/", client_id


def test_nginx_forward_auth_login_page_and_sign_out(browser: Any, idp: str, nginx_single: tuple[str, str]) -> None:
    url, client_id = nginx_single
    page = new_page(browser)
    try:
        sign_in(page, url, idp)  # IdP on 127.0.0.1, app on app.example.test: a cross-site round trip
        assert page.locator("th:has-text('X-authentik-meta-provider') + td").inner_text() == "browser-fwd-single"
        assert_outpost_cookies(page, url, client_id, f"app.{DOMAIN}")
        assert not stored_cookies(page, f"http://other.{DOMAIN}:{urllib.parse.urlsplit(url).port}/")
        sign_out(page, url, idp, client_id)
    finally:
        page.context.close()


def test_screenshot_is_committed() -> None:
    """docs/whoami.png (SAVE_SCREENSHOT=1 regenerates it) is a whole PNG, every chunk's CRC right and its pixels
    exactly the size its header says, of the 1000x800 viewport the proxy-mode test shows; and what it shows is the
    who-am-I page: white, the heading and the "Sign out" link (a browser's unvisited-link blue) at the body's 32px
    margin, the link below all the text."""
    import struct
    import zlib

    data = Path(SCREENSHOT).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body, (crc,) = data[at + 8:at + 8 + length], struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{kind!r} chunk at byte {at} is damaged"
        chunks.append((kind, body))
        at += 12 + length
    assert (chunks[0][0], chunks[-1]) == (b"IHDR", (b"IEND", b""))
    width, height, *kind = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height, kind) == (1000, 800, [8, 2, 0, 0, 0])  # 8-bit RGB, not interlaced
    stride = 3 * width
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + stride)

    def paeth(a: int, b: int, c: int) -> int:
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        return a if pa <= pb and pa <= pc else b if pb <= pc else c

    high = int.from_bytes(b"\x80" * stride)
    low = high ^ int.from_bytes(b"\xff" * stride)
    rows, previous = [], bytes(stride)
    for y in range(height):  # the scanline filters of PNG (RFC 2083 6.3) undone
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        assert kind in (0, 1, 2, 3, 4), f"row {y}: filter {kind}"
        if kind == 2:  # up: a byte-wise sum with the row above, all bytes at once
            a, b = int.from_bytes(line), int.from_bytes(previous)
            line = bytearray((((a & low) + (b & low)) ^ ((a ^ b) & high)).to_bytes(stride))
        for x in range(stride) if kind in (1, 3, 4) else ():
            left = line[x - 3] if x >= 3 else 0
            up, corner = previous[x], previous[x - 3] if x >= 3 else 0
            line[x] = (line[x] + (left, up, (left + up) // 2, paeth(left, up, corner))[kind - 1]) & 0xFF
        rows.append(previous := bytes(line))

    def where(colour: bytes) -> list[tuple[int, int]]:
        found = []
        for y, row in enumerate(rows):
            at = row.find(colour)
            while at != -1:
                if at % 3 == 0:
                    found.append((at // 3, y))
                at = row.find(colour, at + 1)
        return found

    text, link = where(bytes((0, 0, 0))), where(bytes((0, 0, 238)))
    assert rows[0][:3] == rows[-1][-3:] == bytes((255, 255, 255))
    assert text and link, "no black text or no link-blue pixel"
    assert min(x for x, _ in text) == min(x for x, _ in link) == 32
    assert max(y for _, y in text) < min(y for _, y in link), "the link is not below the text"
