"""The registry: the live provider set and session store that every addon reads, swapped whole."""

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import exceptions

from . import config_schema
from .names import AUTHENTIK_RELEASE, Mode
from .provider import Provider
from .sessions import MemoryStore, SessionStore

if TYPE_CHECKING:
    from .embedded import EmbeddedBackend

logger = logging.getLogger("mitm_outpost")


@dataclass(frozen=True, slots=True)
class ProviderSet:
    """Every provider the outpost serves, with its indexes: built whole, then assigned in one step.

    A request reads one set from start to end; a reload or an authentik refresh makes a new one."""

    outpost_name: str = "mitm-outpost"
    sources: dict[str, tuple[Provider, ...]] = field(default_factory=dict)  # "file", "authentik"
    providers: tuple[Provider, ...] = ()
    by_host: dict[str, Provider] = field(default_factory=dict)
    by_name: dict[str, Provider] = field(default_factory=dict)
    by_hostname: dict[str, Provider] = field(default_factory=dict)  # hostnames only one provider has
    domain_providers: tuple[Provider, ...] = ()  # forward_domain, longest cookie domain first

    @classmethod
    def build(cls, outpost_name: str, sources: dict[str, tuple[Provider, ...]]) -> "ProviderSet":
        """Raises ConfigError when two providers would serve one external host or share a name."""
        providers = tuple(p for ps in sources.values() for p in ps)
        by_host: dict[str, Provider] = {}
        source_of: dict[str, str] = {}
        for source, members in sources.items():
            for p in members:
                if source_of.get(p.name, source) != source:
                    raise config_schema.ConfigError(
                        f"provider '{p.name}': field 'name': a provider from another source has this name")
                source_of[p.name] = source
                for key in p.host_keys:
                    if key in by_host:
                        raise config_schema.ConfigError(
                            f"provider '{p.name}': field 'external_host': "
                            f"provider '{by_host[key].name}' already serves {key}"
                        )
                    by_host[key] = p
        hostnames = [p.hostname for p in providers]
        return cls(
            outpost_name=outpost_name, sources=dict(sources), providers=providers, by_host=by_host,
            by_name={p.name: p for p in providers},
            by_hostname={p.hostname: p for p in providers if hostnames.count(p.hostname) == 1},
            domain_providers=tuple(sorted((p for p in providers if p.mode is Mode.FORWARD_DOMAIN),
                                          key=lambda p: len(p.cookie_domain), reverse=True)),
        )

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


@dataclass
class Registry:
    """What every addon of the chain reads. The provider set and the store are each replaced by
    one assignment, never edited in place; change callbacks run after the swap."""

    current: ProviderSet = field(default_factory=ProviderSet)
    store: SessionStore = field(default_factory=MemoryStore)
    legacy_headers: bool = True
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ready: bool = True  # false while providers are still awaited from authentik (readiness)
    embedded: "EmbeddedBackend | None" = None  # the authentik server, when the outpost stands in for the embedded one
    authentik_release: str = AUTHENTIK_RELEASE  # what the outpost reports to authentik (outpost_authentik_version)
    outpost_uuid: str = ""  # the authentik outpost instance's pk, when providers come from authentik
    on_change: list[Callable[[], None]] = field(default_factory=list)  # run after every swap
    _trust: tuple[tuple[Any, ...], dict[str, bool]] = field(default_factory=lambda: ((), {}), repr=False)

    # The current set's parts, for readers that need one of them.
    outpost_name = property(lambda self: self.current.outpost_name)
    sources = property(lambda self: self.current.sources)
    providers = property(lambda self: self.current.providers)
    by_host = property(lambda self: self.current.by_host)
    by_name = property(lambda self: self.current.by_name)

    def provider_for(self, host: str, hostname: str) -> Provider | None:
        return self.current.provider_for(host, hostname)

    def is_trusted(self, peer: str) -> bool:
        """Judged once per peer and set of networks: a reverse proxy asks from a few addresses, again and again."""
        networks, verdicts = self._trust
        if networks is not self.trusted_networks:  # a new set (configure assigns a new tuple): judged afresh
            networks, verdicts = self._trust = (self.trusted_networks, {})
        found = verdicts.get(peer)
        if found is None:
            found = _in_networks(peer, networks)
            if len(verdicts) < 4096:  # beyond, an address is judged each time, not kept
                verdicts[peer] = found
        return found

    def is_ready(self) -> bool:
        """Readiness, the one rule both `/ping` answers use: providers loaded and the store up."""
        return self.ready and self.store.up

    def replace(self, outpost_name: str, providers: tuple[Provider, ...], source: str = "file") -> None:
        """Swap one source's providers. Raises ConfigError (and changes nothing) for a bad set."""
        self.install(ProviderSet.build(outpost_name, {**self.current.sources, source: providers}))

    def install(self, new: ProviderSet, store: SessionStore | None = None) -> None:
        """The swap: the new store started, then set and store assigned, then the old store stopped.
        A callback that fails is logged; the set it saw is already whole."""
        old_store = self.store
        if store is not None and store is not old_store:
            if loop_running() and (start := getattr(store, "start", None)) is not None:
                start()  # else Configuration.running starts it
            self.store = store
        old, self.current = self.current, new
        if store is not None and store is not old_store and (stop := getattr(old_store, "stop", None)) is not None:
            stop()
        kept = {id(p.idp) for p in new.providers}
        for gone in {id(p.idp): p.idp for p in old.providers if id(p.idp) not in kept}.values():
            if (close := getattr(gone, "close", None)) is not None:
                close()
        for callback in self.on_change:
            try:
                callback()
            except Exception:
                logger.exception("after the provider change: %s failed", getattr(callback, "__qualname__", callback))


def loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


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
