"""Starting the outpost: the bare command, mitmweb, and configuration errors that stop it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import yaml

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port, wait_for_port
from tests.support.processes import BIN, ROOT, Outpost, Process, provider_entry


def _run_with_config(config_text: str, tmp_path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "mitm_config.yaml"
    config.write_text(config_text)
    return subprocess.run(
        [str(BIN / "mitmdump"), "-s", str(ROOT / "addons/outpost.py"), "--set", f"outpost_config={config}",
         "--set", f"outpost_http_port={free_port()}", "--set", "outpost_https_port=0", "--set", "listen_port=0",
         "--set", "metrics_port=0", "--set", f"confdir={tmp_path}"],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def _provider(idp: str, **fields: object) -> dict[str, object]:
    return {"name": "app", "external_host": "http://app.example.test", "internal_host": "http://127.0.0.1:1",
            "issuer": idp, "client_id": "c", "client_secret": "s", **fields}


BAD_CONFIGS = {
    "unknown key": ({"colour": "red"}, "provider 'app': unknown field 'colour'"),
    "wrong type": ({"intercept_header_auth": "yes please"},
                   "provider 'app': field 'intercept_header_auth': expected bool, got str"),
    "number as bool": ({"access_token_validity": True},
                       "field 'access_token_validity': expected int or float, got bool"),
    "missing field": ({"client_id": None}, "provider 'app': field 'client_id': required"),
    "bad mode": ({"mode": "magic"}, "field 'mode': must be one of proxy, forward_single, forward_domain"),
    "external host with a path": ({"external_host": "http://app.example.test/sub"},
                                  "field 'external_host': must be scheme://host[:port] only"),
    "bad skip rule": ({"skip_path_regex": "^/ok\n(?<=x)y"}, "field 'skip_path_regex': line 2 '(?<=x)y'"),
    "missing env var": ({"client_secret": "${OUTPOST_TEST_UNSET_VAR}"},
                        "field 'client_secret': environment variable OUTPOST_TEST_UNSET_VAR is not set"),
    "unreachable issuer": ({"issuer": "http://127.0.0.1:9"},
                           "provider 'app': field 'issuer': cannot fetch the discovery document"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_stops_the_outpost_with_one_clear_message(idp: str, tmp_path: Path, case: str) -> None:
    fields, message = BAD_CONFIGS[case]
    result = _run_with_config(yaml.safe_dump({"providers": [_provider(idp, **fields)]}), tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert message in output, output
    assert "Traceback" not in output
    assert "authentik outpost for" not in output  # the outpost listeners never opened


def test_two_providers_on_one_external_host_are_refused(idp: str, tmp_path: Path) -> None:
    doc = {"providers": [_provider(idp), _provider(idp, name="other", client_id="d")]}
    result = _run_with_config(yaml.safe_dump(doc), tmp_path)
    assert result.returncode == 1
    assert ("provider 'other': field 'external_host': provider 'app' already serves app.example.test"
            in result.stdout + result.stderr)


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    result = _run_with_config("providers: [", tmp_path)
    assert result.returncode == 1 and "not valid YAML" in result.stdout + result.stderr
    result = _run_with_config("providers: []", tmp_path)
    assert result.returncode == 1 and "'providers' must be a non-empty list" in result.stdout + result.stderr


def test_secrets_from_env_and_files(idp: str, upstream: str, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "secret").write_text("from-a-file\n")
    entry = provider_entry("env", port, upstream, idp, client_id="${OUTPOST_TEST_CLIENT}")
    del entry["client_secret"]
    entry["client_secret_file"] = str(tmp_path / "secret")
    with Outpost([entry], port, env={"OUTPOST_TEST_CLIENT": "client-from-env"}) as outpost:
        start = browser().get(f"{outpost.url}/outpost.goauthentik.io/start")
        assert "client_id=client-from-env" in start.headers["location"]


def test_bare_command_serves_9000_and_9443(idp: str, upstream: str, tmp_path: Path) -> None:
    """`mitmdump -s addons/outpost.py` and nothing else, in a directory with mitm_config.yaml."""
    for port in (9000, 9443):
        try:
            wait_for_port(port, timeout=0.1)
        except TimeoutError:
            continue
        pytest.fail(f"port {port} is taken; stop the demo (scripts/run) before running the tests")
    (tmp_path / "mitm_config.yaml").write_text(
        yaml.safe_dump({"providers": [provider_entry("bare", 9000, upstream, idp)]}))
    shutil.copytree(ROOT / "addons", tmp_path / "addons", ignore=shutil.ignore_patterns("__pycache__"))
    with Process([str(BIN / "mitmdump"), "-s", "addons/outpost.py", "--set", f"confdir={tmp_path}"],
                 port=9000, cwd=tmp_path) as proc:
        wait_for_port(9443, proc.proc)
        client = browser()
        mock_login(client, "http://127.0.0.1:9000/headers")
        assert client.get("http://127.0.0.1:9000/headers").json()["path"] == "/headers"
        assert httpx2.get("https://127.0.0.1:9443/outpost.goauthentik.io/ping", verify=False).status_code == 204


def test_mitmweb_runs_the_same_outpost(idp: str, upstream: str, tmp_path: Path) -> None:
    port, web_port = free_port(), free_port()
    entry = provider_entry("web", port, upstream, idp)
    extra = ["--set", f"web_port={web_port}", "--set", "web_open_browser=false"]
    with Outpost([entry], port, extra=extra, tool="mitmweb") as outpost:
        wait_for_port(web_port)
        client = browser()
        mock_login(client, f"{outpost.url}/headers")
        assert client.get(f"{outpost.url}/headers").json()["path"] == "/headers"


def test_demo_config_is_valid() -> None:
    sys.path.insert(0, str(ROOT / "addons"))
    from mitm_outpost import config_schema as config

    demo = config.load(ROOT / "mitm_config.yaml")
    assert [p["name"] for p in demo.providers] == ["demo"]
    assert demo.providers[0]["external_host"] == "http://localhost:9000"


def test_outpost_config_from_the_environment(idp: str, upstream: str, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "elsewhere.yaml"
    config.write_text(yaml.safe_dump({"providers": [provider_entry("env-config", port, upstream, idp)]}))
    args = [str(BIN / "mitmdump"), "-s", str(ROOT / "addons/outpost.py"), "--set", f"outpost_http_port={port}",
            "--set", "outpost_https_port=0", "--set", "listen_port=0", "--set", "metrics_port=0",
            "--set", f"confdir={tmp_path}"]
    with Process(args, port=port, env={"OUTPOST_CONFIG": str(config)}, cwd=tmp_path):
        assert browser().get(f"http://127.0.0.1:{port}/x").status_code == 302
