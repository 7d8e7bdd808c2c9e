"""pytest plugin: test your own app behind a real outpost, with real logins.

Installed with the package (entry point ``pytest11``); without the entry point, load it with
``pytest -p mitm_outpost.pytest_plugin``. Walk-through: docs/testing-your-app.md.

What runs, once per test session and only when a test asks for it:

- the bundled development IdP (``oidc-provider-mock``, from the venv of the running Python);
- your app: a URL you give, or a command the plugin starts on a free port;
- the outpost (``python -m mitm_outpost``) in proxy mode in front of your app;
- for forward-auth tests, nginx (from PATH or /usr/sbin) with the single-application config of
  docs/forward-auth/nginx-single.conf, asking a second outpost in ``forward_single`` mode.

Users are declared by the test that logs them in (``login_as("alice", groups=["admins"])``):
their claims are PUT into the dev IdP just before the real OIDC login, so every test can give
the same user different groups. Tests that run in parallel processes (xdist) each get their own
IdP and outpost.

Fixtures: ``outpost_upstream`` (override it, or set ``outpost_upstream``/``outpost_upstream_command``
in the ini file), ``outpost_provider`` (extra provider fields, override it), ``outpost_idp``,
``outpost_app``, ``outpost_nginx``, and per test ``login_as``, ``anonymous``,
``forward_auth_nginx``, ``outpost_clients``. Helpers: ``assert_identity``, ``assert_no_identity``, ``received_headers``,
``run_app``.

This module imports no mitmproxy code: the outpost runs in its own process.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx2
import pytest
import yaml

from . import names

__all__ = [
    "AppProcess", "DevIdP", "Harness", "OutpostSetup", "assert_identity", "assert_no_identity",
    "received_headers", "run_app",
]

READY_TIMEOUT = 30.0
FORWARD_AUTH_DOMAIN = "localtest"  # the app is http://app.localtest:<nginx port>/, mapped to 127.0.0.1
_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("outpost_upstream", "URL of the (already running) app to put behind the outpost", default="")
    parser.addini("outpost_upstream_command",
                  "command that starts the app; {port} is replaced by a free port, {python} by the running Python",
                  default="")
    parser.addini("outpost_nginx_template",
                  "nginx http{} snippet with {{port}} {{domain}} {{outpost_host}} {{outpost_port}} {{upstream_host}} "
                  "{{upstream_port}} placeholders (default: the built-in copy of docs/forward-auth/nginx-single.conf)",
                  default="")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A port free on every address: the outpost listens on all of them, and test servers on other
    loopback addresses (127.0.0.2, ...) would otherwise hold a port that 127.0.0.1 reports free."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[Any] | None = None, what: str = "process", log: Path | None = None,
                  timeout: float = READY_TIMEOUT) -> None:
    """Until something listens on `port`: a RuntimeError if `proc` exits first, a TimeoutError after
    `timeout` seconds, each ending with the tail of `log` when there is one."""
    def tail() -> str:
        return f":\n{_tail(log)}" if log is not None else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}{tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what}: nothing listens on port {port} after {timeout:.0f} s{tail()}")


def _tail(log: Path, size: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-size:]
    except OSError:
        return ""


class _Child:
    """A child process in its own process group, output in a log file, stopped on exit."""

    def __init__(self, what: str, args: Sequence[str], port: int, *, cwd: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.what, self.args, self.port = what, list(args), port
        fd, log = tempfile.mkstemp(prefix=f"outpost-plugin-{what.split()[0]}-", suffix=".log")
        os.close(fd)
        self.log = Path(log)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=cwd, env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            wait_for_port(port, self.proc, what, self.log)
        except BaseException:
            self.stop()
            raise

    @property
    def output(self) -> str:
        return _tail(self.log, 1 << 20)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # children that outlived the parent (nginx workers, a shell's child)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.unlink(missing_ok=True)  # what a failure needs is in its message


class AppProcess:
    """Your app, started from a command on a free port (``{port}`` in the command); ``url`` is its address.

    >>> with run_app([sys.executable, "app.py", "--port", "{port}"]) as app: ...
    """

    def __init__(self, command: str | Sequence[str], *, port: int | None = None, cwd: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.port = port or free_port()
        parts = shlex.split(command) if isinstance(command, str) else list(command)
        values = {"port": str(self.port), "python": sys.executable}
        self.args = [re.sub(r"\{(port|python)\}", lambda m: values[m.group(1)], str(p)) for p in parts]
        self.cwd, self.env = cwd, {"PORT": str(self.port), **(env or {})}
        self._child: _Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return self._child.output if self._child else ""

    def start(self) -> Self:
        self._child = _Child(f"app ({' '.join(self.args)})", self.args, self.port, cwd=self.cwd, env=self.env)
        return self

    def stop(self) -> None:
        if self._child:
            self._child.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_app(command: str | Sequence[str], **kwargs: Any) -> AppProcess:
    """An `AppProcess` (not yet started): use it as a context manager in your `outpost_upstream` fixture."""
    return AppProcess(command, **kwargs)


class DevIdP:
    """The development IdP (oidc-provider-mock). `set_user` declares a user and their claims at any time."""

    def __init__(self) -> None:
        binary = _BIN / "oidc-provider-mock"
        found = str(binary) if binary.exists() else shutil.which("oidc-provider-mock")
        if not found:
            pytest.fail("mitm_outpost.pytest_plugin needs the dev IdP: pip install oidc-provider-mock", pytrace=False)
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="outpost-plugin-idp-"))
        users = self.workdir / "users.yaml"
        users.write_text("[]\n")
        self._child = _Child("oidc-provider-mock", [found, "--port", str(self.port), "--user-claims-file", str(users)],
                             self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_user(self, sub: str, claims: Mapping[str, Any]) -> None:
        response = httpx2.put(f"{self.url}/users/{urllib.parse.quote(sub, safe='')}", json=dict(claims), timeout=10)
        assert response.status_code == 204, f"the dev IdP refused user {sub!r}: {response.status_code} {response.text}"

    def stop(self) -> None:
        self._child.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def user_claims(username: str, *, groups: Iterable[str] = (), entitlements: Iterable[str] = (),
                attributes: Mapping[str, Any] | None = None, ak_proxy: Mapping[str, Any] | None = None,
                **claims: Any) -> dict[str, Any]:
    """The claims the dev IdP gives `username` (`sub` and `preferred_username`); `attributes` become
    ``ak_proxy.user_attributes`` (where authentik puts a user's attributes, e.g. ``additionalHeaders``)."""
    proxy = dict(ak_proxy or {})
    if attributes is not None:
        proxy["user_attributes"] = {**dict(proxy.get("user_attributes") or {}), **dict(attributes)}
    result: dict[str, Any] = {
        "preferred_username": username, "name": username, "email": f"{username}@example.test", "email_verified": True,
        "groups": list(groups), "entitlements": list(entitlements), **claims,
    }
    if proxy:
        result["ak_proxy"] = proxy
    return result


class HostMap(httpx2.HTTPTransport):
    """Sends requests for the given host names to 127.0.0.1, keeping the name for Host and cookies."""

    def __init__(self, hosts: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hosts = frozenset(hosts)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.host not in self.hosts:
            return super().handle_request(request)
        original = request.url
        request.url = original.copy_with(host="127.0.0.1")
        try:
            return super().handle_request(request)
        finally:
            request.url = original


class OutpostSetup:
    """The outpost (and, for forward auth, nginx) in front of the app. `url` is where a browser goes."""

    def __init__(self, *, idp: DevIdP, upstream: str, provider: Mapping[str, Any], mode: str = "proxy",
                 nginx_template: str | None = None) -> None:
        self.idp, self.upstream, self.mode = idp, upstream.rstrip("/"), mode
        self._children: list[_Child] = []
        outpost_port = free_port()
        name = "app" if mode == "proxy" else "app-forward-auth"
        if mode == "proxy":
            self.url, self.hosts = f"http://127.0.0.1:{outpost_port}", ()
        else:
            self.nginx_port = free_port()
            self.url = f"http://app.{FORWARD_AUTH_DOMAIN}:{self.nginx_port}"
            self.hosts = (f"app.{FORWARD_AUTH_DOMAIN}",)
        entry: dict[str, Any] = {
            "name": name, "mode": mode, "external_host": self.url, "issuer": idp.url,
            "client_id": f"{name}-client", "client_secret": f"{name}-secret-{os.urandom(8).hex()}",
            **({"internal_host": self.upstream} if mode == "proxy" else {}), **dict(provider),
        }
        self.provider = entry
        self.workdir = Path(tempfile.mkdtemp(prefix="outpost-plugin-"))
        self.config = self.workdir / "outpost.yaml"
        self.config.write_text(yaml.safe_dump({"outpost": {"name": "pytest-outpost"}, "providers": [entry]}))
        settings = [f"outpost_config={self.config}", f"outpost_http_port={outpost_port}", "outpost_https_port=0",
                    "metrics_port=0", "listen_port=0", f"confdir={self.workdir}",
                    # nginx asks from loopback. Said explicitly: the lean runner applies only the options it is given.
                    "trusted_proxies=127.0.0.0/8"]
        args = [sys.executable, "-m", "mitm_outpost", *(p for s in settings for p in ("--set", s))]
        try:
            self.outpost = self._start(_Child("outpost", args, outpost_port, cwd=self.workdir))
            if mode != "proxy":
                self.nginx = self._start(self._nginx(nginx_template or NGINX_SINGLE, outpost_port))
        except BaseException:
            self.stop()
            raise

    def _start(self, child: _Child) -> _Child:
        self._children.append(child)
        return child

    def _nginx(self, template: str, outpost_port: int) -> _Child:
        binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")
        if not binary:
            pytest.skip("forward-auth tests need nginx (with auth_request) on PATH, e.g. apt-get install nginx")
        up = urllib.parse.urlsplit(self.upstream)
        values = {"port": self.nginx_port, "domain": FORWARD_AUTH_DOMAIN, "outpost_host": "127.0.0.1",
                  "outpost_port": outpost_port, "upstream_host": up.hostname, "upstream_port": up.port or 80}
        snippet = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(values[m.group(1)]), template)
        root = self.workdir / "nginx"
        (root / "tmp").mkdir(parents=True)
        user = "user root root;\n" if os.geteuid() == 0 else ""  # workers as nobody could not use this tmp tree
        (root / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid nginx.pid;\nerror_log stderr notice;\n"
            "events { worker_connections 256; }\nhttp {\n    access_log off;\n"
            + "".join(f"    {kind}_temp_path tmp/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + snippet + "\n}\n")
        return _Child("nginx", [binary, "-p", f"{root}/", "-c", "nginx.conf"], self.nginx_port, cwd=root)

    def client(self, **kwargs: Any) -> httpx2.Client:
        """A browser-like client (asks for HTML, keeps cookies, does not follow redirects) on `url`."""
        headers = {"Accept": "text/html", **dict(kwargs.pop("headers", None) or {})}
        return httpx2.Client(base_url=self.url, headers=headers, follow_redirects=kwargs.pop("follow_redirects", False),
                             timeout=kwargs.pop("timeout", 15), transport=HostMap(self.hosts), **kwargs)

    def login(self, client: httpx2.Client, username: str, claims: Mapping[str, Any], next_path: str = "/") -> httpx2.Response:
        """Declare the user at the IdP, then the real flow: start -> IdP authorize -> login form -> callback.
        Returns the callback's answer (a redirect to `next_path`); the session cookie is in `client`."""
        self.idp.set_user(username, claims)
        target = urllib.parse.urljoin(self.url + "/", next_path.lstrip("/"))
        url = f"{self.url}{names.START_PATH}?{urllib.parse.urlencode({'rd': target})}"
        trail = []
        response = client.get(url)
        for _ in range(10):
            trail.append(f"{response.request.method} {response.request.url} -> {response.status_code}")
            if response.status_code not in (301, 302, 303, 307, 308):
                break
            location = urllib.parse.urljoin(str(response.url), response.headers["location"])
            if response.url.path == names.CALLBACK_PATH:
                cookie = names.cookie_name(self.provider["client_id"])
                if any(c.name == cookie for c in client.cookies.jar):
                    return response
                break
            if location.startswith(self.idp.url) and "/authorize" in location:
                response = client.post(location, data={"sub": username})
            else:
                response = client.get(location)
        raise AssertionError(f"login of {username!r} through {self.url} failed:\n  " + "\n  ".join(trail)
                             + f"\n{response.text[:500]}\n--- outpost log ---\n{self.outpost.output[-3000:]}")

    def stop(self) -> None:
        for child in reversed(self._children):
            child.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Harness:
    """Clients for one test on one `OutpostSetup`; every client is closed when the test ends."""

    def __init__(self, setup: OutpostSetup) -> None:
        self.setup = setup
        self._clients: list[httpx2.Client] = []

    @property
    def url(self) -> str:
        return self.setup.url

    def anonymous(self, **kwargs: Any) -> httpx2.Client:
        """A client without a session."""
        client = self.setup.client(**kwargs)
        self._clients.append(client)
        return client

    def login_as(self, username: str, *, groups: Iterable[str] = (), entitlements: Iterable[str] = (),
                 attributes: Mapping[str, Any] | None = None, ak_proxy: Mapping[str, Any] | None = None,
                 next_path: str = "/", client_options: Mapping[str, Any] | None = None, **claims: Any) -> httpx2.Client:
        """A client with a real session of `username` (sub and preferred_username), who has these
        groups, entitlements, attributes (`ak_proxy.user_attributes`), `ak_proxy` and other claims."""
        client = self.anonymous(**dict(client_options or {}))
        self.setup.login(client, username, user_claims(username, groups=groups, entitlements=entitlements,
                                                       attributes=attributes, ak_proxy=ak_proxy, **claims), next_path)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()


# --------------------------------------------------------------------------- headers the app received


def received_headers(source: Any) -> dict[str, str]:
    """The request headers the app reports, names lower-cased.

    Contract: the app echoes them as JSON, either ``{"headers": {...}}``, ``{"headers": [[name, value], ...]}``,
    or a plain object of headers. `source` is a response with that body, the decoded JSON, or a mapping or
    list of pairs of headers (e.g. what your app recorded).
    """
    if isinstance(source, httpx2.Response):
        assert source.status_code == 200, f"the app answered {source.status_code}, not its headers: {source.text[:300]}"
        source = source.json()
    if isinstance(source, Mapping) and "headers" in source and not isinstance(source["headers"], str):
        source = source["headers"]
    pairs = source.items() if isinstance(source, Mapping) else source
    seen: dict[str, str] = {}
    for name, value in pairs:
        key = str(name).lower()
        seen[key] = f"{seen[key]}, {value}" if key in seen else str(value)
    return seen


_FIELDS = {"username": names.USERNAME, "email": names.EMAIL, "name": names.NAME, "uid": names.UID}
_LISTS = {"groups": names.GROUPS, "entitlements": names.ENTITLEMENTS}


def assert_identity(source: Any, username: str | None = None, *, groups: Iterable[str] | None = None,
                    entitlements: Iterable[str] | None = None, email: str | None = None, name: str | None = None,
                    uid: str | None = None, headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """Assert the app received this identity from the outpost; returns all headers it received.

    Only the given fields are checked. `groups` and `entitlements` compare as sets (the outpost
    joins them with ``|``); `headers` are further exact header values (e.g. ``additionalHeaders``).
    """
    seen = received_headers(source)
    problems = []
    expected = {"username": username, "email": email, "name": name, "uid": uid}
    for field, value in expected.items():
        got = seen.get(_FIELDS[field].lower())
        if value is not None and got != value:
            problems.append(f"{_FIELDS[field]}: expected {value!r}, the app received {got!r}")
    for field, values in (("groups", groups), ("entitlements", entitlements)):
        if values is None:
            continue
        raw = seen.get(_LISTS[field].lower())
        got_set = set(raw.split("|")) - {""} if raw is not None else None
        if got_set != set(values):
            problems.append(f"{_LISTS[field]}: expected {sorted(values)!r}, the app received {raw!r}")
    for header, value in (headers or {}).items():
        if seen.get(header.lower()) != value:
            problems.append(f"{header}: expected {value!r}, the app received {seen.get(header.lower())!r}")
    assert not problems, "identity headers:\n  " + "\n  ".join(problems)
    return seen


def assert_no_identity(source: Any) -> dict[str, str]:
    """Assert the app received no identity: every X-authentik-* header absent or empty."""
    seen = received_headers(source)
    filled = {h: seen[h.lower()] for h in names.IDENTITY_HEADERS[:7] if seen.get(h.lower())}
    assert not filled, f"the app received an identity: {filled}"
    return seen


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def outpost_upstream(pytestconfig: pytest.Config) -> Iterator[str]:
    """The app's URL. Default: the ini option `outpost_upstream`, or `outpost_upstream_command` started on a
    free port (cwd: the rootdir). Override this fixture (session scope) to start your app yourself."""
    url = str(pytestconfig.getini("outpost_upstream") or "").strip()
    command = str(pytestconfig.getini("outpost_upstream_command") or "").strip()
    if url:
        yield url
    elif command:
        with run_app(command, cwd=pytestconfig.rootpath) as app:
            yield app.url
    else:
        pytest.fail("mitm_outpost.pytest_plugin: tell it where your app is: override the `outpost_upstream` fixture, "
                    "or set `outpost_upstream` (URL) or `outpost_upstream_command` in the pytest ini options",
                    pytrace=False)


@pytest.fixture(scope="session")
def outpost_provider() -> dict[str, Any]:
    """Extra provider fields (authentik names), e.g. ``{"skip_path_regex": "^/health$"}``. Override it
    (session scope). Applies to proxy mode and forward auth alike."""
    return {}


@pytest.fixture(scope="session")
def outpost_idp() -> Iterator[DevIdP]:
    """The development IdP."""
    idp = DevIdP()
    yield idp
    idp.stop()


@pytest.fixture(scope="session")
def outpost_app(outpost_idp: DevIdP, outpost_upstream: str, outpost_provider: dict[str, Any]) -> Iterator[OutpostSetup]:
    """The outpost in proxy mode in front of the app, at ``outpost_app.url``."""
    setup = OutpostSetup(idp=outpost_idp, upstream=outpost_upstream, provider=outpost_provider)
    yield setup
    setup.stop()


@pytest.fixture(scope="session")
def outpost_nginx(pytestconfig: pytest.Config, outpost_idp: DevIdP, outpost_upstream: str,
                  outpost_provider: dict[str, Any]) -> Iterator[OutpostSetup]:
    """nginx at ``http://app.localtest:<port>`` in front of the app, asking an outpost in forward_single mode."""
    template_file = str(pytestconfig.getini("outpost_nginx_template") or "").strip()
    template = (pytestconfig.rootpath / template_file).read_text() if template_file else None
    provider = {k: v for k, v in outpost_provider.items() if k not in ("mode", "internal_host")}
    setup = OutpostSetup(idp=outpost_idp, upstream=outpost_upstream, provider=provider, mode="forward_single",
                         nginx_template=template)
    yield setup
    setup.stop()


@pytest.fixture
def outpost_clients(outpost_app: OutpostSetup) -> Iterator[Harness]:
    """`login_as` and `anonymous` together, for the proxy-mode outpost."""
    harness = Harness(outpost_app)
    yield harness
    harness.close()


@pytest.fixture
def login_as(outpost_clients: Harness) -> Any:
    """``login_as(username, groups=..., entitlements=..., attributes=..., ak_proxy=..., **claims)``:
    an httpx2 client on the outpost with a real session of that user."""
    return outpost_clients.login_as


@pytest.fixture
def anonymous(outpost_clients: Harness) -> httpx2.Client:
    """An httpx2 client on the outpost without a session (asks for HTML, does not follow redirects)."""
    return outpost_clients.anonymous()


@pytest.fixture
def forward_auth_nginx(outpost_nginx: OutpostSetup) -> Iterator[Harness]:
    """The same as `outpost_clients` behind nginx: ``forward_auth_nginx.login_as(...)``, ``.anonymous()``, ``.url``."""
    harness = Harness(outpost_nginx)
    yield harness
    harness.close()


# The built-in nginx config: the directives of docs/forward-auth/nginx-single.conf (kept equal by
# tests/e2e/test_plugin_example.py), for installs that do not have the docs.
NGINX_SINGLE = """\
map $http_cookie $authentik_cookie_1 {
    "~^(?<before>.*?)(?:;\\s*)?authentik_proxy_[0-9a-f]{8}(?:_login)?=[^;]*(?<after>.*)$" "$before$after";
    default $http_cookie;
}
map $authentik_cookie_1 $authentik_app_cookie {
    "~^(?<before>.*?)(?:;\\s*)?authentik_proxy_[0-9a-f]{8}(?:_login)?=[^;]*(?<after>.*)$" "$before$after";
    default $authentik_cookie_1;
}
map $http_upgrade $authentik_upgrade {
    "~*^websocket$" websocket;
    default         "";
}
map $http_upgrade $authentik_connection_upgrade {
    "~*^websocket$" upgrade;
    default         "";
}
server {
    listen      127.0.0.1:{{port}};
    server_name app.{{domain}};
    proxy_buffers     8 16k;
    proxy_buffer_size 32k;
    location / {
        proxy_pass         http://{{upstream_host}}:{{upstream_port}};
        proxy_http_version 1.1;
        proxy_set_header   Host $http_host;
        proxy_set_header   Cookie $authentik_app_cookie;
        proxy_set_header   Upgrade $authentik_upgrade;
        proxy_set_header   Connection $authentik_connection_upgrade;
        proxy_set_header   X-Forwarded-Host $http_host;
        proxy_set_header   X-Forwarded-Proto $scheme;
        auth_request     /outpost.goauthentik.io/auth/nginx;
        error_page       401 = @goauthentik_proxy_signin;
        auth_request_set $auth_cookie $upstream_http_set_cookie;
        add_header       Set-Cookie $auth_cookie;
        auth_request_set $authentik_username      $upstream_http_x_authentik_username;
        auth_request_set $authentik_groups        $upstream_http_x_authentik_groups;
        auth_request_set $authentik_entitlements  $upstream_http_x_authentik_entitlements;
        auth_request_set $authentik_email         $upstream_http_x_authentik_email;
        auth_request_set $authentik_name          $upstream_http_x_authentik_name;
        auth_request_set $authentik_uid           $upstream_http_x_authentik_uid;
        auth_request_set $authentik_jwt           $upstream_http_x_authentik_jwt;
        auth_request_set $authentik_meta_jwks     $upstream_http_x_authentik_meta_jwks;
        auth_request_set $authentik_meta_outpost  $upstream_http_x_authentik_meta_outpost;
        auth_request_set $authentik_meta_provider $upstream_http_x_authentik_meta_provider;
        auth_request_set $authentik_meta_app      $upstream_http_x_authentik_meta_app;
        auth_request_set $authentik_meta_version  $upstream_http_x_authentik_meta_version;
        auth_request_set $authentik_legacy_auth_username      $upstream_http_x_auth_username;
        auth_request_set $authentik_legacy_auth_groups        $upstream_http_x_auth_groups;
        auth_request_set $authentik_legacy_forwarded_email    $upstream_http_x_forwarded_email;
        auth_request_set $authentik_legacy_forwarded_pref_usr $upstream_http_x_forwarded_preferred_username;
        auth_request_set $authentik_legacy_forwarded_user     $upstream_http_x_forwarded_user;
        proxy_set_header X-authentik-username      $authentik_username;
        proxy_set_header X-authentik-groups        $authentik_groups;
        proxy_set_header X-authentik-entitlements  $authentik_entitlements;
        proxy_set_header X-authentik-email         $authentik_email;
        proxy_set_header X-authentik-name          $authentik_name;
        proxy_set_header X-authentik-uid           $authentik_uid;
        proxy_set_header X-authentik-jwt           $authentik_jwt;
        proxy_set_header X-authentik-meta-jwks     $authentik_meta_jwks;
        proxy_set_header X-authentik-meta-outpost  $authentik_meta_outpost;
        proxy_set_header X-authentik-meta-provider $authentik_meta_provider;
        proxy_set_header X-authentik-meta-app      $authentik_meta_app;
        proxy_set_header X-authentik-meta-version  $authentik_meta_version;
        proxy_set_header X-Auth-Username                $authentik_legacy_auth_username;
        proxy_set_header X-Auth-Groups                  $authentik_legacy_auth_groups;
        proxy_set_header X-Forwarded-Email              $authentik_legacy_forwarded_email;
        proxy_set_header X-Forwarded-Preferred-Username $authentik_legacy_forwarded_pref_usr;
        proxy_set_header X-Forwarded-User               $authentik_legacy_forwarded_user;
    }
    location /outpost.goauthentik.io/ {
        proxy_pass              http://{{outpost_host}}:{{outpost_port}};
        proxy_set_header        Host $http_host;
        proxy_set_header        X-Forwarded-Host $http_host;
        proxy_set_header        X-Forwarded-Proto $scheme;
        proxy_set_header        X-Original-URL $scheme://$http_host$request_uri;
        proxy_set_header        X-Original-URI "";
        proxy_pass_request_body off;
        proxy_set_header        Content-Length "";
    }
    location @goauthentik_proxy_signin {
        internal;
        add_header Set-Cookie $auth_cookie;
        return 302 /outpost.goauthentik.io/start?rd=$scheme://$http_host$request_uri;
    }
}
"""
