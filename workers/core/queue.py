"""Every statement jobvisor sends to its queue table lives here.

Each statement is named, guarded by the state it expects, and bulk work passes arrays
(unnested, or indexed by each row's position in them), so a round trip serves many jobs.
Writes that finish a job are fenced by the job's `lease_key`: a worker whose lease was
lost changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from workers.core import plugins, webhooks
from workers.core.errors import MAX_MESSAGE
from workers.core.plugins import JobEvent

STATUSES = ("queued", "leased", "completed", "failed", "cancelled")
# A lease key: text as the lease returns it (LeasedJob.lease_key), or a uuid.UUID.
LeaseKey = str | uuid.UUID
CANCEL_CHANNEL = "jobvisor_cancel"
MAX_ERRORS = 10  # attempts whose errors a job keeps (sql/006, jobvisor.push_error)


def jobs_channel(job_type: str) -> str:
    """The channel a type's workers LISTEN on; mirrors `jobvisor.jobs_channel` (sql/006)."""
    if len(job_type) <= 60:
        return f"jv_{job_type}"
    return f"jv_{job_type[:51]}_{hashlib.md5(job_type.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class NewJob:
    """One job to enqueue. `delay` is seconds from now."""

    job_type: str
    payload: Any = field(default_factory=dict)
    priority: int = 0
    delay: float = 0.0
    max_attempts: int = 5
    key: str | None = None
    sticky_key: bool = False
    batch_id: str | None = None
    # POSTed a signed notification when the job finishes (docs/webhooks.md); checked
    # against the allow-list at enqueue.
    callback_url: str | None = None


class LeasedJob(NamedTuple):
    """One leased job as the lease returns it. A named tuple: the runtime builds one per
    job it leases, and a frozen dataclass cost three times as much to build (≈ 2 µs)."""

    id: int
    job_type: str
    payload: Any
    attempt: int
    max_attempts: int
    # The lease's fence, as text: every statement that uses it casts it to uuid, so no
    # uuid.UUID is built per job on the way in and formatted again on the way out.
    lease_key: str
    priority: int
    batch_id: str | None
    # Held by a worker that died beside other jobs: run it alone (sql/006).
    suspect: bool = False
    # Why the payload could not be decoded (the job then fails as `payload_invalid`).
    payload_error: str | None = None


def _decode_payload(text: str | None) -> tuple[Any, str | None]:
    """Decode a payload in the worker, not in the driver: a payload that any producer
    could store but Python can't load (nesting deeper than the recursion limit) fails
    its own job instead of the lease that fetched it."""
    if text is None:
        return None, None
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "payload nesting is too deep to decode"
    except ValueError as exc:
        return None, f"payload is not valid JSON: {type(exc).__name__}"


def _clip(message: str | None) -> str | None:
    return None if message is None else message[:MAX_MESSAGE]


# --- enqueue -------------------------------------------------------------------------

_INSERT_INTO = """
INSERT INTO jobvisor.jobs AS j
    (job_type, payload, priority, visible_at, max_attempts, idempotency_key, key_sticky, batch_id,
     callback_url)"""

# A live (or sticky) job holding the key wins: nothing is inserted for it.
_ON_KEY_CONFLICT = """
ON CONFLICT (idempotency_key)
    WHERE idempotency_key IS NOT NULL AND (status IN ('queued', 'leased') OR key_sticky)
    DO NOTHING
RETURNING j.id, j.idempotency_key
"""

# Many jobs travel as one JSON document, a row object each: json.dumps writes it in C,
# where nine arrays were dumped by psycopg element by element in Python (escaping each
# string), which was most of a bulk enqueue's time (docs/benchmarks.md).
_ENQUEUE = f"""{_INSERT_INTO}
SELECT t, p, pr, now() + make_interval(secs => d), m, k, s, b, c
FROM ROWS FROM (jsonb_to_recordset(%(rows)s::jsonb)
     AS (t text, p jsonb, pr int, d float8, m int, k text, s bool, b text, c text))
     WITH ORDINALITY AS n(t, p, pr, d, m, k, s, b, c, ord)
ORDER BY ord{_ON_KEY_CONFLICT}"""

# One job, as most producers enqueue (a follow-up, a cron slot, a submission): the same
# insert with one VALUES row of plain parameters. Sent as a many-row statement (then
# nine one-element arrays), the parameters cost more than the row itself: ≈ 0.2 ms of a
# 0.6 ms call (docs/benchmarks.md).
_ENQUEUE_ONE = f"""{_INSERT_INTO}
VALUES (%(type)s::text, %(payload)s::jsonb, %(priority)s::int,
        now() + make_interval(secs => %(delay)s::float8), %(max_attempts)s::int, %(key)s::text,
        %(sticky)s::bool, %(batch)s::text, %(callback)s::text){_ON_KEY_CONFLICT}"""

_EXISTING_BY_KEY = """
SELECT idempotency_key, id FROM jobvisor.jobs
WHERE idempotency_key = ANY(%(keys)s)
  AND (status IN ('queued', 'leased') OR key_sticky)
"""


@contextlib.contextmanager
def _atomic(conn: psycopg.Connection) -> Iterator[None]:
    """One transaction around a status change and its plug-in outcomes: the caller's,
    when it is in one (or will commit the implicit one), else one of our own."""
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        with conn.transaction():
            yield
    else:
        yield


def enqueue_many(conn: psycopg.Connection, jobs: Sequence[NewJob]) -> list[int]:
    """Insert jobs in one round trip; returns ids in input order.

    A job whose idempotency key is already held by a live job (or a finished sticky
    one) is not inserted: its position gets the existing job's id instead. A callback
    URL outside the allow-list raises `webhooks.WebhookURLError` before anything is sent.
    """
    if not jobs:
        return []
    if len(jobs) == 1:
        return _enqueue_rows(conn, jobs, _ENQUEUE_ONE, _one_row(jobs[0]))
    return _enqueue_rows(conn, jobs, _ENQUEUE, _many_rows(jobs))


def _one_row(job: NewJob) -> dict[str, Any]:
    """`_ENQUEUE_ONE`'s parameters."""
    return {"type": job.job_type, "payload": Jsonb(job.payload), "priority": job.priority,
            "delay": float(job.delay), "max_attempts": job.max_attempts, "key": job.key,
            "sticky": job.sticky_key, "batch": job.batch_id, "callback": job.callback_url}


def _many_rows(jobs: Sequence[NewJob]) -> dict[str, Any]:
    """`_ENQUEUE`'s parameter: the rows as one JSON document."""
    return {"rows": json.dumps(
        [{"t": j.job_type, "p": j.payload, "pr": j.priority, "d": float(j.delay),
          "m": j.max_attempts, "k": j.key, "s": j.sticky_key, "b": j.batch_id,
          "c": j.callback_url} for j in jobs], separators=(",", ":"))}


