"""Listeners: the reverse modes, ports and certificates the outpost sets in mitmproxy's options, from its own
options and authentik's AUTHENTIK_LISTEN__* variables, through the production chain (`chain.build`)."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons
from mitmproxy.utils import human

from mitm_outpost import chain
from mitm_outpost.listeners import DEFAULT_CERT_FILE, PLACEHOLDER_TARGET, Listeners
from mitm_outpost.registry import Registry
from tests.unit.conftest import make_provider

TARGET = f"reverse:{PLACEHOLDER_TARGET}"


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AUTHENTIK_HOST", "AUTHENTIK_TOKEN", "AUTHENTIK_LISTEN__HTTP", "AUTHENTIK_LISTEN__HTTPS"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def outpost(registry: Registry, confdir: Path, fast_lane: bool = False) -> Iterator[taddons.context]:
    # mitmproxy's Proxyserver: the options Listeners sets (and its check that each mode is a valid one)
    with taddons.context(Proxyserver(), chain.build(registry, interactive=False, fast_lane=fast_lane)) as tctx:
        tctx.options.update(confdir=str(confdir))
        yield tctx


def test_the_defaults_are_authentik_s_ports_on_every_interface(registry: Registry, tmp_path: Path) -> None:
    with outpost(registry, tmp_path) as tctx:
        assert (tctx.options.outpost_listen_host, tctx.options.outpost_http_port, tctx.options.outpost_https_port) == (
            "", 9000, 9443)
        tctx.options.update(outpost_http_port=9000)  # as a start with the defaults configures them
        assert tctx.options.mode == [f"{TARGET}@9000", f"{TARGET}@9443"]
        assert (tctx.options.keep_host_header, tctx.options.connection_strategy) == (True, "lazy")
        assert human.parse_size(tctx.options.stream_large_bodies) == 1024 * 1024  # streamed beyond 1 MiB


def test_ports_and_address_become_reverse_modes(registry: Registry, tmp_path: Path) -> None:
    with outpost(registry, tmp_path) as tctx:
        tctx.options.update(outpost_http_port=9100, outpost_https_port=9543, outpost_listen_host="127.0.0.2")
        assert tctx.options.mode == [f"{TARGET}@127.0.0.2:9100", f"{TARGET}@127.0.0.2:9543"]
        tctx.options.update(outpost_https_port=0)
        assert tctx.options.mode == [f"{TARGET}@127.0.0.2:9100"], "0 turns the HTTPS listener off"


def test_authentik_s_listen_variables_set_the_defaults(registry: Registry, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHENTIK_LISTEN__HTTP", "127.0.0.3:9200,[::1]:9200")  # a list: the first counts
    monkeypatch.setenv("AUTHENTIK_LISTEN__HTTPS", "[::]:9643")
    with outpost(registry, tmp_path) as tctx:
        assert (tctx.options.outpost_listen_host, tctx.options.outpost_http_port, tctx.options.outpost_https_port) == (
            "127.0.0.3", 9200, 9643)
        tctx.options.update(outpost_http_port=9200)
        assert tctx.options.mode == [f"{TARGET}@127.0.0.3:9200", f"{TARGET}@127.0.0.3:9643"]


def test_all_interfaces_in_a_listen_variable_is_no_address(registry: Registry, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHENTIK_LISTEN__HTTP", "0.0.0.0:9300")
    monkeypatch.setenv("AUTHENTIK_LISTEN__HTTPS", "not-a-port")
    with outpost(registry, tmp_path) as tctx:
        assert (tctx.options.outpost_listen_host, tctx.options.outpost_http_port, tctx.options.outpost_https_port) == (
            "", 9300, 9443)


def test_with_the_fast_lane_mitmproxy_listens_on_no_port(registry: Registry, tmp_path: Path) -> None:
    with outpost(registry, tmp_path, fast_lane=True) as tctx:
        tctx.options.update(outpost_http_port=9100)
        assert tctx.options.mode == []
        assert tctx.options.certs == [f"*={tmp_path / DEFAULT_CERT_FILE}"]


def test_a_mode_the_user_chose_is_kept_until_an_outpost_port_changes(registry: Registry, tmp_path: Path) -> None:
    with outpost(registry, tmp_path) as tctx:
        tctx.options.update(mode=["reverse:http://127.0.0.1:7000@7001"], stream_large_bodies="5m")
        tctx.options.update(outpost_config=str(tmp_path / "absent.yaml"))  # a reload: the user's mode stays
        assert tctx.options.mode == ["reverse:http://127.0.0.1:7000@7001"]
        assert tctx.options.stream_large_bodies == "5m"
        tctx.options.update(outpost_http_port=9100)
        assert tctx.options.mode == [f"{TARGET}@9100", f"{TARGET}@9443"]


@pytest.mark.parametrize("option", ["outpost_http_port", "outpost_https_port"])
@pytest.mark.parametrize("port", [-1, 65536])
def test_a_port_outside_0_to_65535_is_refused(registry: Registry, tmp_path: Path, option: str, port: int) -> None:
    with outpost(registry, tmp_path) as tctx:
        before = getattr(tctx.options, option)
        with pytest.raises(exceptions.OptionsError, match=rf"^{option}: a port number from 0 \(off\) to 65535$"):
            tctx.options.update(**{option: port})
        assert getattr(tctx.options, option) == before


def test_the_fallback_certificate_names_every_provider_host_without_its_own(tmp_path: Path) -> None:
    registry = Registry()
    own = tmp_path / "own.pem"
    registry.replace("test-outpost", (
        make_provider(),
        make_provider(name="b", external_host="https://b.example.test:8443", client_id="b"),
        make_provider(name="own", external_host="https://own.example.test", client_id="own", certificate=str(own)),
        make_provider(name="ip", external_host="https://192.0.2.7", client_id="ip"),
    ))
    with outpost(registry, tmp_path) as tctx:
        tctx.options.update(outpost_http_port=9000)
        fallback = tmp_path / DEFAULT_CERT_FILE
        assert tctx.options.certs == [f"*={fallback}", f"own.example.test={own}"]  # later entries win
        names = x509.load_pem_x509_certificate(fallback.read_bytes()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["localhost", "app.example.test", "b.example.test"]
        assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "192.0.2.7"]
        assert fallback.stat().st_mode & 0o777 == 0o600  # it holds the private key


def test_the_fallback_certificate_is_made_again_only_when_its_hosts_change(registry: Registry, tmp_path: Path) -> None:
    fallback = tmp_path / DEFAULT_CERT_FILE
    with outpost(registry, tmp_path) as tctx:
        tctx.options.update(outpost_http_port=9000)
        first = fallback.read_bytes()
        tctx.options.update(outpost_http_port=9001)
        assert fallback.read_bytes() == first
        registry.replace("test-outpost", (make_provider(external_host="https://new.example.test"),))
        tctx.options.update(outpost_http_port=9002)
        names = x509.load_pem_x509_certificate(fallback.read_bytes()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["localhost", "new.example.test"]


def test_running_announces_the_mode_again(registry: Registry, tmp_path: Path) -> None:
    """mitmproxy starts its servers before `-s` scripts configure: the chosen mode must be sent once more."""
    announced: list[set[str]] = []

    def receiver(updated: set[str]) -> None:
        announced.append(updated)

    with outpost(registry, tmp_path) as tctx:
        tctx.options.changed.connect(receiver)
        listeners = next(a for a in tctx.master.addons.get("chain").members if isinstance(a, Listeners))
        listeners.running()
    assert announced == [{"mode"}]
