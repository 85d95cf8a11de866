"""Queue semantics on a real PostgreSQL, statement by statement."""

from __future__ import annotations

import re
import threading

import psycopg
import pytest

from supervisor_app.migrate import migrate
from tests.helpers import counts
from workers.core import queue as q
from workers.core.runtime import backoff_delay


def test_enqueue_many_keeps_order_and_payload_unknown_fields(db):
    payloads = [{"n": i, "parameters": {"extra_field": [1, {"x": None}]}} for i in range(50)]
    ids = q.enqueue_many(db, [q.NewJob("noop", p) for p in payloads])
    assert ids == sorted(ids) and len(set(ids)) == 50
    stored = [q.get_job(db, i)["payload"] for i in ids]
    assert stored == payloads


def test_idempotent_enqueue_returns_live_job(db):
    first = q.enqueue(db, q.NewJob("noop", {"a": 1}, key="submission-7"))
    again = q.enqueue_many(db, [q.NewJob("noop", {"a": 2}, key="submission-7"),
                                q.NewJob("noop", {"a": 3})])
    assert again[0] == first and again[1] != first
    assert q.get_job(db, first)["payload"] == {"a": 1}
    # Once finished, a non-sticky key is free again.
    (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
    assert job.id == first
    assert q.complete(db, job.id, job.lease_key, None)
    assert q.enqueue(db, q.NewJob("noop", {}, key="submission-7")) != first


def test_sticky_key_stays_taken_after_completion(db):
    first = q.enqueue(db, q.NewJob("noop", {}, key="cron:backup:2026-01-01T03:00",
                                   sticky_key=True))
    (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
    q.complete(db, job.id, job.lease_key, None)
    again = q.enqueue(db, q.NewJob("noop", {}, key="cron:backup:2026-01-01T03:00",
                                   sticky_key=True))
    assert again == first
    assert counts(db) == {"completed": 1}


def test_lease_takes_highest_priority_then_oldest_and_skips_delayed(db):
    low = q.enqueue(db, q.NewJob("noop", {}, priority=0))
    high = q.enqueue(db, q.NewJob("noop", {}, priority=5))
    q.enqueue(db, q.NewJob("noop", {}, priority=9, delay=3600))
    low2 = q.enqueue(db, q.NewJob("noop", {}, priority=0))
    q.enqueue(db, q.NewJob("other", {}, priority=99))
    jobs = q.lease(db, "noop", 10, worker_id="w", lease_seconds=30)
    assert [j.id for j in jobs] == [high, low, low2]
    assert all(j.attempt == 1 for j in jobs)


def test_concurrent_leases_never_hand_out_a_job_twice(db_dsn, db):
    q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(400)])
    got: list[list[int]] = []

    def grab() -> None:
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            mine = []
            while batch := q.lease(conn, "noop", 7, worker_id="w", lease_seconds=30):
                mine += [j.id for j in batch]
            got.append(mine)

    threads = [threading.Thread(target=grab) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for mine in got for i in mine]
    assert len(ids) == 400 and len(set(ids)) == 400


def test_completion_with_a_stale_lease_key_changes_nothing(db):
    q.enqueue(db, q.NewJob("noop", {}))
    (old,) = q.lease(db, "noop", 1, worker_id="a", lease_seconds=0)
    assert q.rescue(db) == [(old.id, "noop", "queued")]
    (new,) = q.lease(db, "noop", 1, worker_id="b", lease_seconds=30)
    assert new.id == old.id and new.lease_key != old.lease_key and new.attempt == 2
    assert not q.complete(db, old.id, old.lease_key, {"by": "a"})
    assert q.retry(db, old.id, old.lease_key, code="x", message=None, delay=0) is None
    assert not q.fail(db, old.id, old.lease_key, code="x", message=None)
    assert q.heartbeat(db, [(old.id, old.lease_key)], 30) == {}
    assert q.complete(db, new.id, new.lease_key, {"by": "b"})
    assert q.get_job(db, new.id)["result"] == {"by": "b"}


