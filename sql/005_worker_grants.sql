-- The worker role may read what `jobvisor status` shows, so operators can run the CLI
-- with the least-privilege DSN too.
GRANT SELECT ON jobvisor.supervisors TO jobvisor_worker;
