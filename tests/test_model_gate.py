"""The model gate (issue #16): one limit per (model server, model), found from what the
server shows, shared by every process through PostgreSQL, lost by a dead holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.fakes.ollama import FakeOllama
from tests.helpers import counts, start_worker, stop, wait_for
from tests.supervisor_harness import REPO
from workers.core import model_gate, model_store
from workers.core import queue as q
from workers.core.errors import TransientError
from workers.core.model_gate import ModelGate, Policy, Ticket
from workers.learning.ai import ollama

MODEL = "qwen2.5vl:7b"
ADAPTIVE = Policy("adaptive", None, 32)


# --- configuration ---------------------------------------------------------------------


def test_policy_from_env_and_its_errors() -> None:
    assert model_gate.policy_from_env({}) == Policy("adaptive", None, 32)
    assert model_gate.policy_from_env({"AI_MODEL_LIMIT": " OFF "}).mode == "off"
    fixed = model_gate.policy_from_env({"AI_MODEL_LIMIT": "4", "AI_MODEL_LIMIT_MAX": "2"})
    assert (fixed.mode, fixed.fixed, fixed.initial) == ("fixed", 4, 4)
    assert model_gate.policy_from_env({"AI_MODEL_LIMIT_MAX": "8"}).max_limit == 8
    for env, name in [({"AI_MODEL_LIMIT": "lots"}, "AI_MODEL_LIMIT"),
                      ({"AI_MODEL_LIMIT": "0"}, "AI_MODEL_LIMIT"),
                      ({"AI_MODEL_LIMIT": "-2"}, "AI_MODEL_LIMIT"),
                      ({"AI_MODEL_LIMIT_MAX": "0"}, "AI_MODEL_LIMIT_MAX"),
                      ({"AI_MODEL_LIMIT_MAX": "1e3"}, "AI_MODEL_LIMIT_MAX")]:
        with pytest.raises(model_gate.ModelGateError, match=name):
            model_gate.policy_from_env(env)


def test_a_bad_policy_fails_the_model_call_with_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_MODEL_LIMIT", "many")
    with pytest.raises(ValueError, match="AI_MODEL_LIMIT must be adaptive, off or a whole number"):
        ollama.chat("http://127.0.0.1:9", MODEL, [{"role": "user", "content": "x"}])


def test_endpoint_label_drops_credentials_query_and_slash() -> None:
    assert model_gate.endpoint_label("HTTP://user:secret@GPU-Box:11434/ollama/?x=1") == \
        "http://gpu-box:11434/ollama"
    assert model_gate.endpoint_label("http://[::1]:11434/") == "http://[::1]:11434"
    a = model_gate.lock_id("http://a:1", "m")
    assert 0 <= a < 2**31 and a != model_gate.lock_id("http://a:1", "n")


def test_server_wait_from_ollama_durations() -> None:
    answer = {"total_duration": 900_000_000, "load_duration": 100_000_000,
              "prompt_eval_duration": 200_000_000, "eval_duration": 300_000_000}
    assert model_gate.ollama_server_wait(answer) == pytest.approx(0.3)
    assert model_gate.ollama_server_wait({"message": {}}) is None
    assert model_gate.ollama_server_wait({"total_duration": "x"}) is None
    assert model_gate.ollama_server_wait({"total_duration": 1, "eval_duration": 5}) == 0.0


# --- the control law, fed by hand (no clock, no server) --------------------------------


def _gate(policy: Policy = ADAPTIVE) -> tuple[ModelGate, Any]:
    g = ModelGate(None, policy)
    lim = g.limiter("http://m:1", MODEL)
    g._current(lim)
    return g, lim


def _send(g: ModelGate, lim: Any, *, saturated: bool = True) -> Ticket:
    row, epoch = g._current(lim)
    lim.read_at = 0.0  # read the store again next time
    return Ticket(lim, None, epoch, row.version, saturated, time.monotonic() - 1.0)


def _feed(g: ModelGate, lim: Any, n: int, *, wait: float = 0.0, saturated: bool = True,
          outcome: str = "ok") -> None:
    """n requests of 1 s each, `wait` of it in the server's queue."""
    for _ in range(n):
        ticket = _send(g, lim, saturated=saturated)
        _observe(g, lim, ticket, outcome, 1.0 + wait, wait if outcome == "ok" else None)


