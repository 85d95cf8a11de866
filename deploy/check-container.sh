#!/usr/bin/env bash
# Build the jobvisor image here and prove it runs, against the PostgreSQL service at
# 127.0.0.1:5432 (trust auth, superuser postgres):
#
#   (0) the image's non-editable install has the `jobvisor.plugins` entry points and the
#       package data (workers/learning/sql/*.sql, supervisor_app/static/)
#   (1) the HEALTHCHECK turns healthy
#   (2) PID 1 is tini, `jobvisor run` is its child, every process runs as uid 10001
#   (3) `docker kill -s HUP` reloads (the supervisor logs `reloaded`)
#   (4) `jobvisor backup --wait` (docker exec) writes a dump into the BACKUP_DIR volume
#       that a real `pg_restore --list` reads
#   (5) `docker stop` drains within the grace: no SIGKILL, exit code 0, the in-flight
#       job is not left leased
#   (6) no password in `docker inspect`, `docker logs`, or any /proc/*/cmdline inside the
#       container (sampled while the backup's pg_dump runs, too)
#
# Every check prints PASS or FAIL with a reason; the last line is one JSON object with
# the build time and the image size. Exit status: 0 all passed; 1 a check failed, or a
# step they need did (base, build, database set-up, docker run); 2 it could not run here
# (no docker or BuildKit, no psql or PostgreSQL, port 9464 or the role names taken). Every wait has a
# bound; a trap removes the container, the database, the roles and the temporary files.
#
#   deploy/check-container.sh                 # as root, with dockerd running
#
# No registry needed: the base of both stages is a Debian bookworm made with debootstrap
# (deploy/container/make-base.sh, kept as jobvisor-base:bookworm and reused), pg_dump
# comes from PGDG when it answers, else from Debian (bookworm: 15), and pip reaches PyPI
# directly, through the host's CA bundle (a TLS-inspecting proxy), or, where neither
# works, from a wheelhouse built on the host with the host's pip configuration (local
# mirrors) and served on 127.0.0.1. See docs/runbook.md, "The container check".
#
# Settings (environment):
#   JV_IMAGE         tag to build (jobvisor:check); removed at the end unless JV_KEEP_IMAGE=1
#   JV_LOG_DIR       keep the build, base and container logs there
#   JV_BASE_IMAGE    base tag (jobvisor-base:bookworm); JV_REBUILD_BASE=1 makes it anew
#   JV_NO_CACHE=1    build with --no-cache (a cold build, for measuring)
#   PG_SOURCE        pgdg | debian (default: pgdg if apt.postgresql.org answers)
#   PG_MAJOR         postgresql-client major (default: the server's with pgdg, 15 with debian)
#   JV_PIP           auto | pypi | pypi-ca | wheelhouse (default auto: the first that works)
#   JV_PIP_CA        CA bundle for pypi-ca (default $PIP_CERT, else the system bundle)
#   PGHOST, PGPORT, PGUSER  the server (127.0.0.1, 5432, postgres); the container reaches
#                    it with --network host, so it must be this host's loopback
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2

image=${JV_IMAGE:-jobvisor:check}
base_image=${JV_BASE_IMAGE:-jobvisor-base:bookworm}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
unset PGPASSWORD PGDATABASE PGSERVICE
http_port=9464            # supervisor.http.port of config/jobvisor.yaml, as the HEALTHCHECK uses
stop_timeout=45           # the Dockerfile's advice: grace (30 s) + margin
roles=(jobvisor_app jobvisor_worker_login jobvisor_backup)

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
passed=() failed=()
pass() { printf 'PASS %s: %s\n' "$1" "$2"; passed+=("$1"); }
fail() { printf 'FAIL %s: %s\n' "$1" "$2"; failed+=("$1"); }
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

