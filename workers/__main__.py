"""`python -m workers --type TYPE [--concurrency N]`: one sub-worker process.

The DSN is the worker role's (workers.core.dsn: LEARNING_DATABASE_URL, else DATABASE_URL),
never from arguments, so it can't show in `ps`. With no database variable set at all it
is the embedded PostgreSQL under $JOBVISOR_HOME, as for the CLI: started if needed and held
while this process runs (workers.core.embedded). The supervisor passes every other setting
as flags.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys

from workers.core import embedded, logs, model_gate, plugins
from workers.core.dsn import dsn_for, unset_role
from workers.core.registry import HandlerError, load
from workers.core.runtime import Runtime, WorkerSettings

EXIT_BAD_INPUT = 2
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workers", description=__doc__.splitlines()[0])
    p.add_argument("--type", required=True, dest="job_type", help="the job type to serve")
    p.add_argument("--concurrency", type=int,
                   default=int(os.environ.get("WORKER_CONCURRENCY", "1") or 1),
                   help="jobs in flight at once (default: $WORKER_CONCURRENCY or 1)")
    p.add_argument("--prefetch", type=int, default=0,
                   help="extra jobs leased ahead of free threads (tiny jobs)")
    p.add_argument("--handler", help="module:function (default: entry point or built-in)")
    p.add_argument("--lease", type=float, default=60.0, help="lease seconds")
    p.add_argument("--heartbeat", type=float, default=15.0, help="heartbeat seconds")
    p.add_argument("--poll", type=float, default=2.0, help="fallback poll seconds")
    p.add_argument("--no-listen", action="store_true",
                   help="poll only (for PgBouncer in transaction mode)")
    p.add_argument("--timeout", type=float, default=300.0, help="hard timeout per job (s)")
    p.add_argument("--grace", type=float, default=30.0, help="drain grace on SIGTERM (s)")
    p.add_argument("--max-attempts", type=int, default=5,
                   help="attempts for jobs this worker enqueues (default for any type)")
    p.add_argument("--attempts-by-type", default="{}",
                   help="JSON object: max attempts of follow-up jobs per type")
    p.add_argument("--backoff", type=float, default=5.0, help="first retry delay (s)")
    p.add_argument("--max-backoff", type=float, default=600.0, help="retry delay cap (s)")
    p.add_argument("--global-concurrency", type=int, help="cap on leased jobs on all hosts")
    p.add_argument("--fair", action="store_true",
                   help="lease by fair share between keys (the type has fair_by)")
    p.add_argument("--max-running-per-key", type=int,
                   help="cap on leased jobs per fair-share key on all hosts (with --fair)")
    p.add_argument("--no-keep-completed", action="store_true",
                   help="delete completed jobs as they complete (keep no history)")
    p.add_argument("--options", default="{}", help="JSON object of handler options")
    p.add_argument("--worker-id", help="lease owner id (default host:pid)")
    return p


def _fail(message: str) -> int:
    print(f"jobvisor worker: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _die_with_parent() -> None:
    """Under a supervisor: have the kernel send SIGUSR2 when it dies (Linux), so a
    supervisor killed with -9 leaves no child leasing on its own."""
    parent = os.environ.get("JOBVISOR_PARENT_PID", "")
    if not parent.isdigit():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR2, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the runtime's parent check each loop still notices
    if os.getppid() != int(parent):
        sys.exit(0)  # it died before we asked: nothing leased yet, nothing to give back


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure()
    _die_with_parent()
    if args.concurrency < 1:
        return _fail(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.max_running_per_key is not None and (args.max_running_per_key < 1
                                                 or not args.fair):
        return _fail(f"--max-running-per-key must be >= 1 and needs --fair, got "
                     f"{args.max_running_per_key}{'' if args.fair else ' without --fair'}")
    if args.heartbeat >= args.lease:
        return _fail(f"--heartbeat ({args.heartbeat:g}s) must be shorter than --lease "
                     f"({args.lease:g}s)")
    try:
        options = json.loads(args.options)
        attempts = json.loads(args.attempts_by_type)
        if not isinstance(options, dict) or not isinstance(attempts, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        return _fail(f"--options and --attempts-by-type must be JSON objects: {exc}")
    try:
        handler = load(args.job_type, args.handler)
        plugins.job_settings(args.job_type)  # a broken plug-in fails here, named, not per job
    except HandlerError as exc:
        return _fail(f"{exc.code}: {exc}")
    except plugins.PluginError as exc:
        return _fail(f"PLUGIN_INVALID: {exc}")
    try:
        model_gate.policy_from_env()  # a bad AI_MODEL_LIMIT fails here, not per model call
    except model_gate.ModelGateError as exc:
        return _fail(str(exc))
    dsn = dsn_for("worker")
    if not dsn:
        # The CLI's rule: the embedded server stands in only when no database variable
        # is set, never for a role whose variable is missing.
        if refused := unset_role("worker"):
            return _fail(refused)
        try:
            dsn = embedded.start()
        except embedded.EmbeddedUnavailable as exc:
            return _fail(str(exc))
    settings = WorkerSettings(
        job_type=args.job_type, concurrency=args.concurrency, prefetch=max(0, args.prefetch),
        lease=args.lease, heartbeat=args.heartbeat, poll=args.poll, listen=not args.no_listen,
        timeout=args.timeout, grace=args.grace, max_attempts=args.max_attempts,
        backoff=args.backoff, max_backoff=args.max_backoff,
        global_concurrency=args.global_concurrency, options=options,
        fair=args.fair, max_running_per_key=args.max_running_per_key,
        keep_completed=not args.no_keep_completed,
        attempts_by_type={str(k): int(v) for k, v in attempts.items()},
    )
    if args.worker_id:
        settings.worker_id = args.worker_id
    return Runtime(dsn, settings, handler).run()


if __name__ == "__main__":
    sys.exit(main())
