"""Fixtures against a real PostgreSQL.

JOBVISOR_TEST_DATABASE_URL names a server to use (its databases are created and
dropped per test); without it a throwaway embedded server (pgserver) is started.
Each test gets a fresh database cloned from a migrated template.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from supervisor_app.migrate import migrate

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_model_gate() -> Iterator[None]:
    """Each test builds this process's model gate anew: its policy from the environment
    the test set, no limits or database left from another test."""
    from workers.core import model_gate

    model_gate.configure(None)
    yield
    model_gate.configure(None)


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    url = os.environ.get("JOBVISOR_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    tmp = Path(tempfile.mkdtemp(prefix="jobvisor-test-pg-"))
    server = pgserver.get_server(tmp / "pgdata", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def template_db(pg_server_dsn: str) -> Iterator[str]:
    name = f"jobvisor_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate(make_conninfo(pg_server_dsn, dbname=name))
    yield name
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_dsn(pg_server_dsn: str, template_db: str) -> Iterator[str]:
    """DSN of a fresh, migrated database for this test (superuser)."""
    name = f"jobvisor_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield make_conninfo(pg_server_dsn, dbname=name)
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_dsn(pg_server_dsn: str) -> Iterator[str]:
    """DSN of a fresh database with nothing in it, not even the migrations (superuser)."""
    name = f"jobvisor_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(pg_server_dsn, dbname=name)
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(db_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def worker_env(db_dsn: str) -> dict[str, str]:
    """Environment for child processes: the test DSN and the repo on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LEARNING_DATABASE_URL", "DATABASE_URL")}
    env["DATABASE_URL"] = db_dsn
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
