"""`jobvisor submit` and `jobvisor submissions show`: the learning pipeline from a shell.

`submit FILE` stores the upload, inserts the submission and enqueues its `pdf` job in
one transaction (a PDF or a PNG/JPEG photo), and prints the submission id. With
`--wait` it follows the stages on stderr (pending → extracted → completed) and prints
the feedback at the end; a failed submission or a wait that times out exits 1. A result
the stub backend made (a placeholder, `AI_BACKEND=stub`, the default) is said so on
stderr. `submit DIR` submits every PDF/photo in a folder as one batch.

The plug-in's `commands` (workers/learning/plugin.py): the CLI calls `register(sub, kit)`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from workers.core import queue
from workers.core.commands import EXIT_OK, BadInput, CommandKit, Failed
from workers.learning.storage import storage_from_env

STAGES = ("pending", "extracted", "completed")
# The backend value that means "a placeholder, no model" (text_backend, feedback_backend).
STUB = "stub"
# pdf → vision → feedback: the jobs one submission adds to its batch when all goes well.
SUBMISSION_STAGES = 3
POLL_S = 0.5
DEFAULT_WAIT = "10m"
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png", ".png"),
    (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
)

def register(subparsers: Any, kit: CommandKit) -> None:
    """The plug-in's commands: `submit` and `submissions show` (Plugin.commands)."""
    sp = kit.add("submit", cmd_submit, "submit a PDF or photo (or a folder of them, as one "
                 "batch) to the learning pipeline (pdf → vision → feedback); prints the "
                 "submission id", subparsers)
    sp.add_argument("file", metavar="FILE", help="a PDF, PNG or JPEG file, or a folder")
    sp.add_argument("--owner", default=None,
                    help="owner subject (app.current_sub) of the submission "
                         "(default: the OS user name)")
    sp.add_argument("--criteria", metavar="FILE",
                    help="criteria: a JSON array of strings, or one criterion per line")
    sp.add_argument("--wait", action="store_true",
                    help="follow the stages on stderr and print the feedback at the end")
    sp.add_argument("--timeout", type=kit.duration, default=kit.duration(DEFAULT_WAIT),
                    help=f"how long --wait waits (default {DEFAULT_WAIT})")

    ssub = kit.group("submissions", "inspect learning submissions", subparsers,
                     "submissions_command")
    sp = kit.add("show", cmd_show, "show a submission: status, error code, feedback", ssub)
    sp.add_argument("id", metavar="ID")
    sp.add_argument("--owner", help="act as this subject (needed unless the DSN's role "
                                    "bypasses row-level security)")
    sp.add_argument("--json", action="store_true", help="one JSON object, text included")


# --- submit ------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.is_dir():  # every PDF/photo in the folder, as one batch
        return submit_directory(args.kit, path, owner=args.owner, criteria=args.criteria,
                                wait=args.wait, timeout=args.timeout)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror or exc}") from None
    mime, suffix = _sniff(data, path)
    criteria = _criteria(Path(args.criteria)) if args.criteria else []
    owner = args.owner or _default_owner()
    if not owner.strip():
        raise BadInput("--owner must not be empty")

    submission_id = str(uuid.uuid4())
    source_key = f"submissions/{submission_id}/source{suffix}"
    dsn = args.kit.dsn("owner")
    storage = storage_from_env()
    # Stored first: the pdf job may start the moment the transaction commits.
    storage.write(source_key, data)
    try:
        _insert(dsn, submission_id, owner, source_key, mime, criteria,
                args.kit.max_attempts("pdf", 5))
    except BaseException:
        storage.delete_prefix(f"submissions/{submission_id}/")
        raise
    print(submission_id, flush=True)
    if not args.wait:
        return EXIT_OK
    return _wait(dsn, submission_id, owner, args.timeout)


