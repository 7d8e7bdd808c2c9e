"""Providers from the authentik API (the contract double of tests/support/authentik_api.py):
start-up, pagination, live refresh, SESSION_END, failures, certificates, the environment."""

from __future__ import annotations

import base64
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from cryptography import x509

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.processes import free_port
from tests.support.authentik_api import (
    AuthentikAPIDouble,
    authentik_oidc_configuration,
    hash_session_key,
    make_provider,
    self_signed_certificate,
)
from tests.support.authentik_token import AuthentikTokenEndpoint
from tests.support.processes import BIN, ROOT, Process


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


class ApiOutpost(Process):
    """`mitmdump -s addons/outpost.py` with AUTHENTIK_HOST/TOKEN and no mitm_config.yaml."""

    def __init__(self, api: AuthentikAPIDouble, *, token: str | None = None, env: dict[str, str] | None = None,
                 tls_port: int = 0, tool: str = "mitmdump") -> None:
        self.port, self.tls_port = free_port(), tls_port
        self.dir = Path(tempfile.mkdtemp(prefix="api-outpost-"))
        head = ([sys.executable, "-m", "mitm_outpost"] if tool == "lean"
                else [str(BIN / "mitmdump"), "-s", str(ROOT / "addons/outpost.py")])
        args = [*head, "--set", f"outpost_config={self.dir}/absent.yaml",
                "--set", f"outpost_http_port={self.port}", "--set", f"outpost_https_port={tls_port}",
                "--set", "listen_port=0", "--set", f"metrics_port={free_port()}", "--set", f"confdir={self.dir}"]
        environment = {"AUTHENTIK_HOST": api.url, "AUTHENTIK_TOKEN": token or api.token, **(env or {})}
        if tool == "lean":
            environment["PYTHONPATH"] = str(ROOT / "addons")
        super().__init__(args, port=self.port, env=environment)

    def get(self, host: str, path: str = "/", client: httpx2.Client | None = None, **kwargs: Any) -> httpx2.Response:
        return (client or browser()).get(f"http://127.0.0.1:{self.port}{path}",
                                         headers={"Host": host, **kwargs.pop("headers", {})}, **kwargs)

    def ready(self) -> bool:
        return httpx2.get(f"http://127.0.0.1:{self.port}/outpost.goauthentik.io/ping").status_code == 204


def provider(idp_doc: dict[str, Any], name: str, host: str, upstream: str, **fields: Any) -> dict[str, Any]:
    return make_provider(name, f"http://{host}", upstream, client_id=f"{name}-client", client_secret=f"{name}-secret",
                         oidc_configuration=idp_doc, **fields)


@pytest.fixture(scope="module")
def idp_doc(idp: str) -> dict[str, Any]:
    """The dev IdP's discovery document in the shape authentik embeds (its required keys present)."""
    mock = httpx2.get(f"{idp}/.well-known/openid-configuration").json()
    return {**authentik_oidc_configuration(idp, "app", alg="RS256"), **mock, "introspection_endpoint": "",
            "token_endpoint_auth_methods_supported": ["client_secret_basic"]}


@pytest.fixture
def api() -> Iterator[AuthentikAPIDouble]:
    with AuthentikAPIDouble(outpost_name="edge-outpost", max_page_size=2) as double:
        yield double


def login(outpost: ApiOutpost, host: str, user: str = "alice") -> httpx2.Client:
    client = browser(headers={"Host": host})
    url = f"http://127.0.0.1:{outpost.port}/headers"
    start = client.get(url)
    assert start.status_code == 302, start.text
    # the browser follows Locations on `host`; the outpost listens on 127.0.0.1
    authorize = client.get(start.headers["location"].replace(f"http://{host}", f"http://127.0.0.1:{outpost.port}"))
    form = client.post(authorize.headers["location"], data={"sub": user},
                       headers={"Host": authorize.headers["location"].split("/")[2]})
    done = client.get(form.headers["location"].replace(f"http://{host}", f"http://127.0.0.1:{outpost.port}"))
    assert done.status_code == 302, done.text
    return client


def seen(outpost: ApiOutpost, host: str, client: httpx2.Client) -> dict[str, str]:
    response = outpost.get(host, "/headers", client)
    assert response.status_code == 200, response.status_code
    return {k.lower(): v for k, v in response.json()["headers"]}


