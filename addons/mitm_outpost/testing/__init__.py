"""The test harness for apps behind the outpost, shared by the pytest plugin, our tests and the benchmarks.

- `processes`: child processes, free ports, readiness; `app`: your app on a free port;
- `idp`: the development IdP; `login`: the browser's walk through a login;
- `outpost`: the outpost, in front of an app, with nginx for forward auth (`forward_auth`);
- `transport`: host names on loopback; `assertions`: the identity headers an app received.

It imports no mitmproxy code (the outpost runs in its own process) and nothing of a checkout's tests/.
"""
