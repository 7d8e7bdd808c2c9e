"""`--workers N`: the option, its checks, and what the supervisor reads before it starts anything."""

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mitmproxy import exceptions
from mitmproxy.test import taddons

from mitm_outpost import chain, supervisor, workers
from mitm_outpost.__main__ import parse
from mitm_outpost.file_source import FileSource


@contextlib.contextmanager
def context() -> Iterator[tuple[workers.Workers, taddons.context]]:
    addon = workers.Workers()
    with taddons.context(addon) as tctx:
        tctx.master.options.add_option("outpost_config", str, "", "FileSource's")
        yield addon, tctx


def config(tmp_path: Path, store: str) -> str:
    path = tmp_path / "outpost.yaml"
    provider = {"name": "app", "external_host": "https://app.example.test", "internal_host": "http://10.0.0.5:8080",
                "client_id": "app", "client_secret": "s3cret", "issuer": "https://idp.example.test"}
    path.write_text(yaml.safe_dump({"outpost": {"name": "o", "session_store": store}, "providers": [provider]}))
    return str(path)


@pytest.mark.parametrize("value, expected", [("1", 1), ("4", 4), ("auto", len(os.sched_getaffinity(0)))])
def test_count(value: str, expected: int) -> None:
    assert workers.count(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "", "1.5"])
def test_count_refuses_what_is_not_a_number_of_processes(value: str) -> None:
    with pytest.raises(exceptions.OptionsError, match="outpost_workers: a number of processes"):
        workers.count(value)


def test_the_workers_flag_is_the_option() -> None:
    assert parse(["--workers", "3", "--set", "metrics_port=0"]).setoptions == ["metrics_port=0", "outpost_workers=3"]
    assert parse([]).setoptions == []


def test_reuse_port_only_in_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(workers.WORKER_ENV, raising=False)
    assert not workers.reuse_port()
    monkeypatch.setenv(workers.WORKER_ENV, "1")
    assert workers.reuse_port()


def test_the_option_exists_in_the_production_runner_only() -> None:
    production = [type(a) for a in chain.build(interactive=False).members]
    assert production.index(workers.Workers) < production.index(FileSource)  # refuses before the file is read
    assert workers.Workers not in [type(a) for a in chain.build().members]


@pytest.mark.parametrize("count", ["2", "auto"])
def test_several_workers_with_a_memory_store_are_refused(tmp_path: Path, count: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "process_cpu_count", lambda: 2, raising=False)  # auto: as on this 2-core machine
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with context() as (addon, tctx):
        tctx.options.update(outpost_config=config(tmp_path, "memory"))
        with pytest.raises(exceptions.OptionsError, match=r"shared session store.*`session_store: redis://\.\.\.`"):
            tctx.configure(addon, outpost_workers=count)


def test_a_redis_store_or_one_worker_is_accepted(tmp_path: Path) -> None:
    with context() as (addon, tctx):
        tctx.configure(addon, outpost_workers="1", outpost_config=config(tmp_path, "memory"))
        tctx.configure(addon, outpost_workers="2", outpost_config=config(tmp_path, "redis://127.0.0.1:6379/0"))


def test_a_reload_to_a_memory_store_is_refused(tmp_path: Path) -> None:
    with context() as (addon, tctx):
        path = config(tmp_path, "redis://127.0.0.1:6379/0")
        tctx.configure(addon, outpost_workers="2", outpost_config=path)
        config(tmp_path, "memory")
        with pytest.raises(exceptions.OptionsError, match="shared session store"):
            tctx.options.update(outpost_config=path)  # what SIGHUP does


def test_providers_from_authentik_only_mean_a_memory_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHENTIK_HOST", "https://authentik.example.test")
    with pytest.raises(exceptions.OptionsError, match="shared session store"):
        workers.require_shared_store(str(tmp_path / "absent.yaml"), 2)


def test_a_file_that_does_not_parse_is_left_to_file_source(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [")
    workers.require_shared_store(str(bad), 2)


def test_the_supervisor_reads_its_options_as_the_workers_will(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHENTIK_LISTEN__METRICS", "127.0.0.1:9301")
    opts = supervisor.options(["outpost_workers=2", "outpost_http_port=9100", "listen_port=0", "outpost_log_decisions"])
    assert (opts.outpost_workers, opts.outpost_http_port) == ("2", 9100)
    assert (opts.metrics_port, opts.metrics_listen_host) == (9301, "127.0.0.1")  # the env default, as in a worker
    with pytest.raises(exceptions.OptionsError, match="not an integer"):
        supervisor.options(["metrics_port=x"])
    with pytest.raises(exceptions.OptionsError, match="metrics_port: a port number"):
        supervisor.options(["metrics_port=70000"])


def test_a_port_in_use_stops_the_supervisor_before_any_worker() -> None:
    """Even one held with SO_REUSEPORT, as another supervisor's workers hold it."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError) as refused:
            supervisor.check_ports_free("127.0.0.1", [0, port])
        assert refused.value.errno == errno.EADDRINUSE
    supervisor.check_ports_free("127.0.0.1", [0, port])


def test_the_supervisor_makes_the_certificate_authority_once_before_the_workers(tmp_path: Path) -> None:
    """Workers starting at once in a fresh confdir would each write mitmproxy's CA; one read another's
    half-written key in CI ("Unable to load PEM file")."""
    confdir = tmp_path / "conf"
    supervisor.make_certificate_authority([f"confdir={confdir}", "outpost_workers=2"])
    made = {p.name: p.read_bytes() for p in confdir.iterdir()}
    assert "mitmproxy-ca.pem" in made and b"PRIVATE KEY" in made["mitmproxy-ca.pem"]
    supervisor.make_certificate_authority([f"confdir={confdir}"])  # a second start reads it, never remakes it
    assert {p.name: p.read_bytes() for p in confdir.iterdir()} == made
