"""The development IdP (oidc-provider-mock), whose users a test declares right before logging them in.

Declaring the claims per test (`set_user`) keeps tests independent: the same name can have other
groups in the next test, and no users file has to match the tests.
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import httpx2

from .processes import Child, free_port, wait_for_http

PROGRAM = "oidc-provider-mock"


def _program() -> str:
    """The program of the running Python's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / PROGRAM
    found = str(beside) if beside.exists() else shutil.which(PROGRAM)
    if not found:
        raise RuntimeError(f"the development IdP is not installed: pip install {PROGRAM}")
    return found


def user_claims(username: str, *, groups: Iterable[str] = (), entitlements: Iterable[str] = (),
                email: str | None = None, name: str | None = None, **extra: Any) -> dict[str, Any]:
    """The claims of `username` (its sub and preferred_username), as the outpost reads them; `extra`
    claims go as they are (e.g. authentik's ``ak_proxy``)."""
    return {"preferred_username": username, "name": name or username, "email": email or f"{username}@example.test",
            "email_verified": True, "groups": list(groups), "entitlements": list(entitlements), **extra}


class DevIdP:
    """oidc-provider-mock on 127.0.0.1:`port` (a free one by default), with the users of `users_file`
    (a YAML list of claims) if given."""

    def __init__(self, port: int | None = None, users_file: str | os.PathLike[str] | None = None) -> None:
        self.port = port or free_port()
        users = ["--user-claims-file", str(users_file)] if users_file else []
        self.child = Child(PROGRAM, [_program(), "--port", str(self.port), *users], port=self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.child.start()
        try:
            wait_for_http(f"{self.url}/.well-known/openid-configuration", proc=self.child.proc, what=PROGRAM,
                          log=self.child.log)
        except BaseException:
            self.stop()
            raise
        return self

    def set_user(self, sub: str, claims: Mapping[str, Any]) -> None:
        """Declare (or redeclare) user `sub` with these claims."""
        response = httpx2.put(f"{self.url}/users/{urllib.parse.quote(sub, safe='')}", json=dict(claims), timeout=10)
        if response.status_code != 204:
            raise RuntimeError(f"the dev IdP refused user {sub!r}: {response.status_code} {response.text[:300]}")

    def stop(self) -> None:
        self.child.stop()
        self.child.log.unlink(missing_ok=True)  # what a failure needs is in its message

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
