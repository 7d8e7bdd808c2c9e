"""mitm-outpost: `mitmdump -s addons/outpost.py` (or mitmweb) runs an authentik-compatible proxy outpost.

The chain below is the whole request path, one concern per addon, in order. The first addon
that answers sets `flow.response`; every later one then steps aside.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mitm_outpost.access import Access  # noqa: E402
from mitm_outpost.authentik import AuthentikSource  # noqa: E402
from mitm_outpost.configuration import Configuration, Registry  # noqa: E402
from mitm_outpost.endpoints import Endpoints  # noqa: E402
from mitm_outpost.forward_auth import ForwardAuth  # noqa: E402
from mitm_outpost.header_auth import HeaderAuth  # noqa: E402
from mitm_outpost.listeners import Listeners  # noqa: E402
from mitm_outpost.metrics import Metrics  # noqa: E402
from mitm_outpost.routing import Routing  # noqa: E402
from mitm_outpost.sanitize import Sanitize  # noqa: E402
from mitm_outpost.session_check import SessionCheck  # noqa: E402
from mitm_outpost.upstream import Upstream  # noqa: E402

registry = Registry()

addons = [
    Configuration(registry),  # mitm_config.yaml -> providers
    AuthentikSource(registry),  # or/and providers from the authentik API (AUTHENTIK_HOST, AUTHENTIK_TOKEN)
    Listeners(registry),  # ports 9000/9443, certificates
    Metrics(registry),  # port 9300: /metrics, /ping
    Routing(registry),  # 1. provider by Host; ping
    Sanitize(),  # 2. drop forged identity headers and outpost cookies
    Endpoints(registry),  # 3. start, callback, sign_out
    SessionCheck(registry),  # 4. cookie -> session
    HeaderAuth(registry),  # 4b. or Authorization: Bearer/Basic -> session
    ForwardAuth(registry),  # forward auth answers here (2xx, 401 or 302)
    Access(),  # 5-6. unauthenticated paths, login redirect or 401
    Upstream(registry),  # 7-8. backend, forwarding and identity headers
]
