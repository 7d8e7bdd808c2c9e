"""Several worker processes behind the outpost's ports (`--workers N`)."""

import os

WORKER_ENV = "MITM_OUTPOST_WORKER"  # set by the supervisor in each worker it starts


def reuse_port() -> bool:
    """Workers share the ports (SO_REUSEPORT); a single process never does, so a second outpost
    started by mistake on the same port still fails with EADDRINUSE."""
    return bool(os.environ.get(WORKER_ENV))
