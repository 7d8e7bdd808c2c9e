"""The production runner's event dispatch calls what mitmproxy's AddonManager calls, in its order."""

import logging

import pytest
from mitmproxy import addonmanager, exceptions, hooks, http
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook
from mitmproxy.test import taddons, tflow, tutils

from mitm_outpost.lean_master import HookTable, arguments, drop_message_type_checks


class Recorder:
    def __init__(self, name: str, calls: list[str], children: tuple[object, ...] = ()) -> None:
        self.name, self.calls = name, calls
        if children:
            self.addons = list(children)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.calls.append(f"{self.name}:requestheaders:{flow.id}")

    async def request(self, flow: http.HTTPFlow) -> None:
        self.calls.append(f"{self.name}:request")


class Failing:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        raise ValueError("a bug")


class Halting:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        raise exceptions.AddonHalt


class Updates:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def update(self, flows: list[http.HTTPFlow]) -> None:
        self.calls.append(f"update:{len(flows)}")


def managers(master: object, *make: object) -> tuple[list[str], list[str], addonmanager.AddonManager, HookTable]:
    """mitmproxy's manager and ours, each with the same kinds of addons, each recording into its own list."""
    theirs_calls: list[str] = []
    ours_calls: list[str] = []
    theirs, ours = addonmanager.AddonManager(master), HookTable(master)
    for manager, calls in ((theirs, theirs_calls), (ours, ours_calls)):
        for i, kind in enumerate(make):
            manager.add(kind(str(i), calls))  # type: ignore[operator]
    return theirs_calls, ours_calls, theirs, ours


def nested(name: str, calls: list[str]) -> Recorder:
    return Recorder(name, calls, (Recorder(name + ".child", calls),))


async def test_handlers_run_as_mitmproxys_in_order_with_children() -> None:
    with taddons.context() as tctx:
        theirs_calls, ours_calls, theirs, ours = managers(tctx.master, Recorder, nested, Recorder)
        f = tflow.tflow()
        for hook in (HttpRequestHeadersHook(f), HttpRequestHook(f)):
            await theirs.handle_lifecycle(hook)
            await ours.handle_lifecycle(hook)
            theirs.trigger(HttpRequestHeadersHook(f))
            ours.trigger(HttpRequestHeadersHook(f))
        assert ours_calls == theirs_calls and len(ours_calls) == 16
        assert ours_calls[:3] == [f"0:requestheaders:{f.id}", f"1:requestheaders:{f.id}",
                                  f"1.child:requestheaders:{f.id}"]


async def test_a_failing_addon_is_logged_and_the_next_runs_and_a_halt_ends_the_event(
        caplog: pytest.LogCaptureFixture) -> None:
    with taddons.context() as tctx:
        calls: list[str] = []
        ours = HookTable(tctx.master)
        ours.add(Failing(), Recorder("after", calls))
        f = tflow.tflow()
        with caplog.at_level(logging.ERROR):
            await ours.trigger_event(HttpRequestHeadersHook(f))
        assert calls == [f"after:requestheaders:{f.id}"]
        assert "Addon error: a bug" in caplog.text
        halted = HookTable(tctx.master)
        halted.add(Halting(), Recorder("never", calls))
        await halted.trigger_event(HttpRequestHeadersHook(f))
        assert calls == [f"after:requestheaders:{f.id}"]


async def test_an_addon_added_or_removed_later_is_seen() -> None:
    with taddons.context() as tctx:
        calls: list[str] = []
        ours = HookTable(tctx.master)
        first = Recorder("first", calls)
        ours.add(first)
        f = tflow.tflow()
        await ours.trigger_event(HttpRequestHeadersHook(f))
        ours.add(Updates(calls), Recorder("second", calls))
        await ours.handle_lifecycle(HttpRequestHeadersHook(f))
        ours.remove(first)
        await ours.handle_lifecycle(HttpRequestHeadersHook(f))
        assert calls == [f"first:requestheaders:{f.id}", f"first:requestheaders:{f.id}",
                         f"second:requestheaders:{f.id}", "update:1", f"second:requestheaders:{f.id}", "update:1"]


def test_arguments_are_mitmproxys() -> None:
    f = tflow.tflow()
    for event in (hooks.UpdateHook([f]), HttpRequestHeadersHook(f), hooks.ConfigureHook({"a"})):
        assert arguments(event) == event.args()


def test_dropped_message_type_checks_drop_only_that_check() -> None:
    original = http.MessageData.__dict__.get("__post_init__")
    assert original is not None  # mitmproxy's debug-only check, there unless python -O
    with pytest.raises(TypeError):
        http.Request.make("GET", "http://example.test/").data.__class__(**{
            **tutils.treq().data.__dict__, "http_version": "HTTP/1.1"})  # a str where bytes belong
    try:
        drop_message_type_checks()
        made = tutils.treq().data.__class__(**{**tutils.treq().data.__dict__, "http_version": "HTTP/1.1"})
        assert made.http_version == "HTTP/1.1"
    finally:
        http.MessageData.__post_init__ = original  # type: ignore[attr-defined]
