"""Run one `pg_dump` into the backup directory and describe it in a manifest.

What this guards against (the old cron container): a password on a command line, a
`pg_dump` that hangs forever behind a blocked pipe, and raw error text with internal
names in the manifest. So:

- the DSN never reaches an argv: PG* variables of the child plus a 0600 passfile;
- `pg_dump -Fc` writes straight into a file we opened; its stderr goes to a file read
  only after it exited; the worker waits on the process, never on a pipe;
- a hard deadline kills the child's whole process group (TERM, then KILL);
- the dump is written as `dump.pgdump.partial` and renamed only when complete;
- expected failures come back as a failed `Manifest` with an error code, never raise.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from workers.backup.dsn import (
    DsnError,
    PgConnection,
    child_environment,
    parse_dsn,
    password_needs_env,
    scrubbed_environment,
    write_passfile,
)
from workers.backup.manifest import (
    DUMP_NAME,
    STATUS_FAILED,
    STATUS_RUNNING,
    STATUS_SUCCEEDED,
    Manifest,
    describe_os_error,
    fsync_dir,
    redact_secrets,
    sanitize_message,
    write_manifest,
)
from workers.backup.retention import apply_retention, new_run_id
from workers.core.dsn import dsn_for
from workers.core.errors import Cancelled, PermanentError, TransientError

log = logging.getLogger("jobvisor.backup")

DEFAULT_BACKUP_DIR = Path(".jobvisor/backups")
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_KEEP_LAST = 7
DEFAULT_KILL_GRACE_S = 5.0
VERSION_PROBE_TIMEOUT_S = 10.0
POLL_S = 0.2  # how often the wait loop checks the deadline and `should_stop`
STDERR_TAIL_BYTES = 64 * 1024

# Error codes (manifest `error_code`, job error code).
BACKUP_TIMEOUT = "backup_timeout"
BACKUP_DUMP_FAILED = "backup_dump_failed"
BACKUP_TOOL_MISSING = "backup_tool_missing"
BACKUP_VERSION_MISMATCH = "backup_version_mismatch"
BACKUP_STORAGE_UNAVAILABLE = "backup_storage_unavailable"
BACKUP_SERVER_UNAVAILABLE = "backup_server_unavailable"
BACKUP_CONFIG_INVALID = "backup_config_invalid"
BACKUP_CANCELLED = "backup_cancelled"
BACKUP_INTERNAL_ERROR = "backup_internal_error"

# Retrying will not fix these without an operator; the rest may pass next time.
PERMANENT_CODES = frozenset({BACKUP_TOOL_MISSING, BACKUP_VERSION_MISMATCH, BACKUP_CONFIG_INVALID})

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class BackupConfigError(ValueError):
    """Settings that cannot work (no DSN, a bad number). Message names the variable."""

    code = BACKUP_CONFIG_INVALID


@dataclass(frozen=True)
class BackupSettings:
    dsn: str = field(repr=False)  # carries the password: never in repr or logs
    backup_dir: Path = DEFAULT_BACKUP_DIR
    timeout_s: float = DEFAULT_TIMEOUT_S
    keep_last: int | None = DEFAULT_KEEP_LAST
    keep_days: float | None = None
    pg_dump: str | None = None  # explicit pg_dump path (PG_DUMP); no search when set
    kill_grace_s: float = DEFAULT_KILL_GRACE_S

    def __post_init__(self) -> None:
        # Absolute once, so a later chdir cannot move the backups and the sanitizer
        # can recognise paths inside the directory.
        object.__setattr__(self, "backup_dir", Path(self.backup_dir).absolute())

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dsn: str | None = None
    ) -> BackupSettings:
        """Read BACKUP_* variables. `dsn` is the fallback when neither
        BACKUP_DATABASE_URL nor DATABASE_URL is set (e.g. the embedded server's)."""
        env = os.environ if environ is None else environ
        chosen = dsn_for("backup", env) or dsn
        if not chosen:
            raise BackupConfigError("no database for backups: set BACKUP_DATABASE_URL")
        keep_last = _optional_number(env, "BACKUP_KEEP_LAST", DEFAULT_KEEP_LAST, int)
        keep_days = _optional_number(env, "BACKUP_KEEP_DAYS", None, float)
        timeout = _duration(env.get("BACKUP_TIMEOUT", ""), DEFAULT_TIMEOUT_S, "BACKUP_TIMEOUT")
        return cls(
            dsn=chosen,
            backup_dir=backup_dir_from_env(env),
            timeout_s=timeout,
            keep_last=None if keep_last is None else int(keep_last),
            keep_days=keep_days,
            pg_dump=env.get("PG_DUMP") or None,
        )


def backup_dir_from_env(environ: Mapping[str, str] | None = None) -> Path:
    """BACKUP_DIR (default ./.jobvisor/backups), absolute; needs no DSN (for listing)."""
    env = os.environ if environ is None else environ
    return Path(env.get("BACKUP_DIR") or DEFAULT_BACKUP_DIR).absolute()


@dataclass(frozen=True)
class PgDumpTool:
    path: str
    source: str  # PG_DUMP | PATH | pgserver | postgresql
    version: str
    major: int


@dataclass(frozen=True)
class ServerInfo:
    version: str
    major: int
    names: tuple[str, ...]  # current_user, current_database: hidden like the DSN's


class _Failure(Exception):
    """An expected failure on the way; turned into a failed manifest by run_backup."""

    def __init__(self, code: str, message: str, *, detail: str = "",
                 exit_code: int | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.message = message
        self.detail = detail  # for the log only, secrets redacted there
        self.exit_code = exit_code


@dataclass
class _Run:
    """State of one attempt: what the manifest and the cleanup need."""

    settings: BackupSettings
    manifest: Manifest
    started: float
    conn: PgConnection | None = None
    identifiers: tuple[str, ...] = ()
    run_dir: Path | None = None
    partial: Path | None = None

    def sanitize(self, text: str) -> str:
        return sanitize_message(
            text,
            secrets_=self.conn.secrets if self.conn else (),
            identifiers=self.identifiers,
            backup_dir=self.settings.backup_dir,
        )

    def redact(self, text: str) -> str:
        return redact_secrets(text, self.conn.secrets if self.conn else ())


# --- public API ---------------------------------------------------------------------


def run_backup(
    settings: BackupSettings,
    *,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Dump the database into a new run directory and return its manifest.

    Expected failures (timeout, pg_dump error, no pg_dump, version mismatch, storage,
    server unreachable, bad DSN, `should_stop()` turning true) give a manifest with
    status `failed` and an `error_code`; it is written beside the dump when the
    directory is writable. `progress(bytes_so_far)` is called while pg_dump runs.
    """
    started_wall = datetime.now(UTC)
    run_id = new_run_id(started_wall, secrets.token_hex(3))
    run = _Run(
        settings=settings,
        manifest=Manifest(run_id=run_id, status=STATUS_RUNNING,
                          started_at=started_wall.isoformat()),
        started=time.monotonic(),
    )
    deadline = run.started + settings.timeout_s
    log.info("backup_started", extra={"run": run_id, "timeout_s": settings.timeout_s})
    try:
        # Private 0700 directory for the passfile and pg_dump's stderr: neither belongs
        # next to the dumps, and both go away with it.
        with tempfile.TemporaryDirectory(prefix="jobvisor-backup-") as private:
            _run_steps(run, Path(private), deadline, should_stop, progress)
    except _Failure as failure:
        _fail(run, failure)
    except OSError as exc:
        # Local scratch space (temp dir, passfile) rather than the backup directory.
        _fail(run, _Failure(BACKUP_STORAGE_UNAVAILABLE,
                            f"local temporary storage failed ({describe_os_error(exc)})"))
    except BaseException as exc:
        # A bug or an interrupt: record the attempt as failed, then let it propagate.
        _fail(run, _Failure(BACKUP_INTERNAL_ERROR, f"unexpected {type(exc).__name__}"))
        raise
    finally:
        _remove_partial(run)
        _finish(run)
    return run.manifest


def run_backup_or_raise(
    settings: BackupSettings,
    *,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """For the job wrapper: the manifest on success, else the queue's error types.

    Permanent: tool missing, version mismatch, bad configuration. Cancelled: the job
    was asked to stop. Everything else is transient (the next attempt may succeed).
    """
    manifest = run_backup(settings, should_stop=should_stop, progress=progress)
    if manifest.ok:
        return manifest
    code = manifest.error_code or BACKUP_DUMP_FAILED
    message = manifest.error_message or ""
    if code == BACKUP_CANCELLED:
        raise Cancelled(message)
    if code in PERMANENT_CODES:
        raise PermanentError(code, message)
    raise TransientError(code, message)


def find_pg_dump_candidates(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(source, path) pairs in order of preference among equal major versions."""
    env = os.environ if environ is None else environ
    found: list[tuple[str, str]] = []
    on_path = shutil.which("pg_dump", path=env.get("PATH", os.defpath))
    # Debian's pg_wrapper picks a binary per call (by cluster, by PGHOST): its
    # `--version` may not be what dumps. The real binaries are listed below anyway.
    if on_path and os.path.basename(os.path.realpath(on_path)) != "pg_wrapper":
        found.append(("PATH", on_path))
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "pginstall" / "bin" / "pg_dump"
        if os.access(bundled, os.X_OK):
            found.append(("pgserver", str(bundled)))
    for path in sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"), reverse=True):
        if os.access(path, os.X_OK):
            found.append(("postgresql", path))
    unique: dict[str, tuple[str, str]] = {}
    for source, path in found:
        unique.setdefault(os.path.realpath(path), (source, path))
    return list(unique.values())


def parse_pg_version(text: str) -> tuple[str, int] | None:
    """`pg_dump (PostgreSQL) 15.20 (Debian ...)` -> ("15.20", 15)."""
    match = _VERSION.search(text)
    if not match:
        return None
    major = int(match.group(1))
    version = match.group(1) + (f".{match.group(2)}" if match.group(2) else "")
    return version, major


# --- the steps ----------------------------------------------------------------------


def _run_steps(
    run: _Run,
    private: Path,
    deadline: float,
    should_stop: Callable[[], bool] | None,
    progress: Callable[[int], None] | None,
) -> None:
    settings = run.settings
    _prepare_storage(run)
    try:
        run.conn = parse_dsn(settings.dsn)
    except DsnError as exc:
        raise _Failure(BACKUP_CONFIG_INVALID, str(exc)) from None
    run.identifiers = run.conn.identifiers + _env_identifiers()

    server = _server_info(run, deadline)
    run.identifiers += server.names
    run.manifest.server_version = server.version

    tool = _select_pg_dump(run, server, private)
    run.manifest.pg_dump_path = tool.path
    run.manifest.pg_dump_source = tool.source
    run.manifest.pg_dump_version = tool.version
    log.info("backup_pg_dump_selected", extra={"run": run.manifest.run_id, "source": tool.source, "pg_dump_version": tool.version, "server_version": server.version})

    env = _dump_environment(run.conn, private)
    _dump(run, tool, env, private, deadline, should_stop, progress)


def _prepare_storage(run: _Run) -> None:
    """Create the run directory and its first manifest: this is also the write probe."""
    backup_dir = run.settings.backup_dir
    run_dir = backup_dir / run.manifest.run_id
    try:
        backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        run_dir.mkdir(mode=0o700)
        run.run_dir = run_dir
        write_manifest(run.manifest, run_dir)
    except OSError as exc:
        if run.run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
            run.run_dir = None
        # The path itself may name internal mounts: the errno name is enough here.
        raise _Failure(
            BACKUP_STORAGE_UNAVAILABLE,
            f"backup directory is missing or not writable ({describe_os_error(exc)})",
            detail=f"errno={exc.errno}",
        ) from None


def _server_info(run: _Run, deadline: float) -> ServerInfo:
    import psycopg  # only the backup child needs it here

    remaining = max(deadline - time.monotonic(), 0.0)
    kwargs: dict[str, object] = {"autocommit": True, "application_name": "jobvisor-backup"}
    assert run.conn is not None
    if "PGCONNECT_TIMEOUT" not in run.conn.env:
        # libpq treats anything below 2 s as 2 s.
        kwargs["connect_timeout"] = max(2, min(int(remaining) or 1, 10))
    try:
        with psycopg.connect(run.settings.dsn, **kwargs) as conn:  # type: ignore[arg-type]
            row = conn.execute(
                "SELECT current_setting('server_version_num')::int,"
                " current_setting('server_version'), current_user, current_database()"
            ).fetchone()
    except psycopg.Error as exc:
        raise _Failure(
            BACKUP_SERVER_UNAVAILABLE,
            "could not query the server version: " + _first_line(str(exc)),
            detail=str(exc),
        ) from None
    assert row is not None
    version_num, version, user, database = row
    return ServerInfo(
        version=str(version).split()[0],
        major=int(version_num) // 10000,
        names=(str(user), str(database)),
    )


def _select_pg_dump(run: _Run, server: ServerInfo, private: Path) -> PgDumpTool:
    """The pg_dump whose major matches the server, else the closest newer one."""
    explicit = run.settings.pg_dump
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise _Failure(BACKUP_TOOL_MISSING, "PG_DUMP does not name an executable file")
        candidates = [("PG_DUMP", explicit)]
    else:
        candidates = find_pg_dump_candidates()
    tools: list[PgDumpTool] = []
    for source, path in candidates:
        parsed = _probe_version(path, private)
        if parsed is None:
            log.warning("backup_pg_dump_unusable", extra={"run": run.manifest.run_id, "source": source})
            continue
        tools.append(PgDumpTool(path=path, source=source, version=parsed[0], major=parsed[1]))
    if not tools:
        raise _Failure(
            BACKUP_TOOL_MISSING,
            "no usable pg_dump found: install the PostgreSQL client or set PG_DUMP",
        )
    for tool in tools:
        if tool.major == server.major:
            return tool
    newer = sorted((t for t in tools if t.major > server.major), key=lambda t: t.major)
    if newer:
        return newer[0]
    best = max(tools, key=lambda t: t.major)
    run.manifest.pg_dump_path, run.manifest.pg_dump_source = best.path, best.source
    run.manifest.pg_dump_version = best.version
    raise _Failure(
        BACKUP_VERSION_MISMATCH,
        f"pg_dump {best.version} is older than server {server.version}:"
        f" install pg_dump {server.major} or newer",
    )


def _probe_version(path: str, private: Path) -> tuple[str, int] | None:
    out = private / f"version-{secrets.token_hex(4)}.txt"
    try:
        with open(out, "wb") as fh:
            rc = _run_in_group(
                [path, "--version"], env=_probe_env(), stdout=fh.fileno(),
                stderr=subprocess.DEVNULL, deadline=time.monotonic() + VERSION_PROBE_TIMEOUT_S,
                grace_s=1.0,
            )
        text = out.read_text(encoding="utf-8", errors="replace")[:1000]
    except (OSError, _Timeout):
        return None
    finally:
        out.unlink(missing_ok=True)
    return parse_pg_version(text) if rc == 0 else None


def _dump_environment(conn: PgConnection, private: Path) -> dict[str, str]:
    passfile = None
    if conn.password is not None and not password_needs_env(conn.password):
        passfile = write_passfile(private, conn.password)
    return child_environment(conn, passfile=passfile)


def _dump(
    run: _Run,
    tool: PgDumpTool,
    env: dict[str, str],
    private: Path,
    deadline: float,
    should_stop: Callable[[], bool] | None,
    progress: Callable[[int], None] | None,
) -> None:
    assert run.run_dir is not None and run.conn is not None
    argv = [tool.path, "--format=custom", "--no-password"]
    if run.conn.conninfo_extras:
        # Only keepalive-style keywords: no host, user, database or password.
        argv.append(f"--dbname={run.conn.conninfo_extras}")
    partial = run.run_dir / (DUMP_NAME + ".partial")
    stderr_path = private / "pg_dump.stderr"
    try:
        # O_EXCL + 0600: a dump holds every row; nobody else should read it.
        dump_fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise _Failure(
            BACKUP_STORAGE_UNAVAILABLE,
            f"cannot create the dump file ({describe_os_error(exc)})",
        ) from None
    run.partial = partial

    def tick() -> None:
        if should_stop is not None and should_stop():
            raise _Stop
        if progress is not None:
            with contextlib.suppress(OSError):
                progress(os.fstat(dump_fd).st_size)

    try:
        with open(stderr_path, "wb") as err:
            try:
                rc = _run_in_group(argv, env=env, stdout=dump_fd, stderr=err.fileno(),
                                   deadline=deadline, grace_s=run.settings.kill_grace_s,
                                   tick=tick)
            except _Timeout:
                raise _Failure(
                    BACKUP_TIMEOUT,
                    f"pg_dump did not finish within {run.settings.timeout_s:g} s and was killed",
                    detail=_stderr_tail(stderr_path),
                ) from None
            except _Stop:
                raise _Failure(BACKUP_CANCELLED, "backup cancelled before pg_dump finished",
                               detail=_stderr_tail(stderr_path)) from None
            except OSError as exc:
                raise _Failure(BACKUP_TOOL_MISSING,
                               f"pg_dump could not be started ({describe_os_error(exc)})") from None
        stderr_text = _stderr_tail(stderr_path)
        if rc != 0:
            what = (f"pg_dump was killed by signal {-rc}" if rc < 0
                    else f"pg_dump exited with code {rc}")
            reason = _error_line(stderr_text)
            raise _Failure(BACKUP_DUMP_FAILED, what + (f": {reason}" if reason else ""),
                           detail=stderr_text, exit_code=rc)
        if stderr_text.strip():
            log.warning("backup_pg_dump_stderr", extra={"run": run.manifest.run_id, "detail": run.redact(stderr_text)})
        try:
            os.fsync(dump_fd)
        except OSError as exc:
            raise _Failure(BACKUP_STORAGE_UNAVAILABLE,
                           f"cannot flush the dump file ({describe_os_error(exc)})") from None
    finally:
        os.close(dump_fd)
    _complete(run, partial)


def _complete(run: _Run, partial: Path) -> None:
    assert run.run_dir is not None
    try:
        size, digest = _size_and_sha256(partial)
        if size == 0:
            raise _Failure(BACKUP_DUMP_FAILED, "pg_dump exited with code 0 but wrote nothing",
                           exit_code=0)
        final = run.run_dir / DUMP_NAME
        os.replace(partial, final)
        run.partial = None
        fsync_dir(run.run_dir)
    except OSError as exc:
        raise _Failure(BACKUP_STORAGE_UNAVAILABLE,
                       f"cannot finish the dump file ({describe_os_error(exc)})") from None
    run.manifest.file = DUMP_NAME
    run.manifest.bytes = size
    run.manifest.sha256 = digest
    run.manifest.status = STATUS_SUCCEEDED


# --- process handling ---------------------------------------------------------------


class _Timeout(Exception):
    pass


class _Stop(Exception):
    pass


def _run_in_group(
    argv: list[str],
    *,
    env: Mapping[str, str],
    stdout: int,
    stderr: int,
    deadline: float,
    grace_s: float,
    tick: Callable[[], None] | None = None,
) -> int:
    """Run argv in its own session, output to files; kill its group on deadline/stop.

    Waiting on the process (not reading a pipe) is what keeps a stuck child, or a
    grandchild holding the descriptors, from blocking us.
    """
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=dict(env),
        start_new_session=True, close_fds=True,
    )
    try:
        delay = 0.005
        next_tick = time.monotonic() + POLL_S
        while not _exited(proc):
            now = time.monotonic()
            if now >= deadline:
                raise _Timeout
            if tick is not None and now >= next_tick:
                tick()
                next_tick = now + POLL_S
            time.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, POLL_S)
    except BaseException:
        _signal_group(proc.pid, signal.SIGTERM)
        _wait_exited(proc, time.monotonic() + grace_s)
        raise
    finally:
        # The leader is a zombie here, not reaped, so its pid (= the group id) cannot
        # have been reused: the KILL reaches only stragglers of this group.
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=max(grace_s, 1.0))
        except subprocess.TimeoutExpired:
            # Stuck in the kernel (e.g. a hung NFS write): do not hang with it.
            log.error("backup_child_unkillable", extra={"child_pid": proc.pid})
    return proc.returncode


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """True once the child exited, without reaping it (WNOWAIT)."""
    if not hasattr(os, "waitid"):  # not Linux: accept the (tiny) pid-reuse window
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_exited(proc: subprocess.Popen[bytes], until: float) -> None:
    while not _exited(proc) and time.monotonic() < until:
        time.sleep(0.02)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --- endings --------------------------------------------------------------------------