def test_retry_until_max_attempts_then_failed_with_last_code(db):
    job_id = q.enqueue(db, q.NewJob("noop", {}, max_attempts=3))
    statuses = []
    for attempt in range(1, 4):
        (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
        assert job.attempt == attempt
        statuses.append(q.retry(db, job.id, job.lease_key, code=f"e{attempt}",
                                message="x" * 5000, delay=0))
    assert statuses == ["queued", "queued", "failed"]
    row = q.get_job(db, job_id)
    assert row["status"] == "failed" and row["error_code"] == "e3"
    assert len(row["error_message"]) == 1024 and row["finished_at"] is not None


def test_backoff_delays_grow_and_stop_at_the_cap():
    for _ in range(200):
        # base 5 s doubles to 80 s at attempt 5, capped at 80 s from there on.
        delays = [backoff_delay(a, 5.0, 80.0) for a in range(1, 10)]
        growing = delays[:5]
        assert all(later >= earlier for earlier, later in zip(growing, growing[1:], strict=False))
        assert 2.5 <= delays[0] <= 5.0
        assert all(40.0 <= d <= 80.0 for d in delays[4:])


def test_retried_job_is_invisible_until_its_backoff_passes(db):
    q.enqueue(db, q.NewJob("noop", {}))
    (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
    assert q.retry(db, job.id, job.lease_key, code="t", message=None, delay=3600) == "queued"
    assert q.lease(db, "noop", 1, worker_id="w", lease_seconds=30) == []
    db.execute("UPDATE jobvisor.jobs SET visible_at = now() WHERE id = %s", (job.id,))
    assert [j.id for j in q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)] == [job.id]


def test_put_back_does_not_count_the_attempt(db):
    q.enqueue(db, q.NewJob("noop", {}))
    (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
    assert q.put_back(db, [(job.id, job.lease_key)]) == {job.id}
    row = q.get_job(db, job.id)
    assert row["status"] == "queued" and row["attempts"] == 0


def test_rescue_of_a_worker_that_died_holding_one_job_charges_it_and_fails_when_out(db):
    a = q.enqueue(db, q.NewJob("noop", {}, max_attempts=1))
    q.lease(db, "noop", 1, worker_id="host:123:a", lease_seconds=300)
    q.enqueue(db, q.NewJob("noop", {}))
    q.lease(db, "noop", 1, worker_id="host:456:b", lease_seconds=300)
    rescued = q.rescue_worker(db, "host:123:a")
    assert rescued == [(a, "noop", "failed", True)]
    row = q.get_job(db, a)
    assert row["error_code"] == "worker_died" and row["attempts"] == 1
    assert [e["code"] for e in row["errors"]] == ["worker_died"]
    assert counts(db) == {"failed": 1, "leased": 1}


def test_rescue_of_a_worker_that_died_holding_several_keeps_their_attempts_as_suspects(db):
    ids = [q.enqueue(db, q.NewJob("noop", {}, max_attempts=1)) for _ in range(3)]
    q.lease(db, "noop", 3, worker_id="host:123:a", lease_seconds=300)
    rescued = q.rescue_worker(db, "host:123:a", code="noop_memory_exceeded")
    assert sorted(rescued) == [(i, "noop", "queued", False) for i in ids]
    for i in ids:
        row = q.get_job(db, i)
        assert row["attempts"] == 0 and row["suspect"]
        assert row["error_code"] == "noop_memory_exceeded"


def test_a_suspect_is_leased_alone_and_only_by_a_worker_holding_nothing(db):
    plain = q.enqueue(db, q.NewJob("noop", {}))
    suspects = [q.enqueue(db, q.NewJob("noop", {})) for _ in range(2)]
    db.execute("UPDATE jobvisor.jobs SET suspect = true WHERE id = ANY(%s)", (suspects,))
    busy = q.lease(db, "noop", 5, worker_id="w1", lease_seconds=30)
    assert [j.id for j in busy] == [plain]  # not alone: no suspect
    (first,) = q.lease(db, "noop", 5, worker_id="w2", lease_seconds=30, alone=True)
    assert first.id == suspects[0] and first.suspect
    (second,) = q.lease(db, "noop", 5, worker_id="w3", lease_seconds=30, alone=True)
    assert second.id == suspects[1]


def test_a_payload_python_cannot_decode_fails_only_its_own_lease_entry(db):
    deep = "[" * 6000 + "]" * 6000
    db.execute("INSERT INTO jobvisor.jobs (job_type, payload) VALUES ('noop', %s::jsonb)",
               (deep,))
    ok = q.enqueue(db, q.NewJob("noop", {"fine": True}))
    jobs = {j.id: j for j in q.lease(db, "noop", 5, worker_id="w", lease_seconds=30)}
    assert jobs[ok].payload == {"fine": True} and jobs[ok].payload_error is None
    (bad,) = [j for j in jobs.values() if j.id != ok]
    assert bad.payload is None and "too deep" in bad.payload_error


def test_cancel_wins_over_retry_rescue_and_put_back(db):
    ids = [q.enqueue(db, q.NewJob("noop", {})) for _ in range(3)]
    jobs = {j.id: j for j in q.lease(db, "noop", 3, worker_id="w", lease_seconds=30)}
    for i in ids:
        assert q.cancel(db, i) == "cancel_requested"
    assert q.retry(db, ids[0], jobs[ids[0]].lease_key, code="x", message=None,
                   delay=0) == "cancelled"
    assert q.put_back(db, [(ids[1], jobs[ids[1]].lease_key)]) == {ids[1]}
    db.execute("UPDATE jobvisor.jobs SET leased_until = now() - interval '1s' WHERE id = %s",
               (ids[2],))
    assert q.rescue(db) == [(ids[2], "noop", "cancelled")]
    for i in ids:
        row = q.get_job(db, i)
        assert row["status"] == "cancelled" and row["error_code"] == "cancelled"
    assert q.lease(db, "noop", 3, worker_id="w", lease_seconds=30) == []


def test_cancel_wins_over_the_rescue_of_a_dead_worker(db):
    # One worker died holding one job (charged: out of attempts it would fail), another
    # holding two (suspects, put back uncounted): a requested cancel wins over both.
    alone = q.enqueue(db, q.NewJob("noop", {}, max_attempts=1))
    q.lease(db, "noop", 1, worker_id="host:1:a", lease_seconds=300)
    together = [q.enqueue(db, q.NewJob("noop", {})) for _ in range(2)]
    q.lease(db, "noop", 2, worker_id="host:2:b", lease_seconds=300)
    for i in (alone, together[0]):
        assert q.cancel(db, i) == "cancel_requested"
    assert q.rescue_worker(db, "host:1:a") == [(alone, "noop", "cancelled", True)]
    assert sorted(q.rescue_worker(db, "host:2:b")) == [(together[0], "noop", "cancelled", False),
                                                        (together[1], "noop", "queued", False)]
    for i in (alone, together[0]):
        row = q.get_job(db, i)
        assert row["status"] == "cancelled" and row["error_code"] == "cancelled"
        assert row["finished_at"] is not None and row["leased_until"] is None
    assert counts(db) == {"cancelled": 2, "queued": 1}
    assert q.status_counts(db)["noop"]["cancelled"] == 2  # the finished counts agree
    # Only the innocent job runs again.
    assert [j.id for j in q.lease(db, "noop", 3, worker_id="w", lease_seconds=30,
                                  alone=True)] == [together[1]]


def test_each_attempt_error_is_kept_and_the_history_is_bounded(db):
    job_id = q.enqueue(db, q.NewJob("noop", {}, max_attempts=q.MAX_ERRORS + 3))
    for n in range(1, q.MAX_ERRORS + 3):
        db.execute("UPDATE jobvisor.jobs SET visible_at = now() WHERE id = %s", (job_id,))
        (job,) = q.lease(db, "noop", 1, worker_id="w", lease_seconds=30)
        q.retry(db, job.id, job.lease_key, code=f"e{n}", message=f"attempt {n}", delay=0)
    errors = q.get_job(db, job_id)["errors"]
    assert len(errors) == q.MAX_ERRORS
    assert [e["code"] for e in errors] == [f"e{n}" for n in range(3, q.MAX_ERRORS + 3)]
    assert errors[-1]["attempt"] == q.MAX_ERRORS + 2 and errors[-1]["message"] == \
        f"attempt {q.MAX_ERRORS + 2}"


@pytest.mark.parametrize("result, why", [
    (float("nan"), "not JSON"), ({"x": float("inf")}, "not JSON"), ("a\u0000b", "NUL"),
    ({"k": ["\ud800"]}, "surrogate"), (object(), "not JSON"),
])
def test_encode_result_refuses_what_jsonb_cannot_hold(result, why):
    with pytest.raises(q.ResultError, match=why):
        q.encode_result(result)


def test_encode_result_keeps_an_escaped_backslash_before_u0000(db):
    text = q.encode_result({"s": "\\u0000"})  # a backslash, then the letters u0000
    (back,) = db.execute("SELECT %s::jsonb ->> 's'", (text,)).fetchone()
    assert back == "\\u0000"


def test_worker_channels_are_per_type_and_match_the_sql_function(db):
    for name in ("noop", "a" * 60, "b" * 63, "x" * 61):
        (sql_name,) = db.execute("SELECT jobvisor.jobs_channel(%s)", (name,)).fetchone()
        assert sql_name == q.jobs_channel(name) and len(sql_name) <= 63
    assert q.jobs_channel("b" * 63) != q.jobs_channel("b" * 62)


def test_cancel_queued_and_running_and_retry_failed(db):
    queued = q.enqueue(db, q.NewJob("noop", {}))
    running = q.enqueue(db, q.NewJob("other", {}))
    (job,) = q.lease(db, "other", 1, worker_id="w", lease_seconds=30)
    assert q.cancel(db, queued) == "cancelled"
    assert q.cancel(db, running) == "cancel_requested"
    assert q.heartbeat(db, [(job.id, job.lease_key)], 30) == {running: True}
    assert q.cancel(db, queued) is None
    assert q.retry_failed(db, queued)
    assert q.get_job(db, queued)["status"] == "queued"
    assert not q.retry_failed(db, queued)


def test_prune_removes_only_old_finished_rows(db):
    ids = q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(4)])
    jobs = q.lease(db, "noop", 3, worker_id="w", lease_seconds=30)
    q.complete_many(db, [(j.id, j.lease_key, None) for j in jobs[:2]])
    q.fail(db, jobs[2].id, jobs[2].lease_key, code="x", message=None)
    db.execute("UPDATE jobvisor.jobs SET finished_at = now() - interval '8 days' "
               "WHERE id = %s", (jobs[0].id,))
    removed = q.prune(db, {"completed": 7 * 86400, "failed": 30 * 86400})
    assert removed == 1
    assert q.get_job(db, jobs[0].id) is None and q.get_job(db, ids[3]) is not None


