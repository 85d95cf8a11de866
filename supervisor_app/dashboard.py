"""The operator dashboard on the supervisor's HTTP port: a page, its JSON API, and actions.

`http.py` hands every path it doesn't serve itself to `route`. The page (`/ui/`) is
static HTML, CSS and JavaScript shipped in `supervisor_app/static/`; it polls
`/ui/api/state` every couple of seconds and renders with `textContent` only, so job data
can never become markup. Payloads, results, error messages and progress notes are never
read: they may carry student content (see the queue's operator views).

Access (environment, read per request so tests and operators can flip it):

- `JOBVISOR_DASHBOARD=readonly` (default): anyone who reaches the port sees the page;
  actions need the operator token.
- `JOBVISOR_DASHBOARD=token`: the page's data and actions both need the token.
- `JOBVISOR_DASHBOARD=off`: nothing under `/ui` exists (404).

The token is the one of the operator health endpoint (`supervisor.health_token_env`),
sent as `Authorization: Bearer …`. Browsers never attach that header on their own (it is
not a cookie), so a cross-site page cannot make an operator's browser act; requests whose
`Origin` or `Sec-Fetch-Site` say they come from elsewhere are refused before the token is
even looked at. Every action, refused ones included, is logged on `jobvisor.dashboard`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import psycopg

from workers.core import queue

if TYPE_CHECKING:
    from supervisor_app.supervisor import Supervisor

log = logging.getLogger("jobvisor.dashboard")

MODE_ENV = "JOBVISOR_DASHBOARD"
MODES = ("readonly", "token", "off")
PREFIX = "/ui"
API = PREFIX + "/api"

SAMPLE_EVERY = 5.0       # seconds between throughput samples
HISTORY_S = 300.0        # the jobs/min chart covers the last five minutes
CHART_POINTS = 30        # ... in 10-second steps
DB_CACHE_S = 1.5         # many open tabs cost one set of queries per this interval
FAILURES_SHOWN = 30
RUNNING_SHOWN = 30
BATCHES_SHOWN = 20
AUDIT_KEPT = 50
FINISHED_OUTCOMES = ("completed", "failed", "cancelled")

_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_JOB_ACTION = re.compile(rf"^{API}/jobs/(\d{{1,18}})/(retry|cancel)$")
_TYPE_ACTION = re.compile(rf"^{API}/types/([a-z][a-z0-9_]{{0,62}})/(pause|resume)$")

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                   "X-Frame-Options": "DENY"}
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}

Answer = tuple[int, dict[str, str], bytes]
T = TypeVar("T")


_warned_modes: set[str] = set()


def mode() -> str:
    """The configured access mode; an unknown value fails closed to `token`."""
    value = os.environ.get(MODE_ENV, "readonly").strip().lower() or "readonly"
    if value not in MODES:
        if value not in _warned_modes:  # once per value, not once per poll
            _warned_modes.add(value)
            log.warning("dashboard_mode_invalid", extra={"value": value[:40], "using": "token"})
        return "token"
    return value


# --- throughput history ---------------------------------------------------------------------

def finished_totals(outcomes: Mapping[tuple[str, str, str | None], list[float]]
                    ) -> dict[str, float]:
    """Per type, jobs finished for good so far (completed, failed, cancelled)."""
    totals: dict[str, float] = {}
    for (job_type, outcome, _code), row in dict(outcomes).items():
        if outcome in FINISHED_OUTCOMES and row:
            totals[job_type] = totals.get(job_type, 0.0) + row[0]
    return totals


class Rates:
    """A ring buffer of cumulative finished counts, turned into jobs per minute.

    The supervisor only keeps running totals (its children report outcomes through their
    status pipes); a rate needs the same totals at earlier times, which this keeps.
    """

    def __init__(self, every: float = SAMPLE_EVERY, history: float = HISTORY_S) -> None:
        self.every = every
        self.history = history
        self.samples: deque[tuple[float, dict[str, float]]] = deque(
            maxlen=int(history / every) + 2)
        self.lock = threading.Lock()

    def sample(self, now: float, totals: dict[str, float]) -> None:
        with self.lock:
            # Callers race (sampler thread, API calls); keep roughly even spacing.
            if self.samples and now - self.samples[-1][0] < self.every * 0.8:
                return
            self.samples.append((now, dict(totals)))

    def per_minute(self, job_type: str, now: float, current: float) -> float | None:
        """Jobs/min over the chart's window (five minutes, as the column and the sparkline
        beside it say); None until there is a few seconds' history."""
        with self.lock:
            past = [(t, c.get(job_type, 0.0)) for t, c in self.samples
                    if now - t <= self.history]
        if not past or now - past[0][0] < self.every * 0.8:
            return None
        t0, c0 = past[0]
        return max(0.0, current - c0) * 60.0 / (now - t0)

    def series(self, job_type: str, now: float, current: float,
               points: int = CHART_POINTS) -> list[float | None]:
        """Jobs/min in `points` equal steps over the history window, oldest first.

        A step with no samples on both sides is None (the chart draws a gap), so a
        supervisor that just started doesn't pretend to have been idle.
        """
        with self.lock:
            known = [(t, c.get(job_type, 0.0)) for t, c in self.samples]
        known.append((now, current))
        step = self.history / points
        out: list[float | None] = []
        for i in range(points):
            start, end = now - self.history + i * step, now - self.history + (i + 1) * step
            a = _at_or_after(known, start)
            b = _at_or_before(known, end)
            if a is None or b is None or b[0] - a[0] < step * 0.4:
                out.append(None)
            else:
                out.append(round(max(0.0, b[1] - a[1]) * 60.0 / (b[0] - a[0]), 2))
        return out


