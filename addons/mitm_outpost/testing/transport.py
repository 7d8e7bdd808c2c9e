"""Name-based hosting on one machine: a client that uses app.example.test like a browser would.

Forward auth and multi-provider setups tell apps apart by host name, and cookies are scoped by it,
so a test cannot just ask for 127.0.0.1. This transport connects there and leaves the URL alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx2

LOOPBACK = "127.0.0.1"


class LoopbackTransport(httpx2.HTTPTransport):
    """Connects to 127.0.0.1 (the same port) for `hosts` (every host when None). The request keeps its
    URL and Host, so the cookie jar judges cookies by the name a browser would use."""

    def __init__(self, hosts: Iterable[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hosts = None if hosts is None else frozenset(hosts)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if self.hosts is not None and request.url.host not in self.hosts:
            return super().handle_request(request)
        original = request.url
        request.url = original.copy_with(host=LOOPBACK)
        try:
            return super().handle_request(request)
        finally:
            request.url = original