def _observe(g: ModelGate, lim: Any, ticket: Ticket, outcome: str, rtt: float,
             wait: float | None) -> None:
    with lim.cond:  # as release() calls it
        g._observe(lim, ticket, outcome, rtt, wait)


def _limit(g: ModelGate, lim: Any) -> int:
    lim.read_at = 0.0
    return g._current(lim)[0].limit


def _probe_now(g: ModelGate, lim: Any) -> None:
    g.local.rows[(lim.endpoint, lim.model)]["next_probe"] = 0.0


def _settled(lim: Any) -> None:
    """A round trip after a decrease: the requests of the old limit have left the server
    (until then, what is sent would queue behind them and is not counted)."""
    lim.settle_until = 0.0


def test_without_queueing_a_saturated_limit_rises_one_per_window() -> None:
    g, lim = _gate()
    assert _limit(g, lim) == 1
    _feed(g, lim, 3)  # a window is max(3, limit) requests
    assert _limit(g, lim) == 2
    _feed(g, lim, 2)
    assert _limit(g, lim) == 2  # not a whole window yet
    _feed(g, lim, 1)
    assert _limit(g, lim) == 3
    _feed(g, lim, 3)
    assert _limit(g, lim) == 4


def test_an_unsaturated_limit_stays_where_it_is() -> None:
    """Light load shows no queueing either; growing then would only invite a burst."""
    g, lim = _gate()
    _feed(g, lim, 30, saturated=False)
    assert _limit(g, lim) == 1


def test_a_little_queueing_takes_one_step_back_and_delays_the_next_probe() -> None:
    g, lim = _gate()
    for _ in range(4):
        _feed(g, lim, max(3, _limit(g, lim)))
    assert _limit(g, lim) == 5
    _feed(g, lim, 5, wait=0.25)  # q = 0.25 (a 5th request in a 4-slot server)
    assert _limit(g, lim) == 4
    _settled(lim)
    _feed(g, lim, 8)  # the probe waits out its backoff: no rise however clean
    assert _limit(g, lim) == 4
    _probe_now(g, lim)
    _feed(g, lim, 4)
    assert _limit(g, lim) == 5


def test_a_fall_from_a_limit_that_had_held_probes_again_soon() -> None:
    """Only a probe taken back lengthens the wait; a limit that had held and then saw a
    little queueing (noise, another client) tries again after the shortest wait."""
    g, lim = _gate()
    for _ in range(3):
        _feed(g, lim, max(3, _limit(g, lim)))
    _feed(g, lim, 4, wait=0.25)  # the probe to 4 taken back: the wait grows
    row = g.local.rows[(lim.endpoint, lim.model)]
    assert _limit(g, lim) == 3 and row["backoff"] == 8.0
    _settled(lim)
    _probe_now(g, lim)
    g.local.clock = lambda: 1000.0  # the store's clock, fixed: the wait it sets is exact
    _feed(g, lim, 3, wait=0.25)  # 3 had held; now it queues: down, the wait as it was
    assert _limit(g, lim) == 2 and row["backoff"] == 8.0
    assert row["next_probe"] == 1000.0 + model_store.PROBE_BACKOFF_MIN_S


def test_a_server_that_stops_answering_may_be_probed_at_once() -> None:
    """Ollama's parallelism changes when it restarts: refused connections clear the wait
    for the next probe, so a server back with more slots is found within one window."""
    g, lim = _gate()
    for _ in range(3):
        _feed(g, lim, max(3, _limit(g, lim)))
    _feed(g, lim, 4, wait=0.25)
    _settled(lim)
    assert _limit(g, lim) == 3
    _feed(g, lim, 3)  # the backoff holds it
    assert _limit(g, lim) == 3
    _feed(g, lim, 1, outcome="down")
    _feed(g, lim, 3)
    assert _limit(g, lim) == 4


