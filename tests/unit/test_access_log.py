"""AccessLog: one line per request, in json or text or none, with the fields it promises and never a query
string, a cookie or a credential. Requests go through the production chain (`chain.build`)."""

import contextlib
import json
import logging
import shlex
from collections.abc import Iterator

import pytest
from mitmproxy import exceptions, http
from mitmproxy import flow as mflow
from mitmproxy.proxy.layers.http import HttpErrorHook, HttpRequestHeadersHook, HttpRequestHook, HttpResponseHook
from mitmproxy.test import taddons, tflow, tutils

from mitm_outpost import chain
from mitm_outpost.registry import Registry
from tests.unit.conftest import signed_in

ACCESS = "mitm_outpost.access"


@pytest.fixture(autouse=True)
def no_authentik(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTHENTIK_HOST", raising=False)
    monkeypatch.delenv("AUTHENTIK_TOKEN", raising=False)


@contextlib.contextmanager
def outpost(registry: Registry, interactive: bool = False, **options: object) -> Iterator[taddons.context]:
    with taddons.context(chain.build(registry, interactive=interactive)) as tctx:
        if options:
            tctx.options.update(**options)
        yield tctx


def request(path: str = "/x", host: str = "app.example.test", **headers: str) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=1, path=path.encode(), headers=(),
                                    timestamp_start=1000.0, timestamp_end=1000.25))
    f.request.headers["Host"] = host
    for name, value in headers.items():
        f.request.headers[name] = value
    return f


async def decide(tctx: taddons.context, f: http.HTTPFlow) -> http.HTTPFlow:
    await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    if f.response is None:
        await tctx.master.addons.handle_lifecycle(HttpRequestHook(f))
    return f


async def answered(tctx: taddons.context, f: http.HTTPFlow) -> http.HTTPFlow:
    """Decided, then the response hook: the upstream's answer (sent at 1001.0, done at 1001.5) when the
    request went upstream, else the outpost's own with those timestamps."""
    await decide(tctx, f)
    if f.response is None:
        f.response = tutils.tresp(status_code=201)
    f.response.timestamp_start, f.response.timestamp_end = 1001.0, 1001.5
    await tctx.master.addons.handle_lifecycle(HttpResponseHook(f))
    return f


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ACCESS]


def without_time(line: str) -> dict:
    record = json.loads(line)
    assert isinstance(record.pop("time"), float)
    return record


