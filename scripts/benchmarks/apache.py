"""The peer (issue 17): Apache httpd with mod_auth_openidc, what an administrator who wants OIDC in front of an
app picks today (Debian: apache2, libapache2-mod-auth-openidc). The bench runs it next to the outpost, at the
same dev IdP, in front of the same upstream, behind the same nginx for forward auth."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path

from mitm_outpost import names
from mitm_outpost.testing.processes import Child, free_port
from mitm_outpost.testing.transport import LoopbackTransport

from .login import check_proxied, check_redirect, log_in
from .nginx import forward_auth_servers, start_nginx
from .processes import wait_http
from .shared import FORWARD_DOMAIN, HOST, START_PATH, USER, Bench, Setup

APACHE_MODULE_DIRS = ("/usr/lib/apache2/modules", "/usr/lib64/httpd/modules", "/usr/lib/httpd/modules")
# LoadModule for each one found in the module directory; the others are compiled in (Debian: unixd).
APACHE_MODULES = ("mpm_event", "unixd", "authn_core", "authz_core", "authz_user", "headers", "alias", "rewrite",
                  "proxy", "proxy_http", "auth_openidc")
APACHE_SESSION_COOKIE = "mod_auth_openidc_session"
SESSION_COOKIE = re.compile(f"^{APACHE_SESSION_COOKIE}$")
APACHE_CALLBACK = names.CALLBACK_PATH  # OIDCRedirectURI, relative (the request's host), as ours
AUTH_PATH = f"{names.OUTPOST_PREFIX}{names.FORWARD_AUTH}/nginx"  # what nginx-single.conf's auth_request asks

# Production-like: Debian's mpm_event.conf and apache2.conf values, except MaxKeepAliveRequests (100 there):
# unlimited, as nginx's keepalive_requests and mitmproxy here, so that no row alone reconnects every 100
# requests. No access log (as nginx's access_log off and outpost_access_log=off). The children run as
# nobody, as nginx's workers; ErrorLog to stderr, which Processes keeps in the bench's temp dir.
APACHE_MAIN = """\
# scripts/bench: a private Apache in the foreground, its state under {dir}
ServerRoot {dir}
DefaultRuntimeDir {dir}
PidFile {dir}/httpd.pid
ErrorLog /dev/stderr
LogLevel warn
Listen {host}:{port}
ServerName {host}
User nobody
Group nogroup
{modules}
StartServers 2
MinSpareThreads 25
MaxSpareThreads 75
ThreadLimit 64
ThreadsPerChild 25
MaxRequestWorkers 150
MaxConnectionsPerChild 0
Timeout 300
KeepAlive On
KeepAliveTimeout 5
MaxKeepAliveRequests 0

OIDCProviderMetadataURL {idp}/.well-known/openid-configuration
OIDCClientID {client}
OIDCClientSecret bench-secret
OIDCRedirectURI {callback}
OIDCCryptoPassphrase {passphrase}
OIDCScope "openid profile email"
OIDCRemoteUserClaim preferred_username
OIDCSessionType server-cache
OIDCCacheType shm
# the outpost's sessions here last access_token_validity (3600 s); mod_auth_openidc's default is 300 s idle
OIDCSessionInactivityTimeout 3600
OIDCPassClaimsAs headers
{locations}"""

APACHE_PROXY = """\
<Location />
    AuthType openid-connect
    Require valid-user
    # the upstream answers `hello <X-authentik-username>`: the signed-in user, as the outpost sends it
    RequestHeader set X-authentik-username "expr=%{{REMOTE_USER}}"
