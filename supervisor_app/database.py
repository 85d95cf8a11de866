"""Which database the CLI and supervisor use, checked before anything else runs. The role
rule is workers.core.dsn's; this adds the embedded server when no variable is set."""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

from supervisor_app import embedded
from workers.core.dsn import Role, dsn_for, unset_role


class DatabaseUnavailable(Exception):
    """The database can't be reached; the message names host and port, no secrets."""


def resolve_dsn(role: Role = "owner", *, keep_embedded_running: bool = False) -> str:
    """The DSN `role` uses (workers.core.dsn.dsn_for), else the embedded server, unless
    another role's variable is set (workers.core.dsn.unset_role): refused, naming both."""
    dsn = dsn_for(role)
    if dsn:
        return dsn
    if refused := unset_role(role):
        raise DatabaseUnavailable(refused)
    return embedded.start(keep_running=keep_embedded_running)


def check(dsn: str, timeout: float = 5.0) -> None:
    """DatabaseUnavailable, naming what is wrong (`explain`), unless `dsn` answers."""
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise DatabaseUnavailable(explain(dsn, exc)) from exc


# libpq reports connection failures as text (psycopg leaves sqlstate unset for them), so
# they are told apart by the server's FATAL message, with the sqlstate where there is one.
_MISSING_DATABASE = re.compile(r'database "[^"]*" does not exist')
_MISSING_ROLE = re.compile(r'role "[^"]*" does not exist')
_BAD_PASSWORD = re.compile(r"password authentication failed|password is missing|"
                           r"no password supplied|password must be supplied")
_NO_HBA_ENTRY = re.compile(r"no pg_hba\.conf entry")


def explain(dsn: str, exc: psycopg.Error) -> str:
    """One line on why `dsn` can't be used: names the host, port, database and user as
    the DSN gives them (not as the server echoes them), never the password or the DSN."""
    if not isinstance(exc, psycopg.OperationalError):
        # A malformed DSN: psycopg's message quotes it, password and all.
        return "the database URL is not a valid connection string (see README, \"Database roles\")"
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        info = {}
    text = str(exc)
    host = f"{info.get('host') or info.get('hostaddr') or 'localhost'}:{info.get('port') or 5432}"
    # Names as the DSN gives them; libpq's defaults (the OS user) as the server quotes them.
    user = info.get("user") or _quoted(r'(?:role|user) "([^"]*)"', text) or "(default)"
    dbname = info.get("dbname") or _quoted(r'database "([^"]*)"', text) or user
    state = getattr(exc, "sqlstate", None)
    text = str(exc)
    if state == "3D000" or _MISSING_DATABASE.search(text):
        return (f'database "{dbname}" does not exist on PostgreSQL at {host} '
                "(create it, or fix the database name in the URL)")
    if state == "28P01" or _BAD_PASSWORD.search(text):
        return f'password authentication failed for user "{user}" at {host}'
    if _MISSING_ROLE.search(text):
        return f'role "{user}" does not exist on PostgreSQL at {host}'
    if _NO_HBA_ENTRY.search(text):
        return (f'PostgreSQL at {host} refuses user "{user}" for database "{dbname}" '
                "(no pg_hba.conf entry allows it)")
    if state == "28000":
        return f'PostgreSQL at {host} refuses user "{user}" (invalid authorization)'
    if "timeout expired" in text or "timed out" in text:
        return f"cannot reach PostgreSQL at {host} (timed out)"
    if "the database system is" in text:  # starting up, shutting down, in recovery
        return f"PostgreSQL at {host} is not accepting connections yet (starting or stopping)"
    if state == "53300" or "too many clients" in text or "remaining connection slots" in text:
        return f"PostgreSQL at {host} has no free connection slots"
    if "failed to resolve host" in text or "could not translate host name" in text:
        return f"cannot reach PostgreSQL at {host} (unknown host)"
    return f"cannot reach PostgreSQL at {host} ({_short_reason(text)})"


def _quoted(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def _short_reason(text: str) -> str:
    """`connection refused`, `no such file or directory`, ...: libpq's reason after the
    last `failed:`, first line only, without quoted values."""
    reason = text.split("failed:")[-1].strip().splitlines()[0] if text.strip() else ""
    reason = re.sub(r'"[^"]*"', "…", reason).strip().rstrip(".")
    return reason[:80].lower() or "no reason given"
