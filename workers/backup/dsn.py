"""Turn the backup DSN into what `pg_dump` gets: PG* variables and, apart, the password.

`pg_dump` never sees the DSN in its arguments: `/proc/<pid>/cmdline` is world-readable,
`/proc/<pid>/environ` is not. Host, port, user and database become `PG*` variables of
the child only; the password goes into a 0600 passfile that the caller removes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from workers.core.dsn import PG_VARIABLE_FOR

# Which DSN a backup uses is workers.core.dsn's rule (role `backup`).

# Keywords libpq has no variable for. They name no host, user or secret, so they may
# travel as a small conninfo string in pg_dump's `--dbname` (the database itself still
# comes from PGDATABASE).
_ARGV_SAFE_KEYWORDS = frozenset(
    {"keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
     "tcp_user_timeout"}
)

# Meaningless for pg_dump (it sets its own application name fallback).
_DROPPED_KEYWORDS = frozenset({"fallback_application_name"})

# Values that identify the deployment: redacted from every message we store.
_IDENTIFYING_KEYWORDS = ("host", "hostaddr", "user", "dbname", "service", "passfile")

# Parent variables that must not reach pg_dump: they carry whole DSNs or other secrets
# the dump does not need. PGPASSWORD is handled on its own (see child_environment).
_SCRUB_NAME = re.compile(r"(^|_)(DATABASE_URL|DSN)$|PASSWORD|SECRET|TOKEN", re.IGNORECASE)


class DsnError(ValueError):
    """The DSN cannot be used for a backup. The message never quotes the DSN."""


@dataclass(frozen=True)
class PgConnection:
    """A parsed DSN, split into what may be shown and what may not."""

    env: dict[str, str]
    password: str | None = field(default=None, repr=False)
    conninfo_extras: str | None = None
    identifiers: tuple[str, ...] = ()

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.password,) if self.password else ()


def parse_dsn(dsn: str) -> PgConnection:
    """Split a URI or key=value DSN into child env variables and the password."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - psycopg's parse error quotes the DSN itself
        raise DsnError("the backup DSN cannot be parsed") from None

    env: dict[str, str] = {}
    extras: list[str] = []
    password: str | None = None
    for key, raw in params.items():
        value = "" if raw is None else str(raw)
        if key == "password":
            password = value or None
        elif key in PG_VARIABLE_FOR:
            env[PG_VARIABLE_FOR[key]] = value
        elif key in _ARGV_SAFE_KEYWORDS:
            extras.append(f"{key}={_quote_conninfo(value)}")
        elif key in _DROPPED_KEYWORDS:
            continue
        else:
            # e.g. sslpassword: a secret with no environment variable; refuse rather
            # than put it in pg_dump's arguments.
            raise DsnError(f"connection keyword {key!r} is not supported for backups")

    identifiers: list[str] = []
    for key in _IDENTIFYING_KEYWORDS:
        value = params.get(key)
        if value:
            # Multi-host DSNs list hosts comma-separated; each one is a name to hide.
            identifiers.extend(part for part in str(value).split(",") if part)
    return PgConnection(
        env=env,
        password=password,
        conninfo_extras=" ".join(extras) or None,
        identifiers=tuple(dict.fromkeys(identifiers)),
    )


def write_passfile(directory: Path, password: str) -> Path:
    """Write a 0600 passfile matching any connection; the caller deletes it."""
    path = directory / "pgpass"
    # `*` fields match whatever host/port/db/user libpq ends up using, including
    # fallbacks from the parent's PG* variables. `\` and `:` must be escaped.
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"*:*:*:*:{escaped}\n")
    return path


def child_environment(
    conn: PgConnection,
    base: Mapping[str, str] | None = None,
    *,
    passfile: Path | None = None,
) -> dict[str, str]:
    """The environment for `pg_dump`: the parent's minus secrets, plus the DSN's PG*."""
    env = scrubbed_environment(base)
    env.update(conn.env)
    env.setdefault("PGAPPNAME", "jobvisor-backup")
    if conn.password is not None:
        # PGPASSWORD outranks PGPASSFILE in libpq: drop an inherited one so the DSN's
        # password is the one used.
        env.pop("PGPASSWORD", None)
        if passfile is not None:
            env["PGPASSFILE"] = str(passfile)
        else:
            env["PGPASSWORD"] = conn.password
    return env


def scrubbed_environment(
    base: Mapping[str, str] | None = None, *, keep_pgpassword: bool = True
) -> dict[str, str]:
    """The parent's environment without variables that carry DSNs or secrets.

    An inherited PGPASSWORD stays by default: the in-process version check uses it
    too, and pg_dump must connect the same way.
    """
    base = os.environ if base is None else base
    return {
        k: v
        for k, v in base.items()
        if (k == "PGPASSWORD" and keep_pgpassword) or not _SCRUB_NAME.search(k)
    }


def password_needs_env(password: str) -> bool:
    """A passfile is line-based: a password with a line break cannot go into one."""
    return "\n" in password or "\r" in password


def _quote_conninfo(value: str) -> str:
    if value and re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
