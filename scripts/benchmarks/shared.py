"""What the setups of a run share: the names every module uses, `Bench` (the run's children, temp dir,
upstream and dev IdP) and `Setup` (what one row of the table measures)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from mitm_outpost import names

from .processes import Processes

HOST = "127.0.0.1"
USER = "alice"  # defined in scripts/demo/users.yaml
VENV_BIN = Path(sys.executable).parent
MITMDUMP = str(VENV_BIN / "mitmdump")
# This package as a command, with cwd the checkout: the fallback upstream and the fresh-process probes.
BENCH_COMMAND = (sys.executable, "-m", __package__)
OUTPOST_DOMAIN = "outpost.test"  # the providers are <x>.outpost.test:<port>; every name is 127.0.0.1 here
FORWARD_DOMAIN = "example.test"  # the app is app.example.test:<nginx port>; every name is 127.0.0.1 here
KEEPALIVE = 16  # idle connections nginx keeps open to the auth server and to the upstream
PING_PATH = names.OUTPOST_PREFIX + names.PING
START_PATH = names.START_PATH


@dataclass(frozen=True)
class Bench:
    """One run's common ground: the children (stopped at the end), the temp dir of their configs and logs,
    the upstream every setup sits in front of and the dev IdP every login goes through."""
    procs: Processes
    tmp: Path
    upstream_port: int
    idp: str  # the dev IdP's URL, the issuer of every provider

    @property
    def upstream(self) -> str:
        return f"http://{HOST}:{self.upstream_port}"

    @property
    def confdir(self) -> str:
        """mitmproxy's confdir for every mitmdump and runner: a private CA and default cert, nothing lands in
        ~/.mitmproxy."""
        return f"confdir={self.tmp / 'mitm'}"


@dataclass
class Setup:
    label: str
    url: str
    server: list[str]  # the command of the process under test
    pid: int | None = None  # whose CPU time is measured (the proxies)
    headers: tuple[str, ...] = ()
    via: list[str] | None = None  # forward auth: the command of the nginx in front
    count_non_200: bool = True  # with wrk: count answers that are not 200 (NON_200_SCRIPT)

    @property
    def signed_in(self) -> bool:
        """Whether the rows' requests carry a session cookie or a bearer token (so a non-200 means it was lost)."""
        return any(h.startswith(("Cookie:", "Authorization:")) for h in self.headers)