def test_global_limit_caps_leased_jobs_of_a_type(db):
    q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(10)])
    assert len(q.lease(db, "noop", 5, worker_id="a", lease_seconds=30, global_limit=3)) == 3
    assert q.lease(db, "noop", 5, worker_id="b", lease_seconds=30, global_limit=3) == []


def test_notify_is_sent_on_enqueue_on_the_type_channel_only(db_dsn, db):
    with psycopg.connect(db_dsn, autocommit=True) as listener:
        listener.execute(f'LISTEN "{q.jobs_channel("noop")}"')
        q.enqueue_many(db, [q.NewJob("sleep", {})])
        q.enqueue_many(db, [q.NewJob("noop", {}), q.NewJob("noop", {}), q.NewJob("sleep", {})])
        got = [n.channel for n in listener.notifies(timeout=2)]
    assert got == [q.jobs_channel("noop")]  # one per statement, none for the other type


def test_one_insert_notifies_each_queued_type_once_and_counts_each_batch(db_dsn, db):
    """sql/012's one trigger does both jobs of the two it replaced, in one statement: a
    NOTIFY per queued type (none for a type whose rows are not queued), and each batch's
    total; a row without a batch makes no batch row."""
    with psycopg.connect(db_dsn, autocommit=True) as listener:
        for t in ("noop", "sleep", "fail"):
            listener.execute(f'LISTEN "{q.jobs_channel(t)}"')
        db.execute("""
            INSERT INTO jobvisor.jobs (job_type, batch_id, status, finished_at) VALUES
                ('noop', 'b-2', 'queued', NULL), ('noop', 'b-1', 'queued', NULL),
                ('sleep', NULL, 'queued', NULL), ('noop', 'b-2', 'queued', NULL),
                ('fail', 'b-1', 'cancelled', now())""")
        got = sorted(n.channel for n in listener.notifies(timeout=2))
    assert got == sorted([q.jobs_channel("noop"), q.jobs_channel("sleep")])
    assert (q.get_batch(db, "b-1")["total"], q.get_batch(db, "b-1")["cancelled"]) == (2, 1)
    assert q.get_batch(db, "b-2")["total"] == 2
    q.enqueue(db, q.NewJob("noop", {}))
    assert db.execute("SELECT count(*) FROM jobvisor.batches").fetchone()[0] == 2


