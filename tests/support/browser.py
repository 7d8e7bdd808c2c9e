"""A real browser for end-to-end tests: Debian's Chromium driven by Playwright for Python.

Why: our own test client (httpx2) applies cookie rules the way *we* read the RFCs. Chromium is the
judge that matters: whether it stores the outpost's cookies, sends them back after the IdP's
cross-site redirect (SameSite), and keeps them off other hosts (Domain).

Chromium comes from Debian (``apt-get install chromium``, done automatically when running as root,
serialised with the same lock file as the apt installs of tests/support/proxies.py); Playwright
never downloads a browser here (``playwright install`` is not used), it is pointed at
``/usr/bin/chromium`` with ``executable_path``.

This module does not import pytest at import time; ``chromium_or_skip`` imports it lazily and must
only be called from a fixture or a test.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Debian package that ships /usr/bin/chromium.
APT_PACKAGE = "chromium"
#: The lock file of tests/support/proxies.py `_apt_install`: one apt-get at a time across processes.
APT_LOCK = Path(tempfile.gettempdir()) / "mitm-outpost-apt.lock"
#: What the browser waits for any one step (navigation, text, click), in milliseconds.
TIMEOUT_MS = 15_000

#: Flags for a headless Chromium on a machine without a screen, without outbound network and as root.
#: ``--host-resolver-rules`` makes every ``*.example.test`` name this machine (localhost and
#: 127.0.0.1 are untouched), so forward-auth tests can use real host names with real cookie rules.
#: HTTPS upgrades are disabled so ``http://app.example.test:<port>`` is fetched as typed.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable",
    "--host-resolver-rules=MAP *.example.test 127.0.0.1",
)

_apt_attempted = False


class BrowserUnavailable(RuntimeError):
    """Chromium or Playwright is missing and could not be installed."""


def find_chromium() -> str | None:
    """Path of Chromium: $CHROMIUM_PATH, else chromium / chromium-browser on PATH."""
    configured = os.environ.get("CHROMIUM_PATH")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _apt_install() -> str:
    """apt-get update + install chromium, once per process, serialised across processes."""
    global _apt_attempted
    if _apt_attempted:
        return "apt-get install chromium already attempted in this process"
    _apt_attempted = True
    with open(APT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if find_chromium():
            return "installed by another process"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            proc = subprocess.run(
                ["sh", "-c", f"apt-get update -qq && apt-get install -y -qq {APT_PACKAGE}"],
                check=False, env=env, capture_output=True, text=True, timeout=900,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"apt-get failed to run: {exc}"
        return f"apt-get exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def require_chromium() -> str:
    """Path of Chromium; installs it with apt-get when missing and running as root.

    Raises BrowserUnavailable when Chromium or the Playwright package is still missing.
    """
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        raise BrowserUnavailable(
            f"the Python package playwright is missing (it is in requirements.lock): {exc}") from None
    path = find_chromium()
    if path:
        return path
    detail = ""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        detail = _apt_install()
        path = find_chromium()
        if path:
            return path
    raise BrowserUnavailable(f"chromium not found (install it: apt-get install -y {APT_PACKAGE}). {detail}".strip())


def chromium_or_skip() -> str:
    """``require_chromium`` for fixtures: a missing browser fails under CI=true, skips otherwise."""
    try:
        return require_chromium()
    except BrowserUnavailable as exc:
        import pytest

        if os.environ.get("CI") == "true":
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
        raise  # unreachable: skip raises


@contextmanager
def chromium(executable: str) -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``), closed on exit.

    Playwright gives every launch a new, empty profile in a temp directory (its own
    ``--user-data-dir``), removed on close.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=list(CHROMIUM_ARGS),
                                     chromium_sandbox=False, timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any, width: int = 1000, height: int = 800) -> Any:
    """A page in a fresh context (its own cookie jar) with the step timeout set."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    return context.new_page()


def stored_cookies(page: Any, url: str) -> dict[str, dict[str, Any]]:
    """The cookies Chromium would send to ``url``, by name, as Chromium itself reports them (CDP).

    Read over the DevTools protocol rather than ``context.cookies()``: Playwright fills in
    ``sameSite`` when a cookie has none, CDP leaves it out, so a missing attribute shows.
    """
    cdp = page.context.new_cdp_session(page)
    try:
        cookies = cdp.send("Network.getCookies", {"urls": [url]})["cookies"]
    finally:
        cdp.detach()
    return {c["name"]: c for c in cookies}
