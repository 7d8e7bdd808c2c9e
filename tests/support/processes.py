"""Real processes for end-to-end tests, on `mitm_outpost.testing`: what only our tests need of them.

Every process of the session is kept in `Process.started` and its whole log is `output` (the tests
search it, and tests/conftest.py checks every outpost's log for secrets at the end); the dev IdP
has the demo users; the outpost runs this checkout's code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import httpx2

from mitm_outpost import names
from mitm_outpost.testing import outpost as harness
from mitm_outpost.testing.idp import DevIdP
from mitm_outpost.testing.login import sign_in
from mitm_outpost.testing.processes import Child

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The production runner (its fast lane answers forward-auth checks without mitmproxy's layers) and
# mitmdump (every request a mitmproxy flow): forward-auth tests run against both and expect the same.
RUNNERS = ("lean", "mitmdump")


class Recorded(Child):
    """A child whose whole log is `output`, registered in `started` when it starts."""

    started: ClassVar[list[Recorded]] = []

    def start(self) -> Self:
        Recorded.started.append(self)
        return super().start()

    @property  # type: ignore[override]  # the tests read the whole log as text
    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Process(Recorded):
    """A command, run from the checkout unless `cwd` says otherwise."""

    def __init__(self, args: list[str], port: int | None = None, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        super().__init__(Path(args[0]).name, args, port=port, cwd=cwd or ROOT, env=env)


class Outpost(Recorded, harness.Outpost):
    """The outpost with a config written for this test: `mitmdump -s addons/outpost.py`, mitmweb,
    or (tool="lean") the production runner with this checkout's addons/ first on its path."""

    def __init__(self, providers: list[dict[str, Any]], http_port: int, https_port: int = 0,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None, tool: str = "mitmdump",
                 metrics_port: int = 0) -> None:
        if tool == "lean":
            env = {"PYTHONPATH": str(ROOT / "addons"), **(env or {})}
        super().__init__(providers, http_port=http_port, https_port=https_port, metrics_port=metrics_port,
                         runner=tool, extra=extra, env=env)


def mock_idp(port: int) -> DevIdP:
    """The dev IdP with the demo users (scripts/demo/users.yaml)."""
    return DevIdP(port, ROOT / "scripts/demo/users.yaml")


def whoami(port: int) -> Process:
    """The demo upstream: echoes the headers it received."""
    return Process([sys.executable, str(ROOT / "scripts/demo/whoami.py"), str(port)], port=port)


def provider_entry(name: str, outpost_port: int, upstream: str, issuer: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "mode": names.Mode.PROXY.value,
        "external_host": f"http://127.0.0.1:{outpost_port}",
        "internal_host": upstream,
        "issuer": issuer,
        "client_id": f"{name}-client",
        "client_secret": f"{name}-secret",
        **fields,
    }


def follow_login(client: httpx2.Client, url: str, idp: str, user: str = "alice") -> httpx2.Response:
    """`sign_in` at the dev IdP whose URL is `idp`; fails if the walk did not go through it."""
    final = sign_in(client, url, user)
    assert any(str(r.url).startswith(idp) for r in final.history), f"the login from {url} did not go through {idp}"
    return final