def test_start_up_from_the_api_with_pagination(api: AuthentikAPIDouble, idp_doc: dict[str, Any], upstream: str) -> None:
    api.set_providers([provider(idp_doc, f"app{i}", f"app{i}.example.test", upstream) for i in range(5)])
    with ApiOutpost(api) as outpost:
        eventually(outpost.ready)
        assert api.count("/api/v3/outposts/proxy/") >= 3  # three pages of two
        for i in range(5):
            assert outpost.get(f"app{i}.example.test", "/x").status_code == 302
        assert outpost.get("other.example.test").status_code == 400
        client = login(outpost, "app3.example.test")
        headers = seen(outpost, "app3.example.test", client)
        assert headers["x-authentik-username"] == "alice"
        assert headers["x-authentik-meta-outpost"] == "edge-outpost" and headers["x-authentik-meta-provider"] == "app3"
        eventually(lambda: len(api.hellos) >= 1)
        assert api.ws_clients[0].headers.get("authorization") == f"Bearer {api.token}"


def test_refresh_adds_changes_and_removes_providers_and_keeps_sessions(api: AuthentikAPIDouble, idp_doc: dict[str, Any],
                                                                       upstream: str) -> None:
    a, c = provider(idp_doc, "a", "a.example.test", upstream), provider(idp_doc, "c", "c.example.test", upstream)
    api.set_providers([a, c])
    with ApiOutpost(api) as outpost:
        eventually(outpost.ready)
        client = login(outpost, "a.example.test")
        eventually(lambda: api.connected >= 1)
        changed = {**a, "skip_path_regex": "^/open$"}
        api.set_providers([changed, provider(idp_doc, "b", "b.example.test", upstream)])
        assert api.send_trigger_update() == 1
        eventually(lambda: outpost.get("b.example.test", "/x").status_code == 302)
        assert outpost.get("c.example.test", "/x").status_code == 400  # removed: stops serving at once
        assert outpost.get("a.example.test", "/open").status_code == 200  # changed: the new rule applies
        assert seen(outpost, "a.example.test", client)["x-authentik-username"] == "alice"  # session kept


def test_session_end_ends_exactly_that_idp_session(api: AuthentikAPIDouble, idp: str, idp_doc: dict[str, Any],
                                                   upstream: str) -> None:
    for user, key in (("sess-one", "django-1"), ("sess-two", "django-2")):
        httpx2.put(f"{idp}/users/{user}",
                   json={"preferred_username": user, "sid": hash_session_key(key)}).raise_for_status()
    api.set_providers([provider(idp_doc, "a", "a.example.test", upstream),
                       provider(idp_doc, "b", "b.example.test", upstream)])
    with ApiOutpost(api) as outpost:
        eventually(outpost.ready)
        one_a, one_b = login(outpost, "a.example.test", "sess-one"), login(outpost, "b.example.test", "sess-one")
        two = login(outpost, "a.example.test", "sess-two")
        eventually(lambda: api.connected >= 1)
        api.send_session_end(hash_session_key("django-1"))
        eventually(lambda: outpost.get("a.example.test", "/headers", one_a).status_code == 302)
        assert outpost.get("b.example.test", "/headers", one_b).status_code == 302  # across providers
        assert seen(outpost, "a.example.test", two)["x-authentik-username"] == "sess-two"


def test_server_down_keeps_the_last_good_set(api: AuthentikAPIDouble, idp_doc: dict[str, Any], upstream: str) -> None:
    api.set_providers([provider(idp_doc, "a", "a.example.test", upstream)])
    with ApiOutpost(api) as outpost:
        eventually(outpost.ready)
        api.set_down(True)
        assert outpost.proc is not None
        outpost.proc.send_signal(signal.SIGUSR1)
        eventually(lambda: "keeping the last good providers" in outpost.output)
        assert outpost.get("a.example.test", "/x").status_code == 302
        api.set_broken_json(True)
        api.set_down(False)
        eventually(lambda: outpost.output.count("keeping the last good providers") >= 2)
        assert outpost.get("a.example.test", "/x").status_code == 302 and outpost.ready()