# --- state for the trap ---------------------------------------------------------------
tmp=$(mktemp -d /tmp/jobvisor-check.XXXXXX)
chmod 0711 "$tmp"
cname=jobvisor-check-$$
db=jobvisor_check_$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
made_db=0 made_roles=0 wheel_server_pid='' built_image=0
build_s=null base_s=null image_bytes=null pg_source=null pg_major=null pip_source=null

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [[ -n $wheel_server_pid ]] && kill "$wheel_server_pid" 2>/dev/null
  timeout 60 docker rm -f "$cname" >/dev/null 2>&1
  if ((made_db)); then
    timeout 30 psql -X -q -d postgres -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
      || log "cleanup: could not drop database $db"
  fi
  if ((made_roles)); then
    for r in "${roles[@]}"; do
      timeout 30 psql -X -q -d postgres -c "DROP ROLE IF EXISTS $r" >/dev/null 2>&1 \
        || log "cleanup: could not drop role $r"
    done
  fi
  if [[ -n ${JV_LOG_DIR:-} ]]; then   # the logs (no passwords in them: check 6)
    mkdir -p "$JV_LOG_DIR" && cp "$tmp"/*.log "$tmp"/logs.txt "$JV_LOG_DIR"/ 2>/dev/null
  fi
  if ((built_image)) && [[ ${JV_KEEP_IMAGE:-0} != 1 ]]; then
    timeout 60 docker rmi "$image" >/dev/null 2>&1
  fi
  rm -rf --one-file-system "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

summary() {   # a count line, then the last line: one JSON object
  local p f
  printf 'container: %d passed, %d failed\n' "${#passed[@]}" "${#failed[@]}"
  p=$(printf '%s\n' "${passed[@]}" | python3 -c 'import json,sys; print(json.dumps([l for l in sys.stdin.read().split("\n") if l]))')
  f=$(printf '%s\n' "${failed[@]}" | python3 -c 'import json,sys; print(json.dumps([l for l in sys.stdin.read().split("\n") if l]))')
  local mib=null
  [[ $image_bytes != null ]] && mib=$(( (image_bytes + 524288) / 1048576 ))
  printf '{"build_s": %s, "image_bytes": %s, "image_mib": %s, "base_image": %s, "base_s": %s, "pg_source": %s, "pg_major": %s, "pip": %s, "passed": %s, "failed": %s}\n' \
    "$build_s" "$image_bytes" "$mib" "$(json_str "$base_image")" "$base_s" "$pg_source" "$pg_major" "$pip_source" "$p" "$f"
}

cannot() {    # a prerequisite is missing: exit 2 (.ci/run reports the check as skipped)
  fail "$1" "$2"
  summary
  exit 2
}
broken() {    # a step the checks need failed (base, build, database, run): exit 1
  fail "$1" "$2"
  summary
  exit 1
}

# --- prerequisites ----------------------------------------------------------------------
command -v docker >/dev/null || cannot prerequisites "no docker CLI"
timeout 20 docker info >/dev/null 2>&1 || cannot prerequisites "dockerd does not answer (start it: dockerd &)"
command -v psql >/dev/null || cannot prerequisites "no psql on this host (apt-get install postgresql-client)"
[[ $PGHOST == 127.0.0.1 || $PGHOST == localhost ]] \
  || cannot prerequisites "PGHOST=$PGHOST: the container reaches the server over --network host, so it must be 127.0.0.1"
server_num=$(timeout 10 psql -X -Atq -d postgres -c 'SHOW server_version_num' 2>/dev/null) \
  || cannot prerequisites "no PostgreSQL answers as $PGUSER at $PGHOST:$PGPORT"
server_major=$(( server_num / 10000 ))

# BuildKit: a CLI with buildx, or a CLI before 23 that has BuildKit built in
# (Debian bookworm's docker.io is 20.10; a newer CLI without buildx cannot use BuildKit).
build_cmd=()
if docker buildx version >/dev/null 2>&1; then
  build_cmd=(docker build)
else
  for cli in docker /usr/bin/docker; do
    v=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null) || continue
    if (( ${v%%.*} < 23 )); then build_cmd=(env DOCKER_BUILDKIT=1 "$cli" build); break; fi
  done
fi
((${#build_cmd[@]})) || cannot prerequisites "no BuildKit: install docker-buildx, or use a docker CLI older than 23 (Debian's docker.io)"

# --- the base image ---------------------------------------------------------------------
if [[ ${JV_REBUILD_BASE:-0} == 1 ]] || ! docker image inspect "$base_image" >/dev/null 2>&1; then
  log "making the base $base_image (debootstrap)"
  t0=$(date +%s.%N)
  timeout 600 deploy/container/make-base.sh "$base_image" >"$tmp/base.log" 2>&1 \
    || { tail -20 "$tmp/base.log" >&2; broken base "deploy/container/make-base.sh failed (see above)"; }
  base_s=$(python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$t0")
  pass base "$base_image made with debootstrap in ${base_s} s"
else
  log "reusing the base $base_image"
fi

# --- where pg_dump and pip packages come from ---------------------------------------------
if [[ -z ${PG_SOURCE:-} ]]; then
  if timeout 10 python3 -c 'import urllib.request as u; u.urlopen("https://apt.postgresql.org/pub/repos/apt/dists/bookworm-pgdg/Release", timeout=8)' 2>/dev/null; then
    PG_SOURCE=pgdg
  else
    PG_SOURCE=debian
  fi
fi
case $PG_SOURCE in
  pgdg) PG_MAJOR=${PG_MAJOR:-$server_major} ;;
  debian) PG_MAJOR=${PG_MAJOR:-15} ;;
  *) cannot prerequisites "PG_SOURCE must be pgdg or debian, not $PG_SOURCE" ;;
esac
pg_source=$(json_str "$PG_SOURCE") pg_major=$PG_MAJOR
log "pg_dump: postgresql-client-$PG_MAJOR from $PG_SOURCE (server: $server_major)"
((PG_MAJOR < server_major)) && log "note: pg_dump $PG_MAJOR is older than the server ($server_major); the backup then needs another pg_dump (pgserver's)"

probe_pypi() {   # $1: CA bundle or empty
  local mount=() ca=()
  [[ -n $1 ]] && mount=(-v "$1:/probe-ca.crt:ro") ca=(/probe-ca.crt)
  timeout 60 docker run --rm "${mount[@]}" "$base_image" python3 -c '
import ssl, sys, urllib.request as u
ctx = ssl.create_default_context(cafile=sys.argv[1] if len(sys.argv) > 1 else None)
u.urlopen("https://pypi.org/simple/setuptools/", timeout=20, context=ctx)' "${ca[@]}" >/dev/null 2>&1
}
host_ca=${JV_PIP_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
pip_mode=${JV_PIP:-auto}
if [[ $pip_mode == auto ]]; then
  if probe_pypi ""; then pip_mode=pypi
  elif [[ -r $host_ca ]] && probe_pypi "$host_ca"; then pip_mode=pypi-ca
  else pip_mode=wheelhouse
  fi
fi
secrets=() network=()
case $pip_mode in
  pypi) ;;
  pypi-ca)
    [[ -r $host_ca ]] || cannot prerequisites "JV_PIP=pypi-ca: no CA bundle at $host_ca"
    printf '[global]\ncert = /etc/ssl/certs/pip-ca.crt\n' >"$tmp/pip.conf"
    secrets=(--secret "id=pip.conf,src=$tmp/pip.conf" --secret "id=pip-ca.crt,src=$host_ca") ;;
  wheelhouse)
    # The host's pip (its configuration: local mirrors, find-links) builds every wheel the
    # image needs; the build reaches them over 127.0.0.1 (--network host), nothing else.
    hostpy=python3
    [[ -x .venv/bin/python ]] && hostpy=.venv/bin/python
    log "wheelhouse: $hostpy -m pip wheel .[pdf,ai] (host pip configuration)"
    # From a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    mkdir -p "$tmp/src" && cp -r pyproject.toml README.md supervisor_app workers "$tmp/src/"
    timeout 600 "$hostpy" -m pip wheel -q --wheel-dir "$tmp/wheels" "$tmp/src[pdf,ai]" "setuptools>=68" wheel \
      >"$tmp/wheel.log" 2>&1 || { tail -20 "$tmp/wheel.log" >&2; broken pip "pip wheel on the host failed (see above)"; }
    wport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$tmp/wheels" "$wport" >/dev/null 2>&1 &
    wheel_server_pid=$!
    printf '[global]\nno-index = true\nfind-links = http://127.0.0.1:%s/\n' "$wport" >"$tmp/pip.conf"
    secrets=(--secret "id=pip.conf,src=$tmp/pip.conf")
    network=(--network host) ;;
  *) cannot prerequisites "JV_PIP must be auto, pypi, pypi-ca or wheelhouse, not $pip_mode" ;;
esac
pip_source=$(json_str "$pip_mode")
log "pip: $pip_mode"

# --- build --------------------------------------------------------------------------------
nocache=()
[[ ${JV_NO_CACHE:-0} == 1 ]] && nocache=(--no-cache)
log "building $image: ${build_cmd[*]} (log: build.log)"
old_image_id=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null)
t0=$(date +%s.%N)
timeout 900 "${build_cmd[@]}" --progress=plain "${nocache[@]}" "${network[@]}" "${secrets[@]}" \
    --build-arg "PYTHON_IMAGE=$base_image" --build-arg "PG_SOURCE=$PG_SOURCE" \
    --build-arg "PG_MAJOR=$PG_MAJOR" -t "$image" . >"$tmp/build.log" 2>&1
build_rc=$?
build_s=$(python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$t0")
if ((build_rc)); then
  tail -30 "$tmp/build.log" >&2
  broken build "docker build exited $build_rc after ${build_s} s (see above)"
fi
built_image=1
# A build that moved the tag leaves the image it named before dangling: remove it.
if [[ -n $old_image_id && $old_image_id != "$(docker image inspect -f '{{.Id}}' "$image")" ]]; then
  docker rmi "$old_image_id" >/dev/null 2>&1
fi
image_bytes=$(docker image inspect -f '{{.Size}}' "$image")
cached=$(grep -c '^#[0-9]* CACHED' "$tmp/build.log")
pass build "${build_s} s ($cached steps cached), $(( image_bytes / 1048576 )) MiB"

# The non-editable install in the final image: entry points and package data came along.
pkg=$(timeout 60 docker run --rm --network none --entrypoint python -w / "$image" -c '
from importlib.resources import files
import workers
from workers.core import plugins
names = sorted(p.name for p in plugins.installed())
sql = sorted(f.name for f in files("workers.learning").joinpath("sql").iterdir() if f.name.endswith(".sql"))
static = sorted(f.name for f in files("supervisor_app").joinpath("static").iterdir())
where = workers.__file__
ok = {"backup", "learning"} <= set(names) and sql and static and where.startswith("/opt/jobvisor/venv/")
print("ok" if ok else "missing", f"plug-ins {names}, workers/learning/sql {sql}, supervisor_app/static {len(static)} files, workers from {where}")
' 2>&1 | tail -1)
if [[ $pkg == "ok "* ]]; then
  pass package "${pkg#ok }"
else
  fail package "${pkg#missing }"
fi

# --- the database, the compose way --------------------------------------------------------
port_free() { python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }
for _ in $(seq 30); do port_free "$http_port" && break; sleep 2; done
port_free "$http_port" || cannot prerequisites "port $http_port on 127.0.0.1 is taken (the container uses --network host)"

# The roles are cluster-wide: like tests/test_deploy.py, never touch ones that exist
# (checked only now, after the build, so that no one takes them in between).
for _ in $(seq 60); do
  taken=$(timeout 10 psql -X -Atq -d postgres -c \
    "SELECT string_agg(rolname, ',') FROM pg_roles WHERE rolname IN ('jobvisor_app','jobvisor_worker_login','jobvisor_backup')")
  [[ -z $taken ]] && break
  sleep 2
done
[[ -z $taken ]] || cannot prerequisites "roles $taken already exist on $PGHOST:$PGPORT (waited 120 s): not touching them"

pw() { od -An -N18 -tx1 /dev/urandom | tr -d ' \n'; }
app_pw=$(pw) worker_pw=$(pw) backup_pw=$(pw)
secrets_list=("$app_pw" "$worker_pw" "$backup_pw")
timeout 30 psql -X -q -d postgres -c "CREATE DATABASE \"$db\"" >/dev/null || broken database "CREATE DATABASE $db failed"
made_db=1 made_roles=1
# The init script itself, as the postgres image runs it (passwords through psql's
# environment). It refuses passwords unsafe in URLs; ours are hex.
if ! JOBVISOR_APP_PASSWORD=$app_pw JOBVISOR_WORKER_PASSWORD=$worker_pw JOBVISOR_BACKUP_PASSWORD=$backup_pw \
     POSTGRES_USER=$PGUSER POSTGRES_DB=$db timeout 60 bash deploy/postgres/initdb/10-jobvisor-roles.sh >"$tmp/initdb.log" 2>&1; then
  cat "$tmp/initdb.log" >&2
  broken database "deploy/postgres/initdb/10-jobvisor-roles.sh failed"
fi

# The passwords reach the container as a libpq passfile on a read-only mount, never as
# environment (which `docker inspect` shows) or arguments. libpq wants it 0600, owned by
# the user reading it.
mkdir -p "$tmp/secrets" "$tmp/backups"
{
  printf '%s:%s:%s:jobvisor_app:%s\n' "$PGHOST" "$PGPORT" "$db" "$app_pw"
  printf '%s:%s:%s:jobvisor_worker_login:%s\n' "$PGHOST" "$PGPORT" "$db" "$worker_pw"
  printf '%s:%s:%s:jobvisor_backup:%s\n' "$PGHOST" "$PGPORT" "$db" "$backup_pw"
} >"$tmp/secrets/pgpass"
chown 10001:10001 "$tmp/secrets/pgpass" "$tmp/backups"
chmod 0600 "$tmp/secrets/pgpass"
chmod 0700 "$tmp/backups"
dsn() { printf 'postgresql://%s@%s:%s/%s' "$1" "$PGHOST" "$PGPORT" "$db"; }

# --- run ----------------------------------------------------------------------------------
started=$(date +%s)
if ! timeout 60 docker run -d --name "$cname" --network host --stop-timeout "$stop_timeout" \
    -e "DATABASE_URL=$(dsn jobvisor_app)" \
    -e "LEARNING_DATABASE_URL=$(dsn jobvisor_worker_login)" \
    -e "BACKUP_DATABASE_URL=$(dsn jobvisor_backup)" \
    -e PGPASSFILE=/run/secrets/jobvisor/pgpass \
    -e JOBVISOR_HTTP_HOST=127.0.0.1 \
    -e AI_BACKEND=stub \
    -v "$tmp/secrets:/run/secrets/jobvisor:ro" \
    -v "$tmp/backups:/var/lib/jobvisor/backups" \
    "$image" >/dev/null; then
  broken run "docker run failed"
fi
clogs() { timeout 30 docker logs "$cname" 2>&1; }
dump_logs() { log "last container log lines:"; clogs | tail -25 >&2; }
state() { timeout 10 docker inspect -f "$1" "$cname" 2>/dev/null; }

# (1) health
health=starting
while (( $(date +%s) - started < 150 )); do
  health=$(state '{{.State.Health.Status}}')
  [[ $health == healthy || $health == unhealthy ]] && break
  [[ $(state '{{.State.Running}}') == true ]] || { health="exited ($(state '{{.State.ExitCode}}'))"; break; }
  sleep 1
done
if [[ $health == healthy ]]; then
  pass "1-health" "healthy $(( $(date +%s) - started )) s after docker run ($(clogs | grep -c '"event": "child_started"') children started)"
else
  fail "1-health" "health is '$health' after $(( $(date +%s) - started )) s; last probe: $(state '{{range .State.Health.Log}}{{.Output}}{{end}}' | tail -c 300 | tr '\n' ' ')"
  dump_logs
fi

# (2) PID 1, uid
procs=$(timeout 20 docker exec "$cname" sh -c '
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ -r "$d/cmdline" ] || continue
    uid=$(sed -n "s/^Uid:[[:space:]]*\([0-9]*\).*/\1/p" "$d/status" 2>/dev/null)
    ppid=$(sed -n "s/^PPid:[[:space:]]*//p" "$d/status" 2>/dev/null)
    printf "%s %s %s %s\n" "$p" "$ppid" "$uid" "$(tr "\0\n" "  " <"$d/cmdline")"
  done' 2>&1)
