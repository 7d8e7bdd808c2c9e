"""mitm-outpost: `mitmdump -s addons/outpost.py` (or mitmweb) runs an authentik-compatible proxy outpost.

The addons and their order are in `mitm_outpost/chain.py`, shared with the lean production
runner (`python -m mitm_outpost`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mitm_outpost import chain  # noqa: E402

addons = [chain.build()]
