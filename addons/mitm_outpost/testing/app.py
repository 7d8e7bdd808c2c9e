"""Your app as the outpost's upstream: started from a command line on a free port."""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .processes import Child, free_port


class App(Child):
    """`command` (a list, or a string split as a shell would) with ``{port}`` and ``{python}`` replaced by
    a free port (also in ``$PORT``) and the running Python; `start` waits until the port listens.

    >>> with run_app([sys.executable, "app.py", "--port", "{port}"]) as app: ...
    """

    def __init__(self, command: str | Sequence[str], *, port: int | None = None,
                 cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> None:
        port = port or free_port()
        values = {"port": str(port), "python": sys.executable}
        parts = shlex.split(command) if isinstance(command, str) else list(command)
        args = [re.sub(r"\{(port|python)\}", lambda m: values[m.group(1)], str(part)) for part in parts]
        super().__init__(f"app ({shlex.join(args)})", args, port=port, cwd=cwd, env={"PORT": str(port), **(env or {})})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        super().stop()
        self.log.unlink(missing_ok=True)  # a failure to start quotes it; nothing reads it after the session


def run_app(command: str | Sequence[str], **kwargs: Any) -> App:
    """An `App`, not yet started: use it as a context manager in your `outpost_upstream` fixture."""
    return App(command, **kwargs)