def _at_or_after(samples: list[tuple[float, float]], t: float) -> tuple[float, float] | None:
    return next((s for s in samples if s[0] >= t), None)


def _at_or_before(samples: list[tuple[float, float]], t: float) -> tuple[float, float] | None:
    return next((s for s in reversed(samples) if s[0] <= t), None)


# --- per-supervisor state: one DB connection, the sampler, the audit trail -------------------

@dataclass
class _Reads:
    at: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)
    running: list[dict[str, Any]] = field(default_factory=list)
    batches: list[dict[str, Any]] | None = None
    error: str | None = None


class _Board:
    """What the dashboard keeps next to one supervisor.

    Its own connection, not the supervisor loop's: HTTP threads must never hold up (or
    close on error) the connection the loop leases and rescues with.
    """

    def __init__(self, sup: Supervisor) -> None:
        self.dsn = sup.dsn
        self.rates = Rates()
        self.audit: deque[dict[str, Any]] = deque(maxlen=AUDIT_KEPT)
        self.db_lock = threading.Lock()
        self.conn: psycopg.Connection | None = None
        self.reads = _Reads()
        self.reads_lock = threading.Lock()

    def db(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run `fn` on the dashboard's connection, reconnecting after an error."""
        with self.db_lock:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=3,
                                                application_name="jobvisor-dashboard")
                    self.conn.execute("SET statement_timeout = '3s'")
                return fn(self.conn)
            except psycopg.Error:
                # An autocommit connection survives a failed statement (a missing grant,
                # a timeout); only a broken one is replaced.
                if self.conn is not None and self.conn.broken:
                    with contextlib.suppress(psycopg.Error):
                        self.conn.close()
                    self.conn = None
                raise

    def cached_reads(self) -> _Reads:
        with self.reads_lock:
            if time.monotonic() - self.reads.at < DB_CACHE_S:
                return self.reads
            reads = _Reads(at=time.monotonic())
            try:
                reads.failures = self.db(lambda c: queue.recent_failures(c, FAILURES_SHOWN))
                reads.running = self.db(lambda c: queue.running_jobs(c, RUNNING_SHOWN))
                try:
                    reads.batches = self.db(lambda c: queue.recent_batches(c, BATCHES_SHOWN))
                except psycopg.errors.InsufficientPrivilege:
                    reads.batches = None  # a least-privilege role may not read batches
            except psycopg.Error as exc:
                reads.error = type(exc).__name__
            self.reads = reads
            return reads

    def record(self, action: str, target: str, result: str, client: str) -> None:
        self.audit.appendleft({"at": _iso(datetime.now(UTC)), "action": action,
                               "target": target, "result": result, "client": client})


_boards: weakref.WeakKeyDictionary[Any, _Board] = weakref.WeakKeyDictionary()
_boards_lock = threading.Lock()