def test_heavy_queueing_comes_down_in_proportion_at_once() -> None:
    """A server restarted with fewer slots: 8 requests in 2 slots wait 3 s per 1 s of
    service (Little's law: q = 8/2 - 1); the limit lands on 2 in one decision."""
    g, lim = _gate()
    while _limit(g, lim) < 8:
        _feed(g, lim, 1)
    _feed(g, lim, 8)  # a clean window at 8: a probe to 9 ...
    _feed(g, lim, 1, wait=1.0)  # ... taken back: 8 holds
    assert _limit(g, lim) == 8 and not lim.probing
    _settled(lim)
    for wait in (0, 0, 1, 1, 2, 2, 3, 3):  # the server restarted with 2 slots
        _feed(g, lim, 1, wait=float(wait))
    assert _limit(g, lim) == 3  # mean q 1.5: 8 / 2.5
    _settled(lim)
    _feed(g, lim, 3, wait=0.5)  # 3 in 2 slots: q = 3/2 - 1
    assert _limit(g, lim) == 2


def test_a_probe_is_taken_back_after_its_first_queued_request() -> None:
    g, lim = _gate()
    for _ in range(3):
        _feed(g, lim, max(3, _limit(g, lim)))
    assert _limit(g, lim) == 4
    _feed(g, lim, 1, wait=1.0)  # one request, a whole service time in line: one step
    assert _limit(g, lim) == 3


def test_busy_and_timeouts_multiply_the_limit_by_three_quarters() -> None:
    g, lim = _gate()
    while _limit(g, lim) < 8:
        _feed(g, lim, 1)
    _feed(g, lim, 1, outcome="busy")
    assert _limit(g, lim) == 6
    _feed(g, lim, 1, outcome="timeout")
    assert _limit(g, lim) == 4
    for _ in range(5):
        _feed(g, lim, 1, outcome="busy")
    assert _limit(g, lim) == 1  # never below one


def test_requests_sent_under_an_older_limit_do_not_move_it_again() -> None:
    """Many processes (or threads) see the same overload: it lowers the limit once."""
    g, lim = _gate()
    while _limit(g, lim) < 8:
        _feed(g, lim, 1)
    stale = [_send(g, lim) for _ in range(6)]
    _observe(g, lim, stale[0], "busy", 1.0, None)
    assert _limit(g, lim) == 6
    for ticket in stale[1:]:
        _observe(g, lim, ticket, "busy", 1.0, None)
        _observe(g, lim, ticket, "ok", 1.0, 5.0)
    assert _limit(g, lim) == 6


def test_a_fixed_limit_does_not_move() -> None:
    g, lim = _gate(Policy("fixed", 3, 32))
    _feed(g, lim, 10)
    _feed(g, lim, 3, outcome="busy")
    _feed(g, lim, 3, wait=5.0)
    assert _limit(g, lim) == 3


def test_without_durations_the_round_trip_is_measured_against_its_baseline() -> None:
    """The OpenAI-compatible /v1 path: no durations, the shortest recent round trip is
    the no-queue baseline."""
    g, lim = _gate()
    while _limit(g, lim) < 4:
        _feed(g, lim, 1)
    for _ in range(4):
        _observe(g, lim, _send(g, lim), "ok", 1.0, None)  # the baseline: 1 s
    assert _limit(g, lim) == 5
    for _ in range(2):  # 2 s where 1 s is the baseline: q = 1
        _observe(g, lim, _send(g, lim), "ok", 2.0, None)
    assert _limit(g, lim) < 5


# --- against the fake Ollama, in this process -------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(models=[MODEL], slots=3, latency=0.1) as server:
        yield server


def _chat(fake: FakeOllama) -> str:
    return ollama.chat(fake.base_url, MODEL, [{"role": "user", "content": "x"}],
                       timeout=(2.0, 30.0))


