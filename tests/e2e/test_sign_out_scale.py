"""Sign-out with 1,000,000 sessions in the memory store: it ends that user's sessions and touches no
other (the store's indexes, not a walk). A real outpost, the dev IdP and real logins; the store is
filled through its own interface by tests/support/store_spy.py, which also reports what sign-out touched."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.support.processes import ROOT, Outpost, provider_entry

SESSIONS = 1_000_000
LOGINS = 3  # alice twice, bob once
SPY = re.compile(r"store_spy: delete_user ended (\d+), deleted (\d+) entries, walked the store (\d+) times, "
                 r"([\d.]+) ms; sessions (\d+) -> (\d+), users indexed (\d+) -> (\d+)")


@pytest.fixture(scope="module")
def outpost(idp: str, upstream: str) -> Iterator[Outpost]:
    port = free_port()
    env = {"OUTPOST_TEST_PREFILL": str(SESSIONS - LOGINS), "OUTPOST_TEST_PROVIDER": "app"}
    entry = provider_entry("app", port, upstream, idp, access_token_validity=3600)
    with Outpost([entry], port, extra=["-s", str(ROOT / "tests/support/store_spy.py")], env=env) as process:
        deadline = time.monotonic() + 300
        while "store_spy: prefilled" not in process.output:
            assert time.monotonic() < deadline and process.proc and process.proc.poll() is None, process.output[-2000:]
            time.sleep(0.5)
        yield process


def test_sign_out_touches_only_that_users_sessions(outpost: Outpost) -> None:
    assert f"store_spy: prefilled {SESSIONS - LOGINS} sessions" in outpost.output
    clients = {}
    for name, user in (("first", "alice"), ("second", "alice"), ("bob", "bob")):
        clients[name] = browser()
        assert mock_login(clients[name], f"{outpost.url}/headers", user).status_code == 302
        assert clients[name].get(f"{outpost.url}/headers").status_code == 200
    assert clients["first"].get(f"{outpost.url}/outpost.goauthentik.io/sign_out").status_code == 302
    assert clients["first"].get(f"{outpost.url}/headers").status_code == 302
    assert clients["second"].get(f"{outpost.url}/headers").status_code == 302
    assert clients["bob"].get(f"{outpost.url}/headers").status_code == 200
    spied = SPY.findall(outpost.output)
    assert len(spied) == 1, outpost.output[-2000:]
    ended, deleted, walks, _ms, before, after, users_before, users_after = spied[0]
    assert (int(ended), int(deleted), int(walks)) == (2, 2, 0)
    assert (int(before), int(after)) == (SESSIONS, SESSIONS - 2)
    assert (int(users_before), int(users_after)) == (SESSIONS - LOGINS + 2, SESSIONS - LOGINS + 1)
