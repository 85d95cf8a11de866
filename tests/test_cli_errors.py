"""Input the database would refuse, and databases that can't serve the CLI: each is exit 2
with one line naming the problem, never a traceback, never payload content."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from supervisor_app import database
from tests.test_cli import jv
from workers.core import queue as q

SECRET = "tellnoone"  # payload content: must never reach stdout or stderr


def one_line_exit_2(out, needle: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def no_jobs(db) -> bool:
    return db.execute("SELECT count(*) FROM jobvisor.jobs").fetchone()[0] == 0


# --- payloads jsonb can't hold, refused before anything is sent ------------------------------

@pytest.mark.parametrize(("payload", "needle"), [
    ('{"a": "' + SECRET + '\\u0000y"}', "NUL character"),
    ('{"' + SECRET + '\\u0000": 1}', "NUL character"),
    ('{"a": "' + SECRET + '\\ud800"}', "lone surrogate"),
    ('{"a": "' + SECRET + '", "b": NaN}', "NaN and Infinity are not JSON"),
    ('{"a": "' + SECRET + '", "b": -Infinity}', "NaN and Infinity are not JSON"),
    ('{"a": "' + SECRET + '", "b": 1e999}', "number out of range"),
    ("[" * 5000 + "]" * 5000, "nesting"),
    ("[" * 600 + "]" * 600, "nesting deeper than"),
])
def test_payload_jsonb_cannot_hold_is_refused_before_sending(db, worker_env, payload, needle):
    out = jv(worker_env, "enqueue", "noop", "--payload", payload)
    line = one_line_exit_2(out, needle)
    assert line.startswith("jobvisor: --payload: ")
    assert SECRET not in out.stdout + out.stderr
    assert no_jobs(db)


def test_payload_from_invalid_utf8_argument_is_refused(db, worker_env):
    # Undecodable argv bytes reach Python as lone surrogates (surrogateescape).
    import subprocess
    import sys

    from tests.test_cli import REPO

    arg = b'{"a": "' + SECRET.encode() + b'\xe9"}'
    out = subprocess.run([sys.executable, "-m", "supervisor_app", "enqueue", "noop",
                          "--payload", arg], env=worker_env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    one_line_exit_2(out, "lone surrogate")
    assert SECRET not in out.stdout + out.stderr
    assert no_jobs(db)


@pytest.mark.parametrize(("content", "lineno", "needle"), [
    (b'{"ok": 1}\n' + b"[" * 5000 + b"]" * 5000 + b"\n", 2, "nesting"),
    (b'{"ok": 1}\n{"ok": 2}\n{"a": "caf\xe9 ' + SECRET.encode() + b'"}\n', 3, "not UTF-8"),
    (b'{"a": "' + SECRET.encode() + b'\\u0000"}\n', 1, "NUL character"),
    (b'{"a": "' + SECRET.encode() + b'", "n": NaN}\n', 1, "NaN"),
])
def test_enqueue_file_names_file_and_line_of_a_bad_payload(db, worker_env, tmp_path, content,
                                                           lineno, needle):
    f = tmp_path / "jobs.jsonl"
    f.write_bytes(content)
    out = jv(worker_env, "enqueue", "noop", "--file", str(f))
    line = one_line_exit_2(out, needle)
    assert f"{f}:{lineno}: " in line
    assert SECRET not in out.stdout + out.stderr
    assert no_jobs(db)


# --- options out of the columns' range ----------------------------------------------------------

@pytest.mark.parametrize(("args", "needles"), [
    (["--priority", "99999999999"], ["--priority", "-2147483648", "2147483647"]),
    (["--priority", "-99999999999"], ["--priority", "-2147483648", "2147483647"]),
    (["--delay", "99999999999d"], ["--delay", "at most 3650d"]),
    (["--delay", "9" * 400], ["--delay"]),
    (["--delay", "-5s"], ["--delay", "must not be negative"]),
    (["--delay=-5s"], ["--delay", "must not be negative"]),
    (["--max-attempts", "99999999999"], ["--max-attempts", "1..1000"]),
    (["--max-attempts", "0"], ["--max-attempts", "1..1000"]),
])
def test_enqueue_option_out_of_range_names_the_allowed_range(db, worker_env, args, needles):
    out = jv(worker_env, "enqueue", "noop", "--payload", "{}", *args)
    line = one_line_exit_2(out, needles[0])
    for needle in needles[1:]:
        assert needle in line
    assert no_jobs(db)


def test_enqueue_options_at_the_bounds_are_accepted(db, worker_env):
    out = jv(worker_env, "enqueue", "noop", "--payload", "{}", "--priority", "2147483647",
             "--delay", "3650d", "--max-attempts", "1000")
    assert out.returncode == 0, out.stderr
    job = q.get_job(db, int(out.stdout))
    assert job["priority"] == 2**31 - 1 and job["max_attempts"] == 1000


# --- a database that can't serve the CLI ----------------------------------------------------------

# (`empty_dsn`: conftest's database that exists but was never migrated.)

@pytest.mark.parametrize("args", [
    ["status"], ["status", "--json"], ["enqueue", "noop", "--payload", "{}"],
    ["jobs", "show", "1"], ["jobs", "cancel", "1"], ["batches", "show", "b1"],
])
def test_any_command_before_migrate_says_to_run_migrate(worker_env, empty_dsn, args):
    env = dict(worker_env, DATABASE_URL=empty_dsn)
    out = jv(env, *args)
    line = one_line_exit_2(out, "run `jobvisor migrate`")
    assert conninfo_to_dict(empty_dsn)["dbname"] in line  # names the database


def test_migrate_then_status_works_on_that_database(worker_env, empty_dsn):
    env = dict(worker_env, DATABASE_URL=empty_dsn)
    assert jv(env, "migrate").returncode == 0
    assert jv(env, "status").returncode == 0


@pytest.mark.parametrize(("dsn", "needle"), [
    ("postgresql://postgres:{pw}@127.0.0.1:5432/jobvisor_no_such_db",
     'database "jobvisor_no_such_db" does not exist'),
    ("postgresql://jobvisor_no_such_role:{pw}@127.0.0.1:5432/postgres",
     'role "jobvisor_no_such_role" does not exist'),
    ("postgresql://app:{pw}@127.0.0.1:1/appdb", "cannot reach PostgreSQL at 127.0.0.1:1"),
    ("not a dsn password={pw}", "not a valid connection string"),
])
def test_missing_database_or_role_is_named_without_the_password(worker_env, dsn, needle):
    password = "hunter2-secret"
    env = dict(worker_env, DATABASE_URL=dsn.format(pw=password))
    out = jv(env, "status")
    one_line_exit_2(out, needle)
    assert "hunter2" not in out.stdout + out.stderr


@pytest.mark.parametrize(("message", "expected"), [
    ('connection failed: connection to server at "db", port 5432 failed: FATAL:  password '
     'authentication failed for user "app"', 'password authentication failed for user "app"'),
    ('connection failed: connection to server at "db", port 5432 failed: FATAL:  database '
     '"x" does not exist', 'database "appdb" does not exist'),
    ('connection failed: connection to server at "db", port 5432 failed: FATAL:  role "app" '
     'does not exist', 'role "app" does not exist'),
    ('connection failed: connection to server at "db", port 5432 failed: Connection refused',
     "cannot reach PostgreSQL at db:5432"),
    ("connection timeout expired", "cannot reach PostgreSQL at db:5432 (timed out)"),
    ('connection failed: FATAL:  no pg_hba.conf entry for host "1.2.3.4", user "app", '
     'database "appdb", no encryption', "pg_hba.conf"),
])
def test_connection_failures_are_told_apart(message, expected):
    # Built here rather than written out: no DSN with a password sits in the source.
    dsn = make_conninfo(host="db", port=5432, dbname="appdb", user="app",
                        password="hunter2-" + "secret")
    text = database.explain(dsn, psycopg.OperationalError(message))
    assert expected in text and "hunter2" not in text and "\n" not in text


# --- a type nothing serves ------------------------------------------------------------------------

def test_enqueue_of_a_type_nothing_serves_warns_but_enqueues(db, worker_env):
    out = jv(worker_env, "enqueue", "fail", "--payload", "{}")
    assert out.returncode == 0, out.stderr
    assert q.get_job(db, int(out.stdout))["job_type"] == "fail"
    (line,) = out.stderr.strip().splitlines()
    assert "warning" in line and "'fail'" in line


def test_enqueue_of_a_configured_type_does_not_warn(worker_env):
    out = jv(worker_env, "enqueue", "noop", "--payload", "{}")
    assert out.returncode == 0 and out.stderr == ""


def test_enqueue_of_a_type_a_live_supervisor_serves_does_not_warn(db, worker_env):
    from supervisor_app.registry_table import publish

    publish(db, "sup-1", "host", 1, {"types": ["fail"]})
    out = jv(worker_env, "enqueue", "fail", "--payload", "{}")
    assert out.returncode == 0 and out.stderr == ""


def test_stdin_payloads_work(db, worker_env):
    out = jv(worker_env, "enqueue", "noop", "--file", "-", stdin='{"i": 1}\n{"i": 2}\n')
    assert out.returncode == 0, out.stderr
    assert [q.get_job(db, int(i))["payload"] for i in out.stdout.split()] == [{"i": 1}, {"i": 2}]


def test_nothing_is_written_when_a_later_line_is_bad(db, worker_env, tmp_path: Path):
    f = tmp_path / "jobs.jsonl"
    f.write_text('{"ok": 1}\n{"a": NaN}\n')
    one_line_exit_2(jv(worker_env, "enqueue", "noop", "--file", str(f)), f"{f}:2:")
    assert no_jobs(db)
