"""Two example job types, each registered a different way.

* `example_wordcount` is declared by the package's plug-in (plugin.py, the
  `jobvisor.plugins` entry point in pyproject.toml): installing the package is enough. It
  also writes a row to the plug-in's own table (sql/001_wordcounts.sql).
* `example_checksum` is registered by a `handler:` line in the YAML quotas
  (`handler: jobvisor_example.handlers:checksum`): the module only has to be importable.

Both follow the handler contract: `handle(job, ctx) -> dict | None`, the return value
is the job's result; `PayloadError`/`PermanentError` fail the job at once,
`TransientError` (and any unexpected exception) retries it with backoff.
"""

from __future__ import annotations

import hashlib
from typing import Any

from workers import Job, JobContext, PayloadError, PermanentError

CHUNK_LINES = 1000
ALGORITHMS = ("sha256", "sha1", "md5")


def wordcount(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Count lines and words of `payload["text"]`, reporting progress per chunk of lines,
    and record the counts in `jobvisor_example.wordcounts`."""
    text = _payload(job).get("text")
    if not isinstance(text, str):
        raise PayloadError("example_wordcount: payload needs 'text' (a string)")
    lines = text.splitlines()
    words = 0
    for start in range(0, len(lines), CHUNK_LINES):
        ctx.check_cancelled()  # an operator's `jobs cancel` or shutdown stops us here
        words += sum(len(line.split()) for line in lines[start:start + CHUNK_LINES])
        done = min(len(lines), start + CHUNK_LINES)
        # Stored at most once a second by the runtime: calling it often costs nothing.
        ctx.progress(done / len(lines), f"{done}/{len(lines)} lines")
    # The outcome, through the job's completing transaction, opened only now that the
    # work is done: the row commits with the job's fenced completion, or not at all (a
    # lost lease, an error), so a run repeated after a crash finds no row of an earlier
    # one. ON CONFLICT keeps the write idempotent all the same (at least once).
    ctx.db.execute("INSERT INTO jobvisor_example.wordcounts (job_id, lines, words)"
                   " VALUES (%s, %s, %s) ON CONFLICT (job_id) DO NOTHING",
                   (job.id, len(lines), words))
    return {"lines": len(lines), "words": words}


def checksum(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Digest of `payload["data"]` with the type's YAML `options.algorithm` (sha256)."""
    data = _payload(job).get("data")
    if not isinstance(data, str):
        raise PayloadError("example_checksum: payload needs 'data' (a string)")
    algorithm = str(ctx.options.get("algorithm", "sha256"))
    if algorithm not in ALGORITHMS:
        # A configuration error: retrying would not help.
        raise PermanentError("example_checksum_bad_option",
                             f"options.algorithm must be one of {', '.join(ALGORITHMS)}")
    digest = hashlib.new(algorithm, data.encode("utf-8")).hexdigest()
    return {"algorithm": algorithm, "digest": digest, "bytes": len(data.encode("utf-8"))}


def _payload(job: Job) -> dict[str, Any]:
    return job.payload if isinstance(job.payload, dict) else {}
