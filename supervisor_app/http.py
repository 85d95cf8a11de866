"""One HTTP port: `/metrics`, `/healthz`, the operator-only health probes plug-ins
declare (`Plugin.probes`, e.g. the learning plug-in's `/internal/health/learning-worker`),
and the dashboard.

Served by waitress (a well-kept pure-Python WSGI server) rather than `http.server`: it
reads requests asynchronously, so a thread is taken only by a complete request (300
half-sent requests hold no thread), it bounds threads, connections and request sizes,
times out idle or slow connections, frames keep-alive correctly, answers a bad or
negative Content-Length with 400 and a body over the limit with 413 while reading it.
No endpoint reads a request body: the app never touches one, and the server keeps at
most MAX_BODY of it per connection.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import make_wsgi_app
from waitress.server import create_server

from supervisor_app.metrics import build_registry
from workers.core import plugins

if TYPE_CHECKING:
    from supervisor_app.supervisor import Supervisor

log = logging.getLogger("jobvisor.http")

MAX_BODY = 64 * 1024
THREADS = 8  # requests answered at once; more wait, fully read, for a free thread
# Open connections (half-sent ones included; each costs a socket, not a thread); beyond,
# new ones wait in the listen backlog. poll(), not select(): no 1024-descriptor ceiling.
CONNECTIONS = 1000
BACKLOG = 1024
IDLE_TIMEOUT = 10  # seconds a connection may sit idle or half-sent before it is closed
# How often waitress looks for connections past IDLE_TIMEOUT (its default, 30 s, let a
# half-sent request live up to 40 s): one is closed within IDLE_TIMEOUT + this + 1 s.
CLEANUP_INTERVAL = 2

StartResponse = Callable[..., Any]


class _Headers:
    """Request headers from the WSGI environ, looked up case-insensitively."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            return self.environ.get(key, default)
        return self.environ.get("HTTP_" + key, default)


class App:
    """The WSGI application. `sup` is set once the supervisor exists: the port is bound
    before migrating (a taken port fails at once), and answers 503 until then."""

    def __init__(self) -> None:
        self.sup: Supervisor | None = None
        self.metrics: Callable[..., Iterable[bytes]] | None = None
        # Operator probes: path -> probe(dsn) -> (role, checks), imported on first use.
        self.probes = {path: spec for path, (_plugin, spec) in plugins.probes().items()}

    def attach(self, sup: Supervisor) -> None:
        self.metrics = make_wsgi_app(build_registry(sup))  # negotiates OpenMetrics
        self.sup = sup

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        sup = self.sup
        if sup is None:
            return _json(start, 503, {"status": "starting"})
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "GET" and path == "/metrics":
            assert self.metrics is not None
            return self.metrics(environ, start)
        if method == "GET" and path == "/healthz":
            checks = sup.health_checks()
            ok = all(c["ok"] for c in checks)
            return _json(start, 200 if ok else 503,
                         {"status": "ok" if ok else "degraded", "checks": checks})
        if method == "GET" and path in self.probes:
            probe = plugins.resolve(self.probes[path], what=f"probe {path}")
            return _operator_health(sup, probe, environ, start)
        if method in ("GET", "POST"):
            return _delegate(sup, method, environ, start)
        return _json(start, 405, {"error": "method not allowed"}, {"Allow": "GET, POST"})


def _delegate(sup: Supervisor, method: str, environ: dict[str, Any],
              start: StartResponse) -> Iterable[bytes]:
    """Everything else belongs to the dashboard (pages, its JSON API, actions)."""
    from supervisor_app import dashboard

    target = environ.get("PATH_INFO") or "/"
    if environ.get("QUERY_STRING"):
        target += "?" + environ["QUERY_STRING"]
    answer = dashboard.route(sup, method, target, _Headers(environ), b"",
                             environ.get("REMOTE_ADDR", ""))
    if answer is None:
        return _json(start, 404, {"error": "not found"})
    code, headers, payload = answer
    return _send(start, code, payload, dict(headers))


def _operator_health(sup: Supervisor, probe: Callable[[str], tuple[str | None, list[dict]]],
                     environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
    private = {"Cache-Control": "private, no-store", "Vary": "Origin"}
    expected = os.environ.get(sup.cfg.supervisor.health_token_env, "")
    given = _Headers(environ).get("Authorization") or ""
    scheme, _, token = given.partition(" ")
    if not expected:
        return _json(start, 403, {"error": "operator health is disabled: no token configured"},
                     private)
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        log.warning("health_token_refused", extra={"client": environ.get("REMOTE_ADDR")})
        return _json(start, 401, {"error": "missing or invalid bearer token"},
                     {**private, "WWW-Authenticate": "Bearer"})
    role, db_checks = probe(sup.worker_dsn)
    checks = db_checks + sup.health_checks()
    ok = all(c["ok"] for c in checks)
    return _json(start, 200 if ok else 503, {"status": "healthy" if ok else "degraded",
                                             "currentRole": role, "checks": checks}, private)


_REASONS = {200: "OK", 302: "Found", 304: "Not Modified", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _send(start: StartResponse, code: int, body: bytes,
          headers: dict[str, str]) -> Iterable[bytes]:
    headers.setdefault("Content-Type", "application/octet-stream")
    headers["Content-Length"] = str(len(body))
    start(f"{code} {_REASONS.get(code, 'Status')}", list(headers.items()))
    return [body]


def _json(start: StartResponse, code: int, value: Any,
          headers: dict[str, str] | None = None) -> Iterable[bytes]:
    return _send(start, code, json.dumps(value).encode(),
                 {"Content-Type": "application/json", **(headers or {})})


class Server:
    """The bound port and its serving thread."""

    def __init__(self, host: str, port: int) -> None:
        self.app = App()
        # Binds now: OSError (port taken, address not available) before anything else.
        self.server = create_server(
            self.app, host=host, port=port, threads=THREADS, connection_limit=CONNECTIONS,
            backlog=BACKLOG, channel_timeout=IDLE_TIMEOUT, cleanup_interval=CLEANUP_INTERVAL,
            asyncore_use_poll=True, max_request_body_size=MAX_BODY,
            max_request_header_size=MAX_BODY, expose_tracebacks=False, ident="jobvisor",
            clear_untrusted_proxy_headers=True)
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def start(self, sup: Supervisor) -> None:
        self.app.attach(sup)
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self.thread.start()
        log.info("http_listening", extra={"host": self.server.effective_host,
                                          "port": self.port})

    def shutdown(self) -> None:
        self.server.close()


def serve(sup: Supervisor, host: str, port: int) -> Server:
    """Bind and start serving in a daemon thread (port 0 → any free port)."""
    server = Server(host, port)
    server.start(sup)
    return server