def test_migrations_are_idempotent_and_race_free(empty_dsn):
    dsn = empty_dsn
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(dsn))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    applied = [r for r in results if r]
    assert len(applied) == 1 and applied[0][0] == "001_queue"
    assert migrate(dsn) == []
    with psycopg.connect(dsn) as conn:
        (n,) = conn.execute("SELECT count(*) FROM jobvisor.schema_migrations").fetchone()
    assert n == len(applied[0])


@pytest.mark.parametrize("bad", ["", "Bad-Type", "1abc"])
def test_invalid_type_names_are_rejected_by_the_table(db, bad):
    with pytest.raises(psycopg.errors.CheckViolation):
        q.enqueue(db, q.NewJob(bad, {}))


# Every column a producer sets, and the outcome columns the insert derives from them.
_ENQUEUED_COLUMNS = ("job_type, payload, priority, max_attempts, idempotency_key, key_sticky,"
                     " batch_id, callback_url, status, attempts, round(extract(epoch FROM"
                     " visible_at - created_at)) AS delay_s")


def test_one_job_and_many_jobs_are_stored_alike(db, monkeypatch):
    """A single job goes in through its own one-row statement (queue._ENQUEUE_ONE): every
    field must land as it does through the many-row one, and so must the refusals."""
    from workers.core import webhooks

    monkeypatch.setenv(webhooks.ALLOWED_HOSTS_ENV, "127.0.0.1:9")
    jobs = [
        q.NewJob("noop", {"text": "Grüße \u2603", "deep": [[{"a": None}]], "n": 2**40}),
        q.NewJob("noop", [], priority=-7, delay=3600.0, max_attempts=1),
        q.NewJob("noop_other", "plain string", priority=2**31 - 1, key="k-one",
                 sticky_key=True),
        q.NewJob("noop", {}, callback_url="http://127.0.0.1:9/hook"),
    ]
    one = [q.enqueue_many(db, [j])[0] for j in jobs]
    rows_one = [db.execute(f"SELECT {_ENQUEUED_COLUMNS} FROM jobvisor.jobs WHERE id = %s",
                           (i,)).fetchone() for i in one]
    db.execute("DELETE FROM jobvisor.jobs")
    many = q.enqueue_many(db, jobs)
    rows_many = [db.execute(f"SELECT {_ENQUEUED_COLUMNS} FROM jobvisor.jobs WHERE id = %s",
                            (i,)).fetchone() for i in many]
    assert rows_one == rows_many
    assert rows_one[1][4:] == (None, False, None, None, "queued", 0, 3600)
    # A keyed job already held: both give the holder's id and insert nothing.
    assert q.enqueue_many(db, [jobs[2]]) == [many[2]]
    assert q.enqueue_many(db, [jobs[2], jobs[2]]) == [many[2], many[2]]
    # Refused alike, naming the same rule.
    for bad, error in [(q.NewJob("Bad-Type", {}), psycopg.errors.CheckViolation),
                       (q.NewJob("noop", {}, priority=2**31), psycopg.errors.NumericValueOutOfRange),
                       (q.NewJob("noop", {}, max_attempts=0), psycopg.errors.CheckViolation),
                       (q.NewJob("noop", {"x": "a\u0000b"}), psycopg.errors.UntranslatableCharacter),
                       (q.NewJob("noop", {"x": float("nan")}),
                        psycopg.errors.InvalidTextRepresentation),
                       (q.NewJob("noop", {"at": object()}), TypeError)]:
        for batch in ([bad], [bad, q.NewJob("noop", {})]):
            with pytest.raises(error):
                q.enqueue_many(db, batch)
            db.rollback()
    assert len(q.enqueue_many(db, [])) == 0