def board(sup: Supervisor) -> _Board:
    """The dashboard state for `sup`, created (with its sampler) on first use."""
    with _boards_lock:
        b = _boards.get(sup)
        if b is None:
            b = _boards[sup] = _Board(sup)
            start_sampler(sup, b)
    return b


def start_sampler(sup: Supervisor, b: _Board | None = None) -> None:
    """Sample throughput in the background, so the chart has history when a page opens.

    `route` starts it on the first dashboard request; `supervisor_app.main` may call it
    at start-up to have history from the beginning.
    """
    if b is None:
        board(sup)  # creates the board and starts this sampler once
        return
    ref = weakref.ref(sup)

    def loop() -> None:
        while (s := ref()) is not None:
            b.rates.sample(time.monotonic(), finished_totals(s.outcomes))
            del s  # don't keep the supervisor alive while sleeping
            time.sleep(SAMPLE_EVERY)

    threading.Thread(target=loop, name="dashboard-sampler", daemon=True).start()


# --- routing -----------------------------------------------------------------------------------

def route(sup: Supervisor, method: str, path: str, headers: Mapping[str, str], body: bytes,
          client: str) -> Answer | None:
    """Answer a request as (status, headers incl. Content-Type, body), or None: not ours."""
    current = mode()
    if current == "off":
        return None
    path = urlsplit(path).path
    if method == "GET":
        if path == "/":
            return 302, {"Content-Type": "text/plain; charset=utf-8", "Location": PREFIX + "/",
                         **_COMMON_HEADERS}, b""
        if path in (PREFIX, PREFIX + "/"):
            return _static("index.html")
        if path.startswith(PREFIX + "/static/"):
            return _static(path[len(PREFIX + "/static/"):])
        if path == API + "/state":
            return _state(sup, headers, current)
        return None
    if method == "POST" and path.startswith(API + "/"):
        return _action(sup, path, headers, client)
    return None


def _static(name: str) -> Answer | None:
    files = _static_files()
    if name not in files:
        return None
    ctype, data = files[name]
    extra = {"Content-Security-Policy": _CSP} if ctype.startswith("text/html") else {}
    # no-cache, not no-store: the browser revalidates, so an upgrade shows at once.
    return 200, {"Content-Type": ctype, "Cache-Control": "no-cache", **_COMMON_HEADERS,
                 **extra}, data


_static_cache: dict[str, tuple[str, bytes]] | None = None


def _static_files() -> dict[str, tuple[str, bytes]]:
    """The shipped assets, by file name; only these names are ever served."""
    global _static_cache
    if _static_cache is None:
        root = resources.files("supervisor_app").joinpath("static")
        found: dict[str, tuple[str, bytes]] = {}
        for entry in root.iterdir():
            suffix = os.path.splitext(entry.name)[1]
            if entry.is_file() and suffix in _CONTENT_TYPES:
                found[entry.name] = (_CONTENT_TYPES[suffix], entry.read_bytes())
        _static_cache = found
    return _static_cache


def _json(code: int, value: Any, extra: dict[str, str] | None = None) -> Answer:
    body = json.dumps(value, default=_json_default, separators=(",", ":")).encode()
    return code, {"Content-Type": "application/json", "Cache-Control": "no-store",
                  **_COMMON_HEADERS, **(extra or {})}, body


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    return str(value)


def _iso(value: datetime, timespec: str = "seconds") -> str:
    return value.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


# --- authorisation ------------------------------------------------------------------------------

def _expected_token(sup: Supervisor) -> str:
    return os.environ.get(sup.cfg.supervisor.health_token_env, "")


def _bearer(headers: Mapping[str, str]) -> str | None:
    given = headers.get("Authorization") or ""
    scheme, _, token = given.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _token_ok(sup: Supervisor, token: str | None) -> bool:
    expected = _expected_token(sup)
    return bool(expected) and token is not None and hmac.compare_digest(
        token.encode(), expected.encode())


def _cross_site(headers: Mapping[str, str]) -> str | None:
    """Why a request looks cross-site, or None. Browsers set both headers themselves."""
    site = headers.get("Sec-Fetch-Site")
    if site and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site {site}"
    origin = headers.get("Origin")
    if origin:
        host = (headers.get("Host") or "").lower()
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.netloc.lower() != host:
            return "Origin does not match Host"
    return None


