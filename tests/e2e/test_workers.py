"""`python -m mitm_outpost --workers 2`: a supervisor and two real worker processes on one port,
sharing sessions through a real redis-server.

Each request goes on a fresh connection, so SO_REUSEPORT spreads them over the workers; which
worker answered is read from the access log, whose lines carry the writer's pid."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mitm_outpost import metrics, names
from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.support.processes import Outpost, provider_entry
from tests.support.redis_server import RedisServer

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
ACCESS = re.compile(r"\[(\d+)\] mitm_outpost\.access (\{.*\})$", re.MULTILINE)
FRESH = 24  # fresh connections per check: all on one worker by chance has odds of 2**-23

PING_PATH = names.OUTPOST_PREFIX + names.PING


class WorkerOutpost(Outpost):
    """The production runner with `--workers 2` and its metrics port, its store in Redis (or memory)."""

    def __init__(self, idp: str, upstream: str, redis_url: str | None) -> None:
        port = free_port()
        self.metrics_port = free_port()
        super().__init__([provider_entry("w", port, upstream, idp)], port, tool="lean",
                         metrics_port=self.metrics_port, extra=["--workers", "2"])
        if redis_url:
            self.edit(lambda doc: doc["outpost"].update(session_store=redis_url))

    def edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        doc = yaml.safe_load(self.config.read_text())
        change(doc)
        self.config.write_text(yaml.safe_dump(doc))

    def start(self) -> WorkerOutpost:
        super().start()
        self.wait_ready()
        return self

    def ping(self) -> int:
        """The supervisor's /ping; 0 while its metrics port is not listening yet (or any more)."""
        try:
            return httpx2.get(f"http://127.0.0.1:{self.metrics_port}{PING_PATH}").status_code
        except httpx2.ConnectError:
            return 0

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.ping() != 204:
            assert time.monotonic() < deadline, f"the workers are not ready after {timeout} s:\n{self.output[-3000:]}"
            time.sleep(0.1)

    def pids(self) -> dict[int, int]:
        """The live worker of each slot: the last one its supervisor started."""
        return {int(slot): int(pid) for slot, pid in STARTED.findall(self.output)}

    def served(self, since: int = 0) -> list[tuple[int, dict[str, object]]]:
        """(pid, access log record) of every request answered since `since` (an offset in the output)."""
        return [(int(pid), json.loads(record)) for pid, record in ACCESS.findall(self.output[since:])]


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(httpx2.get(f"http://127.0.0.1:{port}/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def fresh(url: str, cookies: dict[str, str] | None = None) -> httpx2.Response:
    """A request on a new connection (a new client), as from another browser with the same cookies."""
    cookie = "; ".join(f"{name}={value}" for name, value in (cookies or {}).items())
    return httpx2.get(url, headers={"Accept": "text/html", **({"Cookie": cookie} if cookie else {})}, timeout=10)


def gone(pid: int) -> bool:
    """Dead, or a zombie not yet reaped: either way its sockets are closed."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="module")
def workers(idp: str, upstream: str, redis_url: str) -> Iterator[WorkerOutpost]:
    with WorkerOutpost(idp, upstream, redis_url) as outpost:
        yield outpost  # type: ignore[misc]


def signed_in(outpost: WorkerOutpost) -> dict[str, str]:
    client = browser()
    assert mock_login(client, f"{outpost.url}/headers").status_code == 302
    return dict(client.cookies)


def test_a_login_on_one_worker_is_valid_on_every_worker(workers: WorkerOutpost) -> None:
    cookies = signed_in(workers)  # on one connection: one worker
    since = len(workers.output)
    for _ in range(FRESH):
        response = fresh(f"{workers.url}/headers", cookies)
        assert response.status_code == 200 and response.json()["path"] == "/headers"
    allowed = {pid for pid, record in workers.served(since) if record["decision"] == "allowed"}
    assert allowed == set(workers.pids().values())


def test_a_sign_out_on_one_worker_ends_the_session_on_every_worker_within_a_second(workers: WorkerOutpost) -> None:
    client = browser()
    mock_login(client, f"{workers.url}/headers")
    cookies = dict(client.cookies)
    since = len(workers.output)
    assert all(fresh(f"{workers.url}/headers", cookies).status_code == 200 for _ in range(FRESH))
    assert {pid for pid, _ in workers.served(since)} == set(workers.pids().values())  # each worker has it cached
    assert client.get(f"{workers.url}/outpost.goauthentik.io/sign_out").status_code == 302
    signed_out = time.monotonic()
    while not all(fresh(f"{workers.url}/headers", cookies).status_code == 302 for _ in range(FRESH)):
        assert time.monotonic() - signed_out < 1.0, "a worker still accepts the signed-out session"
    since = len(workers.output)
    assert all(fresh(f"{workers.url}/headers", cookies).status_code == 302 for _ in range(FRESH))
    assert {pid for pid, _ in workers.served(since)} == set(workers.pids().values())


def test_the_metrics_port_counts_every_worker_and_ping_answers_for_all(workers: WorkerOutpost) -> None:
    cookies = signed_in(workers)
    for _ in range(FRESH):
        fresh(f"{workers.url}/headers", cookies)
    served = workers.served()
    allowed = [pid for pid, record in served if record["decision"] == "allowed"]
    # A worker hands its request counts to its metrics file every REFRESH seconds (prometheus_metrics.Tally).
    deadline = time.monotonic() + 2 * metrics.REFRESH + 1
    while True:
        samples = scrape(workers.metrics_port)
        decisions = {labels["outcome"]: value for labels, value in samples["mitm_outpost_decisions_total"]}
        if decisions.get("allowed") == len(allowed) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert decisions["allowed"] == len(allowed) and set(allowed) == set(workers.pids().values())
    assert sum(value for _, value in samples["mitm_outpost_logins_total"]) == sum(
        record["code"] == "signed_in" for _, record in served)
    ready = {int(labels["pid"]): value for labels, value in samples["mitm_outpost_worker_ready"]}
    assert ready == {pid: 1.0 for pid in workers.pids().values()}
    assert [value for _, value in samples["authentik_outpost_info"]] == [1.0]
    assert workers.ping() == 204


def test_sighup_reloads_every_worker(workers: WorkerOutpost) -> None:
    assert {fresh(f"{workers.url}/open").status_code for _ in range(4)} == {302}
    workers.edit(lambda doc: doc["providers"][0].update(skip_path_regex="^/open$"))
    since = len(workers.output)
    assert workers.proc is not None
    workers.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while len(re.findall(r"\[\d+\] mitm_outpost outpost 'test-outpost' serving", workers.output[since:])) < 2:
        assert time.monotonic() < deadline, workers.output[since:]
        time.sleep(0.05)
    since = len(workers.output)
    assert all(fresh(f"{workers.url}/open").status_code == 200 for _ in range(FRESH))
    skipped = {pid for pid, record in workers.served(since) if record["decision"] == "skipped"}
    assert skipped == set(workers.pids().values())


def test_a_killed_worker_leaves_the_port_served_and_is_replaced(workers: WorkerOutpost) -> None:
    before = workers.pids()
    victim, survivor = before[1], before[2]
    os.kill(victim, signal.SIGKILL)
    while not gone(victim):
        time.sleep(0.01)
    since = len(workers.output)
    assert all(fresh(f"{workers.url}/x").status_code == 302 for _ in range(FRESH))  # the port is never refused
    assert {pid for pid, _ in workers.served(since)} == {survivor}
    deadline = time.monotonic() + 10
    while (replacement := workers.pids()[1]) == victim:
        assert time.monotonic() < deadline, "no new worker"
        time.sleep(0.05)
    assert f"worker 1 (pid {victim}) was killed by SIGKILL" in workers.output
    workers.wait_ready()
    since = len(workers.output)
    assert all(fresh(f"{workers.url}/x").status_code == 302 for _ in range(FRESH))
    assert {pid for pid, _ in workers.served(since)} == {survivor, replacement}


def test_sigterm_stops_every_worker(idp: str, upstream: str, redis_url: str) -> None:
    with WorkerOutpost(idp, upstream, redis_url) as outpost:
        assert outpost.proc is not None
        pids = set(outpost.pids().values())
        outpost.proc.send_signal(signal.SIGTERM)
        assert outpost.proc.wait(15) == 0
        assert all(gone(pid) for pid in pids)
        drained = re.findall(r"\[(\d+)\] mitm_outpost SIGTERM: no new connections", outpost.output)
        assert set(map(int, drained)) == pids
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", outpost.http_port), timeout=1).close()


def test_workers_with_a_memory_store_are_refused(idp: str, upstream: str) -> None:
    outpost = WorkerOutpost(idp, upstream, None)
    outpost.port = None  # nothing will listen
    Outpost.start(outpost)
    assert outpost.proc is not None and outpost.proc.wait(15) == 2
    assert "need a shared session store" in outpost.output and "session_store: redis://..." in outpost.output
    assert "started (pid" not in outpost.output


def test_a_worker_that_cannot_start_stops_everything(idp: str, upstream: str, redis_url: str) -> None:
    """A configuration error: no restart loop."""
    outpost = WorkerOutpost(idp, upstream, redis_url)
    outpost.config.write_text(outpost.config.read_text().replace("providers:", "providers: [", 1))
    outpost.port = None
    Outpost.start(outpost)
    assert outpost.proc is not None and outpost.proc.wait(20) == 1
    assert "not valid YAML" in outpost.output and "before the outpost was up: stopping" in outpost.output
    assert len(STARTED.findall(outpost.output)) == 2
