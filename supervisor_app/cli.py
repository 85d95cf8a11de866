"""`jobvisor` command line. Exit codes: 0 ok, 1 the operation failed, 2 bad input or
unreachable database (with one line on stderr naming the problem)."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from supervisor_app import database
from supervisor_app.errors import BadInput, Failed
from workers import logs, queue

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
ENQUEUE_CHUNK = 5000


# --- helpers -----------------------------------------------------------------------------

def _connect(args: argparse.Namespace) -> psycopg.Connection:
    dsn = database.resolve_dsn()
    database.check(dsn)
    return psycopg.connect(dsn, autocommit=True)


def _duration(value: str) -> float:
    from supervisor_app.units import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _json_payload(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"{where}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _known_types() -> dict[str, Any]:
    """Types the configuration declares, with their settings (empty if no config)."""
    from supervisor_app.config import ConfigError, load_config, resolve_config_path

    try:
        return dict(load_config(resolve_config_path(None)).types)
    except (ConfigError, FileNotFoundError):
        return {}


def _check_type(job_type: str) -> None:
    from workers.registry import HandlerError, handler_spec

    if not TYPE_NAME.match(job_type):
        raise BadInput(f"job type {job_type!r}: use lowercase letters, digits and _ "
                       "(starting with a letter)")
    types = _known_types()
    try:
        handler_spec(job_type, getattr(types.get(job_type), "handler", None))
    except HandlerError as exc:
        raise BadInput(f"{exc.code}: {exc}") from exc


# --- commands ----------------------------------------------------------------------------

def cmd_db_url(args: argparse.Namespace) -> int:
    print(database.resolve_dsn(keep_embedded_running=args.keep_running))
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from supervisor_app.migrate import migrate

    dsn = database.resolve_dsn()
    database.check(dsn)
    applied = migrate(dsn)
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return EXIT_OK


def _payloads_from_file(path: Path) -> Iterator[Any]:
    try:
        handle = sys.stdin if str(path) == "-" else path.open(encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror}") from exc
    with handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                yield _json_payload(line, f"{path}:{lineno}")


def cmd_enqueue(args: argparse.Namespace) -> int:
    _check_type(args.job_type)
    if (args.payload is None) == (args.file is None):
        raise BadInput("give exactly one of --payload JSON or --file PATH")
    if args.max_attempts is not None and args.max_attempts < 1:
        raise BadInput(f"--max-attempts must be >= 1, got {args.max_attempts}")
    if args.file is not None and args.key:
        raise BadInput("--key applies to one job; use --payload with --key")
    settings = _known_types().get(args.job_type)
    max_attempts = args.max_attempts or (settings.retry.max_attempts if settings else 5)
    from supervisor_app.cli_batches import check_callback_url

    callback = check_callback_url(args.callback_url)  # a refused host: exit 2, nothing sent

    def new(payload: Any) -> queue.NewJob:
        return queue.NewJob(args.job_type, payload, priority=args.priority, delay=args.delay,
                            max_attempts=max_attempts, key=args.key, batch_id=args.batch,
                            callback_url=None if args.batch is not None else callback)

    payloads: Iterator[Any] = (
        iter([_json_payload(args.payload, "--payload")]) if args.payload is not None
        else _payloads_from_file(Path(args.file))
    )
    # A batch is filled in one transaction: it must not finish (and fire its webhook)
    # between two chunks.
    batch = args.batch is not None
    with _connect(args) as conn, (conn.transaction() if batch else contextlib.nullcontext()):
        if batch:
            try:
                queue.create_batch(conn, args.batch, callback_url=callback)
            except ValueError as exc:
                raise BadInput(f"--batch: {exc}") from None
        chunk: list[queue.NewJob] = []
        for payload in payloads:
            chunk.append(new(payload))
            if len(chunk) >= ENQUEUE_CHUNK:
                _print_ids(queue.enqueue_many(conn, chunk))
                chunk = []
        if chunk:
            _print_ids(queue.enqueue_many(conn, chunk))
    return EXIT_OK


def _print_ids(ids: list[int]) -> None:
    sys.stdout.write("".join(f"{i}\n" for i in ids))


def cmd_status(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        queues = queue.status_counts(conn)
        workers, plan, readings, served = _supervisor_view(conn)
        # Text only: the --json shape is a documented contract (DESIGN.md).
        running = [] if args.json else queue.running_jobs(conn, limit=20)
    # Queues with jobs waiting that no live supervisor serves (kept, never failed for it).
    unserved = sorted(t for t, c in queues.items() if c["queued"] and t not in served)
    out = {"queues": queues, "workers": workers, "plan": plan, "unserved": unserved}
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return EXIT_OK
    for t in unserved:
        print(f"warning: {queues[t]['queued']} job(s) of type {t!r} are queued and no running "
              "supervisor serves that type", file=sys.stderr)
    print(f"{'type':<14}{'queued':>8}{'leased':>8}{'done':>9}{'failed':>8}{'cancel':>8}"
          f"{'oldest s':>10}")
    for job_type, c in sorted(queues.items()):
        print(f"{job_type:<14}{c['queued']:>8}{c['leased']:>8}{c['completed']:>9}"
              f"{c['failed']:>8}{c['cancelled']:>8}{c['oldest_queued_s']:>10.1f}")
    for host, r in readings:
        gpus = ", ".join(f"gpu{g['index']} {g['free_bytes'] // 2**20} MiB free"
                         for g in r.get("gpus", [])) or "no GPU"
        print(f"\n{host}: RAM {r['memory_available'] // 2**20} MiB available, "
              f"{r['cpu_count']} CPUs, {gpus}")
    if plan:
        print("plan: " + ", ".join(f"{t}={p['processes']} ({p['reason']})"
                                   for t, p in sorted(plan.items())))
    for w in workers:
        print(f"  {w['job_type']}[{w['slot']}] pid={w['pid']} {w['state']} "
              f"rss={w['rss_bytes'] // 2**20}MiB")
    if running:
        print("\nrunning (longest first):")
    for r in running:
        done = "" if r["progress"] is None else f" {r['progress']:.0%}"
        print(f"  job {r['id']} {r['job_type']}{done} attempt {r['attempts']}/"
              f"{r['max_attempts']} since {r['started_at']}")
    return EXIT_OK


def _supervisor_view(
    conn: psycopg.Connection,
) -> tuple[list[dict], dict[str, dict], list[tuple[str, dict]], set[str]]:
    """Workers, plan, machine readings and served types of live supervisors (published
    in the database)."""
    from supervisor_app.registry_table import live_supervisors, served_types

    workers: list[dict] = []
    plan: dict[str, dict] = {}
    readings: list[tuple[str, dict]] = []
    states = live_supervisors(conn)
    for state in states:
        workers.extend(state.get("workers", []))
        if state.get("readings"):
            readings.append((state["supervisor"]["host"], state["readings"]))
        for job_type, entry in state.get("plan", {}).items():
            merged = plan.setdefault(job_type, {"processes": 0, "reason": entry["reason"]})
            merged["processes"] += entry["processes"]
    return workers, plan, readings, served_types(states)


def _job_or_fail(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    job = queue.get_job(conn, job_id)
    if job is None:
        raise BadInput(f"job {job_id}: no such job")
    return job


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        job = queue.jsonable(_job_or_fail(conn, args.id))
    if args.json:
        print(json.dumps(job, sort_keys=True, default=str))
    else:
        for key, value in job.items():
            if value is None or key == "errors":
                continue
            shown = json.dumps(value, default=str) if key in ("payload", "result") else value
            print(f"{key:>16}: {shown}")
        for e in job.get("errors") or []:  # each attempt's error, oldest first (last 10)
            print(f"{'attempt ' + str(e.get('attempt')):>16}: {e.get('code')} at {e.get('at')}"
                  f" — {e.get('message') or ''}")
    return EXIT_OK


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        job = _job_or_fail(conn, args.id)
        if not queue.retry_failed(conn, args.id):
            raise Failed(f"job {args.id} is {job['status']}: only failed or cancelled jobs can "
                         "be retried (or its idempotency key is held by a newer job)")
    print(f"job {args.id} queued again")
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        job = _job_or_fail(conn, args.id)
        outcome = queue.cancel(conn, args.id)
    if outcome is None:
        raise Failed(f"job {args.id} is already {job['status']}")
    print(f"job {args.id}: {outcome.replace('_', ' ')}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from supervisor_app.main import run

    return run(args)


def cmd_reload(args: argparse.Namespace) -> int:
    from supervisor_app.main import reload

    return reload(args)


# --- parser ------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line naming the problem, as scripts expect; --help shows the usage.
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jobvisor", description="Background jobs from one "
                                "PostgreSQL queue under a single supervisor.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("run", cmd_run, "migrate, then supervise sub-workers for every configured type")
    sp.add_argument("--config", help="quotas YAML (default: $JOBVISOR_CONFIG, "
                    "./config/jobvisor.yaml, /etc/jobvisor/jobvisor.yaml)")
    sp.add_argument("--types", help="comma-separated subset of configured types to run")

    sp = add("reload", cmd_reload, "send SIGHUP to the running supervisor (pid file)")

    add("migrate", cmd_migrate, "apply missing SQL migrations (no-op when up to date)")

    sp = add("db-url", cmd_db_url, "print the DSN in use (starts the embedded server if needed)")
    sp.add_argument("--keep-running", action="store_true",
                    help="leave the embedded server running after this command")

    sp = add("enqueue", cmd_enqueue, "enqueue one job (--payload) or many (--file, JSON lines)")
    sp.add_argument("job_type", metavar="TYPE")
    sp.add_argument("--payload", help="the job's JSON payload")
    sp.add_argument("--file", help="JSON lines, one payload per line ('-' for stdin)")
    sp.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    sp.add_argument("--delay", type=_duration, default=0.0, help="run after this delay (e.g. 30s)")
    sp.add_argument("--key", help="idempotency key: a live job with it is returned instead")
    sp.add_argument("--max-attempts", type=int, help="attempts before failing (default: type's)")
    sp.add_argument("--batch", help="batch id for all jobs")
    sp.add_argument("--callback-url", metavar="URL",
                    help="POST a signed notification here when the job finishes (with "
                         "--batch: once, when the whole batch has); see docs/webhooks.md")

    sp = add("status", cmd_status, "queue counts per type, plus workers and plan of a "
             "running supervisor")
    sp.add_argument("--json", action="store_true", help="one JSON object")

    jobs = add("jobs", lambda a: EXIT_BAD_INPUT, "inspect and act on one job")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION",
                               parser_class=_Parser)
    sp = add("show", cmd_jobs_show, "show a job", jsub)
    sp.add_argument("id", type=int)
    sp.add_argument("--json", action="store_true")
    sp = add("retry", cmd_jobs_retry, "queue a failed or cancelled job again", jsub)
    sp.add_argument("id", type=int)
    sp = add("cancel", cmd_jobs_cancel, "cancel a queued job or ask a running one to stop", jsub)
    sp.add_argument("id", type=int)

    # Command groups that live in modules of their own (the pipeline, backups, batches).
    from supervisor_app import cli_backup, cli_batches, cli_learning

    for module in (cli_learning, cli_backup, cli_batches):
        module.register(sub, add)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure()
    try:
        return args.func(args)
    except BadInput as exc:
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except database.DatabaseUnavailable as exc:
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Failed as exc:
        print(f"jobvisor: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except psycopg.OperationalError as exc:
        print(f"jobvisor: database error ({type(exc).__name__})", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130

