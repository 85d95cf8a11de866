"""The embedded PostgreSQL's lifetime (issue #14): `jobvisor db start|stop|status`,
`jobvisor psql`, and a bare worker without DATABASE_URL. Real pgserver, real processes,
each test with its own JOBVISOR_HOME (so its own server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers import start_worker, stop, wait_for
from tests.supervisor_harness import Supervisor, base_config, free_port
from workers.core import embedded

REPO = Path(__file__).resolve().parent.parent
DB_VARIABLES = ("DATABASE_URL", "LEARNING_DATABASE_URL", "BACKUP_DATABASE_URL")


@pytest.fixture
def home_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """No database variable set, JOBVISOR_HOME in tmp_path; servers left there are stopped."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*DB_VARIABLES, "JOBVISOR_PID_FILE")}
    env.update(JOBVISOR_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    yield env
    for pgdata in tmp_path.glob("*/pgdata"):  # this home's, and a harness supervisor's
        embedded.stop(pgdata, force=True)


def jv(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor_app", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def status(env: dict[str, str]) -> tuple[int, dict]:
    out = jv(env, "db", "status", "--json")
    return out.returncode, json.loads(out.stdout)


def test_db_start_keeps_the_server_running_after_it_exits_until_db_stop(home_env, tmp_path):
    rc, st = status(home_env)
    assert rc == 1 and st["running"] is False and st["dsn"] is None

    started = jv(home_env, "db", "start")
    assert started.returncode == 0, started.stderr
    dsn = started.stdout.strip()
    assert answers(dsn)  # the command has exited: the server outlived it
    again = jv(home_env, "db", "start")
    assert again.returncode == 0 and again.stdout.strip() == dsn  # idempotent

    # Another command attaching and exiting (an ordinary holder) doesn't stop a pinned server.
    assert jv(home_env, "db-url").returncode == 0
    assert answers(dsn)

    rc, st = status(home_env)
    assert rc == 0 and st["running"] and st["dsn"] == dsn and st["kept_running"]
    assert st["data_dir"] == str(tmp_path / "home" / "pgdata") and st["holders"] == []
    text = jv(home_env, "db", "status")
    assert text.returncode == 0 and dsn in text.stdout and "running" in text.stdout

    stopped = jv(home_env, "db", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert not answers(dsn)
    assert status(home_env)[0] == 1
    twice = jv(home_env, "db", "stop")
    assert twice.returncode == 0 and "not running" in twice.stdout


def test_db_url_alone_lives_as_long_as_the_command_and_keep_running_pins_it(home_env):
    url = jv(home_env, "db-url")
    assert url.returncode == 0, url.stderr
    assert not answers(url.stdout.strip())  # it was the only holder: stopped on its exit

    kept = jv(home_env, "db-url", "--keep-running")
    assert kept.returncode == 0 and answers(kept.stdout.strip())
    rc, st = status(home_env)
    assert rc == 0 and st["kept_running"]


def _psql_while_blocked(env: dict[str, str], dsn: str) -> tuple[list[bytes], dict, int, str]:
    """Run `jobvisor psql`, hold it on an advisory lock, and read its psql child's argv and
    environment from /proc while it waits there."""
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(4242)")
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor_app", "psql", "-X", "-A", "-t", "-c",
             "SELECT pg_advisory_lock(4242)"], env=env, cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def psql_child() -> psutil.Process | bool | None:
            if proc.poll() is not None:
                return True  # exited early: the assertion below shows why
            return next((c for c in psutil.Process(proc.pid).children()
                         if c.name() == "psql"), None)

        try:
            child = wait_for(psql_child, what="psql running under `jobvisor psql`")
            assert child is not True, proc.communicate()
            wait_for(lambda: holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()[0] == 1, what="psql waiting on the lock")
            argv = Path(f"/proc/{child.pid}/cmdline").read_bytes().split(b"\0")
            environ = dict(e.split(b"=", 1) for e in
                           Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0") if e)
        finally:
            holder.execute("SELECT pg_advisory_unlock(4242)")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return argv, environ, proc.returncode, out


def test_psql_connects_to_the_embedded_server_with_the_dsn_kept_out_of_argv(home_env):
    dsn = jv(home_env, "db", "start").stdout.strip()
    one = jv(home_env, "psql", "-X", "-A", "-t", "-c", "select 1")
    assert one.returncode == 0 and one.stdout.strip() == "1", one.stderr

    argv, environ, _rc, _out = _psql_while_blocked(home_env, dsn)
    socket_dir = conninfo_to_dict(dsn)["host"]
    assert argv[0].endswith(b"psql") and b"SELECT pg_advisory_lock(4242)" in argv
    assert not any(b"postgresql://" in a or socket_dir.encode() in a for a in argv)
    assert environ[b"PGHOST"] == socket_dir.encode()


def test_psql_uses_database_url_when_set_and_its_password_stays_out_of_argv(db_dsn, tmp_path):
    # The test server (the service, or conftest's embedded one) trusts local connections,
    # so a password in the DSN is never checked, only carried.
    dsn = make_conninfo(db_dsn, password="s3cret-sentinel")
    env = {k: v for k, v in os.environ.items() if k not in DB_VARIABLES}
    env.update(DATABASE_URL=dsn, JOBVISOR_HOME=str(tmp_path / "home"),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    argv, environ, _rc, out = _psql_while_blocked(env, dsn)
    assert not any(b"s3cret" in a for a in argv)
    assert environ[b"PGPASSWORD"] == b"s3cret-sentinel"
    assert environ[b"PGDATABASE"] == conninfo_to_dict(db_dsn)["dbname"].encode()
    assert not (tmp_path / "home" / "pgdata").exists()  # the embedded server wasn't used


def test_a_bare_worker_without_database_url_serves_a_job_on_the_embedded_server(home_env,
                                                                                 tmp_path):
    migrated = jv(home_env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert status(home_env)[0] == 1  # migrate held it only while it ran

    worker = start_worker(home_env, "noop", "--poll", "0.2", log=tmp_path / "worker.log")
    try:
        wait_for(lambda: worker.pid in status(home_env)[1]["holders"] or worker.poll(),
                 interval=0.2, what="the worker holding the embedded server")
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
        enq = jv(home_env, "enqueue", "noop", "--payload", "{}")
        assert enq.returncode == 0, enq.stderr
        job_id = enq.stdout.strip()
        wait_for(lambda: json.loads(jv(home_env, "jobs", "show", job_id, "--json").stdout)
                 ["status"] == "completed", interval=0.2, what="job served by the bare worker")

        refused = jv(home_env, "db", "stop")
        assert refused.returncode == 1 and f"pid {worker.pid}" in refused.stderr
        assert status(home_env)[0] == 0
    finally:
        assert stop(worker) == 0
    # Nothing pinned it: the last holder's exit stopped it.
    assert status(home_env)[0] == 1


def test_a_holder_killed_with_9_does_not_keep_db_stop_refusing(home_env, tmp_path):
    dsn = jv(home_env, "db", "start").stdout.strip()
    worker = start_worker(home_env, "noop", log=tmp_path / "worker.log")
    wait_for(lambda: worker.pid in status(home_env)[1]["holders"], interval=0.2,
             what="the worker holding the embedded server")
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=60)
    rc, st = status(home_env)
    assert rc == 0 and st["holders"] == []  # its pid, left in pgserver's list, is dropped
    assert jv(home_env, "db", "stop").returncode == 0 and not answers(dsn)


def test_db_stop_is_refused_while_a_supervisor_uses_the_embedded_server(home_env, tmp_path):
    cfg = base_config(free_port(), {"noop": {"memory_per_job": "1MiB",
                                             "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, home_env, cfg).start()
    try:
        refused = jv(sup.env, "db", "stop")
        assert refused.returncode == 1, refused.stdout
        assert f"pid {sup.proc.pid}" in refused.stderr and "supervisor" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert status(sup.env)[0] == 0
    finally:
        assert sup.stop() == 0
    assert status(sup.env)[0] == 1  # the supervisor held it; nothing pinned it
    gone = jv(sup.env, "db", "stop")
    assert gone.returncode == 0 and "not running" in gone.stdout