def _insert(dsn: str, submission_id: str, owner: str, source_key: str, mime: str,
            criteria: list[str], max_attempts: int) -> None:
    """The submission and its pdf job: both or neither."""
    job = queue.NewJob("pdf", {"submission_id": submission_id, "owner_sub": owner},
                       key=f"pdf:{submission_id}", max_attempts=max_attempts)
    with psycopg.connect(dsn) as conn, _domain_errors(), conn.transaction():
        # The policy's WITH CHECK holds every role but a superuser to this subject.
        conn.execute("SELECT set_config('app.current_sub', %s, true)", (owner,))
        conn.execute(
            "INSERT INTO public.learning_submissions"
            " (id, owner_sub, source_key, mime_type, criteria)"
            " VALUES (%s, %s, %s, %s, %s)",
            (submission_id, owner, source_key, mime, Jsonb(criteria)),
        )
        queue.enqueue(conn, job)


def _sniff(data: bytes, path: Path) -> tuple[str, str]:
    """(mime type, storage suffix) from the bytes: a file name can lie."""
    if not data:
        raise BadInput(f"{path}: the file is empty")
    if b"%PDF-" in data[:1024]:
        return "application/pdf", ".pdf"
    for magic, mime, suffix in _MAGIC:
        if data.startswith(magic):
            return mime, suffix
    raise BadInput(f"{path}: not a PDF, PNG or JPEG file")


def _criteria(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read criteria ({exc})") from None
    if text.lstrip().startswith(("[", "{")):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(value, dict):
            value = value.get("criteria")
        if not isinstance(value, list) or not all(isinstance(c, str) and c.strip()
                                                  for c in value):
            raise BadInput(f"{path}: criteria must be a JSON array of non-empty strings "
                           "(or an object with one under \"criteria\")")
        return [c.strip() for c in value]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _default_owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli"


@contextmanager
def _domain_errors() -> Iterator[None]:
    """A database without the learning schema, or a role without rights: one line, exit 2."""
    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction):
        raise BadInput("the learning schema is missing: run `jobvisor migrate`") from None
    except psycopg.errors.UndefinedColumn:
        raise BadInput("the learning schema is out of date: run `jobvisor migrate`") from None
    except psycopg.errors.InsufficientPrivilege:
        raise BadInput(
            "the database role may not write submissions (the CLI connects as the owner "
            "role, DATABASE_URL: README, \"Database roles\")") from None


# --- wait --------------------------------------------------------------------------------


