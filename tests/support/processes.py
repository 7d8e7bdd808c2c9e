"""Real processes for end-to-end tests: the outpost (mitmdump + our addons), the dev IdP and
the demo upstream, each on a free loopback port, each stopped when the test ends."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import httpx2
import yaml

from mitm_outpost.pytest_plugin import free_port, wait_for_port  # noqa: F401 (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class Process:
    """A child process with its output in a file, stopped on exit."""

    started: list["Process"] = []  # every process of the session, for checks over all their logs

    def __init__(self, args: list[str], port: int | None = None, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.args, self.port, self.env, self.cwd = args, port, env, cwd
        self.log = tempfile.NamedTemporaryFile(prefix="outpost-test-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Process":
        Process.started.append(self)
        self.proc = subprocess.Popen(
            self.args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})}, cwd=self.cwd or ROOT,
        )
        if self.port:
            try:
                wait_for_port(self.port, self.proc)
            except Exception as e:
                self.stop()
                raise RuntimeError(f"{self.args[0]} did not start: {e}\n{self.output}") from None
        return self

    @property
    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Process":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mock_idp(port: int) -> Process:
    """The bundled development IdP (oidc-provider-mock) with the demo users."""
    return Process(
        [str(BIN / "oidc-provider-mock"), "--port", str(port), "--user-claims-file", str(ROOT / "scripts/demo/users.yaml")],
        port=port,
    )


def whoami(port: int) -> Process:
    """The demo upstream: echoes the headers it received."""
    return Process([sys.executable, str(ROOT / "scripts/demo/whoami.py"), str(port)], port=port)


def provider_entry(name: str, outpost_port: int, upstream: str, issuer: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "mode": "proxy",
        "external_host": f"http://127.0.0.1:{outpost_port}",
        "internal_host": upstream,
        "issuer": issuer,
        "client_id": f"{name}-client",
        "client_secret": f"{name}-secret",
        **fields,
    }


# The production runner (its fast lane answers forward-auth checks without mitmproxy's layers) and
# mitmdump (every request a mitmproxy flow): forward-auth tests run against both and expect the same.
RUNNERS = ("lean", "mitmdump")


class Outpost(Process):
    """The outpost with a config written for this test: `mitmdump -s addons/outpost.py`, mitmweb,
    or (tool="lean") the production runner `python -m mitm_outpost`."""

    def __init__(self, providers: list[dict[str, Any]], http_port: int, https_port: int = 0,
                 extra: list[str] = (), env: dict[str, str] | None = None, tool: str = "mitmdump",  # type: ignore[assignment]
                 metrics_port: int = 0) -> None:
        self.config = Path(tempfile.mkdtemp(prefix="outpost-cfg-")) / "mitm_config.yaml"
        self.config.write_text(yaml.safe_dump({"outpost": {"name": "test-outpost"}, "providers": providers}))
        self.http_port, self.https_port = http_port, https_port
        settings = [f"outpost_config={self.config}", f"outpost_http_port={http_port}", f"outpost_https_port={https_port}",
                    "listen_port=0", f"metrics_port={metrics_port}", f"confdir={self.config.parent}"]
        if tool == "mitmdump":
            settings.append("flow_detail=0")  # mitmdump's own flow lines print URLs; the outpost's log is what is checked
        if tool == "lean":
            head = [sys.executable, "-m", "mitm_outpost"]
            env = {"PYTHONPATH": str(ROOT / "addons"), **(env or {})}
        else:
            head = [str(BIN / tool), "-s", str(ROOT / "addons/outpost.py")]
        args = head + [part for setting in settings for part in ("--set", setting)] + list(extra)
        super().__init__(args, port=http_port, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def browser(headers: dict[str, str] | None = None, **kwargs: Any) -> httpx2.Client:
    """A client that behaves like a browser navigating (keeps cookies, asks for HTML)."""
    return httpx2.Client(follow_redirects=False, headers={"Accept": "text/html", **(headers or {})}, timeout=10, **kwargs)


def mock_login(client: httpx2.Client, url: str, user: str = "alice") -> httpx2.Response:
    """Follow a protected URL through the dev IdP's login page; returns the callback's answer."""
    start = client.get(url)
    assert start.status_code == 302, start.text
    authorize = client.get(start.headers["location"])
    assert authorize.status_code == 302, authorize.text
    form = client.post(authorize.headers["location"], data={"sub": user})
    assert form.status_code == 302, form.text
    return client.get(form.headers["location"])


def follow_login(client: httpx2.Client, url: str, idp: str, user: str = "alice") -> httpx2.Response:
    """Follow redirects from a protected URL through the dev IdP's login; the final answer."""
    response = client.get(url)
    for _ in range(10):
        if response.status_code not in (301, 302, 303, 307):
            return response
        location = urllib.parse.urljoin(str(response.url), response.headers["location"])
        if location.startswith(idp) and "/oauth2/authorize" in location:
            response = client.post(location, data={"sub": user})
        else:
            response = client.get(location)
    raise AssertionError("too many redirects")
