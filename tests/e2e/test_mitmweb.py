"""mitmweb, headless: a login through it, then its REST API shows why each flow went the way it did."""

from __future__ import annotations

import io

import httpx2
from mitmproxy import io as mitmio

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port, wait_for_port
from tests.support.processes import Outpost, provider_entry

PASSWORD = "test-web-password"


def test_mitmweb_shows_every_decision(idp: str, upstream: str) -> None:
    port, web_port = free_port(), free_port()
    entry = provider_entry("web", port, upstream, idp, skip_path_regex="^/public$")
    extra = ["--set", f"web_port={web_port}", "--set", "web_open_browser=false", "--set", f"web_password={PASSWORD}"]
    with Outpost([entry], port, extra=extra, tool="mitmweb") as outpost:
        wait_for_port(web_port)
        client = browser()
        mock_login(client, f"{outpost.url}/headers")
        client.get(f"{outpost.url}/headers")
        browser().get(f"{outpost.url}/public")
        httpx2.get(f"{outpost.url}/x", headers={"Host": "unknown.test"})

        web = httpx2.Client(base_url=f"http://127.0.0.1:{web_port}", headers={"Authorization": f"Bearer {PASSWORD}"})
        flows = web.get("/flows").json()
        comments = {f["request"]["path"].partition("?")[0]: (f["comment"], f["marked"]) for f in flows}
        assert comments["/headers"][0].startswith("outpost [web]: allowed (session): session of alice")
        assert (comments["/public"][0].startswith("outpost [web]: skipped (unauthenticated_path):")
                and comments["/public"][1])
        assert comments["/outpost.goauthentik.io/callback"][0].startswith(
            "outpost [web]: endpoint (signed_in): callback: signed in as alice")
        assert any(c.startswith("outpost: denied (unknown_host): no provider serves host 'unknown.test'")
                   for c, _ in comments.values())

        dumped = list(mitmio.FlowReader(io.BytesIO(web.get("/flows/dump").content)).stream())
        allowed = next(f for f in dumped
                       if f.request.path == "/headers" and f.metadata["outpost"].get("outcome") == "allowed")
        assert (allowed.metadata["outpost"] | {"user": "alice", "provider": "web", "session": "valid"}
                == allowed.metadata["outpost"])

        xsrf = "ab" * 32  # tornado's XSRF check compares cookie and header; a v1 (hex) token is accepted
        web.cookies.set("_mitmproxy_xsrf", xsrf)
        response = web.post("/commands/outpost.providers", json={"arguments": []}, headers={"X-XSRFToken": xsrf})
        assert response.status_code == 200, (response.status_code, response.text[:300], dict(web.cookies))
        answer = response.json()
        assert answer["value"].startswith(f"web: proxy at http://127.0.0.1:{port}")
        for name, arguments in (("outpost.sessions", []), ("outpost.reload", []), ("outpost.config", [])):
            result = web.post(f"/commands/{name}", json={"arguments": arguments}, headers={"X-XSRFToken": xsrf}).json()
            assert "error" not in result, (name, result)
        assert "web-secret" not in web.post("/commands/outpost.config", json={"arguments": []},
                                            headers={"X-XSRFToken": xsrf}).text
        events = " ".join(e["message"] for e in web.get("/events").json())
        assert "idp: token exchange at" in events  # the outpost's own back-channel calls, in the event log

        # What mitmweb shows of the outpost itself: its listeners named for what they serve (no placeholder
        # upstream), and a streaming threshold its status bar can print.
        state = web.get("/state").json()
        descriptions = [server["description"] for server in state["servers"].values()]
        assert descriptions == [f"authentik outpost for web http://127.0.0.1:{port} (proxy to {upstream.rstrip('/')})"]
        options = web.get("/options").json()
        assert [m.partition("@")[0] for m in options["mode"]["value"]] == ["reverse:http://per-provider.invalid:1"]
        assert options["stream_large_bodies"]["value"] == "1048576"