def _wait(dsn: str, submission_id: str, owner: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    shown_stage = -1
    last_note: str | None = None
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = _read(conn, submission_id, owner)
            if row is None:
                raise Failed(f"submission {submission_id} is no longer visible")
            status = row["analysis_status"]
            if status in STAGES:
                # A stage passed between two polls is still reported, in order.
                for index in range(shown_stage + 1, STAGES.index(status) + 1):
                    _say(f"submission {submission_id}: {STAGES[index]}")
                shown_stage = max(shown_stage, STAGES.index(status))
            if status == "completed":
                print(row["feedback_md"], flush=True)
                if note := placeholder_note(row):
                    _say(note)
                return EXIT_OK
            if status == "failed":
                raise Failed(f"submission {submission_id} failed: {row['error_code']}")
            note = _job_note(conn, submission_id)
            if note and note != last_note:
                _say(f"  {note}")
                last_note = note
            if time.monotonic() >= deadline:
                raise Failed(f"submission {submission_id}: still {status} after "
                             f"{timeout:g}s (error code: {row['error_code'] or 'none'})")
            time.sleep(POLL_S)


def _read(conn: psycopg.Connection, submission_id: str, owner: str | None) -> dict | None:
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        if owner:
            cur.execute("SELECT set_config('app.current_sub', %s, true)", (owner,))
        return cur.execute(
            "SELECT id::text, owner_sub, analysis_status, error_code, source_key, mime_type,"
            " criteria, text_body, feedback_md, analysis_json, text_backend, feedback_backend,"
            " created_at, updated_at, extracted_at, finished_at"
            " FROM public.learning_submissions WHERE id = %s",
            (submission_id,),
        ).fetchone()


def _job_note(conn: psycopg.Connection, submission_id: str) -> str | None:
    """What the submission's running job says about itself (`pdf: rendered page 2/5`)."""
    # By the stages' idempotency keys: the partial unique index over live jobs serves it.
    keys = [f"{stage}:{submission_id}" for stage in ("pdf", "vision", "feedback")]
    row = conn.execute(
        "SELECT job_type, status, attempts, error_code, progress_note FROM jobvisor.jobs"
        " WHERE idempotency_key = ANY(%s) AND status IN ('queued', 'leased')"
        " ORDER BY id DESC LIMIT 1",
        (keys,),
    ).fetchone()
    if row is None:
        return None
    job_type, status, attempts, error_code, note = row
    if status == "queued" and error_code:
        return f"{job_type}: retrying after attempt {attempts} ({error_code})"
    if status == "leased":
        return f"{job_type}: {note}" if note else f"{job_type}: running"
    return f"{job_type}: queued"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def placeholder_note(row: dict[str, Any]) -> str | None:
    """One line when the stub backend made the submission's text or feedback, else None."""
    text, feedback = row.get("text_backend") == STUB, row.get("feedback_backend") == STUB
    if not (text or feedback):
        return None
    what = ("the text and the feedback are placeholders" if text and feedback
            else "the text is a placeholder" if text else "the feedback is a placeholder")
    return (f"note: {what} from the stub backend (AI_BACKEND=stub, the default), not an "
            "AI model's work; set AI_BACKEND=local, OLLAMA_BASE_URL, AI_VISION_MODEL and "
            "AI_FEEDBACK_MODEL for real OCR and feedback (README, quick start)")


# --- show --------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    try:
        submission_id = str(uuid.UUID(args.id))
    except ValueError:
        raise BadInput(f"submission {args.id!r}: not a uuid") from None
    with psycopg.connect(args.kit.dsn("owner"), autocommit=True) as conn, _domain_errors():
        row = _read(conn, submission_id, args.owner)
    if row is None:
        raise BadInput(f"submission {submission_id}: no such submission"
                       + ("" if args.owner else " (or it belongs to another --owner)"))
    if args.json:
        print(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False))
        return EXIT_OK
    for key in ("id", "owner_sub", "analysis_status", "error_code", "mime_type", "source_key",
                "created_at", "extracted_at", "finished_at", "text_backend", "feedback_backend"):
        if row[key] is not None:
            print(f"{key:>16}: {row[key]}" + (" (placeholder)" if row[key] == STUB
                                              and key.endswith("_backend") else ""))
    print(f"{'criteria':>16}: {len(row['criteria'])}")
    if row["text_body"] is not None:
        print(f"{'text_body':>16}: {len(row['text_body'])} characters (--json shows it)")
    if row["feedback_md"]:
        print()
        print(row["feedback_md"])
    return EXIT_OK


# --- submit DIR (a batch) ----------------------------------------------------------------------------------