</Location>
ProxyPass / http://{host}:{upstream}/
"""

# For nginx auth_request with docs/forward-auth/nginx-single.conf unchanged: it asks
# /outpost.goauthentik.io/auth/nginx and copies X-authentik-* of a 2xx answer to the upstream request; a 401
# sends the browser to /outpost.goauthentik.io/start?rd=<URL>. The 200 is an empty file: /dev/null, which
# every child can read (the bench's temp dir is root's alone).
APACHE_FORWARD = """\
# nginx sends them (the request's host and scheme); without this, mod_auth_openidc logs two warnings a request
OIDCXForwardedHeaders X-Forwarded-Host X-Forwarded-Proto
Alias {auth} /dev/null
<Location {auth}>
    AuthType openid-connect
    OIDCUnAuthAction 401
    Require valid-user
    OIDCPassClaimsAs environment
    Header set X-authentik-username "expr=%{{REMOTE_USER}}"
    Header set X-authentik-uid "%{{OIDC_CLAIM_sub}}e"
    Header set X-authentik-email "%{{OIDC_CLAIM_email}}e"
    Header set X-authentik-name "%{{OIDC_CLAIM_name}}e"
    Header set X-authentik-groups "%{{OIDC_CLAIM_groups}}e"
</Location>
# a login, then back to rd, a path of this host only
<Location {start}>
    AuthType openid-connect
    Require valid-user
    RewriteEngine On
    RewriteCond "%{{HTTP_HOST}}#%{{QUERY_STRING}}" "^([^#]*)#(?:.*&)?rd=https?://\\1(/[^&]*)"
    RewriteRule ^ %2 [R=302,L,NE,QSD]
</Location>
<Location {callback}>
    AuthType openid-connect
    Require valid-user
