// graphile-worker peer for benchmarks/peers/run.py (not part of the jobvisor package).
//
//   node graphile_worker.js schema            install graphile-worker's schema, exit
//   node graphile_worker.js work              run one worker pool until SIGTERM
//
// Settings come from the environment (DATABASE_URL, GW_CONCURRENCY, GW_LOCAL_QUEUE,
// GW_COMPLETE_BATCH_DELAY, GW_POLL_MS). Task `noop` does nothing; task `stamp` records
// Date.now() at handler start under the payload's `i` (wake latency). Stdout carries
// JSON lines only: {"event":"ready"} once the pool runs, and on SIGTERM one
// {"event":"stats", first_start, last_end, count, stamps} (epoch seconds) before exit.
"use strict";

const { run, runMigrations, Logger } = require("graphile-worker");

const env = process.env;
const connectionString = env.DATABASE_URL;
const quiet = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`[graphile ${level}] ${message}`);
});

async function main() {
  const mode = process.argv[2];
  if (mode === "schema") {
    await runMigrations({ connectionString, logger: quiet });
    return;
  }
  if (mode !== "work") throw new Error(`unknown mode ${mode}`);
  let firstStart = null;
  let lastEnd = null;
  let count = 0;
  const stamps = {};
  const worker = {
    connectionString,
    concurrentJobs: Number(env.GW_CONCURRENCY || 8),
    pollInterval: Number(env.GW_POLL_MS || 2000),
    logger: quiet,
  };
  const localQueue = Number(env.GW_LOCAL_QUEUE || -1);
  if (localQueue > 1) worker.localQueue = { size: localQueue };
  const delay = Number(env.GW_COMPLETE_BATCH_DELAY || -1);
  if (delay >= 0) worker.completeJobBatchDelay = delay;
  const runner = await run({
    noHandleSignals: true,
    preset: { worker },
    taskList: {
      noop: async () => {
        const now = Date.now();
        if (firstStart === null) firstStart = now;
        count += 1;
        lastEnd = now;
      },
      stamp: async (payload) => {
        const now = Date.now();
        stamps[payload.i] = now / 1000;
        if (firstStart === null) firstStart = now;
        count += 1;
        lastEnd = now;
      },
    },
  });
  process.stdout.write(JSON.stringify({ event: "ready" }) + "\n");
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await runner.stop();
    process.stdout.write(JSON.stringify({
      event: "stats",
      first_start: firstStart === null ? null : firstStart / 1000,
      last_end: lastEnd === null ? null : lastEnd / 1000,
      count,
      stamps,
    }) + "\n", () => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
