"""Backups: real pg_dump/pg_restore, fakes that hang or fail, secrets, retention.

Servers: JOBVISOR_TEST_DATABASE_URL if set, else the local service at
postgresql://postgres@127.0.0.1:5432/postgres; the dump/restore test also runs against
the embedded pgserver (PostgreSQL 16) so pg_dump selection by server major is covered.
Each test works in its own scratch database and role, dropped afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from workers.backup import dump as dump_module
from workers.backup.dsn import (
    DsnError,
    child_environment,
    parse_dsn,
    write_passfile,
)
from workers.backup.dump import (
    BACKUP_CANCELLED,
    BACKUP_DUMP_FAILED,
    BACKUP_STORAGE_UNAVAILABLE,
    BACKUP_TIMEOUT,
    BACKUP_TOOL_MISSING,
    BACKUP_VERSION_MISMATCH,
    BackupConfigError,
    BackupSettings,
    parse_pg_version,
    run_backup,
    run_backup_or_raise,
)
from workers.backup.manifest import (
    DUMP_NAME,
    MANIFEST_NAME,
    Manifest,
    read_manifest,
    redact_secrets,
    sanitize_message,
    write_manifest,
)
from workers.backup.retention import apply_retention, list_backups, new_run_id
from workers.core.errors import PermanentError, TransientError
from workers.core.logs import JsonFormatter

FAKES = Path(__file__).resolve().parent / "fakes"
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


# --- servers and scratch databases ---------------------------------------------------



# Test-only values: they must never show up in argv, manifests or logs.
TEST_PASSWORD = "hunter2"
UNREACHABLE_DSN = f"postgresql://u:{TEST_PASSWORD}@127.0.0.1:1/x"

def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """The log lines as jobvisor writes them: event name and every field."""
    fmt = JsonFormatter()
    return "\n".join(fmt.format(r) for r in caplog.records)

def _reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


@pytest.fixture(scope="module")
def service_dsn() -> str:
    dsn = os.environ.get("JOBVISOR_TEST_DATABASE_URL") or LOCAL_DSN
    if not _reachable(dsn):
        pytest.skip("no PostgreSQL service at JOBVISOR_TEST_DATABASE_URL / 127.0.0.1:5432")
    return dsn


@pytest.fixture(scope="module")
def pgserver_dsn() -> Iterator[str]:
    pgserver = pytest.importorskip("pgserver")
    # Not pytest's tmp dir: that one is 0700 and pgserver runs postgres as another
    # user when the tests run as root.
    data = Path(tempfile.mkdtemp(prefix="jobvisor-backup-pg-"))
    server = pgserver.get_server(data / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def admin_dsn(request: pytest.FixtureRequest) -> str:
    """The service if there is one, else the embedded server: tests that need any DB."""
    dsn = os.environ.get("JOBVISOR_TEST_DATABASE_URL") or LOCAL_DSN
    if _reachable(dsn):
        return dsn
    return request.getfixturevalue("pgserver_dsn")


def _create_scratch_db(admin: str, rows: int = 500) -> tuple[str, str]:
    name = f"jv_backup_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(admin, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id serial PRIMARY KEY, body text NOT NULL)")
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, item_id int REFERENCES items)")
        conn.execute(
            "INSERT INTO items (body) SELECT 'item ' || g FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.execute("INSERT INTO notes SELECT g, g FROM generate_series(1, 37) g")
    return name, dsn


def _drop_db(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def scratch_db(admin_dsn: str) -> Iterator[str]:
    name, dsn = _create_scratch_db(admin_dsn)
    yield dsn
    _drop_db(admin_dsn, name)


@pytest.fixture
def secret_role(admin_dsn: str, scratch_db: str) -> Iterator[tuple[str, str]]:
    """(dsn, password) for a read-only login role with a password, over TCP when the
    server listens on TCP. The local service trusts any password: it must still travel
    via the passfile, which is what the tests check."""
    role = f"jv_bk_{uuid.uuid4().hex[:8]}"
    password = f"S3cr3t-{uuid.uuid4().hex}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
        conn.execute(f'GRANT pg_read_all_data TO "{role}"')
    info = conninfo_to_dict(scratch_db)
    info.update(user=role, password=password)
    if info.get("host", "").startswith("/"):
        dsn = make_conninfo(**info)  # the embedded server: socket only
    else:
        host = info.get("host") or "127.0.0.1"
        dsn = f"postgresql://{role}:{password}@{host}:{info.get('port') or 5432}/{info['dbname']}"
    yield dsn, password
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def _server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    assert row is not None
    return str(row[0]).split()[0]


def _counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("items", "notes")
        }


def _fake_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: str) -> Path:
    """Put `fake` first on PATH under the name pg_dump."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    target = bin_dir / "pg_dump"
    shutil.copy(FAKES / fake, target)
    target.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return target


