"""The `backup` job type end to end: real sub-workers and supervisors, the real CLI.

`jobvisor backup --wait` against a `backup` worker, two supervisors sharing one cron
schedule, secrets kept out of every process's arguments (and out of logs and
manifests), and failures reported with their code. A real `pg_dump` is held running,
when a test needs it running, by an exclusive lock on a table it must dump: no sleeps,
no timing guesses.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from supervisor_app.migrate import migrate
from tests.helpers import start_worker, stop, wait_for
from tests.supervisor_harness import Supervisor, base_config, free_port
from workers import PermanentError
from workers.backup import BACKUP_CONFIG_INVALID
from workers.core import queue as q

REPO = Path(__file__).resolve().parent.parent
FAKES = Path(__file__).resolve().parent / "fakes"
LOCAL_SERVICE = "postgresql://postgres@127.0.0.1:5432/postgres"
GATE = "backup_gate"  # the table whose lock holds pg_dump mid-run
# Variables from the caller's shell that would change which database or tool is used.
FOREIGN = ("BACKUP_DATABASE_URL", "PG_DUMP", "BACKUP_TIMEOUT", "BACKUP_KEEP_LAST",
           "BACKUP_KEEP_DAYS", "JOBVISOR_CONFIG")


def _env(worker_env: dict[str, str], backup_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in worker_env.items() if k not in FOREIGN}
    return dict(env, BACKUP_DIR=str(backup_dir), **extra)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # The timeout only keeps a hung CLI from hanging the suite; nothing asserts on time.
    return subprocess.run([sys.executable, "-m", "supervisor_app", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)


def _cli_background(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "supervisor_app", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_dirs(backup_dir: Path) -> list[Path]:
    return sorted(p for p in backup_dir.iterdir() if p.is_dir()) if backup_dir.exists() else []


def _manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


def _server_version(conn: psycopg.Connection) -> str:
    row = conn.execute("SHOW server_version").fetchone()
    assert row is not None
    return str(row[0]).split()[0]


def _config_file(tmp_path: Path, backup: dict[str, Any]) -> Path:
    path = tmp_path / "jobvisor.yaml"
    path.write_text(yaml.safe_dump(base_config(free_port(), {"backup": backup})))
    return path


def _make_gate(conn: psycopg.Connection) -> None:
    conn.execute(f"CREATE TABLE {GATE} (id int)")


def _pg_dump_in(root: psutil.Process) -> psutil.Process | None:
    """The dumping pg_dump under `root` — not the short `pg_dump --version` probe that
    runs first."""
    for proc in root.children(recursive=True):
        try:
            argv = proc.cmdline()
            if argv and argv[0].endswith("pg_dump") and "--format=custom" in argv:
                return proc
        except psutil.Error:
            continue
    return None


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited meanwhile: it has no arguments left to leak
        return b""


def _all_cmdlines() -> dict[int, bytes]:
    return {int(p.name): _cmdline(int(p.name)) for p in Path("/proc").iterdir()
            if p.name.isdigit()}


# --- jobvisor backup --wait -----------------------------------------------------------


def test_backup_command_waits_for_a_real_dump_and_backups_list_shows_it(db, worker_env,
                                                                        tmp_path):
    backups = tmp_path / "backups"
    env = _env(worker_env, backups)
    worker = start_worker(env, "backup", "--poll", "0.2", log=tmp_path / "worker.log")
    try:
        done = _cli(env, "backup", "--wait", "--timeout", "180")
    finally:
        assert stop(worker) == 0
    assert done.returncode == 0, done.stderr

    first, outcome = done.stdout.strip().splitlines()
    job_id = int(first)
    (run_dir,) = _run_dirs(backups)
    manifest = _manifest(run_dir)
    dump = run_dir / "dump.pgdump"
    assert manifest["status"] == "succeeded" and manifest["file"] == "dump.pgdump"
    assert dump.read_bytes()[:5] == b"PGDMP"  # pg_dump's custom format
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == manifest["sha256"]
    assert outcome == (f"backup job {job_id} succeeded: {dump}, {manifest['bytes']} bytes, "
                       f"sha256 {manifest['sha256']}")
    job = q.get_job(db, job_id)
    assert (job["status"], job["attempts"]) == ("completed", 1)
    assert job["result"]["run_id"] == manifest["run_id"] == run_dir.name
    assert job["result"]["path"] == str(dump)

    listed = _cli(env, "backups", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry == dict(manifest, directory=str(run_dir))
    table = _cli(env, "backups", "list")
    assert table.returncode == 0
    assert manifest["run_id"] in table.stdout and "succeeded" in table.stdout


def test_backup_wait_exits_1_naming_backup_dump_failed_after_the_last_attempt(db, worker_env,
                                                                           tmp_path):
    backups = tmp_path / "backups"
    # max_attempts comes from the config the CLI reads; the worker retries at once.
    config = _config_file(tmp_path, {"retry": {"max_attempts": 2}})
    env = _env(worker_env, backups, PG_DUMP=str(FAKES / "pg_dump_fail.sh"),
               JOBVISOR_FAKE_PG_VERSION=_server_version(db), JOBVISOR_CONFIG=str(config))
    worker = start_worker(env, "backup", "--poll", "0.2", "--backoff", "0.05",
                          "--max-backoff", "0.1", log=tmp_path / "worker.log")
    try:
        done = _cli(env, "backup", "--wait", "--timeout", "180")
    finally:
        assert stop(worker) == 0

    assert done.returncode == 1, done.stdout + done.stderr
    job_id = int(done.stdout.strip())
    # Retries are announced on stderr when a poll sees them; the verdict always is.
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"jobvisor: backup job {job_id} failed after 2 of 2 attempts: "
                           "backup_dump_failed: pg_dump exited with code 3")
    job = q.get_job(db, job_id)
    assert (job["status"], job["error_code"], job["attempts"], job["max_attempts"]) == (
        "failed", "backup_dump_failed", 2, 2)
    manifests = [_manifest(d) for d in _run_dirs(backups)]
    assert [(m["status"], m["error_code"], m["exit_code"]) for m in manifests] == [
        ("failed", "backup_dump_failed", 3)] * 2
    assert not any((d / "dump.pgdump").exists() for d in _run_dirs(backups))


def test_cancelling_a_running_backup_stops_pg_dump_and_cancels_the_job(db, worker_env,
                                                                      tmp_path):
    backups = tmp_path / "backups"
    env = _env(worker_env, backups)
    _make_gate(db)
    worker = start_worker(env, "backup", "--poll", "0.2", log=tmp_path / "worker.log")
    try:
        with psycopg.connect(worker_env["DATABASE_URL"]) as blocker:
            blocker.execute(f"LOCK TABLE {GATE} IN ACCESS EXCLUSIVE MODE")
            job_id = int(_cli(env, "backup").stdout)
            dumper = wait_for(lambda: _pg_dump_in(psutil.Process(worker.pid)),
                              what="pg_dump running")
            assert _cli(env, "jobs", "cancel", str(job_id)).returncode == 0
            wait_for(lambda: q.get_job(db, job_id)["status"] == "cancelled",
                     what="job cancelled")
            wait_for(lambda: _gone(dumper), what="pg_dump gone")
    finally:
        assert stop(worker) == 0
    (run_dir,) = _run_dirs(backups)
    manifest = _manifest(run_dir)
    assert (manifest["status"], manifest["error_code"]) == ("failed", "backup_cancelled")
    assert {p.name for p in run_dir.iterdir()} == {"manifest.json"}


# --- the cron schedule ------------------------------------------------------------------------


def test_two_supervisors_with_the_same_schedule_make_one_backup_per_slot(db, worker_env,
                                                                        tmp_path):
    backups = tmp_path / "backups"
    env = _env(worker_env, backups)
    backup = {"schedule": "* * * * *", "processes": {"min": 1, "max": 1}, "concurrency": 1,
              "memory_per_job": "1MiB", "retry": {"max_attempts": 1}}
    sups = [Supervisor(tmp_path, env, base_config(free_port(), {"backup": backup}),
                       name=f"sup{i}").start() for i in (1, 2)]
    try:
        def enqueued() -> list[dict[str, int]]:
            return [{e["slot"]: e["job_id"] for e in s.events("cron_enqueued")} for s in sups]

        # Every minute is a slot; cron runs on the elected supervisor only (the sticky key
        # still guards a slot across a change of leader).
        slot = wait_for(lambda: min(set().union(*enqueued()), default=None),
                        what="a supervisor enqueuing a slot")
        (first,) = [seen[slot] for seen in enqueued() if slot in seen]
        wait_for(lambda: q.get_job(db, first)["status"] == "completed",
                 what="the slot's backup finished")
        assert sum(1 for s in sups if s.events("leadership_taken")) == 1
    finally:
        for sup in sups:
            assert sup.stop() == 0

    rows = db.execute("SELECT idempotency_key, status, attempts, result->>'run_id'"
                      " FROM jobvisor.jobs WHERE job_type = 'backup'").fetchall()
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)) and all(k.startswith("cron:backup:") for k in keys)
    assert [r[1:3] for r in rows if r[0] == f"cron:backup:{slot}"] == [("completed", 1)]
    # One dump per completed job, and no run that no job accounts for.
    succeeded = {d.name for d in _run_dirs(backups) if _manifest(d)["status"] == "succeeded"}
    assert succeeded == {r[3] for r in rows if r[1] == "completed"}
    assert len(_run_dirs(backups)) == sum(r[2] for r in rows)


# --- secrets ------------------------------------------------------------------------------------


@pytest.fixture
def secret_target(db_dsn: str) -> Iterator[tuple[str, str, str]]:
    """(admin DSN, role DSN, password): a migrated database and a role with a password.

    Over TCP when the server listens there (the test server, or the PostgreSQL service
    at 127.0.0.1:5432 next to the embedded one); the local servers trust any password,
    which is fine: what is tested is where the password travels. With no TCP server at
    all, the embedded server's socket carries a keyword DSN with the password instead.
    The role is a superuser: the point is secrets, not privileges, and it must run the
    queue, the migration check and a dump of row-level-secured tables.
    """
    info = conninfo_to_dict(db_dsn)
    own_db: tuple[str, str] | None = None
    if info.get("host", "").startswith("/") and _reachable(LOCAL_SERVICE):
        name = f"jobvisor_bk_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(LOCAL_SERVICE, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        own_db = (LOCAL_SERVICE, name)
        admin = make_conninfo(LOCAL_SERVICE, dbname=name)
        migrate(admin)
    else:
        admin = db_dsn
    role = f"jv_bk_{uuid.uuid4().hex[:8]}"
    password = f"S3cr3t-{uuid.uuid4().hex}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN SUPERUSER PASSWORD '{password}'")
        _make_gate(conn)
    target = conninfo_to_dict(admin)
    if target.get("host", "").startswith("/"):
        dsn = make_conninfo(**dict(target, user=role, password=password))
    else:
        dsn = (f"postgresql://{role}:{password}@{target.get('host') or '127.0.0.1'}:"
               f"{target.get('port') or 5432}/{target['dbname']}")
    try:
        yield admin, dsn, password
    finally:
        server = own_db[0] if own_db else admin
        with psycopg.connect(server, autocommit=True) as conn:
            if own_db:
                conn.execute(f'DROP DATABASE IF EXISTS "{own_db[1]}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def _reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


def test_password_and_dsn_never_appear_in_arguments_logs_or_manifests(secret_target,
                                                                      worker_env, tmp_path):
    admin, dsn, password = secret_target
    backups = tmp_path / "backups"
    env = _env(worker_env, backups, DATABASE_URL=dsn)
    backup = {"processes": {"min": 1, "max": 1}, "concurrency": 1, "memory_per_job": "1MiB"}
    sup = Supervisor(tmp_path, env, base_config(free_port(), {"backup": backup})).start()
    cli: subprocess.Popen[str] | None = None
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            wait_for(lambda: sup.pids(conn, "backup"), what="backup worker up")
        with psycopg.connect(admin) as blocker:
            blocker.execute(f"LOCK TABLE {GATE} IN ACCESS EXCLUSIVE MODE")
            cli = _cli_background(env, "backup", "--wait", "--timeout", "180")
            root = psutil.Process(sup.proc.pid)
            dumper = wait_for(lambda: _pg_dump_in(root), what="pg_dump running")

            tree = [root, *root.children(recursive=True)]
            pids = {p.pid for p in tree} | {cli.pid, dumper.pid}
            assert b"--format=custom" in _cmdline(dumper.pid)  # the real pg_dump, mid-run
            assert {"jobvisor", "workers"} <= {_role(_cmdline(pid)) for pid in pids}
            for pid in pids:
                assert password.encode() not in _cmdline(pid), f"password in argv of {pid}"
                assert dsn.encode() not in _cmdline(pid), f"DSN in argv of {pid}"
            # And no process on this machine at all, whoever started it.
            assert not [pid for pid, line in _all_cmdlines().items() if password.encode() in line]
            blocker.rollback()
        out, err = cli.communicate(timeout=180)
        assert cli.returncode == 0, err
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
        assert sup.stop() == 0

    (run_dir,) = _run_dirs(backups)
    texts = {"manifest": (run_dir / "manifest.json").read_text(),
             "supervisor and worker logs": sup.log(), "CLI output": out + err}
    with psycopg.connect(admin) as conn:
        (job,) = conn.execute("SELECT to_jsonb(j) FROM jobvisor.jobs j").fetchone()
    texts["job row"] = json.dumps(job)
    assert json.loads(texts["manifest"])["status"] == "succeeded"
    assert "backup_succeeded" in texts["supervisor and worker logs"]
    for what, text in texts.items():
        assert password not in text, f"password in {what}"
        assert dsn not in text, f"DSN in {what}"


def _role(cmdline: bytes) -> str:
    """Which of our programs a command line runs: the CLI/supervisor, a worker, or other."""
    argv = cmdline.split(b"\0")
    if b"supervisor_app" in argv:
        return "jobvisor"
    if b"workers" in argv:
        return "workers"
    return "other"


# --- the handler on its own -----------------------------------------------------------------


class _Ctx:
    cancelled = False

    def progress(self, fraction: float, note: str | None = None) -> None:
        pass


def test_handler_without_any_dsn_fails_permanently_naming_the_variable(monkeypatch):
    from workers import Job
    from workers.backup.handler import handle

    for name in ("BACKUP_DATABASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PermanentError) as err:
        handle(Job(1, "backup", {}, 1, 3), _Ctx())  # type: ignore[arg-type]
    assert err.value.code == BACKUP_CONFIG_INVALID
    assert "BACKUP_DATABASE_URL" in err.value.message
