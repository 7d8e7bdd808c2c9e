"""The whole access policy: `verdict()` over every combination of facts."""

import itertools

import pytest

from mitm_outpost.forwarded import ProxyKind
from mitm_outpost.names import Mode
from mitm_outpost.verdict import Action, Credential, Facts, Reason, Verdict, verdict

N, S, H, F = Credential.NONE, Credential.SESSION, Credential.HEADER, Credential.HEADER_FAILED
P, FS, FD = Mode.PROXY, Mode.FORWARD_SINGLE, Mode.FORWARD_DOMAIN
NGINX, TRAEFIK = ProxyKind.NGINX, ProxyKind.TRAEFIK


@pytest.mark.parametrize("facts, expected", [
    # proxy mode: a request to proxy
    (Facts(P, None, S, rule_match=False), Verdict(Action.ALLOW, Reason.SESSION, 0)),
    (Facts(P, None, H, rule_match=False), Verdict(Action.ALLOW, Reason.HEADER_AUTH, 0)),
    (Facts(P, None, S, rule_match=True), Verdict(Action.ALLOW, Reason.SESSION, 0)),  # identity even on open paths
    (Facts(P, None, N, rule_match=True), Verdict(Action.SKIP, Reason.UNAUTHENTICATED_PATH, 0)),
    (Facts(P, None, N, rule_match=False), Verdict(Action.LOGIN, Reason.NO_SESSION, 302)),
    (Facts(P, None, N, rule_match=False, browser=False), Verdict(Action.DENY, Reason.NOT_A_BROWSER, 401)),
    (Facts(P, None, F, rule_match=False), Verdict(Action.DENY, Reason.HEADER_AUTH_FAILED, 401)),
    (Facts(P, None, F, rule_match=False, intercept_header_auth=False), Verdict(Action.LOGIN, Reason.NO_SESSION, 302)),
    (Facts(P, None, F, rule_match=True), Verdict(Action.SKIP, Reason.UNAUTHENTICATED_PATH, 0)),
    (Facts(P, None, S, rule_match=False, backend_valid=False), Verdict(Action.DENY, Reason.BACKEND_INVALID, 502)),
    # one path: what is not in normal form is sent there first, whoever asks
    (Facts(P, None, S, rule_match=True, path_normal=False), Verdict(Action.REDIRECT, Reason.NON_NORMAL_PATH, 308)),
    (Facts(P, None, N, rule_match=True, path_normal=False), Verdict(Action.REDIRECT, Reason.NON_NORMAL_PATH, 308)),
    # a forward-auth provider's host reached directly proxies nothing
    (Facts(FS, None, S, rule_match=True), Verdict(Action.DENY, Reason.FORWARD_AUTH_HOST, 404)),
    (Facts(FD, None, N, rule_match=False), Verdict(Action.DENY, Reason.FORWARD_AUTH_HOST, 404)),
    # forward-auth checks
    (Facts(FS, TRAEFIK, S, rule_match=False), Verdict(Action.ALLOW, Reason.SESSION, 200)),
    (Facts(FD, NGINX, H, rule_match=False), Verdict(Action.ALLOW, Reason.HEADER_AUTH, 200)),
    (Facts(FS, TRAEFIK, S, rule_match=False, backend_valid=False), Verdict(Action.ALLOW, Reason.SESSION, 200)),
    (Facts(FS, NGINX, N, rule_match=True), Verdict(Action.SKIP, Reason.UNAUTHENTICATED_PATH, 200)),
    (Facts(FS, NGINX, N, rule_match=False), Verdict(Action.DENY, Reason.NO_SESSION, 401)),
    (Facts(FS, TRAEFIK, N, rule_match=False), Verdict(Action.LOGIN, Reason.NO_SESSION, 302)),
    (Facts(FD, ProxyKind.CADDY, N, rule_match=False, return_url_known=False),
     Verdict(Action.DENY, Reason.ORIGINAL_URL_UNKNOWN, 401)),
    (Facts(FS, ProxyKind.ENVOY, F, rule_match=False), Verdict(Action.DENY, Reason.HEADER_AUTH_FAILED, 401)),
    (Facts(FS, TRAEFIK, N, rule_match=False, browser=False), Verdict(Action.LOGIN, Reason.NO_SESSION, 302)),
    # a proxy-mode provider's checks never get here (Routing answers 404), but the policy still holds
    (Facts(P, TRAEFIK, N, rule_match=False), Verdict(Action.LOGIN, Reason.NO_SESSION, 302)),
])
def test_verdict_table(facts: Facts, expected: Verdict) -> None:
    assert verdict(facts) == expected


def test_every_combination_keeps_the_invariants() -> None:
    combinations = itertools.product(Mode, (None, *ProxyKind), Credential, *[(True, False)] * 6)
    for mode, check, credential, *flags in combinations:
        facts = Facts(mode, check, credential, *flags)
        result = verdict(facts)
        authenticated = credential in (Credential.SESSION, Credential.HEADER)
        goes_through = result.action in (Action.ALLOW, Action.SKIP)
        assert result.action is not Action.ALLOW or authenticated, facts
        assert result.action is not Action.SKIP or (facts.rule_match and not authenticated), facts
        assert (result.action is Action.LOGIN) == (result.status == 302), facts
        if check is None:
            assert mode is Mode.PROXY or result.action is Action.DENY, facts
            # never judged, never sent
            assert facts.path_normal or result.action in (Action.REDIRECT, Action.DENY), facts
            assert (result.status == 0) == goes_through, facts
        else:
            assert (result.status == 200) == goes_through and result.action is not Action.REDIRECT, facts