def test_unreachable_at_start_is_not_ready_until_loaded(api: AuthentikAPIDouble, idp_doc: dict[str, Any],
                                                        upstream: str) -> None:
    api.set_providers([provider(idp_doc, "a", "a.example.test", upstream)])
    api.set_down(True)
    with ApiOutpost(api) as outpost:
        eventually(lambda: "not reachable yet" in outpost.output)
        assert httpx2.get(f"http://127.0.0.1:{outpost.port}/outpost.goauthentik.io/ping").status_code == 503
        assert httpx2.get(f"http://127.0.0.1:{outpost.port}/outpost.goauthentik.io/live").status_code == 204
        api.set_down(False)
        eventually(outpost.ready)
        assert outpost.get("a.example.test", "/x").status_code == 302


def _served_fingerprint(port: int, sni: str) -> str:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).fingerprint(
        __import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()).hex()


def test_certificate_rotation_on_the_https_port(api: AuthentikAPIDouble, idp_doc: dict[str, Any],
                                                upstream: str) -> None:
    pk = "6f6c6a6d-0000-4000-8000-000000000001"
    cert, key, fingerprint = self_signed_certificate("secure.example.test")
    api.add_certificate(pk, cert, key, fingerprint)
    api.set_providers([make_provider("secure", "https://secure.example.test", upstream, oidc_configuration=idp_doc,
                                     certificate=pk)])
    with ApiOutpost(api, tls_port=free_port()) as outpost:
        eventually(outpost.ready)
        first = _served_fingerprint(outpost.tls_port, "secure.example.test")
        assert first == fingerprint.replace(":", "").lower()
        api.send_trigger_update() if api.connected else None
        new_cert, new_key, new_fingerprint = self_signed_certificate("secure.example.test")
        api.add_certificate(pk, new_cert, new_key, new_fingerprint)
        eventually(lambda: api.connected >= 1)
        api.send_trigger_update()
        eventually(lambda: (_served_fingerprint(outpost.tls_port, "secure.example.test")
                            == new_fingerprint.replace(":", "").lower()))
        assert api.certificate_fetches(pk)["certificate"] == 2  # once per fingerprint, not per refresh