def test_a_lease_key_fences_as_text_or_as_uuid(db):
    """The lease hands its key out as text (no uuid.UUID per job); every fenced statement
    takes it so, or as a uuid.UUID, and a stale one of either kind changes nothing."""
    import uuid

    ids = q.enqueue_many(db, [q.NewJob("noop", {"i": i}) for i in range(4)])
    jobs = q.lease(db, "noop", 4, worker_id="w", lease_seconds=30)
    assert [j.id for j in jobs] == ids
    assert all(isinstance(j.lease_key, str) and uuid.UUID(j.lease_key) for j in jobs)
    a, b, c, d = jobs
    assert set(q.heartbeat(db, [(a.id, a.lease_key), (b.id, uuid.UUID(b.lease_key))], 30)) \
        == {a.id, b.id}
    assert not q.complete(db, a.id, str(uuid.uuid4()), None)
    assert not q.complete(db, b.id, uuid.uuid4(), None)
    assert q.complete(db, a.id, a.lease_key, {"ok": 1})
    assert q.complete(db, b.id, uuid.UUID(b.lease_key), None)
    assert q.fail(db, c.id, c.lease_key, code="x", message="m")
    assert q.put_back(db, [(d.id, d.lease_key)])
    assert counts(db) == {"completed": 2, "failed": 1, "queued": 1}