def _fail(run: _Run, failure: _Failure) -> None:
    manifest = run.manifest
    manifest.status = STATUS_FAILED
    manifest.error_code = failure.code
    manifest.error_message = run.sanitize(failure.message)
    manifest.exit_code = failure.exit_code
    if failure.detail:
        log.warning("backup_failure_detail", extra={"run": manifest.run_id, "code": failure.code, "detail": run.redact(failure.detail)})


def _finish(run: _Run) -> None:
    manifest = run.manifest
    manifest.finished_at = datetime.now(UTC).isoformat()
    manifest.duration_s = round(time.monotonic() - run.started, 3)
    if run.run_dir is not None:
        try:
            write_manifest(manifest, run.run_dir)
        except OSError as exc:
            log.error("backup_manifest_write_failed", extra={"run": manifest.run_id, "errno": exc.errno})
            if manifest.ok:
                # A dump nobody can verify is not a backup we want to rely on.
                with contextlib.suppress(OSError):
                    (run.run_dir / DUMP_NAME).unlink()
                manifest.status = STATUS_FAILED
                manifest.error_code = BACKUP_STORAGE_UNAVAILABLE
                manifest.error_message = (
                    f"cannot write the manifest ({describe_os_error(exc)})"
                )
                manifest.file = manifest.bytes = manifest.sha256 = None
    if manifest.ok:
        log.info("backup_succeeded", extra={"run": manifest.run_id, "bytes": manifest.bytes, "duration_s": manifest.duration_s, "pg_dump_version": manifest.pg_dump_version})
    else:
        log.error("backup_failed", extra={"run": manifest.run_id, "code": manifest.error_code, "exit_code": manifest.exit_code, "error_message": manifest.error_message})
    _retain(run)


