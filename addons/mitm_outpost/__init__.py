"""mitm-outpost: an authentik-compatible identity-aware proxy built from mitmproxy addons."""

__version__ = "0.1.0"
