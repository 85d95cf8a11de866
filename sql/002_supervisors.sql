-- Live supervisors publish their children and plan here, so `jobvisor status` (and any
-- host) can show them without talking to the supervisor process.
CREATE TABLE jobvisor.supervisors (
    id           text        PRIMARY KEY,          -- host:pid
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    state        jsonb       NOT NULL DEFAULT '{}'::jsonb
);