def submit_directory(kit: CommandKit, directory: Path, *, owner: str | None = None,
                     criteria: str | None = None, wait: bool = False,
                     timeout: float = 600.0) -> int:
    """Submit every PDF, PNG and JPEG directly in `directory` as one batch.

    Prints the batch id, then `<submission id>\\t<file name>` per file. All submissions
    and their pdf jobs are inserted in one transaction, so the batch starts complete.
    With `wait`, draws a progress bar over the batch on stderr and, once it finished,
    prints `<submission id>\\t<file name>\\t<status>[\\t<error code>]` per file; exit 1
    when a submission did not complete or the wait timed out.
    """
    if not directory.is_dir():
        raise BadInput(f"{directory}: not a directory")
    crit = _criteria(Path(criteria)) if criteria else []
    owner = owner or _default_owner()
    if not owner.strip():
        raise BadInput("--owner must not be empty")
    candidates = sorted(p for p in directory.iterdir()
                        if p.is_file() and not p.name.startswith("."))
    dsn = kit.dsn("owner")
    storage = storage_from_env()
    batch_id = f"submit-{uuid.uuid4()}"
    submitted: list[tuple[str, str, str, str]] = []  # (submission id, file name, key, mime)
    try:
        for path in candidates:
            # One file in memory at a time: a folder may hold many large scans.
            try:
                data = path.read_bytes()
                mime, suffix = _sniff(data, path)
            except (OSError, BadInput) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                print(f"skipped {path.name}: {reason}", file=sys.stderr)
                continue
            submission_id = str(uuid.uuid4())
            key = f"submissions/{submission_id}/source{suffix}"
            # Stored first: a pdf job may start the moment the transaction commits.
            storage.write(key, data)
            submitted.append((submission_id, path.name, key, mime))
        if not submitted:
            raise BadInput(f"{directory}: no PDF, PNG or JPEG files in it")
        _insert_batch(dsn, batch_id, owner, submitted, crit, kit.max_attempts("pdf", 5))
    except BaseException:
        for submission_id, *_rest in submitted:
            storage.delete_prefix(f"submissions/{submission_id}/")
        raise
    print(batch_id)
    for submission_id, name, _key, _mime in submitted:
        print(f"{submission_id}\t{name}")
    sys.stdout.flush()
    print(f"batch {batch_id}: {len(submitted)} submission(s)", file=sys.stderr)
    if not wait:
        return EXIT_OK
    return _wait_submissions(kit, dsn, batch_id, owner, submitted, timeout)


# The same row _insert writes for one file, here for many in one transaction.
_INSERT_SUBMISSION = (
    "INSERT INTO public.learning_submissions (id, owner_sub, source_key, mime_type, criteria)"
    " VALUES (%s, %s, %s, %s, %s)"
)


def _insert_batch(dsn: str, batch_id: str, owner: str,
                  submitted: list[tuple[str, str, str, str]], criteria: list[str],
                  max_attempts: int) -> None:
    """The submissions, the batch and its pdf jobs: all or nothing."""
    jobs = [queue.NewJob("pdf", {"submission_id": sid, "owner_sub": owner},
                         key=f"pdf:{sid}", max_attempts=max_attempts)
            for sid, _name, _key, _mime in submitted]
    with psycopg.connect(dsn) as conn, _domain_errors(), conn.transaction():
        # The policy's WITH CHECK holds every role but a superuser to this subject.
        conn.execute("SELECT set_config('app.current_sub', %s, true)", (owner,))
        with conn.cursor() as cur:
            cur.executemany(_INSERT_SUBMISSION, [
                (sid, owner, key, mime, Jsonb(criteria)) for sid, _name, key, mime in submitted])
        queue.enqueue_batch(conn, batch_id, jobs)


def _wait_submissions(kit: CommandKit, dsn: str, batch_id: str, owner: str,
                      submitted: list[tuple[str, str, str, str]], timeout: float) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        kit.wait_for_batch(conn, batch_id, timeout=timeout,
                       expected_total=SUBMISSION_STAGES * len(submitted))
        outcomes = [(sid, name, _read(conn, sid, owner))
                    for sid, name, _key, _mime in submitted]
    not_completed = placeholders = 0
    for sid, name, row in outcomes:
        status = row["analysis_status"] if row else "missing"
        code = (row or {}).get("error_code")
        print(f"{sid}\t{name}\t{status}" + (f"\t{code}" if code else ""))
        not_completed += status != "completed"
        placeholders += status == "completed" and placeholder_note(row) is not None
    sys.stdout.flush()
    if placeholders:
        _say(f"note: {placeholders} of {len(outcomes)} submissions hold placeholders from the "
             "stub backend (AI_BACKEND=stub, the default), not a model's work "
             "(`jobvisor submissions show ID` says which part)")
    if not_completed:
        raise Failed(f"batch {batch_id}: {not_completed} of {len(outcomes)} submissions did "
                     "not complete (`jobvisor submissions show ID` says why)")
    return EXIT_OK