</Location>
"""


def find_apache() -> tuple[str, Path] | None:
    """apache2 (Debian) or httpd, and the module directory that holds mod_auth_openidc.so."""
    binary = next(filter(None, (shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
                                for name in ("apache2", "httpd"))), None)
    modules = next((Path(d) for d in APACHE_MODULE_DIRS if (Path(d) / "mod_auth_openidc.so").exists()), None)
    return (binary, modules) if binary and modules else None


def apache_version(apache: str) -> str:
    """`Apache/2.4.x (Debian), mod_auth_openidc <version>` (the module's from dpkg, where there is one)."""
    server = subprocess.run([apache, "-v"], capture_output=True, text=True).stdout
    server = re.search(r"Server version:\s*(.+)", server)
    dpkg = shutil.which("dpkg-query")
    module = subprocess.run([dpkg, "-W", "-f", "${Version}", "libapache2-mod-auth-openidc"], capture_output=True,
                            text=True).stdout.strip() if dpkg else ""
    name = server.group(1).strip() if server else "Apache httpd"
    return f"{name}, mod_auth_openidc {module or '(version unknown)'}"


def start_apache(bench: Bench, name: str, apache: str, modules: Path, port: int,
                 locations: str) -> tuple[Child, list[str]]:
    """One Apache (`-DFOREGROUND`, event MPM: a master and its child processes) with APACHE_MAIN and the given
    locations, its state under tmp/name, client `<name>-client` at the dev IdP (which takes any client)."""
    d = bench.tmp / name
    d.mkdir()
    loads = "\n".join(f"LoadModule {m}_module {modules / f'mod_{m}.so'}" for m in APACHE_MODULES
                      if (modules / f"mod_{m}.so").exists())
    conf = d / "httpd.conf"
    conf.write_text(APACHE_MAIN.format(dir=d, host=HOST, port=port, modules=loads, idp=bench.idp,
                                       client=f"{name}-client", callback=APACHE_CALLBACK,
                                       passphrase=secrets.token_urlsafe(32), locations=locations))
    argv = [apache, "-f", str(conf), "-DFOREGROUND"]
    return bench.procs.start(name, argv), argv


def start_apache_setups(bench: Bench, apache: str, modules: Path, nginx: str | None) -> dict[str, Setup]:
    """Apache + mod_auth_openidc twice, each its own process, signed in at the dev IdP like a browser: in proxy
    mode in front of the upstream (`apache`), and, when nginx is installed, as the auth server of nginx
    auth_request with the nginx config of the outpost's forward-auth rows (`fwd_apache`)."""
    port = free_port()
    child, argv = start_apache(bench, "apache", apache, modules, port,
                               APACHE_PROXY.format(host=HOST, upstream=bench.upstream_port))
    origin = f"http://{HOST}:{port}"
    wait_http(origin + "/bench", child, expect=302)  # no session: to the IdP (metadata fetched by now)
    cookie = log_in(origin, session_cookie=SESSION_COOKIE)
    setups = {"apache": Setup("Apache mod_auth_openidc, proxy mode (signed in)", origin + "/bench", argv, child.pid,
                              (f"Cookie: {cookie}",))}
    check_proxied(setups["apache"].url, setups["apache"].headers)
    print(f"Apache proxy mode: signed in as {USER} at the dev IdP, session cookie {APACHE_SESSION_COOKIE}, "
          f"upstream answers 'hello {USER}'", flush=True)
    if not nginx:
        print("nginx not installed: no nginx auth_request → Apache row", flush=True)
        return setups
    port, front = free_port(), free_port()
    child, argv = start_apache(bench, "fwd_apache", apache, modules, port,
                               APACHE_FORWARD.format(callback=APACHE_CALLBACK, auth=AUTH_PATH, start=START_PATH))
    wait_http(f"http://{HOST}:{port}{AUTH_PATH}", child, expect=401)
    nginx_child, nginx_argv = start_nginx(bench, "nginx-fwd_apache", nginx,
                                          forward_auth_servers(front, port, bench.upstream_port))
    host = (f"Host: app.{FORWARD_DOMAIN}:{front}",)
    wait_http(f"http://{HOST}:{front}{AUTH_PATH}", nginx_child, expect=401)  # nginx -> Apache
    check_redirect(f"http://{HOST}:{front}/bench", host, START_PATH)  # no cookie: 401 -> sign-in
    cookie = log_in(f"http://app.{FORWARD_DOMAIN}:{front}", LoopbackTransport(), SESSION_COOKIE)
    fwd = Setup("nginx auth_request → Apache mod_auth_openidc", f"http://{HOST}:{front}/bench", argv, child.pid,
                (f"Cookie: {cookie}", *host), nginx_argv)
    check_proxied(fwd.url, fwd.headers)
    print(f"{fwd.label}: the auth location answers 401 without a session; signed in as {USER} through nginx at "
          f"app.{FORWARD_DOMAIN}:{front}, upstream answers 'hello {USER}'", flush=True)
    setups["fwd_apache"] = fwd
    return setups



def describe_apache(binary: str) -> str:
    """Apache's line in the report's list: its version and the configuration of both its setups."""
    return (f"{apache_version(binary)}: `{Path(binary).name} -f <generated conf> -DFOREGROUND` "
            f"(one process each for proxy mode and for nginx auth_request), event MPM with Debian's "
            f"defaults (StartServers 2, ThreadsPerChild 25, MaxRequestWorkers 150), KeepAlive On "
            f"(timeout 5 s), MaxKeepAliveRequests 0 (unlimited, as nginx and mitmproxy here), no access "
            f"log, LogLevel warn; OIDCSessionType server-cache, OIDCCacheType shm, "
            f"OIDCSessionInactivityTimeout 3600, OIDCScope \"openid profile email\", session from a "
            f"login at the same dev IdP. Proxy mode: `Require valid-user` on /, OIDCPassClaimsAs "
            f"headers, X-authentik-username from REMOTE_USER (preferred_username), `ProxyPass /` to the "
            f"upstream (mod_proxy_http, reused connections). nginx auth_request: the same nginx config as the "
            f"outpost's rows, {AUTH_PATH} with OIDCUnAuthAction 401, claims as "
            f"environment, answered by an empty 200 with X-authentik-username/uid/email/name/groups "
            f"(the outpost's answer carries more headers, the JWT among them)")