def _generic_plan(conn: psycopg.Connection, sql: str, params: dict[str, tuple[str, str]]
                  ) -> list[dict]:
    """Run `sql` (psycopg's %(name)s placeholders) as a prepared statement with its generic
    plan, the one a session keeps, under EXPLAIN ANALYZE; return every node of the plan.
    params: name -> (type, SQL literal). Rolled back."""
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", sql)))
    text = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", sql)
    types = ", ".join(params[n][0] for n in names)
    args = ", ".join(params[n][1] for n in names)
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE fenced ({types}) AS {text}")
        (plan,) = conn.execute(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE fenced ({args})").fetchone()
        conn.execute("DEALLOCATE fenced")
    nodes: list[dict] = []

    def walk(node: dict) -> None:
        nodes.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return nodes


def _reads_of_jobs(nodes: list[dict]) -> list[dict]:
    """The nodes that read jobvisor.jobs: its index scans (a bitmap heap scan's index is
    its child) and sequential scans."""
    return [n for n in nodes if str(n.get("Index Name", "")).startswith("jobs_")
            or (n.get("Relation Name") == "jobs" and n["Node Type"] == "Seq Scan")]


def _stale_statistics(db: psycopg.Connection) -> None:
    """Statistics of the table as it is now (nothing leased yet), kept: no autovacuum will
    ANALYZE it again during the test."""
    db.execute("ALTER TABLE jobvisor.jobs SET (autovacuum_enabled = false)")
    db.execute("ANALYZE jobvisor.jobs")


def test_fenced_batches_find_their_rows_by_id_whatever_the_statistics_say(db):
    """Statistics taken while nothing was leased, then 400 jobs leased, and a session's
    generic plan: each fenced batch statement reads its own 100 rows through the primary
    key. The join it replaced scanned every leased row against the batch in a nested loop
    (40,000 comparisons; a 100-job acknowledgement 8 ms instead of 1.5)."""
    db.execute("INSERT INTO jobvisor.jobs (job_type) SELECT 'noop' FROM generate_series(1, 20000)")
    _stale_statistics(db)
    held = (q.lease(db, "noop", 200, worker_id="a", lease_seconds=60)
            + q.lease(db, "noop", 200, worker_id="b", lease_seconds=60))
    batch = held[:100]
    ids = "'" + q._array_literal(j.id for j in batch) + "'"
    keys = "'" + q._array_literal(j.lease_key for j in batch) + "'"
    common = {"ids": ("text", ids), "keys": ("text", keys)}
    statements = {
        "complete": (q._COMPLETE, {"results": ("jsonb[]", "array_fill(NULL::jsonb, ARRAY[100])")}),
        "complete_discarding": (q._COMPLETE_DISCARDING,
                                {"results": ("jsonb[]", "array_fill('{}'::jsonb, ARRAY[100])")}),
        "heartbeat": (q._HEARTBEAT, {"lease": ("float8", "60")}),
        "progress": (q._PROGRESS, {"progress": ("real[]", "array_fill(0.5::real, ARRAY[100])"),
                                   "notes": ("text[]", "array_fill('p'::text, ARRAY[100])")}),
        "put_back": (q._PUT_BACK, {"suspect": ("bool", "false")}),
    }
    for name, (sql, extra) in statements.items():
        nodes = _reads_of_jobs(_generic_plan(db, sql, common | extra))
        assert nodes, name
        for node in nodes:
            assert node.get("Index Name") == "jobs_pkey", (name, node["Node Type"],
                                                           node.get("Index Name"))
            assert node["Actual Rows"] <= 100, (name, node["Actual Rows"])
    one = {"id": ("bigint", str(batch[0].id)), "key": ("uuid", f"'{batch[0].lease_key}'"),
           "code": ("text", "'x'"), "message": ("text", "NULL")}
    for name, (sql, extra) in {"retry": (q._RETRY_OR_FAIL, {"delay": ("float8", "1")}),
                               "fail": (q._FAIL, {"status": ("text", "'failed'")})}.items():
        for node in _reads_of_jobs(_generic_plan(db, sql, one | extra)):
            assert node.get("Index Name") == "jobs_pkey", (name, node.get("Index Name"))
    # Nothing was changed by the plans' runs (each rolled back).
    assert counts(db)["leased"] == 400


def test_a_fenced_batch_gives_each_job_its_own_values_and_skips_a_stale_key(db):
    """Keys, results and progress are picked from the arrays by each id's position: the
    batch in an order of its own, one key stale (a lost lease) changes nothing of its job."""
    ids = q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(5)])
    jobs = {j.id: j for j in q.lease(db, "noop", 5, worker_id="w", lease_seconds=60)}
    order = [ids[3], ids[0], ids[4], ids[1], ids[2]]
    stale = ids[4]
    key = {i: ("00000000-0000-0000-0000-000000000000" if i == stale else jobs[i].lease_key)
           for i in order}
    q.save_progress(db, [(i, key[i], i / 100, f"note {i}") for i in order])
    assert set(q.heartbeat(db, [(i, key[i]) for i in order], 60)) == set(order) - {stale}
    done = q.complete_many(db, [(i, key[i], {"mine": i}) for i in order])
    assert done == set(order) - {stale}
    rows = dict((r[0], r[1:]) for r in db.execute(
        "SELECT id, status, result, progress_note FROM jobvisor.jobs WHERE id = ANY(%s)",
        (ids,)).fetchall())
    for i in set(order) - {stale}:
        assert rows[i] == ("completed", {"mine": i}, f"note {i}")
    assert rows[stale] == ("leased", None, None)


