"""A login callback replayed from elsewhere is refused without using the login up: the browser that
started it still completes it. With the memory store and with Redis (the binding checked in a script)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx2
import pytest
import yaml

from mitm_outpost import names
from mitm_outpost.testing.login import browser
from mitm_outpost.testing.processes import free_port
from tests.support.processes import Outpost, provider_entry
from tests.support.redis_server import RedisServer

SESSION_COOKIE = names.cookie_name("app-client")


@pytest.fixture(scope="module", params=["memory", "redis"])
def outpost(request: pytest.FixtureRequest, idp: str, upstream: str) -> Iterator[Outpost]:
    port = free_port()
    process = Outpost([provider_entry("app", port, upstream, idp, access_token_validity=600)], port)
    if request.param == "memory":
        with process:
            yield process
        return
    with RedisServer() as server:
        doc = yaml.safe_load(process.config.read_text())
        doc["outpost"]["session_store"] = server.url
        process.config.write_text(yaml.safe_dump(doc))
        with process:
            yield process


def callback_of_a_login(outpost: Outpost, client: httpx2.Client) -> str:
    """A login run up to the IdP's answer: the callback URL, with its code and state, not yet visited."""
    start = client.get(f"{outpost.url}/outpost.goauthentik.io/start?rd=/headers")
    form = client.post(start.headers["location"], data={"sub": "alice"})
    assert form.status_code == 302, form.text
    return form.headers["location"]


def refused_as_another_browser(response: httpx2.Response) -> bool:
    issued = [c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "=")]
    return response.status_code == 400 and "another browser" in response.text and not issued


def test_a_replayed_callback_leaves_the_login_to_its_browser(outpost: Outpost) -> None:
    real = browser()
    callback = callback_of_a_login(outpost, real)
    assert refused_as_another_browser(browser().get(callback))  # no pre-login cookie at all
    other = browser()
    other.get(f"{outpost.url}/outpost.goauthentik.io/start")  # a pre-login cookie of its own
    assert refused_as_another_browser(other.get(callback))
    done = real.get(callback)
    assert done.status_code == 302 and done.headers["location"] == f"{outpost.url}/headers", done.text
    assert real.get(f"{outpost.url}/headers").json()["path"] == "/headers"
    replay = real.get(callback)
    assert replay.status_code == 400 and "already used" in replay.text  # and still only once

