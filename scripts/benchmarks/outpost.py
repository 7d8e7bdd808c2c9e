"""The outpost under test, in both runners with the same --set options: `mitmdump -s addons/outpost.py` and the
production runner `python -m mitm_outpost` ("lean"); its configuration files, written into the run's temp dir."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mitm_outpost.testing.processes import Child, free_port

from . import ROOT
from .processes import wait_http
from .shared import FORWARD_DOMAIN, HOST, MITMDUMP, OUTPOST_DOMAIN, Bench
from .skip_rules import skip_rules_yaml

OUTPOST_CONFIG = """\
outpost:
{store}  name: mitm-outpost bench
providers:
{providers}"""

OUTPOST_PROVIDER = """\
  - name: {name}
    mode: proxy
    external_host: http://{hostname}:{port}
    internal_host: {upstream}
    issuer: {issuer}
    client_id: {name}-client
    client_secret: bench-secret
    access_token_validity: 3600
{extra}"""

OUTPOST_FORWARD_CONFIG = """\
outpost:
{store}  name: mitm-outpost bench forward auth
providers:
  - name: bench-forward
    mode: forward_single
    external_host: http://app.{domain}:{port}
    issuer: {issuer}
    client_id: bench-forward-client
    client_secret: bench-secret
    access_token_validity: 3600
"""

# The outpost's metrics listener (authentik's 9300, on every interface by default) is off: several
# outposts run at once here, and nothing of the bench listens beyond loopback.
NO_METRICS = ("--set", "metrics_port=0")

# The production runner (README "Running in production"): the same --set options on a lean Master.
# PYTHONPATH=addons so that it runs this checkout's code whether or not the editable install exists.
LEAN_ENV = {"PYTHONPATH": str(ROOT / "addons")}
ACCESS_LOG_OFF = ("--set", "outpost_access_log=off")
# trusted_proxies is set explicitly for the lean runner behind nginx: at the time of writing, `python -m
# mitm_outpost` does not apply that option's default (127.0.0.0/8), so it answers nginx's checks 403 without it.
BEHIND_NGINX = (*ACCESS_LOG_OFF, "--set", "trusted_proxies=127.0.0.0/8")


def session_store(redis_port: int) -> str:
    """The `outpost:` line that keeps sessions in the private Redis (db 0)."""
    return f"  session_store: redis://{HOST}:{redis_port}/0\n"


def provider_yaml(bench: Bench, name: str, port: int, extra: str = "", issuer: str | None = None) -> str:
    """A proxy provider in front of the upstream at http://<name>.outpost.test:<port>, client `<name>-client`."""
    return OUTPOST_PROVIDER.format(name=name, hostname=f"{name}.{OUTPOST_DOMAIN}", port=port,
                                   upstream=bench.upstream, issuer=issuer or bench.idp, extra=extra)


def forward_yaml(bench: Bench, front: int, store: str = "") -> str:
    """The forward_single provider of the app behind nginx at http://app.example.test:<front>."""
    return OUTPOST_FORWARD_CONFIG.format(store=store, domain=FORWARD_DOMAIN, port=front, issuer=bench.idp)


def outpost_argv(runner: str, confdir: str, config: Path, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """`mitmdump -q -s addons/outpost.py` (runner "mitmdump") or `python -m mitm_outpost` ("lean"),
    with the same --set options."""
    head = ([MITMDUMP, "-q", "-s", "addons/outpost.py"] if runner == "mitmdump"
            else [sys.executable, "-m", "mitm_outpost"])
    return [*head, "--set", confdir, "--set", f"outpost_config={config}",
            "--set", f"outpost_http_port={port}", "--set", "outpost_https_port=0",
            "--set", f"outpost_listen_host={HOST}", "--set", "listen_port=0", *NO_METRICS, *extra]


def start_runner(bench: Bench, name: str, runner: str, config_text: str, port: int,
                 extra: tuple[str, ...] = ()) -> tuple[Child, list[str]]:
    """One outpost of `runner` on `port` with `config_text` as tmp/<name>.yaml."""
    config = bench.tmp / f"{name}.yaml"
    config.write_text(config_text)
    argv = outpost_argv(runner, bench.confdir, config, port, extra)
    return bench.procs.start(name, argv, LEAN_ENV if runner == "lean" else None), argv


def start_outpost(bench: Bench, providers: dict[str, tuple[int, str]], runner: str = "mitmdump",
                  name: str = "outpost", extra: tuple[str, ...] = (), store: str = "") -> tuple[Child, list[str], int]:
    """One outpost whose proxy providers, {name: (skip rules, more YAML lines)}, are all in front of
    the upstream, at http://<name>.outpost.test:<port> with client `<name>-client`."""
    port = free_port()
    text = OUTPOST_CONFIG.format(store=store, providers="".join(
        provider_yaml(bench, p, port, skip_rules_yaml(rules) + more) for p, (rules, more) in providers.items()))
    child, argv = start_runner(bench, name, runner, text, port, extra)
    return child, argv, port


def wait_workers(url: str, child: Child) -> None:
    """Every worker answers: the supervisor logs "N workers ready" once each has said so."""
    wait_http(url, child, expect=204)
    deadline = time.monotonic() + 60
    while "workers ready" not in child.output(1 << 20):
        if child.proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{child.what}: the workers did not all get ready:\n{child.output()}")
        time.sleep(0.2)


def addons_mtime() -> float:
    """mitmdump reloads `-s addons/outpost.py` when that file changes, dropping the sessions kept in
    memory: a run during which addons/ changed mixes versions (or measures login redirects)."""
    return max((f.stat().st_mtime for f in (ROOT / "addons").rglob("*.py")), default=0.0)
