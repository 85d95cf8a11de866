"""One concurrency limit per model endpoint, found by observation and shared by every
process and host through PostgreSQL.

A handler that calls a model server wraps each request in `call(base_url, model)`. The
call waits for a *token*, one of the `limit` slots of that (server, model): a
session-level advisory lock `(lock_id, slot)` on a connection of this process, so a dead
holder loses its tokens with its connection, and adding processes never adds requests at
the server. After the request the call reports what it saw, and the limit moves:

- **Queueing** (Vegas-style delay control): the share of a request's time it spent
  waiting inside the server, `q = wait / service`. Ollama says it directly (its
  `total_duration` runs from arrival; `prompt_eval_duration` and `eval_duration` are the
  slot's own work); where a protocol doesn't (OpenAI-compatible `/v1`), `q = rtt /
  baseline - 1` against the shortest round trip seen in the last 2 minutes. Over a window
  of max(3, limit) requests sent under the current limit, a mean `q` above 5 % takes the
  limit one step down, or, from a mean of 0.5 on, to `round(limit / (1 + q))`: by
  Little's law a saturated server with `S` slots and `L > S` requests shows
  `q ≈ L/S - 1`, so this lands on `S`.
- **Probing**: a window without queueing whose requests found every token taken raises
  the limit by one. After a probe that had to be taken back, the next waits 2 s,
  then 8, 32, 60 s; any other fall, two rises in a row, and a server that stops
  answering (a restart is how Ollama's parallelism changes) bring it back to 2 s.
- **Busy** (HTTP 503/429) or a **timeout**: the limit × 0.75 at once (at most limit - 1);
  the job is retried by the queue with its backoff.

The limit row (`jobvisor.model_limits`) carries a version; a change is made only against
the version its samples were sent under, so processes that see the same overload at once
change it once. docs/planning.md ("Model endpoints") explains the law and its failure
modes. Environment: `AI_MODEL_LIMIT` = adaptive (default) | a number (a fixed limit,
still shared through the tokens) | off; `AI_MODEL_LIMIT_MAX` (default 32).

Without a database (`configure` never called: a library caller, a unit test) the same
law runs inside the process alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from workers.core import model_store as store
from workers.core.model_store import (
    PROBE_BACKOFF_GROWTH,
    PROBE_BACKOFF_MAX_S,
    PROBE_BACKOFF_MIN_S,
    DbStore,
    LocalStore,
    Row,
)

log = logging.getLogger("jobvisor.model_gate")

TOLERANCE = 0.05  # mean queue share above which the limit comes down
PROPORTIONAL_Q = 0.5  # from this mean queue share on, it comes down in proportion
WINDOW_MIN = 3  # requests per decision: max(WINDOW_MIN, limit), sent under the same limit
BUSY_FACTOR = 0.75  # a 503/429 or a timeout multiplies the limit by this
BASELINE_WINDOW_S = 120.0
REFRESH_S = 0.25  # how old the local copy of the shared limit may get
POLL_S = 0.01  # a waiter looks for a token another process freed this often
DEFAULT_MAX = 32
MAX_LIMIT = 1024

OK, BUSY, TIMEOUT, DOWN = "ok", "busy", "timeout", "down"


class ModelGateError(ValueError):
    """A bad AI_MODEL_LIMIT / AI_MODEL_LIMIT_MAX (names the variable)."""


class NoToken(Exception):
    """No token of this model endpoint came free within the wait."""


@dataclass(frozen=True)
class Policy:
    mode: str  # "adaptive" | "fixed" | "off"
    fixed: int | None = None
    max_limit: int = DEFAULT_MAX

    @property
    def initial(self) -> int:
        return self.fixed if self.fixed is not None else 1


def policy_from_env(environ: Mapping[str, str] | None = None) -> Policy:
    env = os.environ if environ is None else environ
    raw_max = (env.get("AI_MODEL_LIMIT_MAX") or "").strip()
    max_limit = DEFAULT_MAX
    if raw_max:
        if not raw_max.isdigit() or not 1 <= int(raw_max) <= MAX_LIMIT:
            raise ModelGateError(f"AI_MODEL_LIMIT_MAX must be a whole number from 1 to "
                                 f"{MAX_LIMIT}, got {raw_max!r}")
        max_limit = int(raw_max)
    raw = (env.get("AI_MODEL_LIMIT") or "adaptive").strip().lower()
    if raw in ("adaptive", "off"):
        return Policy(raw, None, max_limit)
    if raw.isdigit() and 1 <= int(raw) <= MAX_LIMIT:
        return Policy("fixed", int(raw), max(max_limit, int(raw)))
    raise ModelGateError(f"AI_MODEL_LIMIT must be adaptive, off or a whole number from 1 to "
                         f"{MAX_LIMIT}, got {raw!r}")


def endpoint_label(base_url: str) -> str:
    """The server's URL without credentials, query or trailing slash (a metrics label)."""
    parts = urlsplit(base_url.strip())
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme.lower(), netloc.lower(), parts.path.rstrip("/"), "", ""))


