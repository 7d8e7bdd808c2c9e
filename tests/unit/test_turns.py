"""Turns: answers without a session wait their turn, in arrival order; signed-in requests never wait."""

import asyncio
import contextlib
from collections.abc import Iterator

import pytest
from mitmproxy import exceptions, http
from mitmproxy.proxy.layers.http import HttpErrorHook, HttpRequestHeadersHook, HttpResponseHook
from mitmproxy.test import taddons, tflow, tutils

from mitm_outpost import chain, turns
from mitm_outpost.registry import Registry
from tests.unit.conftest import signed_in


def _flow(cookie: str = "") -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=1, path=b"/private", headers=()))
    f.request.headers["Host"] = "app.example.test"
    f.request.headers["Accept"] = "text/html"
    if cookie:
        f.request.headers["Cookie"] = cookie
    return f


@contextlib.contextmanager
def _context(registry: Registry) -> Iterator[taddons.context]:
    outpost = chain.build(registry, interactive=False)
    with taddons.context(outpost) as tctx:
        tctx.configure(outpost)  # as mitmproxy does at start: every option
        yield tctx


async def _started(tctx: taddons.context, flow: http.HTTPFlow) -> asyncio.Task[None]:
    task = asyncio.ensure_future(tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(flow)))
    for _ in range(5):
        await asyncio.sleep(0)
    return task


async def test_answers_without_a_session_take_turns_in_arrival_order(registry: Registry) -> None:
    with _context(registry) as tctx:
        first, second, third = _flow(), _flow(), _flow()
        tasks = [await _started(tctx, f) for f in (first, second, third)]
        assert [t.done() for t in tasks] == [True, False, False], "one answer in work, the others wait"
        assert all(f.response is not None and f.response.status_code == 302 for f in (first, second, third))

        with_session = _flow(await signed_in(registry))
        assert (await _started(tctx, with_session)).done(), "a request with a session never waits for a turn"
        assert with_session.response is None

        await tctx.master.addons.handle_lifecycle(HttpResponseHook(first))
        await asyncio.sleep(0)
        assert [t.done() for t in tasks] == [True, True, False], "the turn passes to the next in line only"
        assert "waited behind 1" not in second.metadata["outpost"]["turn"]  # it was first in line
        await tctx.master.addons.handle_lifecycle(HttpErrorHook(second))  # an error ends a turn too
        await asyncio.sleep(0)
        assert tasks[2].done() and "waited behind 1 " in third.metadata["outpost"]["turn"]
        await tctx.master.addons.handle_lifecycle(HttpResponseHook(third))


async def test_a_waiter_that_goes_away_does_not_keep_its_turn(registry: Registry) -> None:
    with _context(registry) as tctx:
        first, gone, last = _flow(), _flow(), _flow()
        tasks = [await _started(tctx, f) for f in (first, gone, last)]
        tasks[1].cancel()
        await tctx.master.addons.handle_lifecycle(HttpResponseHook(first))
        await asyncio.sleep(0)
        assert tasks[2].done(), "the cancelled waiter was skipped"
        await tctx.master.addons.handle_lifecycle(HttpResponseHook(last))
        step = next(a for a in tctx.master.addons.get("chain").members if isinstance(a, turns.Turns))
        assert step.in_work == 0 and not step.waiting


async def test_a_turn_never_returned_ends_at_the_deadline(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "TURN_DEADLINE", 0.05)
    with _context(registry) as tctx:
        tasks = [await _started(tctx, f) for f in (_flow(), _flow())]  # the first flow never gets a response hook
        assert not tasks[1].done()
        await asyncio.wait_for(tasks[1], 1)


async def test_no_limit_and_a_raised_limit_wake_the_waiters(registry: Registry) -> None:
    with _context(registry) as tctx:
        tasks = [await _started(tctx, f) for f in (_flow(), _flow(), _flow())]
        tctx.options.update(outpost_anonymous_turns=2)
        await asyncio.sleep(0)
        assert [t.done() for t in tasks] == [True, True, False]
        tctx.options.update(outpost_anonymous_turns=0)
        await asyncio.sleep(0)
        assert all(t.done() for t in tasks)
        assert (await _started(tctx, _flow())).done(), "0: nobody waits"


def test_a_negative_limit_is_refused(registry: Registry) -> None:
    with _context(registry) as tctx:
        with pytest.raises(exceptions.OptionsError, match="outpost_anonymous_turns"):
            tctx.options.update(outpost_anonymous_turns=-1)
