"""Which database a process talks to, by role, and how to name it without its secrets.

One rule for every caller (README, "Database roles"):

| role     | who                                            | variables, first set wins              |
|----------|------------------------------------------------|----------------------------------------|
| `owner`  | migrations, the supervisor's own duties, the   | `DATABASE_URL`                         |
|          | operator CLI (`enqueue`, `jobs`, `submit`, ...)|                                        |
| `worker` | child processes, the operator health probe     | `LEARNING_DATABASE_URL`, `DATABASE_URL`|
| `backup` | `pg_dump` in the `backup` job                  | `BACKUP_DATABASE_URL`, `DATABASE_URL`  |

With none set, every role uses the embedded PostgreSQL (supervisor_app.embedded), which
the supervisor hands its children as `DATABASE_URL`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from psycopg.conninfo import conninfo_to_dict

Role = Literal["owner", "worker", "backup"]

ROLE_VARIABLES: dict[str, tuple[str, ...]] = {
    "owner": ("DATABASE_URL",),
    # The worker's own least-privilege role (seeds' runbook), else the owner's DSN.
    "worker": ("LEARNING_DATABASE_URL", "DATABASE_URL"),
    # A dedicated (ideally read-only) backup role, else the owner's DSN.
    "backup": ("BACKUP_DATABASE_URL", "DATABASE_URL"),
}


def dsn_for(role: Role, environ: Mapping[str, str] | None = None) -> str | None:
    """The DSN `role` connects with, from the environment; None: use the embedded one."""
    if role not in ROLE_VARIABLES:
        raise ValueError(f"unknown database role {role!r} (one of {', '.join(ROLE_VARIABLES)})")
    env = os.environ if environ is None else environ
    for name in ROLE_VARIABLES[role]:
        value = (env.get(name) or "").strip()
        if value:
            return value
    return None


def variables_set(environ: Mapping[str, str] | None = None) -> list[str]:
    """The database variables of any role that are set (non-blank), sorted."""
    env = os.environ if environ is None else environ
    return sorted({v for vs in ROLE_VARIABLES.values() for v in vs if (env.get(v) or "").strip()})


def unset_role(role: Role, environ: Mapping[str, str] | None = None) -> str | None:
    """Why `role` may not fall back to the embedded server, or None when it may.

    The embedded server stands in only when no database variable is set at all: with
    LEARNING_DATABASE_URL set and DATABASE_URL not, the owner would otherwise migrate a
    different database than the workers use.
    """
    named = variables_set(environ)
    if dsn_for(role, environ) or not named:
        return None
    wanted = " or ".join(ROLE_VARIABLES[role])
    return (f"{', '.join(named)} set but not {wanted}: the {role} role connects with "
            f"{wanted} (README, \"Database roles\")")


def describe(dsn: str) -> str:
    """`host:port/dbname` for messages: never the password or the user."""
    try:
        info = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a malformed DSN must not leak through the error
        return "<unparseable DSN>"
    host = info.get("host") or info.get("hostaddr") or "localhost"
    port = info.get("port") or "5432"
    return f"{host}:{port}/{info.get('dbname') or info.get('user') or ''}".rstrip("/")


# libpq keyword -> the environment variable libpq reads for it (libpq docs, 34.15): how a
# DSN reaches a client program (pg_dump, psql) without its arguments, which anyone can read
# in /proc/<pid>/cmdline. The password is left out: each caller hands it over its own way.
PG_VARIABLE_FOR: dict[str, str] = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "passfile": "PGPASSFILE",
    "require_auth": "PGREQUIREAUTH",
    "channel_binding": "PGCHANNELBINDING",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "client_encoding": "PGCLIENTENCODING",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "gssencmode": "PGGSSENCMODE",
    "sslmode": "PGSSLMODE",
    "requiressl": "PGREQUIRESSL",
    "sslcompression": "PGSSLCOMPRESSION",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcertmode": "PGSSLCERTMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
    "gssdelegation": "PGGSSDELEGATION",
    "service": "PGSERVICE",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
    "sslnegotiation": "PGSSLNEGOTIATION",
}
