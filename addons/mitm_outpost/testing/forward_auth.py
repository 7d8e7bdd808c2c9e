"""nginx in front of an app, asking the outpost with auth_request: the documented config, run as is.

The config users copy (docs/forward-auth/nginx-single.conf, a link to the file here) ships as package
data, so that installs without the docs test behind exactly what the docs say.
"""

from __future__ import annotations

import os
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from .processes import Child

TEMPLATE = resources.files(__package__).joinpath("nginx-single.conf")
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def fill(template: str, **values: Any) -> str:
    """`template` with every ``{{ name }}`` replaced; KeyError naming the first placeholder without a value.
    Values no placeholder uses are ignored, so one set of values serves several templates."""
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def nginx_single_conf(**values: Any) -> str:
    """The single-application config (an http{} snippet) filled in: port, domain, outpost_host,
    outpost_port, upstream_host, upstream_port."""
    return fill(TEMPLATE.read_text(), **values)


def find_nginx() -> str | None:
    """nginx on PATH, or in the sbin directories a user's PATH often lacks."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


def nginx_main_conf(http: str) -> str:
    """A whole nginx.conf around an http{} snippet, for a private prefix directory: in the foreground,
    one worker, its pid and temp files under the prefix, errors to stderr (the child's log)."""
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers as nobody could not use a 0700 temp tree
    temp = "".join(f"    {kind}_temp_path tmp/{kind};\n" for kind in TEMP_PATHS)
    return (f"{user}daemon off;\nworker_processes 1;\npid nginx.pid;\nerror_log stderr notice;\n"
            f"events {{ worker_connections 512; }}\nhttp {{\n    access_log off;\n{temp}{http}\n}}\n")


def nginx(http: str, port: int, root: Path, binary: str | None = None) -> Child:
    """nginx (not yet started) with prefix `root` serving the http{} snippet `http`, which listens on `port`."""
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    (root / "nginx.conf").write_text(nginx_main_conf(http))
    program = binary or find_nginx()
    if not program:
        raise RuntimeError("nginx (with auth_request) is not installed: e.g. apt-get install nginx")
    return Child("nginx", [program, "-p", f"{root}/", "-c", "nginx.conf"], port=port, cwd=root, log_dir=root)