def test_the_limit_finds_the_servers_slots_and_the_server_sees_only_a_probe_beyond(
        fake: FakeOllama) -> None:
    """Three slots the client is not told of, eight threads: the limit settles on 3, and
    from then on the server never holds more than the slots and a probe's request."""
    lim = model_gate.gate().limiter(fake.base_url, MODEL)
    stop = threading.Event()

    def loop() -> int:
        n = 0
        while not stop.is_set():
            _chat(fake)
            n += 1
        return n

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(loop) for _ in range(8)]
        try:
            store = model_gate.gate().local.rows

            def settled() -> bool:  # on 3, after a probe to 4 was taken back
                row = store.get((lim.endpoint, lim.model))
                return row is not None and row["last"] == "down" and row["lim"] == 3

            wait_for(settled, timeout=60, what="the limit to settle on the server's 3 slots")
            fake.reset()  # counters from here on
            wait_for(lambda: fake.stats()["completed"] >= 120, timeout=120,
                     what="120 more requests")
        finally:
            stop.set()
        done = sum(f.result() for f in futures)
    stats = fake.stats()
    assert done >= 120
    assert stats["max_concurrent"] <= 3  # the server's slots: no request was turned away
    # Eight threads, yet in line at most a probe's request (two where a second probe came
    # before the first one's verdict reached every thread): never the other five.
    assert stats["max_queued"] <= 2
    assert stats["rejected_busy"] == 0
    assert lim.row is not None and lim.row.limit <= 4  # a clean window at 4 can't happen


def test_a_503_is_a_retry_that_lowers_the_limit(fake: FakeOllama) -> None:
    gate = model_gate.gate()
    lim = gate.limiter(fake.base_url, MODEL)
    gate.local.ensure(lim.endpoint, lim.model, lim.lock_id, gate.policy)
    gate.local.rows[(lim.endpoint, lim.model)]["lim"] = 8
    fake.inject("503")
    with pytest.raises(TransientError) as raised:
        _chat(fake)
    assert "ollama 503" in str(raised.value)
    assert lim.row is not None and lim.row.limit == 6
    fake.inject("slow", delay=2.0)
    with pytest.raises(TransientError, match="read timeout"):
        ollama.chat(fake.base_url, MODEL, [{"role": "user", "content": "x"}], timeout=(2.0, 0.5))
    assert lim.row.limit == 4
    fake.inject("drop")  # not "busy": a vanished server leaves the limit alone
    with pytest.raises(TransientError, match="unreachable"):
        _chat(fake)
    assert lim.row.limit == 4


def test_no_token_within_the_read_timeout_is_a_retry(
        fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_MODEL_LIMIT", "1")
    model_gate.configure(None)
    release = threading.Event()
    fake.responder = lambda _req: (release.wait(30), None)[1]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_chat, fake)
        wait_for(lambda: fake.stats()["in_flight"] == 1, what="the first request in the server")
        with pytest.raises(TransientError, match="no free slot of model .* within 0.3 s"):
            ollama.chat(fake.base_url, MODEL, [{"role": "user", "content": "x"}],
                        timeout=(2.0, 0.3))
        release.set()
        first.result(timeout=30)
    assert fake.calls("/api/chat") == 1  # the second never reached the server


# --- shared through PostgreSQL ------------------------------------------------------------


def _db_gate(dsn: str, policy: Policy = ADAPTIVE) -> ModelGate:
    return ModelGate(dsn, policy)


def test_tokens_are_shared_between_processes_through_the_database(db_dsn: str) -> None:
    """Two gates with their own connections (two processes, as far as PostgreSQL can
    tell): a fixed limit of 2 admits two calls in all, not two each."""
    a, b = _db_gate(db_dsn, Policy("fixed", 2, 32)), _db_gate(db_dsn, Policy("fixed", 2, 32))
    t1 = a.acquire("http://gpu:11434", MODEL, 1.0)
    t2 = b.acquire("http://gpu:11434", MODEL, 1.0)
    assert {t1.slot, t2.slot} == {0, 1}
    with pytest.raises(model_gate.NoToken):
        a.acquire("http://gpu:11434", MODEL, 0.2)
    with pytest.raises(model_gate.NoToken):
        b.acquire("http://gpu:11434", MODEL, 0.2)
    b.release(t2, "ok", 0.0)
    t3 = a.acquire("http://gpu:11434", MODEL, 1.0)
    assert t3.slot == t2.slot
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT lim, fixed, lock_id FROM jobvisor.model_limits").fetchone()
        held = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s::int::oid AND objsubid = 2", (row[2],)).fetchone()[0]
    assert row[:2] == (2, True) and held == 2
    a.release(t1, None, None)
    a.release(t3, None, None)