def _enqueue_rows(conn: psycopg.Connection, jobs: Sequence[NewJob], sql: str,
                  params: dict[str, Any]) -> list[int]:
    _check_callbacks(j.callback_url for j in jobs)
    rows = conn.execute(sql, params).fetchall()
    keyless = [r[0] for r in rows if r[1] is None]
    by_key = {r[1]: r[0] for r in rows if r[1] is not None}
    missing = [j.key for j in jobs if j.key is not None and j.key not in by_key]
    if missing:
        for key, job_id in conn.execute(_EXISTING_BY_KEY, {"keys": missing}).fetchall():
            by_key[key] = job_id
    ids: list[int] = []
    keyless_iter = iter(keyless)
    for j in jobs:
        if j.key is None:
            ids.append(next(keyless_iter))
        elif j.key in by_key:
            ids.append(by_key[j.key])
        else:  # the holder finished between our insert and our look-up: try once more
            ids.append(enqueue_many(conn, [j])[0])
    return ids


def enqueue(conn: psycopg.Connection, job: NewJob) -> int:
    return enqueue_many(conn, [job])[0]


_COPY = """
COPY jobvisor.jobs (job_type, payload, priority, visible_at, max_attempts, batch_id,
                    callback_url)
FROM STDIN (FORMAT BINARY)
"""
_COPY_TYPES = ["text", "jsonb", "int4", "timestamptz", "int4", "text", "text"]


def enqueue_copy(conn: psycopg.Connection, jobs: Iterable[NewJob]) -> int:
    """Bulk enqueue through binary COPY; returns how many jobs were inserted.

    For loads of many thousands of jobs: several times the rate of `enqueue_many` (see
    docs/benchmarks.md), but no ids come back and no idempotency key can be honoured
    (COPY has no ON CONFLICT), so a job with a key raises ValueError. All of them commit
    together, with the caller's transaction when it is in one. The insert triggers run as
    for any insert: batches count their jobs, each type's workers are woken once.
    A delay counts from the transaction's start, as `enqueue_many`'s `now()` does.
    """
    count = 0
    check_callback = _callback_checker()
    with _atomic(conn), conn.cursor() as cur:
        (start,) = cur.execute("SELECT now()").fetchone()
        with cur.copy(_COPY) as copy:
            copy.set_types(_COPY_TYPES)
            for j in jobs:
                if j.key is not None:
                    raise ValueError(f"job {count + 1}: enqueue_copy takes no idempotency key "
                                     f"(use enqueue_many for keyed jobs)")
                if j.callback_url is not None:
                    check_callback(j.callback_url)
                visible = start if not j.delay else start + timedelta(seconds=float(j.delay))
                copy.write_row((j.job_type, Jsonb(j.payload), j.priority, visible,
                                j.max_attempts, j.batch_id, j.callback_url))
                count += 1
    return count


# --- lease -----------------------------------------------------------------------------

_LEASE_SUSPECT = """suspect AS (
    -- A suspect only for a process that holds nothing else, and then nothing more.
    SELECT id FROM jobvisor.jobs
    WHERE %(alone)s AND job_type = %(type)s AND status = 'queued' AND suspect
      AND visible_at <= now()
    ORDER BY priority DESC, visible_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)"""

_LEASE_PLAIN = """plain AS (
    SELECT id FROM jobvisor.jobs
    WHERE job_type = %(type)s AND status = 'queued' AND visible_at <= now() AND NOT suspect
      AND NOT EXISTS (SELECT 1 FROM suspect)
    ORDER BY priority DESC, visible_at, id
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)"""

_LEASE_UPDATE = """
UPDATE jobvisor.jobs j
SET status = 'leased', lease_key = gen_random_uuid(), leased_by = %(by)s,
    leased_until = now() + make_interval(secs => %(lease)s),
    attempts = j.attempts + 1, started_at = now(), updated_at = now()
-- The picked ids as an array: each row is then found through the primary key, whatever
-- the planner guesses of how many were picked (a join it thought small was planned as a
-- scan of the whole table, a cost that grew with the backlog).
WHERE j.id = ANY(ARRAY(SELECT id FROM suspect UNION ALL SELECT id FROM plain))
  -- A lease need not wait for the disk: the log is flushed in order, so the fenced
  -- (synchronous) completion that depends on it makes it durable first; a crash can only
  -- lose a lease nothing depends on, and that job is simply queued again. (Evaluated
  -- once, before any row is changed.)
  AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL
-- The payload as text: decoded per job by the worker (see _decode_payload).
RETURNING j.id, j.job_type, j.payload::text, j.attempts, j.max_attempts, j.lease_key::text,
          j.priority, j.batch_id, j.suspect
"""

_LEASE = f"WITH {_LEASE_SUSPECT}, {_LEASE_PLAIN}{_LEASE_UPDATE}"

# --- fair share (sql/009, docs/fair_share.md) ---
# A fair type's keyed jobs in tag order, through jobs_fair_lease_order: priority strict,
# then the start tags that interleave the keys (NULL first: keyed after being queued,
# before the type was fair), then id. The same index-ordered SKIP LOCKED scan as FIFO's.
_FAIR_ORDER = "priority DESC, fair_tag NULLS FIRST, id"

_LEASE_FAIR_PLAIN = f"""plain AS (
    SELECT id FROM jobvisor.jobs
    WHERE job_type = %(type)s AND status = 'queued' AND fair_key IS NOT NULL
      AND visible_at <= now() AND NOT suspect
      AND NOT EXISTS (SELECT 1 FROM suspect)
    ORDER BY {_FAIR_ORDER}
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)"""

_LEASE_FAIR = f"WITH {_LEASE_SUSPECT}, {_LEASE_FAIR_PLAIN}{_LEASE_UPDATE}"

# With max_running_per_key, under the type's lease lock (see `lease`): of the first
# %(scan)s jobs in fair order, those whose key stays within its limit, counting the
# key's leased jobs (prefetched ones too) and the jobs before it in this batch; the
# first %(n)s of them are locked (SKIP LOCKED) and leased. A suspect obeys the limit too.
# A key at its limit is passed over, so its slots go to other keys, or stay idle.
_LEASE_FAIR_LIMITED = f"""
WITH running AS (
    -- The type's leased jobs by key, through jobs_leased: as many rows as run, however
    -- many of a key are queued (no key condition, so not jobs_fair_keys' range). As one
    -- object (key: leased count), in which each candidate looks its key up (a binary search):
    -- a join with a row per key was planned, from statistics of a quieter moment, as a
    -- nested loop of candidates × running keys (864 × 100 rows, 9 ms per lease, seen).
    SELECT coalesce(jsonb_object_agg(fair_key, n), '{{}}') AS by_key FROM (
        SELECT fair_key, count(*) AS n FROM jobvisor.jobs
        WHERE job_type = %(type)s AND status = 'leased' AND fair_key IS NOT NULL
        GROUP BY fair_key) g
), suspect AS (
    SELECT s.id FROM jobvisor.jobs s
    WHERE %(alone)s AND s.job_type = %(type)s AND s.status = 'queued' AND s.suspect
      AND s.visible_at <= now()
      AND coalesce(((SELECT by_key FROM running) ->> s.fair_key)::int, 0) < %(per_key)s
    ORDER BY s.priority DESC, s.visible_at, s.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), cand AS (
    SELECT id, fair_key, priority, fair_tag FROM jobvisor.jobs
    WHERE job_type = %(type)s AND status = 'queued' AND fair_key IS NOT NULL
      AND visible_at <= now() AND NOT suspect
      AND NOT EXISTS (SELECT 1 FROM suspect)
    ORDER BY {_FAIR_ORDER}
    LIMIT %(scan)s
), chosen AS (
    SELECT c.id FROM (
        SELECT id, fair_key, priority, fair_tag,
               row_number() OVER (PARTITION BY fair_key ORDER BY {_FAIR_ORDER}) AS nth
        FROM cand) c
    WHERE c.nth + coalesce(((SELECT by_key FROM running) ->> c.fair_key)::int, 0)
          <= %(per_key)s
    ORDER BY c.priority DESC, c.fair_tag NULLS FIRST, c.id
    LIMIT %(n)s
), plain AS (
    -- The chosen ids through the primary key, still queued once locked. Not written as
    -- `status = 'queued'`: that offered the planner jobs_lease_order, the index of the
    -- whole backlog, and with statistics from an emptier queue its generic plan read
    -- every entry of it (100,000 per lease, seen). The CHECK on status makes the two the
    -- same.
    SELECT id FROM jobvisor.jobs
    WHERE id = ANY (ARRAY(SELECT id FROM chosen))
      AND status NOT IN ('leased', 'completed', 'failed', 'cancelled')
    FOR UPDATE SKIP LOCKED
){_LEASE_UPDATE}"""


