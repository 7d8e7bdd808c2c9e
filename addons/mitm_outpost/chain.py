"""The outpost's addons, in order: one list for `mitmdump -s addons/outpost.py` and the lean runner.

A request walks the chain top to bottom; the first addon that answers sets
`flow.response`, and every later one then steps aside.
"""

from .access import Access
from .access_log import AccessLog
from .authentik import AuthentikSource
from .configuration import Configuration, Registry
from .debugging import Commands
from .endpoints import Endpoints
from .forward_auth import ForwardAuth
from .header_auth import HeaderAuth
from .lifecycle import Lifecycle
from .listeners import Listeners
from .metrics import Metrics
from .routing import Routing
from .sanitize import Sanitize
from .session_check import SessionCheck
from .upstream import Upstream


def build(registry: Registry | None = None, interactive: bool = True) -> list[object]:
    """`interactive`: mitmdump/mitmweb/mitmproxy, with the debugging commands and views; the
    lean production runner builds the chain without them."""
    registry = registry or Registry()
    debugging = [Commands(registry)] if interactive else []  # outpost.* commands, JWT and identity views
    return [*debugging,
        Configuration(registry),  # mitm_config.yaml -> providers; the session store
        AuthentikSource(registry),  # or/and providers from the authentik API (AUTHENTIK_HOST, AUTHENTIK_TOKEN)
        Listeners(registry),  # ports 9000/9443, certificates
        Metrics(registry),  # port 9300: /metrics, /ping; request metrics
        Lifecycle(registry),  # SIGHUP reloads the configuration, SIGTERM drains
        AccessLog(interactive),  # one structured line per request
        Routing(registry),  # 1. provider by Host (or a trusted proxy's forwarded URL); health
        Sanitize(),  # 2. drop forged identity headers and outpost cookies
        Endpoints(registry),  # 3. start, callback, sign_out, back-channel logout
        SessionCheck(registry),  # 4. cookie -> session
        HeaderAuth(registry),  # 4b. or Authorization: Bearer/Basic -> session
        ForwardAuth(registry),  # forward auth answers here (2xx, 401 or 302)
        Access(),  # 5-6. unauthenticated paths, login redirect or 401
        Upstream(registry),  # 7-8. backend, forwarding and identity headers
    ]