def lock_id(endpoint: str, model: str) -> int:
    """The advisory lock class of one (endpoint, model): a positive int4."""
    return zlib.crc32(f"jobvisor.model\0{endpoint}\0{model}".encode()) & 0x7FFFFFFF


def ollama_server_wait(answer: Any) -> float | None:
    """Seconds an Ollama request waited for a slot, from its answer's durations (ns)."""
    if not isinstance(answer, dict):
        return None
    try:
        total = int(answer["total_duration"])
        work = sum(int(answer.get(k) or 0) for k in
                   ("load_duration", "prompt_eval_duration", "eval_duration"))
    except (KeyError, TypeError, ValueError):
        return None
    return max(0.0, (total - work) / 1e9)


# --- one (endpoint, model) in this process ------------------------------------------------

@dataclass
class _Limiter:
    endpoint: str
    model: str
    lock_id: int
    cond: threading.Condition = field(default_factory=threading.Condition)
    row: Row | None = None
    read_at: float = 0.0
    epoch: int = -1  # the store epoch `row` was ensured in
    held: set[int] = field(default_factory=set)  # slots held through the store now
    in_flight: int = 0  # every running call, also those whose token died with a connection
    waiting: int = 0  # calls of this process waiting for a token now
    window: list[tuple[float, bool]] = field(default_factory=list)
    # After a decrease, requests admitted under the old limit are still in the server for
    # about one round trip: what is sent meanwhile would queue behind them, so it waits.
    settle_until: float = 0.0
    probing: bool = False  # the limit was last raised: its first queued request says no
    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (when, seconds)
    # since the last flush
    n: int = 0
    busy: int = 0
    timeouts: int = 0
    latency: float | None = None
    q: float | None = None

    def baseline(self, now: float) -> float | None:
        while self.samples and self.samples[0][0] < now - BASELINE_WINDOW_S:
            self.samples.popleft()
        return min(s for _, s in self.samples) if self.samples else None


@dataclass
class Ticket:
    limiter: _Limiter
    slot: int | None  # None: not a store token (the store was unreachable)
    epoch: int
    version: int
    saturated: bool  # every token was taken when this one was sought
    started: float


class Call:
    """What the caller tells about one request: `ok(server_wait=)`, `busy()`, `timeout()`.
    Anything else (a refused connection, a 404) leaves the limit alone."""

    def __init__(self) -> None:
        self.outcome: str | None = None
        self.server_wait: float | None = None

    def ok(self, server_wait: float | None = None) -> None:
        self.outcome, self.server_wait = OK, server_wait

    def busy(self) -> None:
        self.outcome = BUSY

    def timeout(self) -> None:
        self.outcome = TIMEOUT

    def down(self) -> None:
        """No answer (refused, dropped, a 5xx other than busy): the server may be coming
        back with another slot count, so the next probe need not wait its backoff."""
        self.outcome = DOWN