def _retain(run: _Run) -> None:
    settings = run.settings
    try:
        apply_retention(settings.backup_dir, settings.keep_last, settings.keep_days)
    except OSError as exc:
        log.warning("backup_retention_failed", extra={"errno": exc.errno})


def _remove_partial(run: _Run) -> None:
    if run.partial is not None:
        with contextlib.suppress(OSError):
            run.partial.unlink()
        run.partial = None


# --- small helpers --------------------------------------------------------------------


def _probe_env() -> dict[str, str]:
    # `--version` connects nowhere: no connection settings, no password.
    return scrubbed_environment(keep_pgpassword=False)


def _env_identifiers() -> tuple[str, ...]:
    # libpq falls back to these when the DSN leaves a field out.
    values = (os.environ.get(name, "") for name in ("PGHOST", "PGHOSTADDR", "PGUSER",
                                                      "PGDATABASE", "PGSERVICE"))
    return tuple(part for v in values for part in v.split(",") if part)


def _stderr_tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - STDERR_TAIL_BYTES, 0))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _error_line(stderr_text: str) -> str:
    """pg_dump's first `error:` line (the cause), without the program name."""
    lines = [ln.strip() for ln in stderr_text.splitlines() if ln.strip()]
    chosen = next((ln for ln in lines if "error:" in ln.lower()), lines[-1] if lines else "")
    return re.sub(r"^\S*pg_dump:\s*(error:\s*)?", "", chosen)


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _optional_number(
    env: Mapping[str, str], name: str, default: float | None, kind: type
) -> float | None:
    raw = env.get(name)
    if raw is None:
        return default
    raw = raw.strip().lower()
    if raw in ("", "off", "none"):
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise BackupConfigError(f"{name} must be a number or 'off'") from None
    if value < 0:
        raise BackupConfigError(f"{name} must not be negative")
    return value


def _duration(raw: str, default: float, name: str) -> float:
    """Seconds, or a number with s/m/h: `300`, `90s`, `5m`."""
    raw = raw.strip().lower()
    if not raw:
        return default
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|h)?", raw)
    if not match or float(match.group(1)) <= 0:
        raise BackupConfigError(f"{name} must be a positive duration like 300, 90s or 5m")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