def test_a_change_made_by_one_process_is_seen_by_the_others(db_dsn: str) -> None:
    a, b = _db_gate(db_dsn), _db_gate(db_dsn)
    la, lb = a.limiter("http://gpu:11434", MODEL), b.limiter("http://gpu:11434", MODEL)
    for _ in range(3):
        ticket = a.acquire("http://gpu:11434", MODEL, 1.0)
        ticket.saturated = True
        a.release(ticket, "ok", 0.0)
    assert la.row is not None and la.row.limit == 2
    lb.read_at = 0.0
    assert b._current(lb)[0].limit == 2
    # b sees the server busy; a's next request, sent under the old limit, changes nothing
    stale = a.acquire("http://gpu:11434", MODEL, 1.0)
    t = b.acquire("http://gpu:11434", MODEL, 1.0)
    b.release(t, "busy", None)
    a.release(stale, "busy", None)
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        lim, busy = conn.execute("SELECT lim, busy FROM jobvisor.model_limits").fetchone()
    assert lim == 1


_HOLDER = r"""
import sys, time
from workers.core.model_gate import ModelGate, Policy
gate = ModelGate(sys.argv[1], Policy("fixed", 1, 32))
gate.acquire("http://gpu:11434", "qwen2.5vl:7b", 5.0)
print("held", flush=True)
time.sleep(600)
"""


