"""`manifest.json` beside each dump, and the sanitizer for what goes into it.

A manifest is read by operators and tools that may live outside the database's trust
zone, so its error text is a short, fixed-shape sentence: no host, user or database
name, no password, no path outside the backup directory. Full details go to the log.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
DUMP_NAME = "dump.pgdump"
MANIFEST_VERSION = 1
MESSAGE_LIMIT = 300  # manifest error messages: one readable sentence
LOG_LIMIT = 4000  # log details: enough for pg_dump's last lines

STATUS_RUNNING = "running"
STATUS_SUCCEEDED = "succeeded"
STATUS_FAILED = "failed"


@dataclass
class Manifest:
    """One backup attempt. `directory` is where it lives and is not serialized."""

    run_id: str
    status: str
    started_at: str
    finished_at: str | None = None
    duration_s: float | None = None
    file: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    format: str = "custom"
    pg_dump_path: str | None = None
    pg_dump_source: str | None = None
    pg_dump_version: str | None = None
    server_version: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    exit_code: int | None = None
    manifest_version: int = MANIFEST_VERSION
    directory: Path | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCEEDED

    @property
    def dump_path(self) -> Path | None:
        if self.directory is None or not self.file:
            return None
        return self.directory / self.file

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("directory")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: Path | None = None) -> Manifest:
        # Ignore keys from newer versions instead of refusing the whole file.
        known = {f.name for f in fields(cls)} - {"directory"}
        return cls(**{k: v for k, v in data.items() if k in known}, directory=directory)


def write_manifest(manifest: Manifest, directory: Path) -> Path:
    """Write `directory/manifest.json` atomically (temp file, fsync, rename)."""
    target = directory / MANIFEST_NAME
    tmp = directory / f".{MANIFEST_NAME}.{secrets.token_hex(4)}.tmp"
    payload = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    manifest.directory = directory
    return target


def read_manifest(directory: Path) -> Manifest:
    """Raises OSError / ValueError for a missing or unreadable manifest."""
    with open(directory / MANIFEST_NAME, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError("manifest is not a JSON object")
    return Manifest.from_dict(data, directory=directory)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable; some filesystems cannot fsync a directory, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- sanitizing ---------------------------------------------------------------------

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s\"']*", re.IGNORECASE)
_SECRET_PAIR = re.compile(r"\b(password|sslpassword)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.I)
_NAME_PAIR = re.compile(
    r"\b(host|hostaddr|user|dbname|service|passfile|sslkey|sslcert|sslrootcert)"
    r"\s*=\s*('(?:[^'\\]|\\.)*'|[^\s,;)]+)",
    re.IGNORECASE,
)
# libpq/PostgreSQL put the names we must hide in double quotes after these words:
# `server at "db1"`, `host name "db1.internal"`, `for user "backup"`, `database "x"`.
_QUOTED_NAME = re.compile(
    r"\b(server at|host name|host|user|role|database|socket|server)\s+\"[^\"]*\"",
    re.IGNORECASE,
)
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w.])")
# Three or more colons, or `::`: a clock time like 03:00:00 has only two.
_IPV6 = re.compile(
    r"(?<![\w:])(?:[0-9a-f]{0,4}:){3,7}[0-9a-f]{0,4}(?![\w:])"
    r"|(?<![\w:])[0-9a-f]{0,4}::[0-9a-f:]*(?![\w:])",
    re.IGNORECASE,
)
_ABS_PATH = re.compile(r"(?<![\w.~<>-])/[^\s\"'<>|,;()\[\]]*")
# Lower-case dotted names whose last label looks like a TLD, e.g. db1.corp.example.
_FQDN = re.compile(r"(?<![\w.-])(?:[a-z0-9-]+\.)+([a-z]{2,})(?![\w.-])")
_FILE_SUFFIXES = frozenset(
    {"json", "pgdump", "partial", "tmp", "log", "sql", "txt", "conf", "py", "sh", "so",
     "gz", "dump", "stderr"}
)
_MIN_NAME_LEN = 3  # shorter known names are hidden only in the quoted forms above


def redact_secrets(text: str, secrets_: Iterable[str] = (), limit: int = LOG_LIMIT) -> str:
    """For logs: remove passwords and whole URLs/DSNs; keep the rest for diagnosis."""
    out = text
    for secret in sorted({s for s in secrets_ if s}, key=len, reverse=True):
        out = out.replace(secret, "<redacted>")
    out = _URL.sub(lambda m: m.group(0).split("://", 1)[0] + "://<redacted>", out)
    out = _SECRET_PAIR.sub(r"\1=<redacted>", out)
    return _shorten(out, limit)


def sanitize_message(
    text: str,
    *,
    secrets_: Iterable[str] = (),
    identifiers: Iterable[str] = (),
    backup_dir: Path | None = None,
    limit: int = MESSAGE_LIMIT,
) -> str:
    """For manifests and job errors: also hide host/user/database names and paths."""
    out = text
    # Passwords first, as raw substrings: they may contain anything.
    for secret in sorted({s for s in secrets_ if s}, key=len, reverse=True):
        out = out.replace(secret, "<redacted>")
    out = _URL.sub("<url>", out)
    out = _SECRET_PAIR.sub(r"\1=<redacted>", out)
    out = _NAME_PAIR.sub(r"\1=<redacted>", out)
    out = _QUOTED_NAME.sub(r'\1 "<redacted>"', out)
    out = _ABS_PATH.sub(lambda m: _path_replacement(m.group(0), backup_dir), out)
    out = _IPV4.sub("<ip>", out)
    out = _IPV6.sub(lambda m: "<ip>" if m.group(0).count(":") >= 2 else m.group(0), out)
    # Whole dotted names before known short names: `db1.corp.example` must not end up
    # as `<redacted>.corp.example`.
    out = _FQDN.sub(lambda m: m.group(0) if m.group(1) in _FILE_SUFFIXES else "<host>", out)
    for name in sorted({n for n in identifiers if n}, key=len, reverse=True):
        if name.startswith("/"):
            continue  # socket directories: handled as paths above
        if len(name) >= _MIN_NAME_LEN:
            pattern = r"(?<![\w-])" + re.escape(name) + r"(?![\w-])"
            out = re.sub(pattern, "<redacted>", out, flags=re.IGNORECASE)
    return _shorten(out, limit)


def describe_os_error(exc: OSError) -> str:
    """`EACCES` etc.: the errno name says what went wrong without quoting the path."""
    if exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    return type(exc).__name__


def _path_replacement(path: str, backup_dir: Path | None) -> str:
    if backup_dir is not None:
        root = os.path.normpath(str(backup_dir))
        path = os.path.normpath(path)  # `<dir>/../etc` must not pass as inside
        if path == root:
            return "<backup_dir>"
        if path.startswith(root + "/"):
            return "<backup_dir>/" + path[len(root) + 1 :]
    return "<path>"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)].rstrip() + "…"
