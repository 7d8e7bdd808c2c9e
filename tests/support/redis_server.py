"""A real redis-server for the shared-session tests: private port and directory, killable, restartable."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import redis

from mitm_outpost.testing.processes import free_port
from tests.support.processes import Process
from tests.support.proxies import require


class RedisServer(Process):
    def __init__(self, port: int | None = None) -> None:
        self.redis_port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-"))
        binary = require("redis-server")
        super().__init__([binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no"],
                         port=self.redis_port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        super().stop()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