def fair_scan(n: int) -> int:
    """How many queued jobs a lease with max_running_per_key looks at for `n` slots."""
    return min(4 * n + 64, 10_000)

_SUSPECT_WAITING = """
SELECT EXISTS (SELECT 1 FROM jobvisor.jobs
               WHERE job_type = %(type)s AND status = 'queued' AND suspect
                 AND visible_at <= now())
"""


def suspect_waiting(conn: psycopg.Connection, job_type: str) -> bool:
    """Whether a suspect of this type waits for a process that holds nothing (an index
    probe of jobs_suspects: cheap whatever the backlog)."""
    return bool(conn.execute(_SUSPECT_WAITING, {"type": job_type}).fetchone()[0])


_LEASED_COUNT = """
SELECT count(*) FROM jobvisor.jobs WHERE job_type = %(type)s AND status = 'leased'
"""


def lease(
    conn: psycopg.Connection,
    job_type: str,
    n: int,
    *,
    worker_id: str,
    lease_seconds: float,
    global_limit: int | None = None,
    alone: bool = False,
    fair: bool = False,
    per_key_limit: int | None = None,
) -> list[LeasedJob]:
    """Lease up to `n` jobs of one type: highest priority first, then oldest.

    With `alone` (the caller holds no job), a suspect job is leased first and then alone:
    the caller must lease nothing more while it holds a suspect. With `global_limit`,
    leasing of this type is serialised by an advisory lock so the number of leased jobs
    across every host never exceeds it.

    With `fair` (a type with `fair_by`), the keyed jobs go by their start tags instead
    of their age (docs/fair_share.md); with `per_key_limit` (max_running_per_key, which
    implies `fair`) no key ever has more leased jobs than that, on all hosts together:
    leasing is serialised by the same advisory lock as `global_limit`'s.
    """
    if n <= 0:
        return []
    params = {"type": job_type, "n": n, "by": worker_id, "lease": float(lease_seconds),
              "alone": alone}
    sql = _LEASE_FAIR if fair else _LEASE
    if per_key_limit is not None:
        sql = _LEASE_FAIR_LIMITED
        params["per_key"] = per_key_limit
    if global_limit is None and per_key_limit is None:
        rows = conn.execute(sql, params).fetchall()
    else:
        with conn.transaction():
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('jobvisor.lease'), hashtext(%s))",
                (job_type,),
            )
            if global_limit is not None:
                (held,) = conn.execute(_LEASED_COUNT, params).fetchone()
                params["n"] = max(0, min(n, global_limit - held))
            params["scan"] = fair_scan(params["n"])
            rows = conn.execute(sql, params).fetchall() if params["n"] else []
    jobs = []
    for r in rows:
        payload, error = _decode_payload(r[2])
        jobs.append(LeasedJob(r[0], r[1], payload, r[3], r[4], r[5], r[6], r[7],
                              suspect=r[8], payload_error=error))
    jobs.sort(key=lambda j: (-j.priority, j.id))
    return jobs


# --- while running ----------------------------------------------------------------------

# The rows a batch of leases names (heartbeat, progress, completion, put back), each
# changed only while its lease holds. Each row is found by its id through the primary key,
# and its key (result, progress ...) is taken from the parameter arrays at the id's
# position: there is no join with the unnested arrays. With a join and `status =
# 'leased'`, the planner was free to scan every leased row (jobs_leased) against the
# arrays in a nested loop. Statistics taken while few jobs were leased made it choose
# that plan and keep it as the session's generic plan: 400 leased × 100 acknowledged =
# 40,000 comparisons, 8 ms for a 100-job batch instead of 1.5, and half the throughput
# with 10⁶ finished rows retained (docs/benchmarks.md).
# * `leased_until IS NOT NULL` stands for `status = 'leased'` (CHECK leased_has_lease: a
#   row with a lease key and leased_until is leased), so no partial index on the status
#   offers itself in place of the primary key.
# * Each array is a scalar subquery, cast once per statement, not once per row.
# * The ids of one batch are distinct (one lease each).
_IDS = "(SELECT %(ids)s::bigint[])::bigint[]"
_AT = f"array_position({_IDS}, j.id)"
_FENCED = f"""j.id = ANY({_IDS})
      AND j.lease_key = (SELECT %(keys)s::uuid[])[{_AT}] AND j.leased_until IS NOT NULL"""

_HEARTBEAT = f"""
UPDATE jobvisor.jobs j
SET leased_until = now() + make_interval(secs => %(lease)s), updated_at = now()
WHERE {_FENCED}
RETURNING j.id, j.cancel_requested
"""


def heartbeat(
    conn: psycopg.Connection, leases: Sequence[tuple[int, LeaseKey]], lease_seconds: float
) -> dict[int, bool]:
    """Extend the leases still held; returns {job id: cancel requested} for those."""
    if not leases:
        return {}
    rows = conn.execute(
        _HEARTBEAT,
        {
            "lease": float(lease_seconds),
            "ids": _array_literal(i for i, _ in leases),
            "keys": _array_literal(k for _, k in leases),
        },
    ).fetchall()
    return {r[0]: r[1] for r in rows}


_PROGRESS = f"""
UPDATE jobvisor.jobs j
SET progress = (SELECT %(progress)s::real[])[{_AT}],
    progress_note = left((SELECT %(notes)s::text[])[{_AT}], 200), updated_at = now()
WHERE {_FENCED}
"""


def save_progress(
    conn: psycopg.Connection, items: Sequence[tuple[int, LeaseKey, float, str | None]]
) -> None:
    if not items:
        return
    conn.execute(
        _PROGRESS,
        {
            "ids": _array_literal(i[0] for i in items),
            "keys": _array_literal(i[1] for i in items),
            "progress": [min(1.0, max(0.0, float(i[2]))) for i in items],
            "notes": [i[3] for i in items],
        },
    )


