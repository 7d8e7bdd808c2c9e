"""The outpost as tests run it: a config written from provider entries, the real runner, real logins.

`Outpost` is the process (the production runner, or mitmdump/mitmweb with addons/outpost.py);
`ProtectedApp` puts one in front of an app, with nginx in between for forward auth, and gives
browser-like clients and logins at a `DevIdP`; `Clients` are one test's clients of it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx2
import yaml

from .. import names
from .forward_auth import TEMPLATE, fill, nginx
from .idp import DevIdP, user_claims
from .login import browser, sign_in_to_callback, steps
from .processes import Child, free_port, wait_for_http
from .transport import LoopbackTransport

ADDON_SCRIPT = Path(__file__).resolve().parents[2] / "outpost.py"  # a checkout's addons/outpost.py
PING_PATH = names.OUTPOST_PREFIX + names.PING
FORWARD_AUTH_DOMAIN = "localtest"  # behind nginx the app is http://app.localtest:<port>, reached on 127.0.0.1


def runner_command(runner: str) -> list[str]:
    """The command of a runner: "lean" (`python -m mitm_outpost`, production's), or "mitmdump" or
    "mitmweb" with addons/outpost.py (every request a mitmproxy flow; needs a checkout)."""
    if runner == "lean":
        return [sys.executable, "-m", "mitm_outpost"]
    if not ADDON_SCRIPT.exists():
        raise RuntimeError(f"the {runner} runner needs a checkout's addons/outpost.py, not found at {ADDON_SCRIPT}")
    return [str(Path(sys.executable).parent / runner), "-s", str(ADDON_SCRIPT)]


class Outpost(Child):
    """One outpost on a config written from `providers` (authentik's field names) into `workdir` (also its
    confdir and cwd); `start` waits until it answers its ping. `settings` are more ``--set`` options,
    `extra` more arguments; HTTPS and metrics are off unless given a port."""

    def __init__(self, providers: Iterable[Mapping[str, Any]], *, http_port: int | None = None, https_port: int = 0,
                 metrics_port: int = 0, runner: str = "lean", name: str = "test-outpost", settings: Sequence[str] = (),
                 extra: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 workdir: str | os.PathLike[str] | None = None, log_dir: str | os.PathLike[str] | None = None) -> None:
        self.http_port, self.https_port = http_port or free_port(""), https_port  # "": it listens on every address
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="outpost-cfg-"))
        self.config = self.workdir / "mitm_config.yaml"
        self.config.write_text(yaml.safe_dump({"outpost": {"name": name}, "providers": [dict(p) for p in providers]}))
        every = [f"outpost_config={self.config}", f"outpost_http_port={self.http_port}",
                 f"outpost_https_port={https_port}", "listen_port=0", f"metrics_port={metrics_port}",
                 f"confdir={self.workdir}", *settings]
        if runner == "mitmdump":
            every.append("flow_detail=0")  # mitmdump's own flow lines print URLs; the outpost's log says what matters
        args = [*runner_command(runner), *(part for setting in every for part in ("--set", setting)), *extra]
        super().__init__(f"outpost ({runner})", args, port=self.http_port, cwd=self.workdir, env=env, log_dir=log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Self:
        super().start()
        if self.port:
            try:
                wait_for_http(f"http://127.0.0.1:{self.port}{PING_PATH}", 204, self.proc, self.what, self.log)
            except BaseException:
                self.stop()
                raise
        return self


class ProtectedApp:
    """The app at `upstream` behind an outpost whose one provider (`provider`, a dict) logs users in at
    `idp`. In "proxy" mode the outpost forwards to the app; in "forward_single" mode nginx serves it at
    http://app.localtest:<port> with `nginx_template` (default: docs/forward-auth/nginx-single.conf)
    and asks the outpost. `url` is where a browser goes; everything is removed at `stop`."""

    def __init__(self, idp: DevIdP, upstream: str, provider: Mapping[str, Any] | None = None, *,
                 mode: str = names.Mode.PROXY.value, nginx_template: str | None = None, runner: str = "lean") -> None:
        self.idp, self.upstream, self.mode = idp, upstream.rstrip("/"), mode
        self.workdir = Path(tempfile.mkdtemp(prefix="outpost-plugin-"))
        outpost_port = free_port("")
        name = "app" if mode == names.Mode.PROXY else "app-forward-auth"
        if mode == names.Mode.PROXY:
            self.url, self.hosts = f"http://127.0.0.1:{outpost_port}", frozenset[str]()
        else:
            self.nginx_port, self.hosts = free_port(), frozenset({f"app.{FORWARD_AUTH_DOMAIN}"})
            self.url = f"http://app.{FORWARD_AUTH_DOMAIN}:{self.nginx_port}"
        self.provider: dict[str, Any] = {
            "name": name, "mode": mode, "external_host": self.url, "issuer": idp.url, "client_id": f"{name}-client",
            "client_secret": f"{name}-secret-{os.urandom(8).hex()}",
            **({"internal_host": self.upstream} if mode == names.Mode.PROXY else {}), **dict(provider or {}),
        }
        # nginx asks from loopback; said explicitly, as the lean runner applies only the options it is given.
        self.outpost = Outpost([self.provider], http_port=outpost_port, runner=runner, name="pytest-outpost",
                               settings=["trusted_proxies=127.0.0.0/8"], workdir=self.workdir, log_dir=self.workdir)
        self.nginx: Child | None = None
        if mode != names.Mode.PROXY:
            up = urllib.parse.urlsplit(self.upstream)
            snippet = fill(nginx_template or TEMPLATE.read_text(), port=self.nginx_port, domain=FORWARD_AUTH_DOMAIN,
                           outpost_host="127.0.0.1", outpost_port=outpost_port, upstream_host=up.hostname,
                           upstream_port=up.port or 80)
            self.nginx = nginx(snippet, self.nginx_port, self.workdir / "nginx")

    def start(self) -> Self:
        try:
            for child in (self.outpost, self.nginx):
                if child is not None:
                    child.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for child in (self.nginx, self.outpost):
            if child is not None:
                child.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, **options: Any) -> httpx2.Client:
        """A browser-like client (see `login.browser`) with `base_url` = `url`."""
        return browser(base_url=self.url, transport=LoopbackTransport(self.hosts), **options)

    def login(self, client: httpx2.Client, username: str, claims: Mapping[str, Any],
              next_path: str = "/") -> httpx2.Response:
        """Declare the user at the IdP, then the real flow from /start (rd = `next_path`) to the callback,
        whose answer it returns; the session cookie is in `client`. A login without one fails with each
        step and the outpost's log."""
        self.idp.set_user(username, claims)
        target = urllib.parse.urljoin(self.url + "/", next_path.lstrip("/"))
        start = f"{self.url}{names.START_PATH}?{urllib.parse.urlencode({'rd': target})}"
        try:
            final = sign_in_to_callback(client, start, username)
        except RuntimeError as e:
            problem = str(e)
        else:
            if any(c.name == names.cookie_name(self.provider["client_id"]) for c in client.cookies.jar):
                return final
            walked = steps([*final.history, final])
            problem = f"login of {username!r} ended without a session:{walked}\n{final.text[:500]}"
        raise AssertionError(f"{problem}\n--- outpost log ---\n{self.outpost.output(3000)}")


class Clients:
    """The clients of one test on a `ProtectedApp`; `close` closes them all."""

    def __init__(self, app: ProtectedApp) -> None:
        self.app = app
        self._clients: list[httpx2.Client] = []

    @property
    def url(self) -> str:
        return self.app.url

    def anonymous(self, **options: Any) -> httpx2.Client:
        """A client without a session."""
        client = self.app.client(**options)
        self._clients.append(client)
        return client

    def login_as(self, username: str, *, groups: Iterable[str] = (), entitlements: Iterable[str] = (),
                 attributes: Mapping[str, Any] | None = None, ak_proxy: Mapping[str, Any] | None = None,
                 next_path: str = "/", client_options: Mapping[str, Any] | None = None, **claims: Any) -> httpx2.Client:
        """A client with a real session of `username`, who has these groups, entitlements, other claims
        (`email`, `name`, ...), authentik's `ak_proxy` claim, and `attributes` (its ``user_attributes``)."""
        proxy = dict(ak_proxy or {})
        if attributes is not None:
            proxy["user_attributes"] = {**dict(proxy.get("user_attributes") or {}), **dict(attributes)}
        if proxy:
            claims["ak_proxy"] = proxy
        client = self.anonymous(**dict(client_options or {}))
        self.app.login(client, username, user_claims(username, groups=groups, entitlements=entitlements, **claims),
                       next_path)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