def _refused(code: int, message: str, extra: dict[str, str] | None = None) -> Answer:
    return _json(code, {"error": message}, extra)


# --- the state the page shows -------------------------------------------------------------------

def _state(sup: Supervisor, headers: Mapping[str, str], current: str) -> Answer:
    token = _bearer(headers)
    operator = _token_ok(sup, token)
    if token is not None and not operator:
        # A wrong token is said so, even where reading needs none: the page drops it.
        return _refused(401, "invalid operator token", {"WWW-Authenticate": "Bearer"})
    if current == "token" and not operator:
        if not _expected_token(sup):
            return _refused(403, "dashboard needs a token, and none is configured")
        return _refused(401, "this dashboard needs the operator token",
                        {"WWW-Authenticate": "Bearer"})
    return _json(200, snapshot(sup, operator=operator, current=current))


def snapshot(sup: Supervisor, *, operator: bool, current: str = "readonly") -> dict[str, Any]:
    """Everything the page shows, as plain JSON (ids, counts, codes, times; no payloads)."""
    b = board(sup)
    now = time.monotonic()
    totals = finished_totals(sup.outcomes)
    b.rates.sample(now, totals)
    view = _view(sup)
    stats = dict(sup.queue_stats)
    checks = sup.health_checks()
    reads = b.cached_reads()
    workers = view["workers"]
    names = sorted(set(sup.cfg.types) | set(stats) | set(view["plan"]))
    types = []
    for name in names:
        t = sup.cfg.types.get(name)
        q = stats.get(name, {})
        plan = view["plan"].get(name)
        running = sum(1 for w in workers if w["job_type"] == name
                      and w["state"] in ("starting", "running"))
        types.append({
            "name": name,
            "configured": t is not None,
            "paused": name in sup.paused,
            "queue": {s: int(q.get(s, 0)) for s in queue.STATUSES}
            | {"lag_s": float(q.get("oldest_queued_s", 0.0))},
            "per_minute": _round(b.rates.per_minute(name, now, totals.get(name, 0.0))),
            "chart": b.rates.series(name, now, totals.get(name, 0.0)),
            "plan": {"processes": plan["processes"] if plan else 0,
                     "reason": plan["reason"] if plan else
                     ("not planned yet" if t is not None else "no workers configured here"),
                     "running": running,
                     "restarts": sup.restarts.get(name, 0)},
            "settings": None if t is None else {
                "priority": t.priority, "min": t.processes.min, "max": t.processes.max,
                "concurrency": t.concurrency, "memory_per_job": t.memory_per_job,
                "gpu_memory_per_job": t.gpu_memory_per_job},
        })
    return {
        "generated_at": _iso(datetime.now(UTC), "milliseconds"),  # the page's clock
        "refresh_s": 2,
        "mode": current,
        "operator": operator,
        "actions_enabled": bool(_expected_token(sup)),
        "supervisor": {**view["supervisor"],
                       "uptime_s": round(time.time() - view["supervisor"]["started_at"], 1),
                       "reload_error": bool(getattr(sup, "reload_error", None))},
        "health": {"ok": all(c["ok"] for c in checks), "checks": checks},
        "types": types,
        # readings.model_servers: each model server on our GPUs (loaded models, memory
        # held, memory kept for unloaded models); budget: what the plan worked with.
        "capacity": {"readings": view["readings"], "reserve": view["reserve"],
                     "budget": view.get("budget")},
        # Each model endpoint's shared limit, requests in flight and observed latency.
        "models": [_model_endpoint(e) for e in list(sup.model_endpoints)],
        "workers": [{k: w.get(k) for k in ("job_type", "slot", "pid", "state", "uptime_s",
                                          "restarts", "rss_bytes", "cpu_seconds", "inflight",
                                          "last_exit")} for w in workers],
        "running": reads.running,
        "failures": reads.failures,
        "batches": reads.batches,
        "db_error": reads.error,
        "audit": list(b.audit) if operator else None,
    }


def _model_endpoint(e: dict[str, Any]) -> dict[str, Any]:
    out = {k: e[k] for k in ("endpoint", "model", "limit", "max_limit", "fixed", "in_flight",
                             "requests", "busy", "timeouts")}
    for k in ("latency_s", "baseline_s", "wait_share"):
        out[k] = None if e[k] is None else round(float(e[k]), 4)
    for k in ("changed_at", "observed_at"):
        out[k] = None if e[k] is None else _iso(e[k], "milliseconds")
    return out