# --- finished counts -------------------------------------------------------------------
# Finished jobs are counted in jobvisor.job_counts (sql/007) by the very statement that
# moves a job into a finished status or out of one, as a data-modifying CTE (always run,
# referenced or not): the counts commit or roll back with the change, and reading them
# needs no scan of the retained finished rows. Each (type, status) is summed over shards;
# `jobvisor.count_shard` gives the writer one no other transaction holds, so concurrent
# acknowledgements never wait on each other's counter row.

FINISHED = ("completed", "failed", "cancelled")


def _counted(rows: str, *, status: str = "status", sign: str = "") -> str:
    """The CTE `counted` that adds (or, with sign '-', takes off) the finished rows of
    CTE `rows`, by `job_type` and the `status` column named."""
    return f"""counted AS (
    INSERT INTO jobvisor.job_counts AS c (job_type, status, shard, n)
    SELECT g.job_type, g.status, jobvisor.count_shard(g.job_type, g.status), g.n
    FROM (SELECT job_type, {status} AS status, {sign}count(*) AS n FROM {rows}
          WHERE {status} IN ('completed', 'failed', 'cancelled')
          GROUP BY 1, 2) g
    ORDER BY g.job_type, g.status
    ON CONFLICT (job_type, status, shard) DO UPDATE SET n = c.n + excluded.n
)"""


# --- finishing (fenced) ---------------------------------------------------------------

# Finishing statements stamp clock_timestamp(): a statement in a transaction that began
# before the work (a handler's own) must still record when the job really finished.
_COMPLETED_SET = f"""
    SET status = 'completed', result = (SELECT %(results)s::jsonb[])[{_AT}], progress = 1,
        lease_key = NULL, leased_until = NULL, error_code = NULL, error_message = NULL,
        finished_at = clock_timestamp(), updated_at = clock_timestamp()
    WHERE {_FENCED}"""

_COMPLETE = f"""
WITH changed AS (
    UPDATE jobvisor.jobs j{_COMPLETED_SET}
    RETURNING j.id, j.job_type, j.status
), {_counted("changed")}
SELECT id FROM changed
"""

# A type that keeps no history of completed jobs (`keep_completed: false`) deletes them as
# they complete, in the same fenced statement: no new row version, no index entry, a
# fraction of the WAL, nothing for retention to prune later. They are not counted either
# (the counts are of the finished jobs retention keeps). Kept all the same, as any other
# type's: a job of a batch or with a callback (the batch's counters and the webhook read
# it as it finishes) and one with a sticky idempotency key (a cron slot stays taken).
_DISCARDABLE = "j.batch_id IS NULL AND j.callback_url IS NULL AND NOT j.key_sticky"

_COMPLETE_DISCARDING = f"""
WITH removed AS (
    DELETE FROM jobvisor.jobs j
    WHERE {_FENCED}
      AND {_DISCARDABLE}
    RETURNING j.id
), changed AS (
    UPDATE jobvisor.jobs j{_COMPLETED_SET}
      AND NOT ({_DISCARDABLE})
    RETURNING j.id, j.job_type, j.status
), {_counted("changed")}
SELECT id FROM removed UNION ALL SELECT id FROM changed
"""


def _array_literal(values: Iterable[int | LeaseKey]) -> str:
    """Ids or lease keys as one array literal (`{1,2,3}`), cast in the statement: a
    list is dumped element by element, a cost the runtime paid per acknowledged job."""
    return "{" + ",".join(map(str, values)) + "}"


def complete_many(
    conn: psycopg.Connection, items: Sequence[tuple[int, LeaseKey, Any]], *,
    encoded: bool = False, keep: bool = True,
) -> set[int]:
    """Complete many jobs in one statement; returns the ids whose lease still held.

    With `encoded`, each result is already JSON text (or None), as the runtime checks it
    before the batch is sent (see `encode_result`). Without `keep`, jobs that nothing
    else reads once they finish are deleted instead (see `_COMPLETE_DISCARDING`).
    """
    if not items:
        return set()
    if encoded:
        results: list[Any] = [i[2] for i in items]
    else:
        results = [None if i[2] is None else Jsonb(i[2]) for i in items]
    rows = conn.execute(
        _COMPLETE if keep else _COMPLETE_DISCARDING,
        {"ids": _array_literal(i[0] for i in items), "keys": _array_literal(i[1] for i in items),
         "results": results},
    ).fetchall()
    return {r[0] for r in rows}


def complete(conn: psycopg.Connection, job_id: int, lease_key: LeaseKey, result: Any, *,
             encoded: bool = False, keep: bool = True) -> bool:
    return bool(complete_many(conn, [(job_id, lease_key, result)], encoded=encoded, keep=keep))


_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class ResultError(ValueError):
    """A handler's result that jsonb cannot hold."""


class PayloadError(ValueError):
    """A payload that jsonb cannot hold or a worker could not decode; the message names
    the problem, never the payload's content."""


# Deeper than this, a worker's `json.loads` (recursion-bounded, in a thread) may fail to
# decode what PostgreSQL stored: refused at enqueue instead of failing the job later.
MAX_PAYLOAD_DEPTH = 500


def _jsonb_text(value: Any, what: str, error: type[ValueError]) -> str:
    """`value` as the JSON text jsonb will accept, or `error` naming why not.

    `json.dumps` accepts what jsonb refuses: NaN and Infinity, NUL characters (jsonb
    text can't hold U+0000) and lone surrogates (not UTF-8).
    """
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except RecursionError:
        raise error(f"{what} nesting is too deep") from None
    except ValueError as exc:
        problem = ("a circular reference" if "ircular" in str(exc)
                   else "NaN or Infinity")  # allow_nan=False
        raise error(f"{what} holds {problem} (not JSON)") from None
    except TypeError as exc:  # names the Python type, not the value
        raise error(f"{what} is not JSON: {exc}"[:200]) from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} holds a lone surrogate (not UTF-8)") from None
    if _NUL_ESCAPE.search(text):
        raise error(f"{what} holds a NUL character (\\u0000), which jsonb can't store")
    return text


def encode_result(result: Any) -> str | None:
    """The result as the JSON text jsonb will accept, or ResultError naming why not."""
    if result is None:
        return None
    return _jsonb_text(result, "result", ResultError)


def payload_depth(value: Any, limit: int = MAX_PAYLOAD_DEPTH) -> int:
    """How deeply lists and dicts nest in `value` (a scalar is 0), without recursion;
    stops once past `limit`, so a cyclic structure ends too."""
    deepest, stack = 0, [(value, 1)]
    seen: dict[int, int] = {}  # container id -> the deepest level it was walked at
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list | tuple) or seen.get(id(item), 0) >= depth:
            continue
        seen[id(item)] = depth
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict)
                                                      else item))
    return deepest


def check_payload(payload: Any) -> None:
    """PayloadError if jsonb can't store `payload` or a worker couldn't decode it; for
    producers that want a refusal before anything is sent (`jobvisor enqueue`)."""
    if payload_depth(payload) > MAX_PAYLOAD_DEPTH:
        raise PayloadError(f"payload nesting deeper than {MAX_PAYLOAD_DEPTH} levels")
    _jsonb_text(payload, "payload", PayloadError)