pid1=$(awk '$1 == 1 {$1=$2=$3=""; sub(/^ +/, ""); print}' <<<"$procs")
jv=$(awk '$2 == 1 && /jobvisor run/ {print $1, $3}' <<<"$procs" | head -1)
non10001=$(awk '$3 != 10001 {print}' <<<"$procs")
pid1=${pid1% }
if [[ $pid1 == "/usr/bin/tini -- jobvisor run" && -n $jv && ${jv#* } == 10001 && -z $non10001 ]]; then
  pass "2-pid1-uid" "PID 1: '$pid1'; jobvisor run is pid ${jv% *} (child of 1), uid 10001; all $(wc -l <<<"$procs") processes uid 10001"
else
  fail "2-pid1-uid" "PID 1: '${pid1:-?}'; jobvisor run (child of 1): '${jv:-none}'; processes not uid 10001: ${non10001:-none}"
fi

# (3) reload on SIGHUP
before=$(clogs | grep -c '"event": "reloaded"')
t0=$(date +%s.%N)
timeout 20 docker kill -s HUP "$cname" >/dev/null
reloaded=0
for _ in $(seq 100); do
  (( $(clogs | grep -c '"event": "reloaded"') > before )) && { reloaded=1; break; }
  sleep 0.2
done
if ((reloaded)); then
  line=$(clogs | grep '"event": "reloaded"' | tail -1)
  pass "3-reload" "'reloaded' logged $(python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$t0") s after docker kill -s HUP: $(cut -c1-200 <<<"$line")"
else
  fail "3-reload" "no 'reloaded' event within 20 s of SIGHUP; rejected: $(clogs | grep -c '"event": "reload_rejected"')"
  dump_logs
fi

# (4) backup, with (6)'s cmdline sampler running inside the container meanwhile
# (inside: it stops at a flag file, or after 240 s; the host's side is bounded by timeout)
timeout 250 docker exec "$cname" sh -c '
  rm -f /tmp/.jv-sampler-stop; end=$(( $(date +%s) + 240 ))
  while [ ! -e /tmp/.jv-sampler-stop ] && [ "$(date +%s)" -lt "$end" ]; do
    for f in /proc/[0-9]*/cmdline; do tr "\0\n" "  " <"$f" 2>/dev/null; echo; done
  done' >"$tmp/cmdlines.txt" 2>/dev/null &
sampler=$!
t0=$(date +%s.%N)
out=$(timeout 200 docker exec "$cname" jobvisor backup --wait --timeout 180 2>&1)
backup_rc=$?
backup_s=$(python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$t0")
path=$(grep -o 'succeeded: [^,]*' <<<"$out" | head -1 | cut -d' ' -f2)
host_path=$tmp/backups/${path#/var/lib/jobvisor/backups/}
pg_restore=$(ls -1 /usr/lib/postgresql/*/bin/pg_restore 2>/dev/null | sort -V | tail -1)
[[ -z $pg_restore ]] && pg_restore=$(command -v pg_restore)
if ((backup_rc == 0)) && [[ $path == /var/lib/jobvisor/backups/*/dump.pgdump && -f $host_path ]]; then
  manifest=$(dirname "$host_path")/manifest.json
  tool=$(python3 -c 'import json, sys; m = json.load(open(sys.argv[1]))
print("pg_dump {pg_dump_version} ({pg_dump_source}), server {server_version}".format(**m))' "$manifest" 2>&1)
  if [[ -n $pg_restore ]]; then
    listing=$(timeout 60 "$pg_restore" --list "$host_path" 2>&1); lrc=$?
    reader="host's $pg_restore"
  else
    listing=$(timeout 60 docker run --rm --entrypoint pg_restore -v "$tmp/backups:/b:ro" "$image" --list "/b/${path#/var/lib/jobvisor/backups/}" 2>&1); lrc=$?
    reader="the image's pg_restore (none on this host)"
  fi
  entries=$(grep -c '^[0-9]' <<<"$listing")
  if ((lrc == 0)) && grep -q 'TABLE jobvisor jobs ' <<<"$listing"; then
    pass "4-backup" "job done in ${backup_s} s: $(stat -c %s "$host_path") bytes, $tool; $reader --list reads $entries entries, TABLE jobvisor.jobs among them"
  else
    fail "4-backup" "$reader --list exited $lrc or lacks TABLE jobvisor.jobs: $(head -c 300 <<<"$listing")"
  fi
else
  fail "4-backup" "jobvisor backup --wait exited $backup_rc after ${backup_s} s: $(tail -c 400 <<<"$out" | tr '\n' ' ')"
  dump_logs
fi
timeout 20 docker exec "$cname" touch /tmp/.jv-sampler-stop
wait "$sampler" 2>/dev/null

# (6) no secret in docker inspect, docker logs, /proc/*/cmdline (now and during the backup)
timeout 20 docker exec "$cname" sh -c 'for f in /proc/[0-9]*/cmdline; do tr "\0\n" "  " <"$f" 2>/dev/null; echo; done' >>"$tmp/cmdlines.txt" 2>/dev/null
timeout 20 docker inspect "$cname" >"$tmp/inspect.json"
clogs >"$tmp/logs.txt"
leaks=()
for s in "${secrets_list[@]}"; do
  grep -qF -- "$s" "$tmp/inspect.json" && leaks+=("docker inspect")
  grep -qF -- "$s" "$tmp/logs.txt" && leaks+=("docker logs")
  grep -qF -- "$s" "$tmp/cmdlines.txt" && leaks+=("/proc/*/cmdline")
done
samples=$(grep -c . "$tmp/cmdlines.txt")
pg_dump_argv=$( { grep -E '^/[^ ]*/pg_dump .*--format' "$tmp/cmdlines.txt"; grep -E '^/[^ ]*/pg_dump ' "$tmp/cmdlines.txt"; } | head -1 | cut -c1-160)
saw=" (pg_dump was not running at any sample)"
[[ -n $pg_dump_argv ]] && saw=", pg_dump's among them: '${pg_dump_argv% }'"
if ((${#leaks[@]} == 0)) && ((samples > 0)) && [[ -s $tmp/inspect.json ]]; then
  pass "6-no-secrets" "none of the 3 passwords in docker inspect, docker logs or $samples sampled cmdlines$saw"
else
  fail "6-no-secrets" "passwords found in: ${leaks[*]:-nothing, but there was nothing to read ($samples cmdlines)}"
fi

# (5) docker stop drains: a sleep job in flight when the stop comes
job=$(timeout 30 docker exec "$cname" jobvisor enqueue sleep --payload '{"seconds": 5}' 2>&1 | tail -1)
status=
if [[ $job =~ ^[0-9]+$ ]]; then
  for _ in $(seq 120); do
    status=$(timeout 10 psql -X -Atq -d "$db" -c "SELECT status FROM jobvisor.jobs WHERE id = $job")
    [[ $status == leased ]] && break
    sleep 0.5
  done
fi
t0=$(date +%s.%N)
timeout $((stop_timeout + 30)) docker stop -t "$stop_timeout" "$cname" >/dev/null
stop_s=$(python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$t0")
exit_code=$(state '{{.State.ExitCode}}') oom=$(state '{{.State.OOMKilled}}')
after=''
[[ $job =~ ^[0-9]+$ ]] && after=$(timeout 10 psql -X -Atq -d "$db" -c "SELECT status FROM jobvisor.jobs WHERE id = $job")
stopped=$(clogs | grep '"event": "supervisor_stopped"' | tail -1)
if [[ $status == leased && $exit_code == 0 && $oom == false && $after != leased && -n $after ]] \
   && python3 -c "import sys; sys.exit(not float(sys.argv[1]) < float(sys.argv[2]))" "$stop_s" "$stop_timeout" \
   && grep -q '"forced": false' <<<"$stopped"; then
  pass "5-stop-drains" "docker stop took ${stop_s} s (< ${stop_timeout} s: no SIGKILL), exit code 0; the sleep job leased at the stop ended '$after'; supervisor_stopped forced=false"
else
  fail "5-stop-drains" "stop ${stop_s} s, exit code ${exit_code:-?}, OOM ${oom:-?}; sleep job ${job:-not enqueued}: '${status:-?}' before, '${after:-?}' after; last stop event: ${stopped:-none}"
  dump_logs
fi

# --- result ---------------------------------------------------------------------------------
if ((${#failed[@]})); then
  log "${#failed[@]} check(s) failed: ${failed[*]}"
  summary
  exit 1
fi
summary
exit 0
