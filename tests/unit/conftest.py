"""Unit-test helpers: providers built from config entries without any network (explicit endpoints)."""

import time
from typing import Any

import pytest

from mitm_outpost import config_schema as config
from mitm_outpost import provider
from mitm_outpost.identity import user_headers
from mitm_outpost.oidc import IdentityProvider
from mitm_outpost.registry import Registry
from mitm_outpost.sessions import Session


def make_provider(**fields: Any) -> provider.Provider:
    entry = {
        "name": "app", "external_host": "https://app.example.test", "internal_host": "http://10.0.0.5:8080",
        "client_id": "app-client", "client_secret": "s3cret", "issuer": "https://idp.example.test",
        "authorization_endpoint": "https://idp.example.test/authorize", "token_endpoint": "https://idp.example.test/token",
        "end_session_endpoint": "https://idp.example.test/logout", **fields,
    }
    settings = config.parse({"providers": [entry]}).providers[0]
    idp = IdentityProvider.from_settings(
        {**settings, "oidc_configuration": {"id_token_signing_alg_values_supported": ["HS256"]}})
    return provider.build(settings, "test-outpost", idp)


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.replace("test-outpost", (make_provider(skip_path_regex="^/public/\n\n"),))
    return reg


async def signed_in(registry: Registry) -> str:
    """A session of alice at the registry's first provider, put in its store: the Cookie value."""
    p = registry.providers[0]
    headers = user_headers({"sub": "u1", "preferred_username": "alice"}, "tok", True)
    await registry.store.put("sid-1",
                             Session.of(provider=p.name, sub="u1", headers=headers, expires_at=time.time() + 60))
    return f"{p.cookie_name}=sid-1"
