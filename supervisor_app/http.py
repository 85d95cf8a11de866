"""One HTTP port: `/metrics`, `/healthz`, and the operator-only worker health probe."""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from supervisor_app.metrics import build_registry

if TYPE_CHECKING:
    from supervisor_app.supervisor import Supervisor

log = logging.getLogger("jobvisor.http")

OPERATOR_PATH = "/internal/health/learning-worker"
MAX_BODY = 64 * 1024


def probe_database(dsn: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Run `learning_worker_health_probe()` as the worker's role: (role, checks)."""
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SET statement_timeout = '3s'")
            (role,) = conn.execute("SELECT current_user").fetchone()
            rows = conn.execute(
                "SELECT check_name, ok, detail FROM learning_worker_health_probe()").fetchall()
    except psycopg.errors.UndefinedFunction:
        return None, [{"name": "db_probe", "ok": False, "detail": "probe function missing"}]
    except psycopg.Error as exc:
        return None, [{"name": "db_probe", "ok": False, "detail": type(exc).__name__}]
    return role, [{"name": n, "ok": bool(ok), "detail": d} for n, ok, d in rows]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # keep access logs out of stderr
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = generate_latest(self.server.registry)
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            checks = self.server.sup.health_checks()
            ok = all(c["ok"] for c in checks)
            self._json(200 if ok else 503, {"status": "ok" if ok else "degraded",
                                            "checks": checks})
        elif path == OPERATOR_PATH:
            self._operator_health()
        else:
            self._delegate("GET", path)

    def do_POST(self) -> None:  # noqa: N802
        self._delegate("POST", self.path.split("?", 1)[0])

    def _delegate(self, method: str, path: str) -> None:
        """Everything else belongs to the dashboard (pages, its JSON API, actions)."""
        from supervisor_app import dashboard

        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, MAX_BODY)) if length else b""
        answer = dashboard.route(self.server.sup, method, self.path, self.headers, body,
                                 self.client_address[0])
        if answer is None:
            self._json(404, {"error": "not found"})
            return
        code, headers, payload = answer
        ctype = headers.pop("Content-Type", "application/octet-stream")
        self._send(code, payload, ctype, headers)

    def _operator_health(self) -> None:
        private = {"Cache-Control": "private, no-store", "Vary": "Origin"}
        expected = os.environ.get(self.server.sup.cfg.supervisor.health_token_env, "")
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if not expected:
            self._json(403, {"error": "operator health is disabled: no token configured"},
                       private)
            return
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(),
                                                                 expected.encode()):
            log.warning("health_token_refused", extra={"client": self.client_address[0]})
            self._json(401, {"error": "missing or invalid bearer token"},
                       {**private, "WWW-Authenticate": "Bearer"})
            return
        role, db_checks = probe_database(self.server.sup.worker_dsn)
        checks = db_checks + self.server.sup.health_checks()
        ok = all(c["ok"] for c in checks)
        self._json(200 if ok else 503, {"status": "healthy" if ok else "degraded",
                                        "currentRole": role, "checks": checks}, private)

    def _json(self, code: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(value).encode(), "application/json", headers)

    def _send(self, code: int, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sup: Supervisor) -> None:
        self.sup = sup
        self.registry = build_registry(sup)
        super().__init__(addr, _Handler)


def serve(sup: Supervisor, host: str, port: int) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; returns the server (its port may be 0 → any)."""
    server = _Server((host, port), sup)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("http_listening", extra={"host": host, "port": server.server_address[1]})
    return server