def test_a_dead_holder_loses_its_token(db_dsn: str) -> None:
    """kill -9 of a process in the middle of a model call: its token is free again as
    soon as PostgreSQL sees the connection gone, not after some lease runs out."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, db_dsn], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        other = _db_gate(db_dsn, Policy("fixed", 1, 32))
        with pytest.raises(model_gate.NoToken):
            other.acquire("http://gpu:11434", MODEL, 0.3)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        ticket = other.acquire("http://gpu:11434", MODEL, 30.0)
        assert ticket.slot == 0
        other.release(ticket, None, None)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_lost_connection_drops_the_tokens_and_falls_back_to_the_last_limit(
        db_dsn: str) -> None:
    gate = _db_gate(db_dsn, Policy("fixed", 2, 32))
    t1 = gate.acquire("http://gpu:11434", MODEL, 1.0)
    assert gate.db is not None and gate.db.conn is not None
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (gate.db.conn.info.backend_pid,))
    lim = gate.limiter("http://gpu:11434", MODEL)
    lim.read_at = 0.0
    # The next call notices: it is admitted by this process's own count of the last limit.
    t2 = gate.acquire("http://gpu:11434", MODEL, 1.0)
    with pytest.raises(model_gate.NoToken):
        gate.acquire("http://gpu:11434", MODEL, 0.2)
    gate.release(t1, "ok", 0.0)
    gate.release(t2, "ok", 0.0)
    # Once the database answers again the tokens are taken there once more.
    gate.db.retry_at = 0.0
    lim.read_at = 0.0
    t3 = gate.acquire("http://gpu:11434", MODEL, 1.0)
    assert t3.slot == 0 and t3.epoch == gate.db.epoch
    gate.release(t3, None, None)


def test_the_worker_role_may_use_the_limits(db_dsn: str) -> None:
    """A least-privilege worker login (member of jobvisor_worker) takes tokens and
    changes the limit: the migration granted it the table."""
    role = f"jv_gate_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_dsn, autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = 'jobvisor_worker'").fetchone():
            pytest.skip("no jobvisor_worker role on this server")
        admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER INHERIT IN ROLE jobvisor_worker")
    gate = _db_gate(make_conninfo(db_dsn, user=role))
    try:
        ticket = gate.acquire("http://gpu:11434", MODEL, 1.0)
        assert ticket.slot == 0 and ticket.epoch == 0  # through the database, not the fallback
        gate.limiter("http://gpu:11434", MODEL).row = model_gate.Row(4, ticket.version)
        gate.release(ticket, "busy", None)
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT lim, busy FROM jobvisor.model_limits").fetchone() == (1, 1)
    finally:
        assert gate.db is not None
        if gate.db.conn is not None:
            gate.db.conn.close()
        with psycopg.connect(db_dsn, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {role}")


# --- real worker processes ----------------------------------------------------------------


def _model_workers(env: dict[str, str], n: int, concurrency: int, log_dir: Any,
                   extra: dict[str, str] | None = None) -> list[subprocess.Popen]:
    return [start_worker(env | (extra or {}), "modelcall", "--handler", "tests.handlers:model_call",
                         "--concurrency", str(concurrency), "--poll", "0.2",
                         "--backoff", "0.1", "--max-backoff", "0.5",
                         log=log_dir / f"worker{i}.log") for i in range(n)]


def _run_backlog(db: psycopg.Connection, fake: FakeOllama, procs: list[subprocess.Popen],
                 jobs: int) -> None:
    q.enqueue_many(db, [q.NewJob("modelcall", {"base_url": fake.base_url, "model": MODEL})
                        for _ in range(jobs)])
    try:
        wait_for(lambda: counts(db, "modelcall") == {"completed": jobs}, timeout=180,
                 what=f"{jobs} model jobs completed")
    finally:
        for p in procs:
            assert stop(p) == 0


def test_processes_added_do_not_add_requests_at_the_server(db, worker_env, tmp_path) -> None:
    """Issue #16: three worker processes × 4 threads (12 possible requests) against a
    server with 2 slots it is not told of: the server never sees more than one request in
    line beyond its slots, and the shared limit says 2 (or 3 while probing)."""
    with FakeOllama(models=[MODEL], slots=2, latency=0.1) as fake:
        _run_backlog(db, fake, _model_workers(worker_env, 3, 4, tmp_path), 80)
        stats = fake.stats()
    assert stats["completed"] == 80 and stats["rejected_busy"] == 0
    assert stats["max_queued"] <= 2  # the slots' 2 + at most 2 while a probe is judged
    lim, requests = db.execute("SELECT lim, requests FROM jobvisor.model_limits "
                               "WHERE model = %s", (MODEL,)).fetchone()
    assert lim in (2, 3) and requests == 80


def test_without_the_gate_the_same_processes_pile_up_in_the_server(db, worker_env,
                                                                    tmp_path) -> None:
    """The control for the test above: AI_MODEL_LIMIT=off, 12 requests at once."""
    with FakeOllama(models=[MODEL], slots=2, latency=0.1) as fake:
        _run_backlog(db, fake, _model_workers(worker_env, 3, 4, tmp_path,
                                              {"AI_MODEL_LIMIT": "off"}), 80)
        stats = fake.stats()
    assert stats["completed"] == 80 and stats["max_queued"] >= 6


def test_a_worker_refuses_a_bad_limit_setting_at_start_naming_it(worker_env) -> None:
    out = subprocess.run([sys.executable, "-m", "workers", "--type", "modelcall",
                          "--handler", "tests.handlers:model_call"],
                         env=worker_env | {"AI_MODEL_LIMIT": "lots"}, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "AI_MODEL_LIMIT must be adaptive, off or a whole number from 1 to 1024, got 'lots'" \
        in out.stderr


def test_a_token_that_cannot_be_given_back_is_dropped_with_its_connection(
        db_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the unlock to fail and the session live on, the token would stay taken for
    good: the gate drops that connection instead, and PostgreSQL frees its tokens."""

    a, b = _db_gate(db_dsn, Policy("fixed", 1, 32)), _db_gate(db_dsn, Policy("fixed", 1, 32))
    ticket = a.acquire("http://gpu:11434", MODEL, 1.0)
    monkeypatch.setattr(model_store, "GIVE", "SELECT 1 / (%(k)s::int - %(k)s::int)")
    a.release(ticket, None, None)
    assert a.db is not None and a.db.conn is None
    other = b.acquire("http://gpu:11434", MODEL, 10.0)
    assert other.slot == 0
    b.release(other, None, None)