# Cancel wins: a job whose cancel was requested ends cancelled rather than running again.
# Counted by the new status, so only when the job did finish (not when queued again).
_RETRY_OR_FAIL = f"""
WITH changed AS (
    UPDATE jobvisor.jobs j
    SET status = CASE WHEN j.cancel_requested THEN 'cancelled'
                      WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'queued' END,
        visible_at = CASE WHEN j.cancel_requested OR j.attempts >= j.max_attempts
                          THEN j.visible_at
                          ELSE clock_timestamp() + make_interval(secs => %(delay)s) END,
        finished_at = CASE WHEN j.cancel_requested OR j.attempts >= j.max_attempts
                           THEN clock_timestamp() END,
        lease_key = NULL, leased_until = NULL,
        error_code = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE %(code)s END,
        error_message = CASE WHEN j.cancel_requested THEN 'cancelled by request'
                             ELSE %(message)s END,
        errors = jobvisor.push_error(j.errors, j.attempts, %(code)s, %(message)s),
        updated_at = clock_timestamp()
    WHERE j.id = %(id)s AND j.lease_key = %(key)s AND j.leased_until IS NOT NULL  -- leased (see _FENCED)
    RETURNING j.job_type, j.status, j.error_code
), {_counted("changed")}
SELECT status, job_type, error_code FROM changed
"""

_FAIL = f"""
WITH changed AS (
    UPDATE jobvisor.jobs j
    SET status = %(status)s, finished_at = clock_timestamp(), lease_key = NULL,
        leased_until = NULL, error_code = %(code)s, error_message = %(message)s,
        errors = jobvisor.push_error(j.errors, j.attempts, %(code)s, %(message)s),
        updated_at = clock_timestamp()
    WHERE j.id = %(id)s AND j.lease_key = %(key)s AND j.leased_until IS NOT NULL  -- leased (see _FENCED)
    RETURNING j.job_type, j.status, j.error_code
), {_counted("changed")}
SELECT status, job_type, error_code FROM changed
"""


def retry(
    conn: psycopg.Connection,
    job_id: int,
    lease_key: LeaseKey,
    *,
    code: str,
    message: str | None,
    delay: float,
) -> str | None:
    """Queue the job again after `delay`, or fail it when its attempts are used up (or
    cancel it, when a cancel was requested meanwhile). The attempt's error is added to
    the job's history.

    Returns the new status, or None when the lease was lost (nothing changed).
    """
    with _atomic(conn):
        row = conn.execute(
            _RETRY_OR_FAIL,
            {"id": job_id, "key": lease_key, "code": code, "message": _clip(message),
             "delay": float(delay)},
        ).fetchone()
        if row:
            plugins.dispatch_outcomes(conn, [JobEvent(job_id, row[1], "leased", row[0], row[2])])
    return row[0] if row else None


def fail(
    conn: psycopg.Connection,
    job_id: int,
    lease_key: LeaseKey,
    *,
    code: str,
    message: str | None,
    status: str = "failed",
) -> bool:
    """Finish the job as failed (or cancelled) now, whatever attempts are left."""
    if status not in ("failed", "cancelled"):
        raise ValueError(f"fail() cannot set status {status!r}")
    with _atomic(conn):
        row = conn.execute(
            _FAIL,
            {"id": job_id, "key": lease_key, "code": code, "message": _clip(message),
             "status": status},
        ).fetchone()
        if row:
            plugins.dispatch_outcomes(conn, [JobEvent(job_id, row[1], "leased", row[0], row[2])])
    return row is not None


_PUT_BACK = f"""
WITH back AS (
    UPDATE jobvisor.jobs j
    SET status = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'queued' END,
        finished_at = CASE WHEN j.cancel_requested THEN clock_timestamp() END,
        error_code = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE j.error_code END,
        error_message = CASE WHEN j.cancel_requested THEN 'cancelled by request'
                             ELSE j.error_message END,
        attempts = greatest(j.attempts - 1, 0), lease_key = NULL, leased_until = NULL,
        suspect = j.suspect OR %(suspect)s,
        visible_at = clock_timestamp(), updated_at = clock_timestamp()
    WHERE {_FENCED}
    RETURNING j.id, j.job_type, j.status, j.error_code
), {_counted("back")}
-- Identical notifications in one transaction are delivered once.
SELECT id, job_type, status, error_code,
       CASE WHEN status = 'queued' THEN pg_notify(jobvisor.jobs_channel(job_type), '') END
FROM back
"""


def put_back(conn: psycopg.Connection, leases: Sequence[tuple[int, LeaseKey]], *,
             suspect: bool = False) -> set[int]:
    """Return unfinished jobs to the queue without counting the attempt (shutdown).

    With `suspect`, they were beside a job that took their process down (memory): each
    then runs alone. A job whose cancel was requested is cancelled instead.
    """
    if not leases:
        return set()
    with _atomic(conn):
        rows = conn.execute(
            _PUT_BACK, {"ids": _array_literal(i for i, _ in leases),
                        "keys": _array_literal(k for _, k in leases), "suspect": suspect}
        ).fetchall()
        plugins.dispatch_outcomes(conn, [JobEvent(r[0], r[1], "leased", r[2], r[3]) for r in rows])
    return {r[0] for r in rows}


# --- housekeeping (supervisor, CLI) -------------------------------------------------------

_RESCUE = f"""
WITH expired AS (
    SELECT id FROM jobvisor.jobs
    WHERE status = 'leased' AND leased_until < now()
    FOR UPDATE SKIP LOCKED
), changed AS (
    UPDATE jobvisor.jobs j
    SET status = CASE WHEN j.cancel_requested THEN 'cancelled'
                      WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'queued' END,
        finished_at = CASE WHEN j.cancel_requested OR j.attempts >= j.max_attempts
                           THEN clock_timestamp() END,
        visible_at = clock_timestamp(), lease_key = NULL, leased_until = NULL,
        error_code = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE %(code)s END,
        error_message = CASE WHEN j.cancel_requested THEN 'cancelled by request'
                             ELSE %(message)s END,
        errors = jobvisor.push_error(j.errors, j.attempts, %(code)s, %(message)s),
        updated_at = clock_timestamp()
    FROM expired
    WHERE j.id = expired.id
    RETURNING j.id, j.job_type, j.status, j.error_code
), {_counted("changed")}
SELECT c.id, c.job_type, c.status, c.error_code,
       CASE WHEN c.status = 'queued' THEN pg_notify(jobvisor.jobs_channel(c.job_type), '') END
FROM changed c
"""

