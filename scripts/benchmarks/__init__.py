"""Benchmark the outpost against its two ceilings in one run (run it through `scripts/bench`).

Every number here comes from the same upstream, the same load tool and the same options,
measured one after the other in rounds (medians are reported), because figures from different
runs, machines or tools do not compare (see the spec's runnable-peers §7: stock mitmdump is CPU-bound at a few
hundred req/s on a 2-core VM, so only the ratio to bare mitmdump says what our addons cost):

  direct   load tool -> upstream                        (the machine's ceiling)
  bare     load tool -> mitmdump --mode reverse -> upstream (mitmproxy's own cost)
  outpost  load tool -> mitmdump -s addons/outpost.py -> upstream, with a signed-in session
           cookie, so each request walks the whole addon chain and gets identity headers; its provider
           has 1 unauthenticated-path rule (skip_path_regex ^/public/). The two rows below are other
           providers of the same outpost process (picked by Host), so only the configuration differs
  outpost, 100 skip rules   the same with 100 anchored rules (^/public/section-<i>/), none matching
           the benchmarked path: what a long skip list costs every request (target >= 0.95 of 1 rule)
  outpost, header auth      no cookie: `Authorization: Bearer <JWT>`, an ID token the dev IdP issued to
           the provider's client, verified locally (verify_bearer_jwt_locally); after the first request
           (the warm-up) every request is answered from the header-auth cache.

and forward auth (when nginx is installed), nginx configured like docs/forward-auth/nginx-single.conf
plus keep-alive to the auth server and to the upstream:

  fwd-bare     load tool -> nginx -> upstream, each request first asking, with auth_request,
               a bare mitmdump whose script answers 200 with an empty body (mitmproxy's own cost)
  fwd-outpost  the same, asking the outpost's /outpost.goauthentik.io/auth/nginx of a
               forward_single provider, with a session cookie got by signing in through nginx.

and the production runner, `python -m mitm_outpost` (PYTHONPATH=addons) with the same --set options:

  lean runner, no auth (skip rule)         /public/bench, matched by the provider's skip rule: no session
  lean runner, signed in                   outpost_access_log=off
  lean runner, signed in, access log json  the default access log (JSON lines to stderr, a file here)
  nginx auth_request → lean runner         the fwd-outpost setup, asked of the lean runner

and the peer an administrator picks today for OIDC in front of an app (issue 17), when Apache httpd and
mod_auth_openidc are installed: each its own Apache (event MPM, a private config in the temp dir, in the
foreground), client of the same dev IdP, signed in there by a real login, session in its shm cache:

  Apache mod_auth_openidc, proxy mode   load tool -> Apache (`ProxyPass /`, OIDCPassClaimsAs headers) -> upstream
  nginx auth_request → Apache           the fwd-outpost nginx config, asking an Apache location protected with
                                        `OIDCUnAuthAction 401` that answers an empty 200 with X-authentik-* headers

then (unless --no-extras) memory per session (a MemoryStore filled in a fresh process: RSS and
tracemalloc; RedisStore.put into a private redis-server: INFO memory), two lean runners sharing that
Redis behind nginx against one, with Redis commands per request (INFO commandstats), and with
--soak MINUTES the lean runner's RSS every 10 s at ~80 % of its signed-in req/s (h2load --rps).

and what issue 14 asks of login and state changes (login_flood.py, signout.py, reload.py), on lean runners of
their own:

  lean runner, /start                  wrk on /outpost.goauthentik.io/start without cookies: each request stores
                                       a pending login and answers 302 to the IdP (CPU per request, in the rounds)
  lean runner, no session: 302         a protected path without a session: 302 to /start, neither IdP nor store
                                       asked (the /start flood's req/s is compared to this one's)
  signed-in p99 next to a /start flood one client at PROBE_RATE req/s, alone and while wrk floods /start
  sign-out at --signout-sessions       an in-process MemoryStore (fresh process): delete_user of one user, and the
                                       longest event-loop stall during 100 sign-outs per second
  reload                               SIGHUP after a second provider whose issuer never answers was added: /ping
                                       latency from a client sending back to back for RELOAD_WINDOW s

The upstream answers `hello <X-authentik-username>`, so a body of "hello alice" proves that a
request went through the outpost, as alice, to the upstream (and not to a login redirect).

The modules: `cli` (arguments, the fresh-process probes), `run` (one run, step by step), `setups` and `apache`
(the servers and the rows they make), `nginx`, `outpost`, `login`, `load` (wrk/h2load, slices), `report` (the
tables, ratios and targets), and one module per extra measurement. The processes, the dev IdP, the login walker
and the forward-auth template come from `mitm_outpost.testing`, shared with the tests and the pytest plugin.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# This checkout's code (mitm_outpost and its testing helpers), whether or not the editable install exists.
sys.path.insert(0, str(ROOT / "addons"))
