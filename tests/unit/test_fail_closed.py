"""Fail closed, step by step: an exception in any step of the real chain answers the request
at once, and nothing after that step acts on it; the request never reaches the upstream."""

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook
from mitmproxy.test import taddons, tflow, tutils

from mitm_outpost import chain
from mitm_outpost.decision import exchange_of
from mitm_outpost.registry import Registry
from mitm_outpost.routing import Routing
from mitm_outpost.sessions import StoreUnavailable
from tests.unit.conftest import signed_in

HOOKS = ("requestheaders", "request")


def request_steps(registry: Registry) -> list[object]:
    """The real chain's addons that act on requests, in the real order."""
    return [a for a in chain.build(registry, interactive=False).members
            if any(callable(getattr(a, h, None)) for h in HOOKS)]


REQUEST_STEPS = [(type(a), hook) for a in request_steps(Registry()) for hook in HOOKS
                 if callable(getattr(a, hook, None))]


def _flow(path: str, cookie: str) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=1, path=path.encode(), headers=()))
    f.request.headers["Host"] = "app.example.test"
    f.request.headers["Cookie"] = cookie
    f.request.headers["X-authentik-username"] = "forged"
    return f


def test_every_request_step_of_the_chain_is_covered() -> None:
    names = {cls.__name__ for cls, _ in REQUEST_STEPS}
    assert {"Routing", "Sanitize", "Endpoints", "SessionCheck", "HeaderAuth", "Gate", "Upstream"} <= names


async def test_without_a_failure_the_same_request_goes_upstream(registry: Registry) -> None:
    """The control for the test below: this request is one that would pass."""
    f = _flow("/private", await signed_in(registry))
    with taddons.context(chain.build(registry, interactive=False)) as tctx:
        await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f))
        await tctx.master.addons.handle_lifecycle(HttpRequestHook(f))
    assert f.response is None and (f.request.host, f.request.port) == ("10.0.0.5", 8080)
    assert f.request.headers["X-authentik-username"] == "alice"


@pytest.mark.parametrize("path", ["/private", "/public/x"])  # a signed-in request, and one a rule would skip
@pytest.mark.parametrize("error, status", [(RuntimeError("bug"), None), (StoreUnavailable("down"), 503)])
@pytest.mark.parametrize("waits", [False, True], ids=["at once", "after waiting"])
@pytest.mark.parametrize("step, hook", REQUEST_STEPS, ids=[f"{cls.__name__}.{h}" for cls, h in REQUEST_STEPS])
async def test_a_failing_step_answers_and_nothing_goes_upstream(registry: Registry, monkeypatch: pytest.MonkeyPatch,
                                                                step: type, hook: str, error: Exception,
                                                                status: int | None, path: str, waits: bool) -> None:
    later: list[str] = []

    async def fail_later() -> None:
        await asyncio.sleep(0)  # the chain goes on from a step that waited (Chain._walk)
        raise error

    def broken(self: object, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        if waits:
            return fail_later()
        raise error

    def recorder(name: str):  # type: ignore[no-untyped-def]
        def record(self: object, flow: http.HTTPFlow) -> None:
            later.append(name)
        return record

    order = [cls for cls, h in REQUEST_STEPS if h == hook]
    monkeypatch.setattr(step, hook, broken)
    for cls in order[order.index(step) + 1:]:
        monkeypatch.setattr(cls, hook, recorder(f"{cls.__name__}.{hook}"))
    f = _flow(path, await signed_in(registry))
    with taddons.context(chain.build(registry, interactive=False)) as tctx:
        await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f))
        if f.response is None:
            await tctx.master.addons.handle_lifecycle(HttpRequestHook(f))
    assert f.response is not None, "a failing step let the request through"
    assert f.response.status_code == (status or getattr(step, "failure_status", 403))
    assert (f.metadata["outpost"]["outcome"], f.metadata["outpost"]["code"]) == (
        "denied", "store_unavailable" if status else "step_failed")
    if hook == "requestheaders":  # (in `request`, the answer set is what keeps the re-targeted request home)
        exchange = exchange_of(f)
        routed = order.index(step) > order.index(Routing)  # Routing begins the exchange and routes the flow
        assert (exchange is not None, exchange is not None and exchange.proxied) == (routed, False)
        # never re-targeted to the upstream (10.0.0.5:8080): where the client sent it, or the provider's host
        assert (f.request.host, f.request.port) == (("app.example.test", 443) if routed else ("127.0.0.1", 1))
    assert later == [], f"steps after {step.__name__}.{hook} acted on the refused request"
