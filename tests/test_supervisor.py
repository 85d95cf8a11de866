"""`jobvisor run` as a real process: children, signals, reloads, planning, HTTP."""

from __future__ import annotations

import json
import os
import signal

from prometheus_client.parser import text_string_to_metric_families

from supervisor_app.metrics import METRIC_NAMES
from tests.handlers import EFFECTS_DDL
from tests.helpers import counts, wait_for
from tests.supervisor_harness import Supervisor, base_config, free_port
from workers.core import queue as q

SMALL = {"memory_per_job": "1MiB"}


def test_kill_9_of_a_child_mid_job_restarts_it_and_the_job_completes_once(db, worker_env,
                                                                         tmp_path):
    db.execute(EFFECTS_DDL)
    cfg = base_config(free_port(), {"rec": {"handler": "tests.handlers:record", **SMALL,
                                            "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        job_id = q.enqueue(db, q.NewJob("rec", {"seconds": 2}))
        wait_for(lambda: counts(db, "rec").get("leased") == 1, what="job leased")
        (owner,) = db.execute("SELECT leased_by FROM jobvisor.jobs WHERE id = %s",
                              (job_id,)).fetchone()
        victim = int(owner.split(":")[1])
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="job completed")
        row = q.get_job(db, job_id)
        assert row["attempts"] == 2 and row["leased_by"] != owner
        assert db.execute("SELECT job_id, attempt FROM effects").fetchall() == [(job_id, 2)]
        assert [e["child_pid"] for e in sup.events("leases_rescued")] == [victim]
    finally:
        assert sup.stop() == 0


def test_always_crashing_child_backs_off_with_growing_gaps_then_turns_fatal(db, worker_env,
                                                                           tmp_path):
    cfg = base_config(free_port(), {
        "crashy": {"handler": "tests.crashy:handle", **SMALL, "processes": {"min": 1, "max": 1}},
        "noop": {**SMALL, "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        wait_for(lambda: sup.events("child_fatal"), what="slot turning fatal")
        gaps = [e["restart_in_s"] for e in sup.events("child_died")]
        assert gaps == [0.2, 0.4, 0.8]  # backoff 0.2 s doubling; the 4th quick failure: fatal
        status, body, _ = sup.get("/healthz")
        assert status == 503
        (check,) = [c for c in json.loads(body)["checks"] if c["name"] == "children"]
        assert not check["ok"] and check["detail"].startswith("fatal: crashy (retry in ")
        _, text, _ = sup.get("/metrics")
        assert 'jobvisor_worker_processes{job_type="crashy",state="fatal"} 1.0' in text
        # The healthy type keeps working.
        job_id = q.enqueue(db, q.NewJob("noop", {}))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="noop served")
    finally:
        assert sup.stop() == 0


def test_sighup_with_raised_max_adds_processes_and_others_keep_their_pids(db, worker_env,
                                                                         tmp_path):
    types = {"noop": {**SMALL, "processes": {"min": 1, "max": 1}},
             "sleep": {**SMALL, "processes": {"min": 1, "max": 1}}}
    cfg = base_config(free_port(), types)
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        wait_for(lambda: sup.pids(db, "noop") and sup.pids(db, "sleep"), what="children up")
        noop_before, sleep_before = sup.pids(db, "noop"), sup.pids(db, "sleep")
        types["sleep"]["processes"] = {"min": 1, "max": 3}
        sup.write_config(cfg)
        sup.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(sup.pids(db, "sleep")) == 3, what="3 sleep children")
        assert sup.pids(db, "noop") == noop_before
        assert set(sleep_before) <= set(sup.pids(db, "sleep"))
        assert sup.events("reloaded")[0]["resized"] == ["sleep"]
    finally:
        assert sup.stop() == 0


def test_sighup_with_changed_worker_settings_replaces_that_type_only(db, worker_env, tmp_path):
    types = {"noop": {**SMALL, "processes": {"min": 1, "max": 1}},
             "sleep": {**SMALL, "processes": {"min": 2, "max": 2}}}
    cfg = base_config(free_port(), types)
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        wait_for(lambda: sup.pids(db, "noop") and len(sup.pids(db, "sleep")) == 2,
                 what="children up")
        noop_before, sleep_before = sup.pids(db, "noop"), sup.pids(db, "sleep")
        types["sleep"]["concurrency"] = 3
        sup.write_config(cfg)
        sup.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(sup.pids(db, "sleep")) == 2
                 and not set(sup.pids(db, "sleep")) & set(sleep_before),
                 what="both sleep children replaced")
        assert sup.pids(db, "noop") == noop_before
        assert len(sup.events("child_replacing")) == 2
    finally:
        assert sup.stop() == 0


def test_sighup_with_an_invalid_file_keeps_everything_running(db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"noop": {**SMALL, "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        wait_for(lambda: sup.pids(db, "noop"), what="child up")
        before = sup.pids(db, "noop")
        sup.write_config("types:\n  noop:\n    processes: {min: 3, max: 1}\n")
        sup.proc.send_signal(signal.SIGHUP)
        (rejected,) = wait_for(lambda: sup.events("reload_rejected"), what="reload rejected")
        assert "types.noop.processes.max" in rejected["error"]
        assert sup.get("/healthz")[0] == 200
        job_id = q.enqueue(db, q.NewJob("noop", {}))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="still serving")
        assert sup.pids(db, "noop") == before
    finally:
        assert sup.stop() == 0


def _plan(sup: Supervisor, db) -> dict[str, int]:
    view = sup.view(db) or {"plan": {}}
    return {t: p["processes"] for t, p in view["plan"].items()}


def test_low_ram_then_low_gpu_shrink_lower_priority_types_first(db, worker_env, tmp_path):
    overrides = tmp_path / "capacity.json"
    overrides.write_text(json.dumps({"memory_available": "64GiB", "gpu_free": ["40GiB"]}))
    env = dict(worker_env, JOBVISOR_CAPACITY_OVERRIDES=str(overrides))
    cfg = base_config(free_port(), {
        "important": {"handler": "workers.core.builtin:noop", "memory_per_job": "1GiB", "priority": 10,
                      "processes": {"min": 0, "max": 2}},
        "minor": {"handler": "workers.core.builtin:noop", "memory_per_job": "1GiB", "priority": 1, "processes": {"min": 0, "max": 2}},
        "gpu_hi": {"handler": "workers.core.builtin:noop", "memory_per_job": "1MiB",
                   "gpu_memory_per_job": "8GiB", "priority": 9,
                   "processes": {"min": 0, "max": 2}},
        "gpu_lo": {"handler": "workers.core.builtin:noop", "memory_per_job": "1MiB",
                   "gpu_memory_per_job": "8GiB", "priority": 2,
                   "processes": {"min": 0, "max": 2}},
    })
    sup = Supervisor(tmp_path, env, cfg).start()
    try:
        full = {"important": 2, "minor": 2, "gpu_hi": 2, "gpu_lo": 2}
        wait_for(lambda: _plan(sup, db) == full, what="everything at max")
        # RAM for ~2.5 one-GiB processes: the higher priority type keeps its two.
        overrides.write_text(json.dumps({"memory_available": "2700MiB",
                                         "gpu_free": ["40GiB"]}))
        wait_for(lambda: _plan(sup, db) == full | {"minor": 0}, what="minor shrunk")
        # GPU memory for two 8 GiB processes: gpu_lo gives way to gpu_hi.
        overrides.write_text(json.dumps({"memory_available": "2700MiB",
                                         "gpu_free": ["17GiB"]}))
        wait_for(lambda: _plan(sup, db) == full | {"minor": 0, "gpu_lo": 0},
                 what="gpu_lo shrunk")
        wait_for(lambda: not sup.pids(db, "gpu_lo") and len(sup.pids(db, "gpu_hi")) == 2,
                 what="children follow the plan")
    finally:
        assert sup.stop() == 0


def test_sigterm_with_sleep_jobs_in_flight_exits_0_and_loses_no_job(db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"sleep": {**SMALL, "concurrency": 3,
                                              "processes": {"min": 2, "max": 2}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    ids = q.enqueue_many(db, [q.NewJob("sleep", {"seconds": 1}) for _ in range(20)])
    wait_for(lambda: counts(db, "sleep").get("leased") == 6, what="6 jobs in flight")
    assert sup.stop(signal.SIGTERM) == 0
    c = counts(db, "sleep")
    assert sum(c.values()) == len(ids)
    assert set(c) <= {"completed", "queued"} and c["completed"] >= 6
    assert db.execute("SELECT count(*) FROM jobvisor.jobs WHERE attempts > 1").fetchone()[0] == 0


def test_global_concurrency_holds_across_two_supervisors(db, worker_env, tmp_path):
    types = {"sleep": {**SMALL, "concurrency": 2, "global_concurrency": 3,
                       "processes": {"min": 2, "max": 2}}}
    a = Supervisor(tmp_path, worker_env, base_config(free_port(), types), "a").start()
    b = Supervisor(tmp_path, worker_env, base_config(free_port(), types), "b").start()
    seen: list[int] = []
    try:
        q.enqueue_many(db, [q.NewJob("sleep", {"seconds": 0.3}) for _ in range(30)])

        def sample() -> bool:
            (leased,) = db.execute("SELECT count(*) FROM jobvisor.jobs "
                                   "WHERE status = 'leased'").fetchone()
            seen.append(leased)
            return counts(db, "sleep").get("completed") == 30

        wait_for(sample, interval=0.01, timeout=120, what="30 jobs done")
    finally:
        assert a.stop() == 0 and b.stop() == 0
    assert max(seen) <= 3
    assert max(seen) == 3  # 8 threads wanted more: the cap, not idleness, held them
    hosts = db.execute("SELECT count(DISTINCT leased_by) FROM jobvisor.jobs").fetchone()[0]
    assert hosts >= 2


def test_metrics_parse_and_carry_the_documented_names(db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"noop": {**SMALL, "processes": {"min": 1, "max": 1}},
                                    "fail": {**SMALL, "processes": {"min": 1, "max": 1},
                                             "retry": {"max_attempts": 2, "backoff": "0.1s"}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        q.enqueue_many(db, [q.NewJob("noop", {}) for _ in range(5)])
        q.enqueue(db, q.NewJob("fail", {"kind": "permanent"}, max_attempts=2))
        q.enqueue(db, q.NewJob("fail", {"kind": "transient"}, max_attempts=2))

        def scraped() -> dict[str, list]:
            _, text, _ = sup.get("/metrics")
            fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
            done = [s for s in fams.get("jobvisor_jobs", []) if s.labels.get("job_type") ==
                    "noop" and s.labels.get("outcome") == "completed" and s.value == 5]
            failed = [s for s in fams.get("ai_worker_failed", []) if s.value >= 1]
            return fams if done and len(failed) == 2 else {}

        fams = wait_for(scraped, what="outcomes reported in /metrics")
    finally:
        assert sup.stop() == 0
    # The core's names, and those the learning plug-in registers (the platform's alerts).
    names = {n.removesuffix("_total") for n in METRIC_NAMES} | {
        "analysis_jobs_inflight", "ai_worker_retry", "ai_worker_failed"}
    assert names <= set(fams), names - set(fams)
    codes = {s.labels["error_code"] for s in fams["ai_worker_failed"]}
    assert codes == {"fail_permanent", "fail_transient"}
    assert [s.value for s in fams["ai_worker_retry"] if s.labels["phase"] == "fail"] == [1.0]
    rss = [s for s in fams["jobvisor_worker_resident_memory_bytes"]]
    assert {(s.labels["job_type"], s.labels["slot"]) for s in rss} == {("noop", "0"),
                                                                      ("fail", "0")}
    assert all(s.value > 0 for s in rss)


def test_operator_health_endpoint_requires_the_bearer_token(db, worker_env, tmp_path):
    env = dict(worker_env, JOBVISOR_HEALTH_TOKEN="s3cret-token")
    cfg = base_config(free_port(), {"noop": {**SMALL, "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, env, cfg).start()
    try:
        path = "/internal/health/learning-worker"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            status, body, hdrs = sup.get(path, headers)
            assert status == 401 and "checks" not in body
            assert hdrs["Cache-Control"] == "private, no-store" and hdrs["Vary"] == "Origin"
        status, body, hdrs = sup.get(path, {"Authorization": "Bearer s3cret-token"})
        doc = json.loads(body)
        assert status in (200, 503) and doc["status"] in ("healthy", "degraded")
        assert (status == 200) == all(c["ok"] for c in doc["checks"])
        assert hdrs["Cache-Control"] == "private, no-store" and hdrs["Vary"] == "Origin"
        assert {"supervisor_loop", "database", "children"} <= {c["name"] for c in doc["checks"]}
    finally:
        assert sup.stop() == 0


def test_cluster_duties_run_on_one_elected_supervisor_and_the_other_takes_over(
        db, worker_env, tmp_path):
    types = {"noop": {**SMALL, "schedule": "* * * * *", "processes": {"min": 1, "max": 1}}}
    a = Supervisor(tmp_path, worker_env, base_config(free_port(), types), "a").start()
    wait_for(lambda: a.events("leadership_taken"), what="a elected")
    b = Supervisor(tmp_path, worker_env, base_config(free_port(), types), "b").start()
    try:
        wait_for(lambda: a.events("cron_enqueued"), what="the leader enqueueing the slot")
        wait_for(lambda: counts(db, "noop").get("completed", 0) >= 1, what="slot job ran")
        assert not b.events("leadership_taken") and not b.events("cron_enqueued")
        a.proc.kill()  # SIGKILL: its session, and with it the leader lock, goes away
        a.proc.wait()
        wait_for(lambda: b.events("leadership_taken"), what="b taking over")
        # The new leader does the cluster duties: it rescues an expired lease.
        q.enqueue(db, q.NewJob("other", {}))
        q.lease(db, "other", 1, worker_id="gone:1:x", lease_seconds=0.01)
        wait_for(lambda: b.events("leases_expired"), what="b rescuing the expired lease")
    finally:
        assert b.stop() == 0
    keys = db.execute("SELECT idempotency_key, count(*) FROM jobvisor.jobs "
                      "WHERE idempotency_key IS NOT NULL GROUP BY 1").fetchall()
    assert keys and all(n == 1 for _, n in keys)


def test_second_sigint_stops_at_once_and_jobs_go_back(db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"rec": {"handler": "tests.handlers:record", **SMALL,
                                            "processes": {"min": 1, "max": 1}}}, grace="60s")
    db.execute(EFFECTS_DDL)
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    job_id = q.enqueue(db, q.NewJob("rec", {"seconds": 300, "ignore_cancel": True}))
    wait_for(lambda: counts(db, "rec").get("leased") == 1, what="job running")
    sup.proc.send_signal(signal.SIGINT)
    wait_for(lambda: sup.events("supervisor_draining"), what="draining")
    sup.proc.send_signal(signal.SIGINT)
    assert sup.proc.wait(timeout=30) == 130
    row = q.get_job(db, job_id)
    assert row["status"] == "queued"


def test_supervisor_refuses_a_config_with_an_unimportable_handler(worker_env, tmp_path):
    cfg = base_config(free_port(), {"mine": {"handler": "no_such_module:handle", **SMALL}})
    sup = Supervisor(tmp_path, worker_env, cfg)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "supervisor_app", "run", "--config",
                           str(sup.config_path)], env=sup.env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "mine" in proc.stderr and "no_such_module" in proc.stderr



def test_a_silent_child_is_killed_and_replaced(db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"noop": {**SMALL, "processes": {"min": 1, "max": 1}}},
                      child_heartbeat_timeout="2s")
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        (pid,) = wait_for(lambda: sup.pids(db, "noop"), what="child running")
        os.kill(pid, signal.SIGSTOP)  # alive but silent: no heartbeats reach the supervisor
        (silent,) = wait_for(lambda: [e for e in sup.events("child_silent")
                                      if e["child_pid"] == pid], what="silent child noticed")
        assert silent["job_type"] == "noop"
        wait_for(lambda: sup.pids(db, "noop") and sup.pids(db, "noop") != [pid],
                 what="replacement child")
        job_id = q.enqueue(db, q.NewJob("noop", {}))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="served again")
    finally:
        assert sup.stop() == 0


def test_a_child_over_its_memory_limit_is_drained_and_replaced(db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"noop": {"memory_per_job": "1MiB", "memory_limit": "2MiB",
                                             "processes": {"min": 1, "max": 1}}},
                      restart={"backoff": "0.2s", "healthy_after": "1s",
                               "max_quick_failures": 2})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        (first,) = wait_for(lambda: sup.events("child_recycled"), what="recycle")
        assert first["uss"] > first["limit"]
        wait_for(lambda: len(sup.events("child_started")) >= 2, what="replacement started")
        job_id = q.enqueue(db, q.NewJob("noop", {}))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="job served")
        assert not sup.events("child_fatal")  # a recycle is not a failure
        assert not sup.events("child_died")
    finally:
        assert sup.stop() == 0


def test_jobvisor_reload_signals_the_supervisor_from_its_pid_file(db, worker_env, tmp_path):
    cfg = base_config(free_port(), {"noop": {**SMALL, "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-m", "supervisor_app", "reload"], env=sup.env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and str(sup.proc.pid) in out.stdout
        wait_for(lambda: sup.events("reloaded"), what="reload logged")
    finally:
        assert sup.stop() == 0
    gone = subprocess.run([sys.executable, "-m", "supervisor_app", "reload"], env=sup.env,
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "no running supervisor" in gone.stderr


def test_run_on_the_embedded_postgresql_without_database_url(worker_env, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in worker_env.items() if k != "DATABASE_URL"}
    cfg = base_config(free_port(), {"noop": {**SMALL, "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, env, cfg).start()
    try:
        out = subprocess.run([sys.executable, "-m", "supervisor_app", "enqueue", "noop",
                              "--payload", "{}"], env=sup.env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.strip()

        def done() -> bool:
            shown = subprocess.run([sys.executable, "-m", "supervisor_app", "jobs", "show",
                                    job_id, "--json"], env=sup.env, capture_output=True,
                                   text=True, timeout=120)
            return json.loads(shown.stdout)["status"] == "completed"

        wait_for(done, interval=0.5, what="job done on the embedded server")
        url = subprocess.run([sys.executable, "-m", "supervisor_app", "db-url"], env=sup.env,
                             capture_output=True, text=True, timeout=120)
        # pgserver listens on a unix socket only, placed in the data dir when its path
        # is short enough for a socket name.
        assert url.returncode == 0 and url.stdout.startswith("postgresql://")
    finally:
        assert sup.stop() == 0
    assert (sup.dir / "pgdata" / "PG_VERSION").exists()  # kept between runs


def test_status_shows_plan_readings_and_children_of_a_running_supervisor(db, worker_env,
                                                                        tmp_path):
    import subprocess
    import sys

    cfg = base_config(free_port(), {"noop": {**SMALL, "processes": {"min": 1, "max": 2}}})
    sup = Supervisor(tmp_path, worker_env, cfg).start()
    try:
        wait_for(lambda: len(sup.pids(db, "noop")) == 2, what="children published")
        human = subprocess.run([sys.executable, "-m", "supervisor_app", "status"], env=sup.env,
                               capture_output=True, text=True, timeout=60)
        as_json = subprocess.run([sys.executable, "-m", "supervisor_app", "status", "--json"],
                                 env=sup.env, capture_output=True, text=True, timeout=60)
    finally:
        assert sup.stop() == 0
    assert "MiB available" in human.stdout and "plan: noop=2 (max reached)" in human.stdout
    doc = json.loads(as_json.stdout)
    assert doc["plan"] == {"noop": {"processes": 2, "reason": "max reached"}}
    assert sorted(w["slot"] for w in doc["workers"]) == [0, 1]
    assert all(w["rss_bytes"] > 0 and w["state"] == "running" for w in doc["workers"])


def test_a_fatal_slot_retries_by_itself_and_health_recovers_once_it_runs(db, worker_env,
                                                                         tmp_path):
    marker = tmp_path / "broken"
    marker.write_text("x")
    env = dict(worker_env, CRASHY_MARKER=str(marker))
    cfg = base_config(free_port(), {
        "crashy": {"handler": "tests.crashy:handle", **SMALL, "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, env, cfg).start()
    try:
        wait_for(lambda: sup.events("child_fatal"), what="slot turning fatal")
        assert sup.get("/healthz")[0] == 503
        _, text, _ = sup.get("/metrics")
        assert 'jobvisor_worker_processes{job_type="crashy",state="fatal"} 1.0' in text
        marker.unlink()  # the fault is fixed; no reload, no operator
        wait_for(lambda: sup.get("/healthz")[0] == 200, what="health back after a healthy run")
        assert len(sup.events("child_fatal")) == 1 and not sup.events("reloaded")
        job_id = q.enqueue(db, q.NewJob("crashy", {}))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", what="served again")
    finally:
        assert sup.stop() == 0


def test_sighup_gives_a_fatal_slot_a_new_try_at_once_not_after_its_backoff(db, worker_env,
                                                                          tmp_path):
    marker = tmp_path / "broken"
    marker.write_text("x")
    env = dict(worker_env, CRASHY_MARKER=str(marker))
    cfg = base_config(free_port(), {
        "crashy": {"handler": "tests.crashy:handle", **SMALL, "processes": {"min": 1, "max": 1}}},
        restart={"backoff": "0.2s", "max_backoff": "300s", "healthy_after": "3s",
                 "max_quick_failures": 4})
    sup = Supervisor(tmp_path, env, cfg).start()
    try:
        (fatal,) = wait_for(lambda: sup.events("child_fatal"), what="slot turning fatal")
        # The pending retry is 300 s away: every wait below together is bounded far under
        # that, so only the reload can bring the slot back within them.
        assert fatal["retry_in_s"] == 300.0
        assert sup.get("/healthz")[0] == 503
        started = len(sup.events("child_started"))
        marker.unlink()  # fixed; without a reload the slot would wait out its 300 s
        sup.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sup.events("reloaded"), timeout=20, what="reload logged")
        # A child runs again, serves a job, and health is back.
        job_id = q.enqueue(db, q.NewJob("crashy", {}))
        wait_for(lambda: q.get_job(db, job_id)["status"] == "completed", timeout=25,
                 what="the slot serving again after the reload")
        wait_for(lambda: sup.pids(db, "crashy"), timeout=10, what="its child running")
        wait_for(lambda: sup.get("/healthz")[0] == 200, timeout=5, what="/healthz 200")
        assert len(sup.events("child_started")) == started + 1
        assert len(sup.events("child_fatal")) == 1
    finally:
        assert sup.stop() == 0