def test_bad_token_stops_with_a_clear_message(api: AuthentikAPIDouble) -> None:
    outpost = ApiOutpost(api, token="wrong")
    assert outpost.proc is None
    result = subprocess.run(outpost.args, env={**os.environ, **(outpost.env or {})}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert ("authentik refused the token (403)" in result.stderr + result.stdout
            and "Check AUTHENTIK_TOKEN" in result.stderr)


def test_missing_token_prints_help_and_exits_2(api: AuthentikAPIDouble) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHENTIK_")}
    result = subprocess.run([str(BIN / "mitmdump"), "-s", str(ROOT / "addons/outpost.py"),
                             "--set", "listen_port=0", "--set", "metrics_port=0"],
                            env={**env, "AUTHENTIK_HOST": api.url}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "AUTHENTIK_TOKEN is not set" in result.stderr and "AUTHENTIK_HOST=https://" in result.stderr


def test_seed_004_compose_as_a_command_line(api: AuthentikAPIDouble, idp_doc: dict[str, Any], upstream: str,
                                            tmp_path: Path) -> None:
    """seed 004's docker-compose `environment:` block, and nothing else, on the command line."""
    api.set_providers([provider(idp_doc, "a", "a.example.test", upstream)])
    http_port, https_port, metrics_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHENTIK_", "OUTPOST_"))}
    env |= {"AUTHENTIK_HOST": api.url, "AUTHENTIK_INSECURE": "false", "AUTHENTIK_TOKEN": api.token,
            "AUTHENTIK_LISTEN__HTTP": f"127.0.0.1:{http_port}", "AUTHENTIK_LISTEN__HTTPS": f"[::]:{https_port}",
            "AUTHENTIK_LISTEN__METRICS": f"127.0.0.1:{metrics_port}", "HOME": str(tmp_path)}
    (tmp_path / "addons").symlink_to(ROOT / "addons")
    with Process([str(BIN / "mitmdump"), "-s", "addons/outpost.py"], port=http_port, env=env, cwd=tmp_path) as proc:
        assert proc.proc is not None
        eventually(lambda: httpx2.get(f"http://127.0.0.1:{http_port}/outpost.goauthentik.io/ping").status_code == 204)
        assert httpx2.get(f"http://127.0.0.1:{http_port}/x",
                          headers={"Host": "a.example.test", "Accept": "text/html"}).status_code == 302
        assert httpx2.get(f"https://127.0.0.1:{https_port}/outpost.goauthentik.io/ping",
                          verify=False).status_code == 204
        assert httpx2.get(f"http://127.0.0.1:{metrics_port}/outpost.goauthentik.io/ping").status_code == 204
        metrics = httpx2.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert (f'authentik_outpost_info{{build="",outpost_name="edge-outpost",'
                f'outpost_type="proxy",uuid="{api.outpost_pk}"') in metrics
        assert "authentik_outpost_last_update{" in metrics


def test_file_and_api_providers_together_and_a_conflict(api: AuthentikAPIDouble, idp: str, idp_doc: dict[str, Any],
                                                        upstream: str) -> None:
    api.set_providers([provider(idp_doc, "from-api", "api.example.test", upstream)])
    outpost = ApiOutpost(api)
    file_entry = {"name": "from-file", "external_host": "http://file.example.test", "internal_host": upstream,
                  "issuer": idp, "client_id": "file", "client_secret": "file-secret"}
    (outpost.dir / "absent.yaml").write_text(__import__("yaml").safe_dump({"providers": [file_entry]}))
    with outpost:
        eventually(outpost.ready)
        assert outpost.get("api.example.test", "/x").status_code == 302
        assert outpost.get("file.example.test", "/x").status_code == 302
        eventually(lambda: api.connected >= 1)
        api.set_providers([provider(idp_doc, "clash", "file.example.test", upstream)])
        api.send_trigger_update()
        eventually(lambda: "provider 'from-file' already serves file.example.test" in outpost.output)
        assert outpost.get("api.example.test", "/x").status_code == 302  # the last good set keeps serving


@pytest.mark.parametrize("release, outdated", [(None, False), ("2024.2.0", True)])
def test_authentik_does_not_flag_the_outpost_as_outdated(api: AuthentikAPIDouble, idp_doc: dict[str, Any],
                                                         upstream: str, release: str | None, outdated: bool) -> None:
    """The HELLO and X-authentik-meta-version name an authentik release, as authentik's outpost does; an older
    one, set by the option, is flagged exactly as authentik would flag an old outpost."""
    api.set_providers([provider(idp_doc, "app", "app.example.test", upstream)])
    outpost = ApiOutpost(api)
    if release:
        outpost.args += ["--set", f"outpost_authentik_version={release}"]
    with outpost:
        eventually(outpost.ready)
        eventually(lambda: len(api.hellos) >= 1)
        hello = api.hellos[0]
        assert api.version_outdated(hello) is outdated
        assert hello["version"] == (release or api.server_version) and "mitm-outpost 0." in hello["golangVersion"]
        headers = seen(outpost, "app.example.test", login(outpost, "app.example.test"))
        assert headers["x-authentik-meta-version"] == f"goauthentik.io/outpost/{release or api.server_version}"


def test_a_provider_with_no_signing_key_sends_its_jwks_url(api: AuthentikAPIDouble, upstream: str) -> None:
    """authentik's proxy provider without a signing key: HS256 ID tokens (signed with the client secret),
    and X-authentik-meta-jwks is still its application's JWKS URL."""
    with AuthentikTokenEndpoint("hs-client", "hs-secret", {"svc": "app-password"}) as authentik:
        base = f"http://127.0.0.1:{authentik.port}"
        api.set_providers([make_provider("app", "http://hs.example.test", upstream, client_id="hs-client",
                                         client_secret="hs-secret", oidc_configuration=base)])
        with ApiOutpost(api) as outpost:
            eventually(outpost.ready)
            basic = base64.b64encode(b"svc:app-password").decode()
            response = outpost.get("hs.example.test", "/headers", headers={"Authorization": f"Basic {basic}"})
            assert response.status_code == 200, response.text
            headers = {k.lower(): v for k, v in response.json()["headers"]}
            assert headers["x-authentik-username"] == "svc"
            assert headers["x-authentik-meta-jwks"] == f"{base}/application/o/app/jwks/"