# A dead worker's leases. Held alone, the job is the culprit and its attempt counts (it
# fails once attempts are used up). Held beside others, nobody knows which did it: all
# go back uncounted as suspects, and each then runs alone (see `lease`), so a second
# death is charged to the one that caused it. Prefetched jobs count as held: the
# database can't tell them from started ones, and a re-run alone costs them only a wait.
_RESCUE_WORKER = f"""
WITH held AS (
    SELECT id FROM jobvisor.jobs
    WHERE status = 'leased' AND leased_by = %(by)s
    FOR UPDATE
), alone AS (
    SELECT count(*) = 1 AS yes FROM held
), changed AS (
    UPDATE jobvisor.jobs j
    SET status = CASE WHEN j.cancel_requested THEN 'cancelled'
                      WHEN a.yes AND j.attempts >= j.max_attempts THEN 'failed'
                      ELSE 'queued' END,
        finished_at = CASE WHEN j.cancel_requested OR (a.yes AND j.attempts >= j.max_attempts)
                           THEN clock_timestamp() END,
        attempts = CASE WHEN a.yes THEN j.attempts ELSE greatest(j.attempts - 1, 0) END,
        suspect = true,
        visible_at = clock_timestamp(), lease_key = NULL, leased_until = NULL,
        error_code = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE %(code)s END,
        error_message = CASE WHEN j.cancel_requested THEN 'cancelled by request'
                             WHEN a.yes THEN %(message)s
                             ELSE %(message)s || ' beside other jobs (not counted; runs alone next)'
                        END,
        errors = jobvisor.push_error(j.errors, j.attempts, %(code)s,
                                     CASE WHEN a.yes THEN %(message)s
                                          ELSE %(message)s || ' beside other jobs (not counted)'
                                     END),
        updated_at = clock_timestamp()
    FROM held, alone a
    WHERE j.id = held.id
    RETURNING j.id, j.job_type, j.status, a.yes, j.error_code
), {_counted("changed")}
SELECT c.id, c.job_type, c.status, c.yes, c.error_code,
       CASE WHEN c.status = 'queued' THEN pg_notify(jobvisor.jobs_channel(c.job_type), '') END
FROM changed c
"""

WORKER_DIED = "worker_died"


def rescue(conn: psycopg.Connection, *, leased_by: str | None = None,
           code: str = WORKER_DIED) -> list[tuple[int, str, str]]:
    """Requeue expired leases, or (with `leased_by`) every lease of a dead worker.

    Expired: the attempt that was running counts; a job out of attempts fails instead.
    A dead worker's leases: see `rescue_worker`. Returns (id, job_type, new status).
    """
    if leased_by is not None:
        return [(r[0], r[1], r[2]) for r in rescue_worker(conn, leased_by, code=code)]
    with _atomic(conn):
        rows = conn.execute(
            _RESCUE, {"code": "lease_expired", "message": "lease expired before the job finished"}
        ).fetchall()
        plugins.dispatch_outcomes(conn, [JobEvent(r[0], r[1], "leased", r[2], r[3]) for r in rows])
    return [(r[0], r[1], r[2]) for r in rows]


def rescue_worker(conn: psycopg.Connection, leased_by: str, *, code: str = WORKER_DIED,
                  message: str | None = None) -> list[tuple[int, str, str, bool]]:
    """Put a dead worker's leases back at once; returns (id, type, status, charged).

    `code` says how it died (`worker_died`, `<type>_memory_exceeded`). A job it held
    alone is charged the attempt; jobs it held together become suspects, uncounted.
    """
    if message is None:
        message = ("the worker process running this job died" if code == WORKER_DIED
                   else f"the worker process running this job was stopped: {code}")
    with conn.transaction():
        # Its backend may still hold a row lock for a moment after the process died.
        conn.execute("SET LOCAL lock_timeout = '5s'")
        rows = conn.execute(
            _RESCUE_WORKER, {"by": leased_by, "code": code, "message": _clip(message)}
        ).fetchall()
        plugins.dispatch_outcomes(conn, [JobEvent(r[0], r[1], "leased", r[2], r[4]) for r in rows])
    return [(r[0], r[1], r[2], bool(r[3])) for r in rows]


_CANCEL = f"""
WITH target AS (
    SELECT id, status FROM jobvisor.jobs WHERE id = %(id)s FOR UPDATE
), done AS (
    UPDATE jobvisor.jobs j
    SET status = CASE WHEN t.status = 'queued' THEN 'cancelled' ELSE j.status END,
        finished_at = CASE WHEN t.status = 'queued' THEN now() ELSE j.finished_at END,
        cancel_requested = (t.status = 'leased'), updated_at = now()
    FROM target t
    WHERE j.id = t.id AND t.status IN ('queued', 'leased')
    RETURNING j.id, j.job_type, j.status, j.error_code
), {_counted("done")}
SELECT d.status, CASE WHEN d.status = 'leased'
                      THEN pg_notify('jobvisor_cancel', d.id::text) END,
       d.job_type, d.error_code
FROM done d
"""


def cancel(conn: psycopg.Connection, job_id: int) -> str | None:
    """Cancel a queued job, or ask a running one to stop ('cancel requested').

    Returns 'cancelled', 'cancel_requested', or None when the job is not live.
    """
    with _atomic(conn):
        row = conn.execute(_CANCEL, {"id": job_id}).fetchone()
        if row is not None and row[0] == "cancelled":
            plugins.dispatch_outcomes(conn, [JobEvent(job_id, row[2], "queued", "cancelled", row[3])])
    if row is None:
        return None
    return "cancelled" if row[0] == "cancelled" else "cancel_requested"


# Taken off the count of the status it leaves, read from the row it locked.
_RETRY_FAILED = f"""
WITH target AS (
    SELECT id, status FROM jobvisor.jobs
    WHERE id = %(id)s AND status IN ('failed', 'cancelled')
    FOR UPDATE
), changed AS (
    UPDATE jobvisor.jobs j
    SET status = 'queued', attempts = 0, visible_at = now(), finished_at = NULL,
        cancel_requested = false, error_code = NULL, error_message = NULL,
        result = NULL, progress = NULL, progress_note = NULL, updated_at = now(),
        -- A job that failed before its type was fair comes back with a key (sql/009).
        fair_key = coalesce(j.fair_key, (SELECT jobvisor.fair_key_of(j.payload, f.path)
                                         FROM jobvisor.fair_types f
                                         WHERE f.job_type = j.job_type))
    FROM target t
    WHERE j.id = t.id
    RETURNING j.id, j.job_type, t.status AS was
), {_counted("changed", status="was", sign="-")}
SELECT id, pg_notify(jobvisor.jobs_channel(job_type), ''), job_type, was FROM changed
"""


def retry_failed(conn: psycopg.Connection, job_id: int) -> bool:
    """Queue a failed or cancelled job again with fresh attempts (operator request)."""
    try:
        with _atomic(conn):
            row = conn.execute(_RETRY_FAILED, {"id": job_id}).fetchone()
            if row is not None:
                plugins.dispatch_outcomes(conn, [JobEvent(job_id, row[2], row[3], "queued", None)])
        return row is not None
    except psycopg.errors.UniqueViolation:
        # Its idempotency key is held by a newer live job: running it twice is wrong.
        return False


_PRUNE = f"""
WITH gone AS (
    DELETE FROM jobvisor.jobs
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM jobvisor.jobs
        WHERE finished_at IS NOT NULL AND status = %(status)s
          AND finished_at < now() - make_interval(secs => %(age)s)
        LIMIT %(limit)s))
    RETURNING job_type, status
), {_counted("gone", sign="-")}
SELECT count(*) FROM gone
"""


