"""PgQueuer peer for benchmarks/peers/run.py; runs in benchmarks/peers/.venv-pgqueuer,
never in jobvisor's venv (it imports nothing of jobvisor).

    python pgqueuer_worker.py schema        install PgQueuer's tables, exit
    python pgqueuer_worker.py work          run one QueueManager until SIGTERM

Settings from the environment: DATABASE_URL, PGQ_BATCH_SIZE (jobs per dequeue; also the
size of the buffer that batches completions), PGQ_DEQUEUE_TIMEOUT_S. Entrypoint `noop`
does nothing; `stamp` records time.time() at handler start under the payload's `i`.
Stdout: {"event":"ready"}, and on SIGTERM one {"event":"stats", first_start, last_end,
count, stamps} line (epoch seconds).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from datetime import timedelta

import asyncpg
from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.models import Job


async def _schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


async def _work(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))
    state = {"first": None, "last": None, "count": 0}
    stamps: dict[str, float] = {}

    def seen(now: float) -> None:
        if state["first"] is None:
            state["first"] = now
        state["count"] += 1
        state["last"] = now

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        seen(time.time())

    @qm.entrypoint("stamp")
    async def stamp(job: Job) -> None:
        now = time.time()
        stamps[str(json.loads(job.payload or b"{}")["i"])] = now
        seen(now)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, qm.shutdown.set)
    batch = int(os.environ.get("PGQ_BATCH_SIZE", "10"))
    timeout = float(os.environ.get("PGQ_DEQUEUE_TIMEOUT_S", "30"))
    runner = asyncio.create_task(qm.run(dequeue_timeout=timedelta(seconds=timeout),
                                        batch_size=batch))
    await asyncio.sleep(0.3)  # run() has verified the tables and started listening
    if runner.done():
        runner.result()
    print(json.dumps({"event": "ready"}), flush=True)
    await runner
    await conn.close()
    print(json.dumps({"event": "stats", "first_start": state["first"],
                      "last_end": state["last"], "count": state["count"],
                      "stamps": stamps}), flush=True)


def main() -> int:
    dsn = os.environ["DATABASE_URL"]
    mode = sys.argv[1]
    if mode == "schema":
        asyncio.run(_schema(dsn))
    elif mode == "work":
        asyncio.run(_work(dsn))
    else:
        raise SystemExit(f"unknown mode {mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