class ModelGate:
    def __init__(self, dsn: str | None, policy: Policy) -> None:
        self.policy = policy
        self.db = DbStore(dsn) if dsn else None
        self.local = LocalStore()
        self._db_lock = threading.Lock()
        self._lock = threading.Lock()
        self._limiters: dict[tuple[str, str], _Limiter] = {}

    # --- tokens ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def call(self, base_url: str, model: str, *, wait: float) -> Iterator[Call]:
        """Hold a token of (base_url, model) around one request; `NoToken` after `wait` s."""
        report = Call()
        if self.policy.mode == "off":
            yield report
            return
        ticket = self.acquire(base_url, model, wait)
        try:
            yield report
        finally:
            self.release(ticket, report.outcome, report.server_wait)

    def limiter(self, base_url: str, model: str) -> _Limiter:
        endpoint = endpoint_label(base_url)
        with self._lock:
            lim = self._limiters.get((endpoint, model))
            if lim is None:
                lim = self._limiters[(endpoint, model)] = _Limiter(
                    endpoint, model, lock_id(endpoint, model))
            return lim

    def acquire(self, base_url: str, model: str, wait: float) -> Ticket:
        lim = self.limiter(base_url, model)
        deadline = time.monotonic() + wait
        waited = False
        with lim.cond:
            while True:
                row, epoch = self._current(lim)
                slot, row = self._take(lim, row, epoch)
                if slot is not None:
                    if waited:
                        lim.waiting -= 1
                    lim.in_flight += 1
                    # Demand beyond the limit: someone here waits, or this took the last
                    # token (slots are taken lowest first, so the top one is the last).
                    saturated = (waited or lim.waiting > 0 or slot == row.limit - 1
                                 or lim.in_flight >= row.limit)
                    return Ticket(lim, slot if slot >= 0 else None, epoch, row.version,
                                  saturated, time.monotonic())
                if not waited:
                    waited = True
                    lim.waiting += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    lim.waiting -= 1
                    raise NoToken(f"no free slot of model {model} within {wait:g} s")
                lim.cond.wait(min(POLL_S, left))

    def release(self, ticket: Ticket, outcome: str | None, server_wait: float | None) -> None:
        lim = ticket.limiter
        rtt = time.monotonic() - ticket.started
        with lim.cond:
            lim.in_flight -= 1
            if ticket.slot is not None and ticket.epoch == self._epoch():
                lim.held.discard(ticket.slot)
                if self.db is not None:
                    with self._db_lock:
                        try:
                            self.db.run(store.GIVE, {"k": lim.lock_id, "slot": ticket.slot})
                        except psycopg.Error as exc:
                            # A token this session could not give back would stay held by
                            # it: drop the connection, and every token of it with it.
                            if self.db.conn is not None:
                                self.db.lost(exc)
            lim.cond.notify()
            self._observe(lim, ticket, outcome, rtt, server_wait)

    def _epoch(self) -> int:
        return self.db.epoch if self.db is not None else 0

    def _current(self, lim: _Limiter) -> tuple[Row, int]:
        """The shared limit, read at most every REFRESH_S (caller holds lim.cond)."""
        now = time.monotonic()
        epoch = self._epoch()
        if lim.row is not None and lim.epoch == epoch and now - lim.read_at < REFRESH_S:
            return lim.row, epoch
        params = {"e": lim.endpoint, "m": lim.model, "k": lim.lock_id,
                  "lim": self.policy.initial, "fixed": self.policy.fixed is not None,
                  "max": self.policy.max_limit}
        if self.db is not None:
            with self._db_lock:
                try:
                    first = lim.epoch != self.db.epoch or lim.row is None
                    got = self.db.run(store.ENSURE if first else store.READ, params)
                    if got is None:  # the row was deleted under us
                        got = self.db.run(store.ENSURE, params)
                except psycopg.Error:
                    got = None  # unreachable: the last known limit, counted in this process
                if got is not None:
                    if first:
                        lim.held.clear()  # the tokens of a lost connection are gone
                    self._adopt(lim, Row(got[0], got[1]), now)
                    lim.epoch = self.db.epoch
        elif lim.row is None:
            lim.row = self.local.ensure(lim.endpoint, lim.model, lim.lock_id, self.policy)
        else:
            lim.row = self.local.read(lim.endpoint, lim.model)
        if lim.row is None:
            lim.row = Row(self.policy.initial, -1)
        lim.read_at = now
        return lim.row, self._epoch()

    def _take(self, lim: _Limiter, row: Row, epoch: int) -> tuple[int | None, Row]:
        """A free slot number (-1: admitted by this process's own count, the database
        being unreachable) or None, and the limit it was judged against. Through the
        database the limit is read in the same statement: no process admits a call under
        a limit another has already lowered."""
        if self.db is not None and self.db.conn is not None and epoch == self.db.epoch:
            with self._db_lock:
                try:
                    got = self.db.run(store.TAKE, {"e": lim.endpoint, "m": lim.model,
                                                   "held": sorted(lim.held), "k": lim.lock_id})
                except psycopg.Error:
                    got = None
                    if self.db.epoch == epoch:  # a statement error, not a lost connection
                        return None, row
                else:
                    if got is None:  # the row is gone: made again on the next look
                        lim.row = None
                        return None, row
                    self._adopt(lim, Row(got[0], got[1]), time.monotonic())
                    lim.read_at = time.monotonic()
                    if got[2] is None:
                        return None, lim.row or row
                    lim.held.add(got[2])
                    return int(got[2]), lim.row or row
        if self.db is None:
            free = next((s for s in range(row.limit) if s not in lim.held), None)
            if free is not None:
                lim.held.add(free)
            return free, row
        # The database is unreachable: the last known limit, counted in this process.
        return (-1 if lim.in_flight < row.limit else None), row

    # --- the control law ------------------------------------------------------------------
    def _observe(self, lim: _Limiter, ticket: Ticket, outcome: str | None, rtt: float,
                 server_wait: float | None) -> None:
        now = time.monotonic()
        lim.n += 1
        if outcome == BUSY:
            lim.busy += 1
        elif outcome == TIMEOUT:
            lim.timeouts += 1
        q: float | None = None
        if outcome == OK:
            if server_wait is not None:
                service = max(rtt - server_wait, 1e-3)
                q = server_wait / service
                lim.samples.append((now, service))
            else:
                base = lim.baseline(now)
                q = max(0.0, rtt / base - 1.0) if base else 0.0
                lim.samples.append((now, rtt))
            lim.latency = rtt if lim.latency is None else 0.8 * lim.latency + 0.2 * rtt
            lim.q = q if lim.q is None else 0.8 * lim.q + 0.2 * q
        if self.policy.mode == "adaptive" and lim.row is not None:
            current = lim.row
            if outcome in (BUSY, TIMEOUT):
                target = math.floor(current.limit * BUSY_FACTOR)
                self._change(lim, "down", ticket.version, target, reason=outcome)
            elif outcome == DOWN:
                self._probe_soon(lim)
            elif (q is not None and ticket.version == current.version
                  and ticket.started >= lim.settle_until):
                lim.window.append((q, ticket.saturated))
                needed = max(WINDOW_MIN, current.limit)
                total_q = sum(s[0] for s in lim.window)
                # A probe is judged as soon as the window's mean can no longer stay under
                # TOLERANCE: a probe into a full server is taken back after one queued
                # request. Any other window is judged whole, to say how much it queued.
                early = lim.probing and total_q > TOLERANCE * needed
                if early or len(lim.window) >= needed:
                    mean_q = total_q / len(lim.window)
                    saturated = sum(1 for s in lim.window if s[1]) * 2 >= len(lim.window)
                    if total_q > TOLERANCE * needed:
                        # A little queueing or a probe: one step. A lot: as far as
                        # Little's law says the server's slots are (limit / (1 + q)).
                        target = (round(current.limit / (1.0 + mean_q))
                                  if mean_q >= PROPORTIONAL_Q and not early
                                  else current.limit - 1)
                        self._change(lim, "down", current.version, target,
                                     reason="queueing", queue_share=mean_q)
                    elif saturated:
                        self._change(lim, "up", current.version, current.limit + 1,
                                     reason="probe", queue_share=mean_q)
                    lim.window.clear()
        # Every call: one small UPDATE beside a model call of a second or more, and the
        # dashboard's figures are never behind.
        self._flush(lim, now)

    def _change(self, lim: _Limiter, way: str, version: int, target: int, *, reason: str,
                queue_share: float | None = None) -> None:
        params = {"e": lim.endpoint, "m": lim.model, "v": version, "target": target,
                  "bmin": PROBE_BACKOFF_MIN_S, "bmax": PROBE_BACKOFF_MAX_S,
                  "growth": PROBE_BACKOFF_GROWTH}
        got: Row | None = None
        if self.db is not None and self.db.epoch == lim.epoch:
            with self._db_lock:
                try:
                    raw = self.db.run(store.DOWN if way == "down" else store.UP, params)
                except psycopg.Error:
                    return
            got = Row(raw[0], raw[1]) if raw is not None else None
        elif self.db is None:
            got = (self.local.down(lim.endpoint, lim.model, version, target) if way == "down"
                   else self.local.up(lim.endpoint, lim.model, version))
        if got is not None:
            old = lim.row.limit if lim.row is not None else None
            self._adopt(lim, got, time.monotonic())
            lim.read_at = time.monotonic()
            log.info("model_limit_changed", extra={
                "endpoint": lim.endpoint, "model": lim.model, "limit": got.limit,
                "previous": old, "reason": reason,
                "queue_share": None if queue_share is None else round(queue_share, 3)})
            lim.cond.notify_all()

    def _probe_soon(self, lim: _Limiter) -> None:
        params = {"e": lim.endpoint, "m": lim.model, "bmin": PROBE_BACKOFF_MIN_S}
        if self.db is None:
            self.local.probe_soon(lim.endpoint, lim.model)
        elif self.db.epoch == lim.epoch:
            with self._db_lock, contextlib.suppress(psycopg.Error):
                self.db.run(store.PROBE_SOON, params)

    @staticmethod
    def _adopt(lim: _Limiter, row: Row, now: float) -> None:
        """Take a (possibly new) version of the shared limit."""
        old = lim.row
        if old is not None and row.version != old.version:
            lim.window.clear()
            lim.probing = row.limit > old.limit
            if row.limit < old.limit:  # two round trips: the old requests' own and a wait
                lim.settle_until = now + 2 * (lim.latency or 0.0)
        lim.row = row

    def _flush(self, lim: _Limiter, now: float) -> None:
        if self.db is None or not lim.n:
            return
        params = {"e": lim.endpoint, "m": lim.model, "n": lim.n, "busy": lim.busy,
                  "timeouts": lim.timeouts, "latency": lim.latency, "q": lim.q,
                  "base": lim.baseline(now)}
        with self._db_lock:
            try:
                self.db.run(store.STATS, params)
            except psycopg.Error:
                return
        lim.n = lim.busy = lim.timeouts = 0


# --- the process's gate ---------------------------------------------------------------------

_gate_lock = threading.Lock()
_gate: ModelGate | None = None
_dsn: str | None = None


def configure(dsn: str | None) -> None:
    """Share limits through this database from now on (a worker process, at start)."""
    global _dsn, _gate
    with _gate_lock:
        _dsn = dsn
        _gate = None


def gate() -> ModelGate:
    """This process's gate, made on first use with the policy from the environment."""
    global _gate
    with _gate_lock:
        if _gate is None:
            _gate = ModelGate(_dsn, policy_from_env())
        return _gate


def reset() -> None:
    """Forget the gate and its limits (tests; a later call builds a new one)."""
    global _gate
    with _gate_lock:
        _gate = None
