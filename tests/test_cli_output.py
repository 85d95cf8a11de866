"""What the CLI writes where: data commands print their data and nothing else; logs only
with -v, human-readable on a terminal and JSON lines otherwise (JOBVISOR_LOG_FORMAT)."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.helpers import log_events
from tests.test_cli import REPO, jv
from workers.core import logs
from workers.core import queue as q


@pytest.fixture
def fresh_envs(pg_server_dsn: str, worker_env: dict[str, str]) -> Iterator[Any]:
    """Makes worker_env on a new, unmigrated database: `migrate` there logs each migration."""
    names: list[str] = []

    def make() -> dict[str, str]:
        names.append(f"jobvisor_out_{uuid.uuid4().hex[:10]}")
        with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{names[-1]}"')
        env = {k: v for k, v in worker_env.items() if not k.startswith("JOBVISOR_LOG")}
        return dict(env, DATABASE_URL=make_conninfo(pg_server_dsn, dbname=names[-1]))

    yield make
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_env(fresh_envs: Any) -> dict[str, str]:
    return fresh_envs()


def test_data_commands_print_only_their_data_without_verbose(db, worker_env):
    job_id = q.enqueue(db, q.NewJob("noop", {"x": 1}))
    q.cancel(db, job_id)  # nothing queued: `status` has no unserved queue to warn about
    for args in (["status"], ["status", "--json"], ["jobs", "show", str(job_id)],
                 ["jobs", "show", str(job_id), "--json"], ["migrate"], ["db-url"],
                 ["enqueue", "noop", "--payload", "{}"], ["jobs", "cancel", str(job_id + 1)]):
        out = jv(worker_env, *args)
        assert out.returncode == 0, (args, out.stderr)
        assert out.stderr == "", (args, out.stderr)
    assert json.loads(jv(worker_env, "status", "--json").stdout)["queues"]["noop"]


def test_migrate_logs_nothing_without_verbose(fresh_env):
    out = jv(fresh_env, "migrate")
    assert out.returncode == 0 and out.stdout.startswith("applied: ")
    assert out.stderr == ""


@pytest.mark.parametrize("args", [["-v", "migrate"], ["migrate", "-v"], ["migrate", "--verbose"]])
def test_verbose_logs_json_lines_when_not_on_a_terminal(fresh_env, args):
    out = jv(fresh_env, *args)
    assert out.returncode == 0, out.stderr
    applied = log_events(out.stderr, "migration_applied")
    assert applied and applied[0]["level"] == "info"
    assert all(json.loads(line) for line in out.stderr.splitlines())
    assert out.stdout.startswith("applied: ")  # stdout keeps only the data


def test_log_format_text_forces_one_readable_line_per_event(fresh_env):
    out = jv(dict(fresh_env, JOBVISOR_LOG_FORMAT="text"), "--verbose", "migrate")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines and not log_events(out.stderr, "migration_applied")
    first = next(line for line in lines if "migration_applied" in line)
    assert " info " in first and "migration=queue" in first and not first.startswith("{")


def run_on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run the CLI with its stderr on a pseudo-terminal; the exit code and what it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor_app", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode()


def test_on_a_terminal_logs_are_text_unless_json_is_asked_for(fresh_envs):
    rc, text = run_on_a_terminal(fresh_envs(), "-v", "migrate")
    assert rc == 0, text
    assert "migration_applied" in text and not log_events(text, "migration_applied")
    rc, text = run_on_a_terminal(dict(fresh_envs(), JOBVISOR_LOG_FORMAT="json"), "-v", "migrate")
    assert rc == 0, text
    assert log_events(text, "migration_applied")


def test_an_unknown_log_format_is_bad_input(worker_env):
    out = jv(dict(worker_env, JOBVISOR_LOG_FORMAT="xml"), "status")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "JOBVISOR_LOG_FORMAT" in line and "json" in line and "text" in line


# --- the formatters, as the supervisor and its children use them ----------------------------------

class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def configured(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch, fmt: str | None = None,
               **kw: object) -> str:
    monkeypatch.delenv("JOBVISOR_LOG_FORMAT", raising=False)
    if fmt is not None:
        monkeypatch.setenv("JOBVISOR_LOG_FORMAT", fmt)
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    try:
        logs.configure(stream=stream, **kw)  # type: ignore[arg-type]
        logging.getLogger("jobvisor.test").info("child_started", extra={"slot": 2,
                                                                         "note": "a b\nc"})
        logging.getLogger("jobvisor.test").debug("too_fine")
    finally:
        logging.getLogger().handlers[:], level = saved
        logging.getLogger().setLevel(level)
    return stream.getvalue()


@pytest.mark.parametrize(("stream", "fmt", "json_lines"), [
    (io.StringIO, None, True), (Tty, None, False), (Tty, "json", True),
    (io.StringIO, "text", False), (io.StringIO, "JSON", True),
])
def test_format_follows_the_terminal_and_the_variable(monkeypatch, stream, fmt, json_lines):
    text = configured(stream(), monkeypatch, fmt)
    assert len(text.splitlines()) == 1, text  # INFO by default, one line per event
    if json_lines:
        rec = json.loads(text)
        assert rec["event"] == "child_started" and rec["slot"] == 2 and rec["level"] == "info"
    else:
        assert "child_started" in text and "slot=2" in text and " info " in text
        assert not text.startswith("{")


def test_configure_takes_an_explicit_level(monkeypatch):
    assert configured(io.StringIO(), monkeypatch, level="WARNING") == ""
    assert len(configured(io.StringIO(), monkeypatch, level="DEBUG").splitlines()) == 2


def test_text_lines_never_carry_exception_text(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setenv("JOBVISOR_LOG_FORMAT", "text")
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    try:
        logs.configure(stream=stream)
        try:
            raise ValueError("payload says tellnoone")
        except ValueError:
            logging.getLogger("jobvisor.test").exception("job_crashed")
    finally:
        logging.getLogger().handlers[:], level = saved
        logging.getLogger().setLevel(level)
    (line,) = stream.getvalue().splitlines()
    assert "exc_type=ValueError" in line and "tellnoone" not in line


def test_a_long_enqueue_file_shows_its_count_on_a_terminal_and_nothing_on_a_pipe(
        db, worker_env, tmp_path):
    lines = tmp_path / "many.jsonl"
    lines.write_text("".join(f'{{"n": {i}}}\n' for i in range(12_001)))
    code, shown = run_on_a_terminal(worker_env, "enqueue", "noop", "--file", str(lines))
    assert code == 0
    assert "10000 jobs enqueued" in shown and "12001 jobs enqueued, committing" in shown
    piped = jv(worker_env, "enqueue", "noop", "--file", str(lines))
    assert piped.returncode == 0 and piped.stderr == ""
    assert len(piped.stdout.split()) == 12_001
    assert q.status_counts(db)["noop"]["queued"] == 24_002