def prune(conn: psycopg.Connection, retention: dict[str, float], *, limit: int = 10_000,
          rounds: int | None = None) -> int:
    """Delete finished jobs older than their status's retention (seconds), in chunks of
    `limit`; with `rounds`, at most that many chunks per status (the caller goes on later)."""
    removed = 0
    for status, age in retention.items():
        if status not in FINISHED:
            raise ValueError(f"retention for unknown status {status!r}")
        done = 0
        while rounds is None or done < rounds:
            # Never prepared: a generic plan can't see the cutoff and, guessing a third
            # of the rows old enough, may scan them all (see sql/007).
            (n,) = conn.execute(_PRUNE, {"status": status, "age": float(age), "limit": limit},
                                prepare=False).fetchone()
            removed += n
            done += 1
            if n < limit:
                break
    return removed


# --- fair share configuration (supervisor; sql/009) ------------------------------------

@dataclass(frozen=True)
class FairShare:
    """A type's `fair_by` settings: the payload field (dots for nested fields), weights
    by key (default 1) and the optional cap on leased jobs per key."""

    field: str
    weights: dict[str, float] = field(default_factory=dict)
    max_running_per_key: int | None = None


def configure_fair_share(conn: psycopg.Connection, types: dict[str, FairShare],
                         served: Iterable[str]) -> bool:
    """Make `jobvisor.fair_types` say what `types` says for the types in `served` (the
    ones the caller configures; other rows are left alone). Returns whether the set of
    fair types changed, which takes a lock on the jobs for a moment (see sql/009);
    psycopg.errors.LockNotAvailable when that lock did not come within 2 s."""
    spec = {name: {"field": f.field, "weights": dict(f.weights),
                   "max_running_per_key": f.max_running_per_key}
            for name, f in types.items()}
    row = conn.execute("SELECT jobvisor.configure_fair_share(%s, %s)",
                       (Jsonb(spec), sorted(set(served) | set(types)))).fetchone()
    return bool(row[0])


def key_fair_backlog(conn: psycopg.Connection, limit: int = 5000) -> tuple[int, bool]:
    """Key up to `limit` per type of the live jobs queued before their type was fair;
    returns (how many, whether some type may still have more)."""
    pending = [r[0] for r in conn.execute(
        "SELECT job_type FROM jobvisor.fair_types WHERE NOT backlog_done ORDER BY job_type")]
    keyed = 0
    for job_type in pending:
        keyed += conn.execute("SELECT jobvisor.fair_key_backlog(%s, %s)",
                              (job_type, limit)).fetchone()[0]
    more = bool(pending) and bool(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM jobvisor.fair_types WHERE NOT backlog_done)").fetchone()[0])
    return keyed, more


# --- reading -----------------------------------------------------------------------------

# Live jobs through the partial indexes over their statuses (jobs_lease_order, jobs_leased);
# finished ones from their counts. One statement: one snapshot, so the figures agree.
_COUNTS = """
SELECT job_type, 'queued', count(*),
       extract(epoch FROM now() - min(visible_at) FILTER (WHERE visible_at <= now()))
FROM jobvisor.jobs WHERE status = 'queued' GROUP BY job_type
UNION ALL
SELECT job_type, 'leased', count(*), NULL
FROM jobvisor.jobs WHERE status = 'leased' GROUP BY job_type
UNION ALL
SELECT job_type, status, sum(n)::bigint, NULL
FROM jobvisor.job_counts GROUP BY job_type, status HAVING sum(n) <> 0
"""


def status_counts(conn: psycopg.Connection) -> dict[str, dict[str, float]]:
    """Per type: counts by status and the age of the oldest visible queued job.

    Reads no finished row: finished counts are kept in jobvisor.job_counts (sql/007), so
    this stays cheap however many finished jobs retention keeps.
    """
    out: dict[str, dict[str, float]] = {}
    for job_type, status, count, oldest in conn.execute(_COUNTS).fetchall():
        entry = out.setdefault(job_type, {s: 0 for s in STATUSES} | {"oldest_queued_s": 0.0})
        entry[status] = count
        if oldest is not None:
            entry["oldest_queued_s"] = round(max(0.0, float(oldest)), 3)
    return out


_GET = """
SELECT id, job_type, payload::text AS payload, priority, status, attempts, max_attempts,
       visible_at, leased_by, leased_until, cancel_requested, error_code, error_message,
       result::text AS result,
       progress, progress_note, idempotency_key, batch_id, created_at, updated_at,
       started_at, finished_at, suspect, errors
FROM jobvisor.jobs WHERE id = %(id)s
"""


def get_job(conn: psycopg.Connection, job_id: int) -> dict[str, Any] | None:
    """One job, all of it. A payload or result Python can't decode (nesting too deep) is
    None, with `payload_error` / `result_error` saying why, instead of an exception."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_GET, {"id": job_id}).fetchone()
    if row is None:
        return None
    for key in ("payload", "result"):
        row[key], error = _decode_payload(row[key])
        if error:
            row[f"{key}_error"] = error
    return row


# --- batches -------------------------------------------------------------------------------
# Totals and counts are kept by the triggers of sql/004_batches.sql, in the transaction
# that inserts or finishes a job; nothing here writes a counter.

MAX_BATCH_ID = 200

_UPSERT_BATCH = """
INSERT INTO jobvisor.batches AS x (id, callback_url)
VALUES (%(batch_id)s, %(batch_callback)s)
ON CONFLICT (id) DO UPDATE
    SET callback_url = excluded.callback_url, updated_at = now()
    WHERE excluded.callback_url IS NOT NULL
"""

# The batch row and its jobs in one statement: one round trip, and no moment at which
# the batch exists without its jobs. (Totals are added by the INSERT trigger, which sees
# this statement's batch row.)
_ENQUEUE_IN_BATCH = f"WITH batch AS ({_UPSERT_BATCH} RETURNING x.id)\n{_ENQUEUE}"


def _check_batch_id(batch_id: str) -> None:
    if not isinstance(batch_id, str) or not batch_id.strip() or len(batch_id) > MAX_BATCH_ID \
            or not batch_id.isprintable():
        raise ValueError(f"batch id must be 1..{MAX_BATCH_ID} printable characters")


def _callback_checker() -> Callable[[str], None]:
    """A check of callback URLs against the allow-list, read from the environment once,
    at the first URL (not once per job)."""
    allowed: list[str] | None = None

    def check(url: str) -> None:
        nonlocal allowed
        if allowed is None:
            allowed = webhooks.allowed_hosts()
        webhooks.check_url(url, allowed)
    return check


def _check_callbacks(urls: Iterable[str | None]) -> None:
    check = _callback_checker()
    for url in urls:
        if url is not None:
            check(url)


def create_batch(conn: psycopg.Connection, batch_id: str, *,
                 callback_url: str | None = None) -> None:
    """Create a batch (total 0), or set the callback of an existing one.

    Jobs join it by carrying its id; a callback set after the batch finished never fires.
    """
    _check_batch_id(batch_id)
    _check_callbacks([callback_url])
    conn.execute(_UPSERT_BATCH, {"batch_id": batch_id, "batch_callback": callback_url})


def enqueue_batch(conn: psycopg.Connection, batch_id: str, jobs: Sequence[NewJob], *,
                  callback_url: str | None = None) -> list[int]:
    """Enqueue jobs of any types as one batch, creating it, in one round trip.

    Returns ids in input order (as `enqueue_many`). Enqueueing more into the same batch
    later adds to its total; run every part in one transaction when the batch has a
    callback, or it may fire between the parts.
    """
    _check_batch_id(batch_id)
    _check_callbacks([callback_url])
    if any(j.batch_id not in (None, batch_id) for j in jobs):
        raise ValueError(f"enqueue_batch({batch_id!r}): a job names another batch")
    if not jobs:
        create_batch(conn, batch_id, callback_url=callback_url)
        return []
    jobs = [j if j.batch_id == batch_id else replace(j, batch_id=batch_id) for j in jobs]
    return _enqueue_rows(conn, jobs, _ENQUEUE_IN_BATCH,
                         {"batch_id": batch_id, "batch_callback": callback_url}
                         | _many_rows(jobs))


_GET_BATCH = """
SELECT b.id, b.total, b.completed, b.failed, b.cancelled, b.callback_url, b.created_at,
       b.updated_at, b.finished_at,
       coalesce(live.queued, 0) AS queued, coalesce(live.leased, 0) AS leased,
       coalesce(live.running_progress, 0)::float8 AS running_progress,
       w.id AS webhook_job_id, w.status AS webhook_status, w.attempts AS webhook_attempts,
       w.max_attempts AS webhook_max_attempts, w.error_code AS webhook_error_code