def _settings(dsn: str, backup_dir: Path, **kw: object) -> BackupSettings:
    return BackupSettings(dsn=dsn, backup_dir=backup_dir, **kw)  # type: ignore[arg-type]


def _files(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir()}


# --- real dump and restore -------------------------------------------------------------


@pytest.mark.parametrize("server", ["service", "pgserver"])
def test_real_dump_restores_into_fresh_database_with_equal_row_counts(
    server: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    admin = request.getfixturevalue(f"{server}_dsn")
    source_name, source_dsn = _create_scratch_db(admin, rows=1234)
    target_name = f"jv_restore_{uuid.uuid4().hex[:10]}"
    try:
        manifest = run_backup(_settings(source_dsn, tmp_path / "backups"))
        assert manifest.status == "succeeded", manifest.error_message
        server_version = _server_version(admin)
        assert manifest.server_version == server_version
        # pg_dump matches the server's major version (prefer the matching one).
        assert manifest.pg_dump_version.split(".")[0] == server_version.split(".")[0]
        if server == "pgserver":
            assert manifest.pg_dump_source == "pgserver"
        elif server_version.startswith("15.") and Path("/usr/lib/postgresql/15/bin").is_dir():
            assert manifest.pg_dump_path == "/usr/lib/postgresql/15/bin/pg_dump"

        run_dir = manifest.directory
        assert run_dir is not None and run_dir.parent == tmp_path / "backups"
        assert _files(run_dir) == {DUMP_NAME, MANIFEST_NAME}
        dump = run_dir / DUMP_NAME
        assert stat.S_IMODE(dump.stat().st_mode) == 0o600
        assert manifest.bytes == dump.stat().st_size
        assert manifest.sha256 == hashlib.sha256(dump.read_bytes()).hexdigest()
        assert read_manifest(run_dir) == manifest
        assert manifest.duration_s is not None and manifest.finished_at

        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{target_name}"')
        target_dsn = make_conninfo(admin, dbname=target_name)
        pg_restore = Path(os.path.realpath(manifest.pg_dump_path)).parent / "pg_restore"
        env = child_environment(parse_dsn(target_dsn))
        subprocess.run(
            [str(pg_restore), "--no-owner", "--exit-on-error", "--dbname", target_name,
             str(dump)],
            env=env, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
        )
        assert _counts(target_dsn) == _counts(source_dsn) == {"items": 1234, "notes": 37}
    finally:
        _drop_db(admin, target_name)
        _drop_db(admin, source_name)


def test_connection_keywords_without_env_variable_still_reach_pg_dump(
    scratch_db: str, tmp_path: Path
) -> None:
    dsn = make_conninfo(scratch_db, keepalives_idle="30", keepalives="1")
    manifest = run_backup(_settings(dsn, tmp_path))
    assert manifest.status == "succeeded", manifest.error_message
    # `--dbname=keepalives...` must not have replaced the database from PGDATABASE.
    pg_restore = Path(os.path.realpath(manifest.pg_dump_path)).parent / "pg_restore"
    listing = subprocess.run([str(pg_restore), "--list", str(manifest.dump_path)],
                             check=True, capture_output=True, text=True, timeout=60).stdout
    assert f"dbname: {conninfo_to_dict(scratch_db)['dbname']}" in listing


# --- hangs, failures, storage ------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_hanging_pg_dump_is_killed_at_timeout_and_manifest_says_backup_timeout(
    scratch_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_on_path(tmp_path, monkeypatch, "pg_dump_hang.sh")
    pid_file = tmp_path / "fake.pids"
    monkeypatch.setenv("JOBVISOR_FAKE_PG_VERSION", _server_version(scratch_db))
    monkeypatch.setenv("JOBVISOR_FAKE_PID_FILE", str(pid_file))

    manifest = run_backup(_settings(scratch_db, tmp_path / "b", timeout_s=1, kill_grace_s=0.2))

    assert manifest.status == "failed"
    assert manifest.error_code == BACKUP_TIMEOUT
    assert manifest.pg_dump_source == "PATH"
    assert read_manifest(manifest.directory).error_code == BACKUP_TIMEOUT  # type: ignore[arg-type]
    # The partial dump is gone; only the manifest of the failed attempt stays.
    assert _files(manifest.directory) == {MANIFEST_NAME}  # type: ignore[arg-type]
    # The fake ignored SIGTERM and had a child: the whole group got SIGKILL.
    script_pid, child_pid = (int(p) for p in pid_file.read_text().split())
    assert not _alive(script_pid)
    assert not _alive(child_pid)


def test_should_stop_kills_pg_dump_and_reports_cancelled(
    scratch_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_on_path(tmp_path, monkeypatch, "pg_dump_hang.sh")
    monkeypatch.setenv("JOBVISOR_FAKE_PG_VERSION", _server_version(scratch_db))
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    manifest = run_backup(_settings(scratch_db, tmp_path, kill_grace_s=0.2),
                          should_stop=should_stop)
    assert (manifest.status, manifest.error_code) == ("failed", BACKUP_CANCELLED)
    assert _files(manifest.directory) == {MANIFEST_NAME}  # type: ignore[arg-type]


def test_failing_pg_dump_reports_exit_code_and_leaks_nothing(
    secret_role: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn, password = secret_role
    info = conninfo_to_dict(dsn)
    _fake_on_path(tmp_path, monkeypatch, "pg_dump_fail.sh")
    monkeypatch.setenv("JOBVISOR_FAKE_PG_VERSION", _server_version(dsn))
    monkeypatch.setenv("JOBVISOR_FAKE_EXIT_CODE", "3")
    caplog.set_level(logging.DEBUG, logger="jobvisor.backup")

    manifest = run_backup(_settings(dsn, tmp_path / "b"))

    assert (manifest.status, manifest.error_code, manifest.exit_code) == (
        "failed", BACKUP_DUMP_FAILED, 3)
    message = manifest.error_message or ""
    assert message.startswith("pg_dump exited with code 3: ")
    assert "password authentication failed" in message  # still says what went wrong
    on_disk = json.loads((manifest.directory / MANIFEST_NAME).read_text())  # type: ignore[operator]
    on_disk.pop("pg_dump_path")  # names the (fake) tool on purpose: the test's tmp dir
    manifest_text = json.dumps(on_disk)
    for leaked in (password, info["user"], info["dbname"], info["host"], "/srv/internal",
                   str(tmp_path)):
        assert leaked not in message
        assert leaked not in manifest_text
    assert _files(manifest.directory) == {MANIFEST_NAME}  # type: ignore[arg-type]
    # The log keeps the details for operators, but never the password or the DSN.
    logged = _logged(caplog)
    assert "password authentication failed" in logged
    assert password not in logged
    assert dsn not in logged


def test_pg_dump_older_than_server_is_version_mismatch_before_dumping(
    scratch_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "pg_dump"
    shutil.copy(FAKES / "pg_dump_fail.sh", fake)
    monkeypatch.setenv("JOBVISOR_FAKE_PG_VERSION", "9.6.24")

    manifest = run_backup(_settings(scratch_db, tmp_path / "b", pg_dump=str(fake)))

    assert (manifest.status, manifest.error_code) == ("failed", BACKUP_VERSION_MISMATCH)
    assert manifest.exit_code is None  # the fake never ran a dump
    assert manifest.pg_dump_version == "9.6"
    assert "older than server" in (manifest.error_message or "")


def _versioned_fake(directory: Path, name: str, version: str) -> str:
    path = directory / name
    path.write_text(f'#!/bin/sh\nJOBVISOR_FAKE_PG_VERSION={version} exec "{FAKES}/pg_dump_fail.sh" "$@"\n')
    path.chmod(0o755)
    return str(path)


def test_pg_dump_selection_prefers_matching_major_then_closest_newer(
    scratch_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    major = int(_server_version(scratch_db).split(".")[0])
    older = _versioned_fake(tmp_path, "older", f"{major - 1}.3")
    same = _versioned_fake(tmp_path, "same", f"{major}.1")
    newer = _versioned_fake(tmp_path, "newer", f"{major + 1}.0")
    newest = _versioned_fake(tmp_path, "newest", f"{major + 2}.0")
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)

    candidates = [("PATH", newest), ("pgserver", str(broken)), ("x", older), ("y", newer),
                  ("postgresql", same)]
    monkeypatch.setattr(dump_module, "find_pg_dump_candidates", lambda: candidates)
    assert run_backup(_settings(scratch_db, tmp_path / "b")).pg_dump_path == same

    candidates.remove(("postgresql", same))
    assert run_backup(_settings(scratch_db, tmp_path / "b")).pg_dump_path == newer


def test_missing_pg_dump_is_backup_tool_missing(
    scratch_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = run_backup(_settings(scratch_db, tmp_path, pg_dump=str(tmp_path / "nope")))
    assert (manifest.status, manifest.error_code) == ("failed", BACKUP_TOOL_MISSING)
    assert str(tmp_path) not in (manifest.error_message or "")

    monkeypatch.setattr(dump_module, "find_pg_dump_candidates", lambda: [])
    manifest = run_backup(_settings(scratch_db, tmp_path))
    assert manifest.error_code == BACKUP_TOOL_MISSING


def test_backup_dir_that_cannot_be_created_is_storage_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    # Storage is checked first: no database is contacted.
    manifest = run_backup(_settings(UNREACHABLE_DSN, blocker / "backups"))
    assert (manifest.status, manifest.error_code) == ("failed", BACKUP_STORAGE_UNAVAILABLE)
    assert manifest.directory is None
    assert str(tmp_path) not in (manifest.error_message or "")
    assert "ENOTDIR" in (manifest.error_message or "")


def _in_child_as(uid: int | None, fn) -> dict:  # type: ignore[no-untyped-def]
    """Run fn() in a forked child (as `uid` when given); return its JSON-able result.

    As root, permission bits do not stop writes: the child drops to `nobody`. Forking
    (not exec'ing) means it needs nothing from a home directory it may not read.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(read_fd)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            data = json.dumps(fn()).encode()
            os.write(write_fd, data)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


def test_read_only_backup_dir_is_storage_unavailable() -> None:
    base = Path(tempfile.mkdtemp(prefix="jobvisor-backup-ro-"))
    try:
        base.chmod(0o755)
        read_only = base / "backups"
        read_only.mkdir(mode=0o555)
        read_only.chmod(0o555)
        settings = _settings(UNREACHABLE_DSN, read_only)
        uid = 65534 if os.geteuid() == 0 else None
        result = _in_child_as(uid, lambda: run_backup(settings).to_dict())
        assert (result["status"], result["error_code"]) == ("failed", BACKUP_STORAGE_UNAVAILABLE)
        assert "EACCES" in result["error_message"]
        assert str(base) not in result["error_message"]
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# --- secrets --------------------------------------------------------------------------------


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    "utf-8", "replace")
            except OSError:
                continue
    return out


def _child_pg_dump() -> int | None:
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if int(stat_fields[1]) == me and argv0.endswith(b"pg_dump"):
            return int(entry.name)
    return None


def test_password_and_dsn_never_appear_in_any_process_arguments(
    secret_role: tuple[str, str],
    scratch_db: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn, password = secret_role
    caplog.set_level(logging.DEBUG, logger="jobvisor.backup")
    result: dict[str, Manifest] = {}
    with psycopg.connect(scratch_db) as blocker:
        # An exclusive lock holds the real pg_dump at its first table lock, running.
        blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        thread = threading.Thread(
            target=lambda: result.setdefault("m", run_backup(_settings(dsn, tmp_path))))
        thread.start()
        try:
            deadline = time.monotonic() + 60
            pid = None
            while pid is None and time.monotonic() < deadline:
                pid = _child_pg_dump()
                time.sleep(0.05)
            assert pid is not None, "pg_dump never started"

            cmdlines = _cmdlines()
            assert "--format=custom" in cmdlines[pid]
            for proc_pid, cmdline in cmdlines.items():
                assert password not in cmdline, f"password in argv of pid {proc_pid}"
                assert dsn not in cmdline
            assert password not in cmdlines[os.getpid()]

            environ = dict(
                item.split(b"=", 1) for item in
                Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
            assert b"PGPASSWORD" not in environ  # the passfile carries it
            assert environ[b"PGUSER"] == conninfo_to_dict(dsn)["user"].encode()
            passfile = Path(environ[b"PGPASSFILE"].decode())
            assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
            assert not any(k.endswith(b"DATABASE_URL") for k in environ)
        finally:
            blocker.rollback()
        thread.join(120)

    manifest = result["m"]
    assert manifest.status == "succeeded", manifest.error_message
    assert not passfile.exists()
    assert password not in (manifest.directory / MANIFEST_NAME).read_text()  # type: ignore[operator]
    logged = _logged(caplog)
    assert password not in logged and dsn not in logged


# --- DSN handling ---------------------------------------------------------------------------


def test_backup_dsn_prefers_backup_database_url() -> None:
    from workers.core.dsn import dsn_for

    assert dsn_for("backup", {"BACKUP_DATABASE_URL": "b", "DATABASE_URL": "d"}) == "b"
    assert dsn_for("backup", {"BACKUP_DATABASE_URL": " ", "DATABASE_URL": "d"}) == "d"
    assert dsn_for("backup", {}) is None


def test_dsn_becomes_pg_environment_and_a_separate_password() -> None:
    conn = parse_dsn(f"postgresql://bk:{quote('p:w', safe='')}@db1.internal:6432,db2:6433/app?sslmode=require"
                     "&keepalives_idle=30&application_name=nightly")
    assert conn.env == {"PGHOST": "db1.internal,db2", "PGPORT": "6432,6433",
                        "PGUSER": "bk", "PGDATABASE": "app", "PGSSLMODE": "require",
                        "PGAPPNAME": "nightly"}
    assert conn.password == "p:w"
    assert conn.conninfo_extras == "keepalives_idle=30"
    assert set(conn.identifiers) == {"db1.internal", "db2", "bk", "app"}
    assert "p:w" not in repr(conn)


def test_unix_socket_host_goes_to_pghost() -> None:
    conn = parse_dsn("postgresql://postgres:@/postgres?host=/tmp/pg-socket")
    assert conn.env == {"PGHOST": "/tmp/pg-socket", "PGUSER": "postgres",
                        "PGDATABASE": "postgres"}
    assert conn.password is None


def test_child_environment_uses_passfile_and_drops_dsn_variables(tmp_path: Path) -> None:
    conn = parse_dsn("host=h user=u dbname=d password='pa:ss\\\\word'")
    passfile = write_passfile(tmp_path, conn.password)  # type: ignore[arg-type]
    base = {"PATH": "/bin", "DATABASE_URL": f"postgresql://x:{TEST_PASSWORD}@h/d", "PGPASSWORD": "old",
            "BACKUP_DATABASE_URL": "z", "AWS_SECRET_ACCESS_KEY": "k", "PGSSLMODE": "verify-full"}
    env = child_environment(conn, base, passfile=passfile)
    assert env == {"PATH": "/bin", "PGHOST": "h", "PGUSER": "u", "PGDATABASE": "d",
                   "PGSSLMODE": "verify-full", "PGAPPNAME": "jobvisor-backup",
                   "PGPASSFILE": str(passfile)}
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
    assert passfile.read_text() == "*:*:*:*:pa\\:ss\\\\word\n"


def test_unusable_dsn_errors_do_not_quote_the_dsn() -> None:
    with pytest.raises(DsnError) as bad:
        parse_dsn("host=h password=hunter2 user")
    assert "hunter2" not in str(bad.value)
    with pytest.raises(DsnError, match="sslpassword"):
        parse_dsn("host=h sslpassword=hunter2")


def test_settings_from_env() -> None:
    env = {"DATABASE_URL": "postgresql://a@h/d", "BACKUP_DIR": "/srv/backups",
           "BACKUP_TIMEOUT": "5m", "BACKUP_KEEP_LAST": "3", "BACKUP_KEEP_DAYS": "1.5",
           "PG_DUMP": "/opt/pg/bin/pg_dump"}
    settings = BackupSettings.from_env(env)
    assert settings == BackupSettings(dsn="postgresql://a@h/d", backup_dir=Path("/srv/backups"),
                                      timeout_s=300, keep_last=3, keep_days=1.5,
                                      pg_dump="/opt/pg/bin/pg_dump")
    assert "postgresql://" not in repr(settings)
    defaults = BackupSettings.from_env({}, dsn="postgresql://embedded")
    assert (defaults.timeout_s, defaults.keep_last, defaults.keep_days) == (300, 7, None)
    assert defaults.backup_dir == Path(".jobvisor/backups").absolute()
    assert BackupSettings.from_env({"DATABASE_URL": "x", "BACKUP_KEEP_LAST": "off"}).keep_last is None
    with pytest.raises(BackupConfigError):
        BackupSettings.from_env({})
    with pytest.raises(BackupConfigError, match="BACKUP_TIMEOUT"):
        BackupSettings.from_env({"DATABASE_URL": "x", "BACKUP_TIMEOUT": "soon"})


def test_parse_pg_version() -> None:
    assert parse_pg_version("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)") == ("15.20", 15)
    assert parse_pg_version("pg_dump (PostgreSQL) 17beta1") == ("17", 17)
    assert parse_pg_version("something else") is None


# --- sanitizing -----------------------------------------------------------------------------


def test_sanitize_message_strips_names_addresses_paths_and_passwords(tmp_path: Path) -> None:
    raw = (
        'connection to server at "db1.corp.example" (10.1.2.3), port 5432 failed: '
        f'FATAL: password authentication failed for user "backup_ro" {TEST_PASSWORD} '
        f"dsn=postgresql://backup_ro:{TEST_PASSWORD}@db1.corp.example/app host=db1 "
        "on database app via fe80::1ff:fe23:4567:890a at 03:00:00, "
        f"see /var/log/pg.log and {tmp_path}/20250101T000000000000Z-abcdef/dump.pgdump.partial"
    )
    out = sanitize_message(raw, secrets_=[TEST_PASSWORD], identifiers=["db1", "backup_ro", "app"],
                           backup_dir=tmp_path, limit=1000)
    for leaked in (TEST_PASSWORD, "db1", "corp.example", "10.1.2.3", "backup_ro", " app ",
                   "fe80", "/var/log", str(tmp_path)):
        assert leaked not in out
    assert "port 5432 failed" in out and "03:00:00" in out
    assert "<backup_dir>/20250101T000000000000Z-abcdef/dump.pgdump.partial" in out
    assert len(sanitize_message("x" * 5000)) <= 300


def test_redact_secrets_keeps_details_but_not_passwords() -> None:
    out = redact_secrets(f'failed for user "bk" password={TEST_PASSWORD} '
                         f"postgresql://bk:{TEST_PASSWORD}@h/d", [TEST_PASSWORD])
    assert TEST_PASSWORD not in out and 'user "bk"' in out


# --- the job wrapper ------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "error"), [
    (BACKUP_TIMEOUT, TransientError), (BACKUP_DUMP_FAILED, TransientError),
    (BACKUP_STORAGE_UNAVAILABLE, TransientError), (BACKUP_TOOL_MISSING, PermanentError),
    (BACKUP_VERSION_MISMATCH, PermanentError),
])
def test_run_backup_or_raise_maps_codes_to_queue_errors(
    code: str, error: type[Exception], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    failed = Manifest(run_id="r", status="failed", started_at="t", error_code=code,
                      error_message="short")
    monkeypatch.setattr(dump_module, "run_backup", lambda *a, **k: failed)
    with pytest.raises(error) as raised:
        run_backup_or_raise(_settings("x", tmp_path))
    assert (raised.value.code, raised.value.message) == (code, "short")  # type: ignore[attr-defined]


# --- retention ------------------------------------------------------------------------------

NOW = datetime(2025, 11, 25, 3, 0, tzinfo=UTC)


def _make_run(backup_dir: Path, age: timedelta, status: str, *, dump: bool | None = None,
              extra: str | None = None) -> Path:
    started = NOW - age
    run_dir = backup_dir / new_run_id(started, uuid.uuid4().hex[:6])
    run_dir.mkdir(parents=True)
    with_dump = status == "succeeded" if dump is None else dump
    if with_dump:
        (run_dir / DUMP_NAME).write_bytes(b"PGDMP")
    if extra:
        (run_dir / extra).write_bytes(b"PGDMP-part")
    if status != "none":
        write_manifest(Manifest(run_id=run_dir.name, status=status,
                                started_at=started.isoformat(),
                                file=DUMP_NAME if with_dump else None), run_dir)
    return run_dir


def test_retention_keeps_last_n_and_cleans_failed_leftovers(tmp_path: Path) -> None:
    ok = [_make_run(tmp_path, timedelta(days=d), "succeeded") for d in range(1, 6)]
    old_failed = _make_run(tmp_path, timedelta(days=2, hours=1), "failed")
    new_failed = _make_run(tmp_path, timedelta(hours=1), "failed", extra=DUMP_NAME + ".partial")
    crashed = _make_run(tmp_path, timedelta(days=3), "running", extra=DUMP_NAME + ".partial")
    no_manifest = _make_run(tmp_path, timedelta(days=3), "none")
    in_progress = _make_run(tmp_path, timedelta(minutes=5), "running")
    unrelated = tmp_path / "notes"
    unrelated.mkdir()

    removed = apply_retention(tmp_path, keep_last=2, keep_days=None, now=NOW)

    assert set(removed) == {ok[2], ok[3], ok[4], old_failed, crashed, no_manifest}
    remaining = {p for p in tmp_path.iterdir()}
    assert remaining == {ok[0], ok[1], new_failed, in_progress, unrelated}
    assert _files(new_failed) == {MANIFEST_NAME}  # the partial dump went, the record stays
    assert [m.directory for m in list_backups(tmp_path)] == [in_progress, new_failed, ok[0], ok[1]]


def test_retention_by_days_never_deletes_the_newest_good_dump(tmp_path: Path) -> None:
    ok = [_make_run(tmp_path, timedelta(days=d), "succeeded") for d in (10, 20, 30)]
    assert set(apply_retention(tmp_path, None, 1, now=NOW)) == {ok[1], ok[2]}
    assert set(tmp_path.iterdir()) == {ok[0]}
    assert apply_retention(tmp_path, 0, 0, now=NOW) == []


def test_retention_rules_combine_as_union_and_ignore_lost_dumps(tmp_path: Path) -> None:
    lost = _make_run(tmp_path, timedelta(hours=1), "succeeded", dump=False)  # dump deleted
    ok = [_make_run(tmp_path, timedelta(days=d), "succeeded") for d in (1, 2, 3, 9)]
    removed = apply_retention(tmp_path, keep_last=2, keep_days=3.5, now=NOW)
    # Last 2 keeps ok[0..1], 3.5 days also keeps ok[2]. The manifest whose dump is gone
    # does not count as a backup (so it did not use up a "last 2" slot); being newer
    # than the newest good dump, it stays as a record.
    assert set(removed) == {ok[3]}
    assert lost.exists()


def test_retention_without_rules_keeps_every_good_dump(tmp_path: Path) -> None:
    ok = [_make_run(tmp_path, timedelta(days=d), "succeeded") for d in (1, 50, 500)]
    assert apply_retention(tmp_path, None, None, now=NOW) == []
    assert set(tmp_path.iterdir()) == set(ok)


def test_backup_run_applies_retention(scratch_db: str, tmp_path: Path) -> None:
    for _ in range(3):
        assert run_backup(_settings(scratch_db, tmp_path, keep_last=2)).ok
    manifests = list_backups(tmp_path)
    assert len(manifests) == 2 and all(m.ok for m in manifests)
