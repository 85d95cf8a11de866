"""One rule for database roles (workers.core.dsn), tried with the environment compose.yml
gives the container: DATABASE_URL names the owner (not a superuser: it owns the database),
LEARNING_DATABASE_URL a least-privilege worker login. Real PostgreSQL (the service or the
embedded server), real `jobvisor migrate` and `jobvisor run`."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from supervisor_app import database
from tests.helpers import wait_for
from tests.supervisor_harness import REPO, Supervisor, base_config, free_port
from workers.core import queue as q
from workers.core.dsn import ROLE_VARIABLES, dsn_for


@pytest.fixture
def compose_like(pg_server_dsn: str) -> Iterator[dict[str, str]]:
    """A fresh, unmigrated database owned by a new NOSUPERUSER login (as
    deploy/postgres/initdb/10-jobvisor-roles.sh sets up jobvisor_app), and a worker login
    that is only a member of jobvisor_worker (as jobvisor_worker_login)."""
    tag = uuid.uuid4().hex[:8]
    owner, worker, dbname = f"jv_app_{tag}", f"jv_worker_{tag}", f"jobvisor_roles_{tag}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
        admin.execute("""
            DO $$ BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'jobvisor_worker') THEN
                    CREATE ROLE jobvisor_worker NOLOGIN;
                END IF;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
            END $$""")
        admin.execute(f"CREATE ROLE {owner} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                      "NOBYPASSRLS")
        admin.execute(f"GRANT jobvisor_worker TO {owner}")
        admin.execute(f"CREATE ROLE {worker} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                      "NOBYPASSRLS INHERIT")
        admin.execute(f"GRANT jobvisor_worker TO {worker}")
        admin.execute(f'CREATE DATABASE "{dbname}" OWNER {owner}')
    base = conninfo_to_dict(make_conninfo(pg_server_dsn, dbname=dbname))
    base.pop("password", None)  # trust auth here, as on these machines
    yield {"DATABASE_URL": make_conninfo(**{**base, "user": owner}),
           "LEARNING_DATABASE_URL": make_conninfo(**{**base, "user": worker}),
           "admin": make_conninfo(pg_server_dsn, dbname=dbname),
           "owner": owner, "worker": worker}
    with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        for role in (owner, worker):
            admin.execute(f"DROP ROLE IF EXISTS {role}")


def _env(compose: dict[str, str], worker_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in worker_env.items() if k not in ROLE_VARIABLES["backup"]}
    return env | {"DATABASE_URL": compose["DATABASE_URL"],
                  "LEARNING_DATABASE_URL": compose["LEARNING_DATABASE_URL"]}


def test_each_role_resolves_from_its_own_variable_first() -> None:
    env = {"DATABASE_URL": "owner", "LEARNING_DATABASE_URL": "worker",
           "BACKUP_DATABASE_URL": "backup"}
    assert [dsn_for(r, env) for r in ("owner", "worker", "backup")] == \
        ["owner", "worker", "backup"]
    only_owner = {"DATABASE_URL": "owner", "LEARNING_DATABASE_URL": " "}
    assert [dsn_for(r, only_owner) for r in ("owner", "worker", "backup")] == ["owner"] * 3
    assert dsn_for("owner", {}) is None
    with pytest.raises(ValueError, match="unknown database role 'admin'"):
        dsn_for("admin", env)  # type: ignore[arg-type]


def test_a_worker_url_without_an_owner_url_is_refused_naming_both(monkeypatch) -> None:
    # Falling back to the embedded server here would migrate another database than the
    # one the workers use.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("LEARNING_DATABASE_URL", "postgresql://w@db.invalid/app")
    with pytest.raises(database.DatabaseUnavailable,
                       match="LEARNING_DATABASE_URL set but not DATABASE_URL"):
        database.resolve_dsn("owner")
    assert database.resolve_dsn("worker") == "postgresql://w@db.invalid/app"


def test_compose_roles_migrate_as_owner_run_children_as_worker_and_keep_rls(
        compose_like, worker_env, tmp_path) -> None:
    env = _env(compose_like, worker_env)
    migrated = subprocess.run([sys.executable, "-m", "supervisor_app", "migrate"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    assert "learning/003_outcomes" in migrated.stdout
    with psycopg.connect(compose_like["admin"], autocommit=True) as admin:
        owners = {r[0] for r in admin.execute(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'jobvisor'"
            " OR tablename = 'learning_submissions'")}
        assert owners == {compose_like["owner"]}  # created by the owner, not the worker
        admin.execute("SELECT set_config('app.current_sub', 'alice', false)")
        admin.execute("INSERT INTO public.learning_submissions (owner_sub, source_key, mime_type)"
                      " VALUES ('alice', 'a', 'application/pdf')")
        admin.execute("SELECT set_config('app.current_sub', 'bob', false)")
        admin.execute("INSERT INTO public.learning_submissions (owner_sub, source_key, mime_type)"
                      " VALUES ('bob', 'b', 'application/pdf'), ('bob', 'c', 'application/pdf')")

    cfg = base_config(free_port(), {"whoami": {
        "handler": "tests.handlers:whoami", "memory_per_job": "1MiB",
        "processes": {"min": 1, "max": 1}}})
    sup = Supervisor(tmp_path, env, cfg).start()  # migrates again (a no-op) as the owner
    try:
        with psycopg.connect(compose_like["admin"], autocommit=True) as admin:
            ids = [q.enqueue(admin, q.NewJob("whoami", {"as": who}))
                   for who in ("alice", "bob", "")]
            wait_for(lambda: all(q.get_job(admin, i)["status"] == "completed" for i in ids),
                     what="whoami jobs")
            results = [q.get_job(admin, i)["result"] for i in ids]
            supervisor_user = admin.execute(
                "SELECT usename FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
                " AND usename = %s LIMIT 1", (compose_like["owner"],)).fetchone()
    finally:
        assert sup.stop() == 0
    worker = compose_like["worker"]
    # Children run as the worker login, and row-level security still holds it to the
    # subject its job sets: alice sees her one row, bob his two, nobody none.
    assert results == [{"user": worker, "visible": 1}, {"user": worker, "visible": 2},
                       {"user": worker, "visible": 0}]
    assert supervisor_user is not None  # the supervisor's own duties run as the owner