def test_a_fair_lease_with_a_key_limit_stays_small_whatever_the_statistics_say(db):
    """Statistics of an empty queue, then 20,000 queued keyed jobs of 100 keys, one job of
    each leased: the per-key-limited fair lease (max_running_per_key) reads its candidates in
    fair order, counts each key's leased jobs once, and locks through the primary key.
    Written with a join to the running keys and `status = 'queued'`, its generic plan
    looped over the running keys once per candidate (864 × 100 rows, seen) and read every
    entry of jobs_lease_order, the whole backlog (100,000 with 10⁵ queued, seen)."""
    _stale_statistics(db)
    db.execute("INSERT INTO jobvisor.jobs (job_type, fair_key)"
               " SELECT 'noop', 'k' || (i % 100) FROM generate_series(1, 20000) AS i")
    first = q.lease(db, "noop", 100, worker_id="w", lease_seconds=60, fair=True,
                    per_key_limit=2)
    assert len(first) == 100
    scan = q.fair_scan(200)
    nodes = _generic_plan(db, q._LEASE_FAIR_LIMITED, {
        "type": ("text", "'noop'"), "alone": ("bool", "false"), "per_key": ("int", "2"),
        "scan": ("int", str(scan)), "n": ("int", "200"), "by": ("text", "'w'"),
        "lease": ("float8", "60")})
    for node in _reads_of_jobs(nodes):
        assert node.get("Index Name") != "jobs_lease_order", node["Node Type"]
        assert node["Node Type"] != "Seq Scan"
    for node in nodes:
        rows = node.get("Actual Rows", 0) * node.get("Actual Loops", 1)
        assert rows <= scan, (node["Node Type"], node.get("Index Name"), rows)
    # And it leases within the limit: 2 per key, 100 keys, 100 already leased.
    got = q.lease(db, "noop", 200, worker_id="w", lease_seconds=60, fair=True, per_key_limit=2)
    assert len(got) == 100
    per_key = db.execute("SELECT max(n), count(*) FROM (SELECT count(*) AS n FROM jobvisor.jobs"
                         " WHERE status = 'leased' GROUP BY fair_key) s").fetchone()
    assert per_key == (2, 100)
