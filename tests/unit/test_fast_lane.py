"""The fast lane's shortcuts answer exactly as the mitmproxy parts they stand in for."""

import uuid

import pytest
from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.test import tflow

from mitm_outpost import forwarded, lane_connection, pages
from mitm_outpost.lane_connection import IndexedHeaders, make_flow, make_request, response_head

FIELDS = ((b"Host", b"app.example.test"), (b"X-Original-URL", b"http://app.example.test/a?b=1"),
          (b"cookie", b"a=1"), (b"Cookie", b"b=2"), (b"Accept", b"*/*"), (b"X-Caf\xc3\xa9", b"cr\xe8me"),
          (b"Empty", b""))
NAMES = ("Host", "host", b"HOST", "Cookie", "cookie", "X-Original-URL", "Accept", "X-Café", "Empty", "Missing",
         b"x-caf\xc3\xa9", "Transfer-Encoding")


def _indexed(fields: tuple[tuple[bytes, bytes], ...]) -> IndexedHeaders:
    return make_request(b"GET", b"/", b"HTTP/1.1", list(fields), b"", 0.0).headers


@pytest.mark.parametrize("name", NAMES)
def test_lookups_answer_as_mitmproxys_headers(name: str | bytes) -> None:
    ours, theirs = _indexed(FIELDS), http.Headers(FIELDS)
    assert ours.get_all(name) == theirs.get_all(name)
    assert ours.get(name) == theirs.get(name)
    assert ours.get(name, "default") == theirs.get(name, "default")
    assert (name in ours) == (name in theirs)


def test_a_change_to_the_fields_is_seen_by_the_next_lookup() -> None:
    headers = _indexed(FIELDS)
    assert headers.get("Accept") == "*/*"
    headers["Accept"] = "text/html"
    del headers["Host"]
    headers.fields += ((b"Host", b"other.example.test"),)
    assert headers.get("Accept") == "text/html" and headers.get_all("Host") == ["other.example.test"]


def test_get_all_gives_a_list_the_caller_may_change() -> None:
    headers = _indexed(FIELDS)
    headers.get_all("Cookie").append("c=3")
    assert headers.get_all("Cookie") == ["a=1", "b=2"]


@pytest.mark.parametrize("url", [
    "http://app.example.test/a/../b?q=1", "https://app.example.test:8443/%2e%2e/x", "http://APP.example.test./",
    "javascript:alert(1)", "http://app.example.test/a\nb", "http:///nohost", "not a url",
])
def test_remembered_url_judgements_are_the_judgement(url: str) -> None:
    assert forwarded.parse_original_url(url) == forwarded._judge_original_url(url, None)
    assert forwarded.parse_original_url(url) == forwarded._judge_original_url(url, None)  # and from the memo


def test_long_urls_are_judged_each_time_and_never_kept() -> None:
    forwarded._remembered_original_url.cache_clear()
    long_url = "http://app.example.test/" + "a" * forwarded.MEMO_URL_LENGTH
    assert forwarded.parse_original_url(long_url).path == "/" + "a" * forwarded.MEMO_URL_LENGTH
    assert forwarded._remembered_original_url.cache_info().currsize == 0
    forwarded.parse_original_url("http://app.example.test/short")
    assert forwarded._remembered_original_url.cache_info().currsize == 1


def test_a_lane_flow_is_what_mitmproxy_makes() -> None:
    client, server = tflow.tclient_conn(), tflow.tserver_conn()
    ours, theirs = make_flow(client, server), http.HTTPFlow(client, server, live=True)
    mine, other = vars(ours), vars(theirs)
    assert mine.keys() == other.keys()
    assert {k: v for k, v in mine.items() if k not in ("id", "timestamp_created")} \
        == {k: v for k, v in other.items() if k not in ("id", "timestamp_created")}
    assert ours.metadata is not make_flow(client, server).metadata


def test_lane_flow_ids_are_unique_uuids() -> None:
    client, server = tflow.tclient_conn(), tflow.tserver_conn()
    ids = [make_flow(client, server).id for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(i)) == i for i in ids)


def test_a_remembered_answer_head_is_the_assembled_one() -> None:
    heads = []
    for status, extra in ((200, ((b"X-authentik-username", b"alice"),)), (200, ((b"X-authentik-username", b"bob"),)),
                          (401, ()), (200, ((b"X-authentik-username", b"alice"),))):
        response = pages.empty(status)
        response.headers.fields += extra
        heads.append(response_head(response))
        assert heads[-1] == http1.assemble_response_head(response)
    assert heads[0] == heads[3] and len(set(heads)) == 3
    login = pages.empty(302)
    login.headers.add("Set-Cookie", "authentik_proxy_abc=state; HttpOnly")
    assert response_head(login) == http1.assemble_response_head(login)
    assert not any(b"authentik_proxy_abc" in head for head in lane_connection._heads.values())  # a one-off, not kept
