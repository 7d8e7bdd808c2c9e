"""Assertions on the headers an app received from the outpost, as the app reports them.

The outpost's job is those headers, so tests check them where they arrive. Contract: the app (or a
test-only route) answers with the request headers it received as JSON: ``{"headers": {...}}``,
``{"headers": [[name, value], ...]}`` or a plain object of headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import httpx2

from .. import names

# The headers that say who the user is (the others name the outpost, provider and app). A request
# without identity carries them empty or not at all.
USER_HEADERS = names.USER_HEADERS
_SINGLE = {"username": names.USERNAME, "email": names.EMAIL, "name": names.NAME, "uid": names.UID}
_LISTS = {"groups": names.GROUPS, "entitlements": names.ENTITLEMENTS}  # joined with "|" by the outpost


def received_headers(source: Any) -> dict[str, str]:
    """The request headers the app reports, names lower-cased (repeated ones joined with ", ").

    `source`: a response (status 200) with the JSON body of the contract, the decoded JSON, or a
    mapping or list of (name, value) pairs (e.g. what the app recorded in a test double).
    """
    if isinstance(source, httpx2.Response):
        assert source.status_code == 200, f"the app answered {source.status_code}, not its headers: {source.text[:300]}"
        source = source.json()
    if isinstance(source, Mapping) and "headers" in source and not isinstance(source["headers"], str):
        source = source["headers"]
    seen: dict[str, str] = {}
    for name, value in source.items() if isinstance(source, Mapping) else source:
        key = str(name).lower()
        seen[key] = f"{seen[key]}, {value}" if key in seen else str(value)
    return seen


def assert_identity(source: Any, username: str | None = None, *, groups: Iterable[str] | None = None,
                    entitlements: Iterable[str] | None = None, email: str | None = None, name: str | None = None,
                    uid: str | None = None, headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """Assert the app received this identity; returns every header it received.

    Only what is given is checked: groups and entitlements as sets, `headers` as exact values of
    any other header (e.g. ``additionalHeaders``).
    """
    seen = received_headers(source)
    problems = []
    for field, value in {"username": username, "email": email, "name": name, "uid": uid}.items():
        got = seen.get(_SINGLE[field].lower())
        if value is not None and got != value:
            problems.append(f"{_SINGLE[field]}: expected {value!r}, the app received {got!r}")
    for field, values in {"groups": groups, "entitlements": entitlements}.items():
        raw = seen.get(_LISTS[field].lower())
        if values is not None and (raw is None or set(raw.split("|")) - {""} != set(values)):
            problems.append(f"{_LISTS[field]}: expected {sorted(values)!r}, the app received {raw!r}")
    for header, value in (headers or {}).items():
        if seen.get(header.lower()) != value:
            problems.append(f"{header}: expected {value!r}, the app received {seen.get(header.lower())!r}")
    assert not problems, "identity headers:\n  " + "\n  ".join(problems)
    return seen


def assert_no_identity(source: Any) -> dict[str, str]:
    """Assert the app received no identity: every header of USER_HEADERS absent or empty."""
    seen = received_headers(source)
    filled = {h: seen[h.lower()] for h in USER_HEADERS if seen.get(h.lower())}
    assert not filled, f"the app received an identity: {filled}"
    return seen
