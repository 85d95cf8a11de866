-- One concurrency limit per model endpoint (server URL, model), shared by every worker
-- process and host (workers/core/model_gate.py, docs/planning.md "Model endpoints").
-- The tokens themselves are session advisory locks (lock_id, slot 0..lim-1): a process
-- that dies loses them with its connection. This row holds the limit and what was seen.
CREATE TABLE jobvisor.model_limits (
    endpoint        text        NOT NULL CHECK (length(endpoint) BETWEEN 1 AND 512),
    model           text        NOT NULL CHECK (length(model) BETWEEN 1 AND 256),
    lock_id         integer     NOT NULL CHECK (lock_id >= 0),
    lim             integer     NOT NULL CHECK (lim >= 1),
    max_lim         integer     NOT NULL CHECK (max_lim >= 1),
    fixed           boolean     NOT NULL DEFAULT false,
    -- Bumped on every change: a process changes the limit only against the version its
    -- requests were sent under, so an overload seen by many processes lowers it once.
    version         bigint      NOT NULL DEFAULT 0,
    last_change     text        CHECK (last_change IN ('up', 'down')),
    changed_at      timestamptz,
    next_probe_at   timestamptz NOT NULL DEFAULT '-infinity',
    probe_backoff_s float8      NOT NULL DEFAULT 2,
    -- What the processes saw (each writes its own recent figures; the last one wins).
    requests        bigint      NOT NULL DEFAULT 0,
    busy            bigint      NOT NULL DEFAULT 0,
    timeouts        bigint      NOT NULL DEFAULT 0,
    latency_s       float8,
    baseline_s      float8,
    wait_share      float8,
    observed_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint, model)
);

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'jobvisor_worker') THEN
        GRANT SELECT, INSERT, UPDATE ON jobvisor.model_limits TO jobvisor_worker;
    END IF;
END
$$;