def _view(sup: Supervisor) -> dict[str, Any]:
    """`sup.view()` from an HTTP thread; the loop may add a type's slots meanwhile."""
    for _ in range(3):
        try:
            return sup.view()
        except RuntimeError:  # dictionary changed size during iteration: look again
            time.sleep(0.01)
    return sup.view()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# --- actions ----------------------------------------------------------------------------------

def _action(sup: Supervisor, path: str, headers: Mapping[str, str], client: str) -> Answer | None:
    job_match = _JOB_ACTION.match(path)
    type_match = _TYPE_ACTION.match(path)
    if job_match is None and type_match is None:
        return None
    action = (job_match or type_match).group(2)  # type: ignore[union-attr]
    target = (job_match or type_match).group(1)  # type: ignore[union-attr]
    b = board(sup)

    def refuse(code: int, why: str, message: str, extra: dict[str, str] | None = None
               ) -> Answer:
        log.warning("dashboard_action_refused", extra={"action": action, "target": target,
                                                       "reason": why, "client": client})
        b.record(action, target, f"refused: {why}", client)
        return _refused(code, message, extra)

    if not _expected_token(sup):
        env = sup.cfg.supervisor.health_token_env
        return refuse(403, "no_token_configured",
                      f"actions are disabled: no operator token configured (set {env})")
    if (why := _cross_site(headers)) is not None:
        return refuse(403, "cross_site", f"cross-site request refused ({why})")
    token = _bearer(headers)
    if not _token_ok(sup, token):
        return refuse(401, "bad_token" if token else "no_token",
                      "actions need the operator token (Authorization: Bearer …)",
                      {"WWW-Authenticate": "Bearer"})
    if job_match is not None:
        return _job_action(sup, b, action, int(target), client)
    return _type_action(sup, b, action, target, client)


def _job_action(sup: Supervisor, b: _Board, action: str, job_id: int, client: str) -> Answer:
    try:
        brief = b.db(lambda c: queue.job_brief(c, job_id))
        if brief is None:
            result = "not_found"
        elif action == "retry":
            result = "queued" if b.db(lambda c: queue.retry_failed(c, job_id)) else "conflict"
        else:
            result = b.db(lambda c: queue.cancel(c, job_id)) or "conflict"
    except psycopg.Error as exc:
        log.error("dashboard_action_failed", extra={"action": action, "job_id": job_id,
                                                    "client": client,
                                                    "exc_type": type(exc).__name__})
        return _refused(503, "database unreachable")
    job_type = brief["job_type"] if brief else None
    event = {"retry": "dashboard_job_retried", "cancel": "dashboard_job_cancelled"}[action]
    log.info(event, extra={"job_id": job_id, "job_type": job_type, "result": result,
                           "client": client})
    b.record(action, f"job {job_id}" + (f" ({job_type})" if job_type else ""), result, client)
    with b.reads_lock:
        b.reads.at = 0.0  # show the change on the next poll, not after the cache expires
    if result == "not_found":
        return _json(404, {"error": f"no job {job_id}", "result": result})
    if result == "conflict":
        status = brief["status"] if brief else "?"
        why = ("only failed or cancelled jobs can be retried" if action == "retry"
               else "only queued or running jobs can be cancelled")
        return _json(409, {"error": f"job {job_id} is {status}: {why}", "result": result})
    return _json(200, {"job_id": job_id, "job_type": job_type, "result": result})


def _type_action(sup: Supervisor, b: _Board, action: str, job_type: str, client: str) -> Answer:
    if not _TYPE_RE.match(job_type) or (job_type not in sup.cfg.types
                                         and job_type not in sup.paused):
        return _json(404, {"error": f"type {job_type!r} is not configured here"})
    if action == "pause":
        sup.pause(job_type)
        event, result = "dashboard_type_paused", "paused"
    else:
        sup.resume(job_type)
        event, result = "dashboard_type_resumed", "resumed"
    log.info(event, extra={"job_type": job_type, "client": client})
    b.record("drain" if action == "pause" else "resume", f"type {job_type}", result, client)
    return _json(200, {"job_type": job_type, "result": result})