FROM jobvisor.batches b
-- What is still to do, read from the jobs themselves; a finished batch has nothing.
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE j.status = 'queued') AS queued,
           count(*) FILTER (WHERE j.status = 'leased') AS leased,
           sum(j.progress) FILTER (WHERE j.status = 'leased') AS running_progress
    FROM jobvisor.jobs j
    WHERE j.batch_id = b.id AND j.finished_at IS NULL AND b.finished_at IS NULL
) live ON true
LEFT JOIN LATERAL (
    SELECT id, status, attempts, max_attempts, error_code FROM jobvisor.jobs
    WHERE idempotency_key = 'webhook:batch:' || b.id AND key_sticky
    ORDER BY id DESC LIMIT 1
) w ON b.callback_url IS NOT NULL
WHERE b.id = %(id)s
"""


def get_batch(conn: psycopg.Connection, batch_id: str) -> dict[str, Any] | None:
    """A batch: total, counts by status, `finished`, `progress` (finished jobs plus the
    reported progress of running ones, over the total) and its webhook delivery."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_GET_BATCH, {"id": batch_id}).fetchone()
    if row is None:
        return None
    webhook = None
    if row["webhook_job_id"] is not None:
        webhook = {"job_id": row["webhook_job_id"], "status": row["webhook_status"],
                   "attempts": row["webhook_attempts"],
                   "max_attempts": row["webhook_max_attempts"],
                   "error_code": row["webhook_error_code"]}
    for key in ("webhook_job_id", "webhook_status", "webhook_attempts",
                "webhook_max_attempts", "webhook_error_code"):
        del row[key]
    done = row["completed"] + row["failed"] + row["cancelled"]
    row["done"] = done
    row["finished"] = row["finished_at"] is not None
    row["progress"] = (round(min(1.0, (done + row["running_progress"]) / row["total"]), 4)
                       if row["total"] else 0.0)
    row["webhook"] = webhook
    return row


_PRUNE_BATCHES = """
DELETE FROM jobvisor.batches
WHERE id = ANY(ARRAY(
    SELECT id FROM jobvisor.batches
    WHERE finished_at < now() - make_interval(secs => %(age)s)
    LIMIT %(limit)s))
"""


def prune_batches(conn: psycopg.Connection, age: float, *, limit: int = 10_000,
                  rounds: int | None = None) -> int:
    """Delete batches finished longer than `age` seconds ago, in chunks (at most
    `rounds` of them when given)."""
    removed = 0
    done = 0
    while rounds is None or done < rounds:
        cur = conn.execute(_PRUNE_BATCHES, {"age": float(age), "limit": limit},
                           prepare=False)  # a plan that sees the cutoff, as prune's
        removed += cur.rowcount
        done += 1
        if cur.rowcount < limit:
            break
    return removed


# --- webhook deliveries ---------------------------------------------------------------------

def webhook_key(kind: str, ident: int | str) -> str:
    """The sticky idempotency key of the delivery for a job or a batch (sql/004)."""
    if kind not in ("job", "batch"):
        raise ValueError(f"webhook_key: kind must be 'job' or 'batch', got {kind!r}")
    return f"webhook:{kind}:{ident}"


_WEBHOOK_DELIVERY = """
SELECT id, status, attempts, max_attempts, error_code, error_message, created_at, finished_at
FROM jobvisor.jobs
WHERE idempotency_key = %(key)s AND key_sticky
ORDER BY id DESC LIMIT 1
"""


def webhook_delivery(conn: psycopg.Connection, key: str) -> dict[str, Any] | None:
    """The `webhook` job delivering for `key` (see `webhook_key`), or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_WEBHOOK_DELIVERY, {"key": key}).fetchone()


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A job row with timestamps as ISO strings, ready for json.dumps."""
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}



# --- operator views (dashboard) ------------------------------------------------------------
# Reads for people, not for the hot path: each is bounded by a LIMIT and selects ids, codes,
# counts and times only. Payloads, results, error messages and progress notes can carry
# student content, so none of them is read here.

_RECENT_FAILURES = """
SELECT id, job_type, error_code, attempts, max_attempts, finished_at
FROM jobvisor.jobs
WHERE status = 'failed' AND finished_at IS NOT NULL
ORDER BY finished_at DESC, id DESC
LIMIT %(limit)s
"""


def recent_failures(conn: psycopg.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently failed jobs, newest first: id, type, code, attempts, when."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_RECENT_FAILURES, {"limit": limit}).fetchall()


_RUNNING_JOBS = """
SELECT id, job_type, attempts, max_attempts, leased_by, started_at, progress,
       cancel_requested
FROM jobvisor.jobs
WHERE status = 'leased'
ORDER BY started_at, id
LIMIT %(limit)s
"""


def running_jobs(conn: psycopg.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """Leased jobs, longest running first (what an operator may want to cancel)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_RUNNING_JOBS, {"limit": limit}).fetchall()


_JOB_BRIEF = """
SELECT id, job_type, status, attempts, max_attempts, error_code
FROM jobvisor.jobs WHERE id = %(id)s
"""


def job_brief(conn: psycopg.Connection, job_id: int) -> dict[str, Any] | None:
    """A job's identity and state without payload or result (for audit logs)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_JOB_BRIEF, {"id": job_id}).fetchone()


_BATCHES_TABLE = "SELECT to_regclass('jobvisor.batches') IS NOT NULL"

_RECENT_BATCHES = """
SELECT id, total, completed, failed, cancelled, created_at, finished_at
FROM jobvisor.batches
ORDER BY (finished_at IS NULL) DESC, created_at DESC
LIMIT %(limit)s
"""


def recent_batches(conn: psycopg.Connection, limit: int = 20) -> list[dict[str, Any]] | None:
    """Open batches first, then the latest finished; None while the table doesn't exist.

    The callback URL is left out: it may carry a secret in its query string.
    """
    (exists,) = conn.execute(_BATCHES_TABLE).fetchone()
    if not exists:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_RECENT_BATCHES, {"limit": limit}).fetchall()