async def test_a_signed_in_request_is_one_json_line_with_every_field(registry: Registry,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    cookie = await signed_in(registry)
    with outpost(registry) as tctx, caplog.at_level(logging.INFO, ACCESS):
        await answered(tctx, request("/x/y?page=2", Cookie=cookie))
    [line] = lines(caplog)
    assert without_time(line) == {
        "provider": "app", "method": "GET", "host": "app.example.test", "path": "/x/y", "status": 201,
        "route": "outpost", "decision": "allowed", "code": "session", "reason": "session of alice", "uid": "u1",
        "duration_ms": 1500.0, "upstream_ms": 750.0,
    }


async def test_an_answer_of_the_outpost_has_no_upstream_time(registry: Registry,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with outpost(registry) as tctx, caplog.at_level(logging.INFO, ACCESS):
        await answered(tctx, request("/private", Accept="text/html"))
    [line] = lines(caplog)
    assert without_time(line) == {
        "provider": "app", "method": "GET", "host": "app.example.test", "path": "/private", "status": 302,
        "route": "outpost", "decision": "redirected", "code": "no_session",
        "reason": "no session: sent to sign in, back to /private", "uid": "", "duration_ms": 1500.0,
    }


async def test_no_line_holds_a_query_a_cookie_or_a_credential(registry: Registry,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    cookie = await signed_in(registry)
    secrets = {"Cookie": f"other=cookie-secret-1; {cookie}", "Authorization": "Bearer bearer-secret-2"}
    with outpost(registry) as tctx, caplog.at_level(logging.INFO, ACCESS):
        await answered(tctx, request("/x?token=query-secret-3", **secrets))  # signed in: goes upstream
        await answered(tctx, request("/x?token=query-secret-3", host="nobody.test",  # refused: unknown host
                                     Authorization="Basic YmFzaWMtc2VjcmV0LTQ=", Cookie="a=cookie-secret-5"))
    allowed, refused = lines(caplog)
    assert (json.loads(allowed)["decision"], json.loads(refused)["decision"]) == ("allowed", "denied")
    assert (json.loads(allowed)["path"], json.loads(refused)["path"]) == ("/x", "/x")
    for secret in ("cookie-secret-1", "sid-1", "bearer-secret-2", "query-secret-3", "token=", "YmFzaWMtc2VjcmV0LTQ",
                   "cookie-secret-5"):
        assert secret not in allowed + refused


async def test_text_lines_are_key_value_pairs_that_a_client_string_cannot_add_to(
        registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    with outpost(registry, outpost_access_log="text") as tctx, caplog.at_level(logging.INFO, ACCESS):
        await answered(tctx, request("/a\x1b[31m?q=1", host="evil.test status=200", Accept="text/html"))
    [line] = lines(caplog)
    assert line.partition(" ")[0].startswith("time=")
    assert line.partition(" ")[2] == (
        'provider= method=GET host="evil.test status=200" path=/a\\x1b[31m status=400 route=outpost decision=denied '
        'code=unknown_host reason="no provider serves host \'evil.test status=200\'" uid= duration_ms=1500.0'
    )
    assert [pair.partition("=")[0] for pair in shlex.split(line)] == [
        "time", "provider", "method", "host", "path", "status", "route", "decision", "code", "reason", "uid",
        "duration_ms"]


async def test_off_writes_nothing(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    with outpost(registry, outpost_access_log="off") as tctx, caplog.at_level(logging.INFO, ACCESS):
        f = await answered(tctx, request(Accept="text/html"))
    assert f.response.status_code == 302
    assert lines(caplog) == []


async def test_auto_is_json_in_the_lean_runner_and_off_in_mitmdump(registry: Registry,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, ACCESS):
        with outpost(registry, interactive=True) as tctx:
            assert tctx.options.outpost_access_log == "auto"
            await answered(tctx, request(Accept="text/html"))
        assert lines(caplog) == []
        with outpost(registry, interactive=True, outpost_access_log="json") as tctx:
            await answered(tctx, request(Accept="text/html"))
        with outpost(registry, interactive=False) as tctx:
            await answered(tctx, request(Accept="text/html"))
    assert [json.loads(line)["status"] for line in lines(caplog)] == [302, 302]


def test_an_unknown_format_is_refused(registry: Registry) -> None:
    with outpost(registry) as tctx:
        refused = r"^outpost_access_log: one of auto, json, text, off, not 'xml'$"
        with pytest.raises(exceptions.OptionsError, match=refused):
            tctx.options.set("outpost_access_log=xml")  # as --set and :set give it
        assert tctx.options.outpost_access_log == "auto"


@pytest.mark.parametrize("message, status", [("Client disconnected.", 499), ("Connection refused", 502)])
async def test_a_request_that_ends_in_an_error_is_logged_with_the_status_the_client_got(
        registry: Registry, caplog: pytest.LogCaptureFixture, message: str, status: int) -> None:
    cookie = await signed_in(registry)
    with outpost(registry) as tctx, caplog.at_level(logging.INFO, ACCESS):
        f = await decide(tctx, request(Cookie=cookie))
        f.error = mflow.Error(message)
        await tctx.master.addons.handle_lifecycle(HttpErrorHook(f))
    [line] = lines(caplog)
    record = json.loads(line)
    assert (record["status"], record["decision"], "incomplete" in record) == (status, "allowed", False)


async def test_a_streamed_response_cut_short_is_logged_as_incomplete(registry: Registry,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    cookie = await signed_in(registry)
    with outpost(registry) as tctx, caplog.at_level(logging.INFO, ACCESS):
        f = await decide(tctx, request(Cookie=cookie))
        f.response = tutils.tresp(status_code=206)
        f.response.stream = True
        f.error = mflow.Error("Connection reset")
        await tctx.master.addons.handle_lifecycle(HttpErrorHook(f))
    [line] = lines(caplog)
    record = json.loads(line)
    assert (record["status"], record["incomplete"]) == (206, True)


async def test_a_check_logs_the_host_it_asks_about_and_keeps_no_outpost_cookie(
        caplog: pytest.LogCaptureFixture) -> None:
    """The line's host is the original request's, whatever forwarding headers the proxy sent; the check's flow
    (what mitmweb shows and `-w` saves) no longer holds the outpost's cookie, only the client's others."""
    from mitm_outpost.registry import parse_networks
    from tests.unit.conftest import make_provider

    registry = Registry()
    registry.replace("test-outpost", (make_provider(name="single", mode="forward_single",
                                                    external_host="https://fwd.example.test", internal_host=""),))
    registry.trusted_networks = parse_networks(["127.0.0.0/8"])
    cookie = await signed_in(registry)
    check = request("/outpost.goauthentik.io/auth/nginx", host="outpost.internal:9000",
                    **{"X-Original-URL": "https://fwd.example.test/page?q=1", "X-Forwarded-Host": "elsewhere.test",
                       "Cookie": f"theme=dark; {cookie}"})
    with outpost(registry) as tctx, caplog.at_level(logging.INFO, ACCESS):
        await answered(tctx, check)
    [line] = lines(caplog)
    assert json.loads(line)["host"] == "fwd.example.test" and json.loads(line)["decision"] == "allowed"
    assert check.request.headers["Cookie"] == "theme=dark"
    assert cookie.partition("=")[2] not in repr(check.get_state())
