"""A private redis-server (no persistence, loopback only) for the --workers rows, the memory figures and the
replicas, and the command counts the replicas' figure is made of."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis as redis_sync

from mitm_outpost.testing.processes import free_port

from .shared import HOST, Bench


def start_redis(bench: Bench, name: str = "redis") -> tuple[int, str] | None:
    """redis-server (or valkey-server) under tmp/name once it listens: its port and `<server> <version>`;
    None when neither is installed."""
    server = shutil.which("redis-server") or shutil.which("valkey-server")
    if not server:
        return None
    port = free_port()
    (bench.tmp / name).mkdir()
    bench.procs.start(name, [server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                             "--dir", str(bench.tmp / name)], port=port)
    version = redis_client(port).info("server")["redis_version"]
    return port, f"{Path(server).name} {version}"


def redis_client(port: int, db: int = 0) -> redis_sync.Redis:
    return redis_sync.Redis(host=HOST, port=port, db=db)


def command_calls(port: int) -> dict[str, int]:
    """INFO commandstats: calls per command since the server started."""
    stats = redis_client(port).info("commandstats")
    return {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}
