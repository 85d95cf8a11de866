#!/usr/bin/env bash
# jobvisor's database roles, created by the postgres image on the first start of an
# empty data directory (/docker-entrypoint-initdb.d), as the superuser over the local
# socket, in the database POSTGRES_DB.
#
#   jobvisor_worker        NOLOGIN group; the migrations grant the queue and the
#                          learning functions to it (sql/003_worker_role.sql, workers/learning/sql/)
#   jobvisor_app           LOGIN, member of jobvisor_worker, owns the database: runs the
#                          migrations and the supervisor (DATABASE_URL)
#   jobvisor_worker_login  LOGIN, member of jobvisor_worker and nothing else: the
#                          workers' least-privilege DSN (LEARNING_DATABASE_URL), KEDA
#   jobvisor_backup        LOGIN, read-only, sees every row (BACKUP_DATABASE_URL,
#                          docs/backups.md)
#
# Passwords come from JOBVISOR_APP_PASSWORD, JOBVISOR_WORKER_PASSWORD and
# JOBVISOR_BACKUP_PASSWORD and reach psql through its environment (\getenv), never its
# arguments. The script is idempotent: run it again to rotate the passwords
#   docker compose exec postgres /docker-entrypoint-initdb.d/10-jobvisor-roles.sh
#
# The migrations run later (`jobvisor run` as jobvisor_app); creating the group role
# here lets the login roles join it before it would otherwise exist. 003 creates it only
# if it is missing.
#
# No `set -u`: the entrypoint sources this file instead of running it when the file has
# lost its executable bit, and -u would then leak into the entrypoint.
set -eo pipefail

for var in JOBVISOR_APP_PASSWORD JOBVISOR_WORKER_PASSWORD JOBVISOR_BACKUP_PASSWORD; do
    value="${!var:-}"
    if [[ -z "$value" ]]; then
        echo "10-jobvisor-roles: $var is empty; set it in .env" >&2
        exit 1
    fi
    # compose.yml puts the passwords into postgresql:// URLs, where other characters
    # would need percent-encoding.
    if [[ ! "$value" =~ ^[A-Za-z0-9._~-]+$ ]]; then
        echo "10-jobvisor-roles: $var may only contain A-Z a-z 0-9 . _ ~ - (try: openssl rand -hex 24)" >&2
        exit 1
    fi
done

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\getenv app_password JOBVISOR_APP_PASSWORD
\getenv worker_password JOBVISOR_WORKER_PASSWORD
\getenv backup_password JOBVISOR_BACKUP_PASSWORD

SELECT 'CREATE ROLE jobvisor_worker NOLOGIN'
WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'jobvisor_worker')
\gexec

SELECT format('CREATE ROLE %I LOGIN', r)
FROM unnest(ARRAY['jobvisor_app', 'jobvisor_worker_login', 'jobvisor_backup']) AS r
WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r)
\gexec

-- The application: owns the database, hence its `public` schema (pg_database_owner),
-- and creates schema `jobvisor` and every object in the migrations. Membership in
-- jobvisor_worker lets the health probe accept it where no worker login is used.
ALTER ROLE jobvisor_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS
    PASSWORD :'app_password';
GRANT jobvisor_worker TO jobvisor_app;
SELECT format('ALTER DATABASE %I OWNER TO jobvisor_app', current_database())
\gexec

-- The workers: only what the migrations grant to jobvisor_worker.
ALTER ROLE jobvisor_worker_login WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS
    INHERIT PASSWORD :'worker_password';
GRANT jobvisor_worker TO jobvisor_worker_login;

-- Backups: read everything, write nothing (docs/backups.md). BYPASSRLS because pg_dump
-- refuses to dump a table whose policy would hide rows.
ALTER ROLE jobvisor_backup WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE BYPASSRLS
    PASSWORD :'backup_password';
GRANT pg_read_all_data TO jobvisor_backup;
ALTER ROLE jobvisor_backup SET default_transaction_read_only = on;
SELECT format('GRANT CONNECT ON DATABASE %I TO jobvisor_backup', current_database())
\gexec
SQL

echo "10-jobvisor-roles: roles jobvisor_app, jobvisor_worker_login, jobvisor_backup ready"
