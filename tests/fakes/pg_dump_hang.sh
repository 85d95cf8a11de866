#!/bin/sh
# Fake pg_dump that never finishes.
# `--version` answers like the server (JOBVISOR_FAKE_PG_VERSION) so selection passes.
# Otherwise it writes a few bytes (a partial dump to clean up), starts a child in its
# process group and ignores SIGTERM, so only a group-wide SIGKILL ends it.
if [ "$1" = "--version" ]; then
    echo "pg_dump (PostgreSQL) ${JOBVISOR_FAKE_PG_VERSION:-16.2}"
    exit 0
fi
trap '' TERM
printf 'PGDMP-partial'
sleep 3600 &
if [ -n "$JOBVISOR_FAKE_PID_FILE" ]; then
    echo "$$ $!" > "$JOBVISOR_FAKE_PID_FILE"
fi
wait
