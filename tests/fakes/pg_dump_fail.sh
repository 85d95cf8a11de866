#!/bin/sh
# Fake pg_dump that fails like a real one with a connection error.
# `--version` answers JOBVISOR_FAKE_PG_VERSION. The error text deliberately repeats
# everything the manifest must not contain: host, user, database, password, a path.
if [ "$1" = "--version" ]; then
    echo "pg_dump (PostgreSQL) ${JOBVISOR_FAKE_PG_VERSION:-16.2}"
    exit 0
fi
password="$PGPASSWORD"
if [ -z "$password" ] && [ -n "$PGPASSFILE" ]; then
    password=$(sed 's/^\*:\*:\*:\*://' "$PGPASSFILE")
fi
printf 'PGDMP-partial'
echo "pg_dump: warning: using passfile $PGPASSFILE" >&2
echo "pg_dump: error: connection to server at \"$PGHOST\" ($PGHOST), port $PGPORT failed: FATAL:  password authentication failed for user \"$PGUSER\" (password $password) on database $PGDATABASE, see /srv/internal/ops/pg.log" >&2
exit "${JOBVISOR_FAKE_EXIT_CODE:-3}"
