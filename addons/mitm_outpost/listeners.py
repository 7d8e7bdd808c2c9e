"""The Listeners addon: ports 9000 (HTTP) and 9443 (HTTPS) in reverse mode, and the certificates
9443 serves.

`mitmdump -s addons/outpost.py` with no other flag must be an outpost, so when the user has
not chosen a mode we choose ours. 9443 presents the provider's certificate by SNI, else a
self-signed one made here; mitmproxy's interception CA never signs for the outpost.
"""

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import ProxyMode

from .registry import Registry

# Reverse mode needs a target; every request is re-targeted per provider before it leaves, so this
# address is never dialled (connection_strategy=lazy), and it says so where mitmweb shows the mode.
PLACEHOLDER_TARGET = "http://per-provider.invalid:1"
DEFAULT_CERT_FILE = "outpost-default-cert.pem"
STREAM_LARGE_BODIES = str(1024 * 1024)  # bytes, spelled as mitmweb's status bar can show it ("1m" reads NaN there)
SHOWN_PROVIDERS = 3  # in a listener's description; more are counted


class Listeners:
    def __init__(self, registry: Registry, mitmproxy_listens: bool = True) -> None:
        self.registry = registry
        self.mitmproxy_listens = mitmproxy_listens  # else the production runner's fast lane binds the ports
        self.fallback: tuple[Path, list[str]] | None = None  # the fallback certificate last written, and its hosts
        registry.on_change.append(self.providers_changed)

    def providers_changed(self) -> None:
        """A new provider set (a refresh from authentik) may bring new hosts and certificates."""
        self.describe(ctx.options.mode)
        if self.registry.sources.get("authentik") is not None:
            ctx.options.update(certs=self.certificates())

    def load(self, loader: Loader) -> None:
        http_host, http_port = listen_env("AUTHENTIK_LISTEN__HTTP", 9000)
        _, https_port = listen_env("AUTHENTIK_LISTEN__HTTPS", 9443)
        loader.add_option("outpost_http_port", int, http_port,
                          "Port of the outpost's plain HTTP listener (env AUTHENTIK_LISTEN__HTTP).")
        loader.add_option("outpost_https_port", int, https_port,
                          "Port of the outpost's HTTPS listener, 0 turns it off (env AUTHENTIK_LISTEN__HTTPS).")
        loader.add_option("outpost_listen_host", str, http_host,
                          "Address the outpost listens on (empty: all interfaces).")

    def configure(self, updated: set[str]) -> None:
        ours = {"outpost_http_port", "outpost_https_port", "outpost_listen_host", "outpost_config"}
        if not updated & ours:
            return
        for option in ("outpost_http_port", "outpost_https_port"):
            if not 0 <= getattr(ctx.options, option) <= 65535:
                raise exceptions.OptionsError(f"{option}: a port number from 0 (off) to 65535")
        changes: dict[str, object] = {"keep_host_header": True, "connection_strategy": "lazy"}
        if ctx.options.mode == ["regular"] or updated & ours - {"outpost_config"}:
            changes["mode"] = self.modes()
        if not ctx.options.stream_large_bodies:
            changes["stream_large_bodies"] = STREAM_LARGE_BODIES
        changes["certs"] = self.certificates()
        self.describe(changes.get("mode", ctx.options.mode))
        ctx.options.update(**changes)

    def describe(self, specs: list[str]) -> None:
        """mitmproxy names a listener by its mode (`reverse proxy to <target>`, in its start-up lines
        and in mitmweb's list of servers): ours say what they serve instead of the placeholder."""
        for spec in specs:
            mode = ProxyMode.parse(spec)  # cached: the instance mitmproxy's servers use
            if spec.startswith(f"reverse:{PLACEHOLDER_TARGET}@"):
                object.__setattr__(mode, "description", serving(self.registry))

    def running(self) -> None:
        """mitmproxy loads `-s` scripts after it has started its servers from the startup options,
        so the mode we chose in configure() has not reached them yet: announce it again now."""
        ctx.options.changed.send(updated={"mode"})

    def modes(self) -> list[str]:
        if not self.mitmproxy_listens:
            return []
        host = ctx.options.outpost_listen_host
        at = f"{host}:" if host else ""
        ports = [ctx.options.outpost_http_port, ctx.options.outpost_https_port]
        return [f"reverse:{PLACEHOLDER_TARGET}@{at}{port}" for port in ports if port]

    def certificates(self) -> list[str]:
        """`certs` entries: each provider's own certificate for its host, then the fallback for all.
        The fallback is made again only when the hosts it must name change."""
        own = [p for p in self.registry.providers if p.certificate]
        without = sorted({p.hostname for p in self.registry.providers} - {p.hostname for p in own})
        path = Path(ctx.options.confdir).expanduser() / DEFAULT_CERT_FILE
        if self.fallback != (path, without) or not path.exists():
            write_self_signed(path, without)
            self.fallback = (path, without)
        # Later entries win in mitmproxy's cert store, so the fallback goes first.
        return [f"*={path}"] + [f"{p.hostname}={p.certificate}" for p in own]


def serving(registry: Registry) -> str:
    """What the outpost serves, as one line: each provider's name, external origin, mode and backend."""
    shown = [f"{p.name} {p.external_origin} ({p.mode.value}"
             + (f" to {p.backend.scheme}://{p.backend.host}:{p.backend.port})" if p.backend else ")")
             for p in registry.providers[:SHOWN_PROVIDERS]]
    more = len(registry.providers) - SHOWN_PROVIDERS
    if more > 0:
        shown.append(f"and {more} more")
    return f"authentik outpost for {', '.join(shown)}" if shown else "authentik outpost (no providers loaded yet)"


def listen_env(name: str, default_port: int) -> tuple[str, int]:
    """authentik's listen variables (`[::]:9000`, `0.0.0.0:9000`, or a comma-separated list: the first counts)."""
    value = os.environ.get(name, "").split(",")[0].strip()
    if not value:
        return "", default_port
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    return ("" if host in ("", "0.0.0.0", "::") else host), int(port) if port.isdigit() else default_port


def write_self_signed(path: Path, hostnames: list[str]) -> Path:
    """A self-signed certificate for the provider hosts (like authentik's default one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mitm-outpost default certificate")])
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(sans))), critical=False)
        .sign(key, hashes.SHA256())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem + cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o600)
    return path
