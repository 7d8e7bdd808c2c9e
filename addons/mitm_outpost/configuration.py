"""The Configuration addon: owns `mitm_config.yaml` and the live provider set."""

import ipaddress
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from . import config, provider
from .names import Mode
from .provider import Provider
from .sessions import MemoryStore, SessionStore

logger = logging.getLogger("mitm_outpost")
for noisy in ("httpx2", "httpcore2", "httpx", "httpcore"):  # one line per IdP call is our job, not theirs
    logging.getLogger(noisy).setLevel(logging.WARNING)

DEFAULT_CONFIG = "mitm_config.yaml"


@dataclass
class Registry:
    """What every addon of the chain reads: swapped whole, never edited in place."""

    outpost_name: str = "mitm-outpost"
    providers: tuple[Provider, ...] = ()
    by_host: dict[str, Provider] = field(default_factory=dict)
    by_name: dict[str, Provider] = field(default_factory=dict)
    store: SessionStore = field(default_factory=MemoryStore)
    legacy_headers: bool = True
    unverified_upstreams: set[tuple[str, int]] = field(default_factory=set)  # grows with ak_proxy backends
    domain_providers: tuple[Provider, ...] = ()  # forward_domain, longest cookie domain first
    by_hostname: dict[str, Provider] = field(default_factory=dict)  # hostnames only one provider has
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def provider_for(self, host: str, hostname: str) -> Provider | None:
        """The provider serving this host: its external host exactly, else a domain-level
        provider whose cookie domain contains the hostname on a dot boundary."""
        exact = self.by_host.get(host.lower())
        if exact is not None or not hostname:
            return exact
        hostname = hostname.lower().rstrip(".")
        for p in self.domain_providers:
            if hostname == p.cookie_domain or hostname.endswith("." + p.cookie_domain):
                return p
        # nginx's `$host` drops the port; a trusted proxy may name a provider by hostname alone.
        return self.by_hostname.get(hostname) if host.lower() == hostname else None

    def is_trusted(self, peer: str) -> bool:
        return _in_networks(peer, self.trusted_networks)

    sources: dict[str, tuple[Provider, ...]] = field(default_factory=dict)  # "file", "authentik"
    ready: bool = True  # false while providers are still awaited from authentik (readiness)
    outpost_uuid: str = ""  # the authentik outpost instance's pk, when providers come from authentik
    on_change: list[Callable[[], None]] = field(default_factory=list)  # run after every swap

    def replace(self, outpost_name: str, providers: tuple[Provider, ...], source: str = "file") -> None:
        """Swap one source's providers (between requests: every field is rebuilt, then assigned).

        Raises ConfigError when two providers would serve one external host or share a name."""
        sources = {**self.sources, source: providers}
        combined = tuple(p for ps in sources.values() for p in ps)
        by_host: dict[str, Provider] = {}
        names_seen: dict[str, str] = {}
        for p in combined:
            if p.name in names_seen and names_seen[p.name] != source:
                raise config.ConfigError(f"provider '{p.name}': field 'name': a provider from another source has this name")
            names_seen[p.name] = source
            for key in p.host_keys:
                if key in by_host:
                    raise config.ConfigError(
                        f"provider '{p.name}': field 'external_host': provider '{by_host[key].name}' already serves {key}"
                    )
                by_host[key] = p
        providers = combined
        self.sources = sources
        self.outpost_name, self.providers, self.by_host = outpost_name, providers, by_host
        self.by_name = {p.name: p for p in providers}
        for callback in self.on_change:
            callback()
        hostnames = [p.hostname for p in providers]
        self.by_hostname = {p.hostname: p for p in providers if hostnames.count(p.hostname) == 1}
        self.domain_providers = tuple(sorted(
            (p for p in providers if p.mode is Mode.FORWARD_DOMAIN), key=lambda p: len(p.cookie_domain), reverse=True
        ))
        self.unverified_upstreams = set(
            (p.upstream.host, p.upstream.port) for p in providers if p.upstream and not p.upstream.verify_tls
        )


@lru_cache(maxsize=4096)
def _in_networks(peer: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def parse_networks(values: Sequence[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except ValueError as e:
        raise exceptions.OptionsError(f"trusted_proxies: {e}") from None


def build_providers(path: str) -> tuple[config.OutpostConfig, tuple[Provider, ...]]:
    cfg = config.load(path)
    return cfg, tuple(provider.build(entry, cfg.name) for entry in cfg.providers)


def make_store(cfg: config.OutpostConfig) -> SessionStore:
    if cfg.session_store == "memory":
        return MemoryStore()
    from .redis_store import RedisStore

    return RedisStore(cfg.session_store, cfg.session_store_password or None)


class Configuration:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.store_spec = ("memory", "")

    def running(self) -> None:
        start = getattr(self.registry.store, "start", None)
        if start is not None:
            start()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "outpost_config", str, os.environ.get("OUTPOST_CONFIG", DEFAULT_CONFIG),
            "Path of the outpost's provider configuration (YAML). Env OUTPOST_CONFIG sets the default.",
        )
        loader.add_option(
            "trusted_proxies", Sequence[str], ["127.0.0.0/8", "::1/128"],
            "Networks (CIDR) of the reverse proxies whose X-Forwarded-*/X-Original-* headers the outpost believes; "
            "forward-auth checks from anywhere else get 403.",
        )
        loader.add_option(
            "outpost_log_decisions", bool, False,
            "Log one line per request with the decision (the flow comment shows it in mitmweb anyway).",
        )
        loader.add_option(
            "outpost_legacy_headers", bool, True,
            "Also send the pre-2022 identity header names (X-Auth-Username, X-Forwarded-Email, ...).",
        )

    def configure(self, updated: set[str]) -> None:
        if "trusted_proxies" in updated:
            self.registry.trusted_networks = parse_networks(ctx.options.trusted_proxies)
        if "outpost_log_decisions" in updated:
            logger.setLevel(logging.DEBUG if ctx.options.outpost_log_decisions else logging.INFO)
        if "outpost_legacy_headers" in updated:
            self.registry.legacy_headers = ctx.options.outpost_legacy_headers
        if "outpost_config" in updated:
            path = str(Path(ctx.options.outpost_config).expanduser())
            if os.environ.get("AUTHENTIK_HOST") and not Path(path).exists():
                logger.info("no %s: providers come from authentik only", path)
                return
            try:
                cfg, providers = build_providers(path)
                name = cfg.name
                if (cfg.session_store, cfg.session_store_password) != self.store_spec:
                    self.registry.store = make_store(cfg)
                    self.store_spec = (cfg.session_store, cfg.session_store_password)
                self.registry.replace(name, providers)
            except config.ConfigError as e:
                if not self.registry.providers:
                    # At startup, an error-level log line makes mitmproxy exit with status 1
                    # (its errorcheck addon) before anything is served; raising would add a traceback.
                    logger.error("configuration error: %s", e)
                    return
                # Later (`set outpost_config=...`), refusing the change keeps the old set serving.
                raise exceptions.OptionsError(f"configuration error: {e}") from None
            logger.info(
                "outpost %r serving %s", name,
                ", ".join(f"{p.name} ({p.mode.value}) at {p.external_origin}" for p in providers),
            )
