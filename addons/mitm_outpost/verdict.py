"""The access decision, as one pure function of the facts the addons gathered.

Routing, Sanitize, SessionCheck and HeaderAuth find the facts (and do the I/O); the Gate
addon asks `verdict()` once and applies the answer. Nothing else decides whether a request
reaches the application, so the table in the unit tests is the whole policy.
"""

from dataclasses import dataclass
from enum import StrEnum

from .forwarded import ProxyKind
from .names import Mode


class Action(StrEnum):
    ALLOW = "allow"  # upstream (or a forward-auth 200) with the user's identity
    SKIP = "skip"  # upstream (or 200) without identity: an unauthenticated-path rule matched
    LOGIN = "login"  # sent to sign in
    REDIRECT = "redirect"  # to the normalised form of the path, the only one the rules judge
    DENY = "deny"


class Reason(StrEnum):
    """Reason codes: what logs and metrics count (the record's text says it for people)."""

    SESSION = "session"
    HEADER_AUTH = "header_auth"
    UNAUTHENTICATED_PATH = "unauthenticated_path"
    NON_NORMAL_PATH = "non_normal_path"
    NO_SESSION = "no_session"
    NOT_A_BROWSER = "not_a_browser"
    HEADER_AUTH_FAILED = "header_auth_failed"
    ORIGINAL_URL_UNKNOWN = "original_url_unknown"
    FORWARD_AUTH_HOST = "forward_auth_host"
    BACKEND_INVALID = "backend_invalid"
    EMBEDDED_BACKEND = "embedded_backend"  # embedded mode: not the outpost's, to the authentik server (Routing)


class Credential(StrEnum):
    NONE = "none"
    SESSION = "session"  # the outpost's session cookie
    HEADER = "header"  # Authorization: Bearer/Basic that authenticated
    HEADER_FAILED = "header_failed"  # Authorization: Bearer/Basic that did not


@dataclass(frozen=True, slots=True)
class Facts:
    mode: Mode
    check: ProxyKind | None  # a forward-auth check, by the proxy that asks; None: a request to proxy
    credential: Credential
    rule_match: bool  # the target, in normal form, matches an unauthenticated-path rule
    path_normal: bool = True  # the path as sent is its own normal form (or one no rule can match)
    browser: bool = True  # the client can follow a login redirect
    intercept_header_auth: bool = True  # the provider's "Receive header authentication"
    return_url_known: bool = True  # forward auth: the original URL is known and this provider's
    backend_valid: bool = True  # the user's ak_proxy backend claims, if any, are usable


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: Reason
    status: int  # the answer's status; 0 when the request goes upstream


def verdict(facts: Facts) -> Verdict:
    proxied = facts.check is None
    if proxied and facts.mode is not Mode.PROXY:
        return Verdict(Action.DENY, Reason.FORWARD_AUTH_HOST, 404)
    if proxied and not facts.path_normal:
        return Verdict(Action.REDIRECT, Reason.NON_NORMAL_PATH, 308)
    if facts.credential in (Credential.SESSION, Credential.HEADER):
        if proxied and not facts.backend_valid:
            return Verdict(Action.DENY, Reason.BACKEND_INVALID, 502)
        reason = Reason.SESSION if facts.credential is Credential.SESSION else Reason.HEADER_AUTH
        return Verdict(Action.ALLOW, reason, 0 if proxied else 200)
    if facts.rule_match:
        return Verdict(Action.SKIP, Reason.UNAUTHENTICATED_PATH, 0 if proxied else 200)
    if facts.credential is Credential.HEADER_FAILED and facts.intercept_header_auth:
        return Verdict(Action.DENY, Reason.HEADER_AUTH_FAILED, 401)
    if proxied:
        if facts.browser:
            return Verdict(Action.LOGIN, Reason.NO_SESSION, 302)
        return Verdict(Action.DENY, Reason.NOT_A_BROWSER, 401)
    if facts.check is ProxyKind.NGINX:  # nginx turns the 401 into its own sign-in redirect
        return Verdict(Action.DENY, Reason.NO_SESSION, 401)
    if not facts.return_url_known:
        return Verdict(Action.DENY, Reason.ORIGINAL_URL_UNKNOWN, 401)
    return Verdict(Action.LOGIN, Reason.NO_SESSION, 302)
