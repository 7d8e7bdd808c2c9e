"""The Configuration addon: owns `mitm_config.yaml` and the live provider set."""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from . import config, provider
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
    store: SessionStore = field(default_factory=MemoryStore)
    legacy_headers: bool = True
    unverified_upstreams: frozenset[tuple[str, int]] = frozenset()

    def replace(self, outpost_name: str, providers: tuple[Provider, ...]) -> None:
        by_host: dict[str, Provider] = {}
        for p in providers:
            for key in p.host_keys:
                if key in by_host:
                    raise config.ConfigError(
                        f"provider '{p.name}': field 'external_host': provider '{by_host[key].name}' already serves {key}"
                    )
                by_host[key] = p
        self.outpost_name, self.providers, self.by_host = outpost_name, providers, by_host
        self.unverified_upstreams = frozenset(
            (p.upstream.host, p.upstream.port) for p in providers if p.upstream and not p.upstream.verify_tls
        )


def build_providers(path: str) -> tuple[str, tuple[Provider, ...]]:
    cfg = config.load(path)
    return cfg.name, tuple(provider.build(entry, cfg.name) for entry in cfg.providers)


class Configuration:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "outpost_config", str, os.environ.get("OUTPOST_CONFIG", DEFAULT_CONFIG),
            "Path of the outpost's provider configuration (YAML). Env OUTPOST_CONFIG sets the default.",
        )
        loader.add_option(
            "outpost_legacy_headers", bool, True,
            "Also send the pre-2022 identity header names (X-Auth-Username, X-Forwarded-Email, ...).",
        )

    def configure(self, updated: set[str]) -> None:
        if "outpost_legacy_headers" in updated:
            self.registry.legacy_headers = ctx.options.outpost_legacy_headers
        if "outpost_config" in updated:
            path = str(Path(ctx.options.outpost_config).expanduser())
            try:
                name, providers = build_providers(path)
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
