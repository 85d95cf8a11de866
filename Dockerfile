# jobvisor: `jobvisor run` under tini, as an unprivileged user.
#
#   docker build -t jobvisor .
#   docker run --stop-timeout 45 -e DATABASE_URL=... -p 9464:9464 jobvisor
#
# Quotas are read from /etc/jobvisor/jobvisor.yaml (a copy of config/jobvisor.yaml is
# baked in; mount a directory over /etc/jobvisor to change it, then `docker kill -s HUP`
# reloads it). Stop: SIGTERM drains the children within `supervisor.grace` (30 s in the
# shipped config), so give the container that plus a margin before SIGKILL:
# `--stop-timeout 45` (docker run), `stop_grace_period: 45s` (compose.yml),
# `terminationGracePeriodSeconds: 45` (deploy/k8s). See docs/runbook.md.
#
# Needs BuildKit (the default builder since Docker 23; `DOCKER_BUILDKIT=1` on 20.10). No
# `# syntax=` line on purpose: it would pull a frontend image from Docker Hub, which a
# host without a registry cannot; every feature used here is in the builder's own.
#
# Build arguments, for hosts that reach no image registry or no PGDG
# (deploy/check-container.sh builds it that way; docs/runbook.md, "The container check"):
#   PYTHON_IMAGE  the base of both stages. It must have Python 3.11 as `python`, with
#                 `python -m venv` working (deploy/container/make-base.sh makes one with
#                 debootstrap: Debian's python3 3.11, python3-venv, python-is-python3).
#   PG_SOURCE     where postgresql-client-${PG_MAJOR} comes from: `pgdg` (the PostgreSQL
#                 project's apt repository, the default) or `debian` (bookworm has 15 only).
#   PG_MAJOR      pg_dump's major version (see below).
# And two optional BuildKit secrets for pip, absent by default (pip then uses PyPI): `pip.conf`
# (mounted as /etc/pip.conf: an index, a proxy, `cert = /etc/ssl/certs/pip-ca.crt`) and
# `pip-ca.crt` (a CA bundle, e.g. a TLS-inspecting proxy's). Neither lands in a layer.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# pg_dump must have the major version of the server it dumps (docs/backups.md): the same
# major as the `postgres` image in compose.yml. Debian bookworm itself ships 15, so the
# client comes from the PostgreSQL project's apt repository (PGDG) by default;
# PG_SOURCE=debian PG_MAJOR=15 where PGDG cannot be reached and the server is 15.
ARG PG_SOURCE=pgdg
ARG PG_MAJOR=16

# --- build: a virtual environment with jobvisor installed (not editable) -------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/jobvisor/venv
ENV PATH=/opt/jobvisor/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone (empty package directories and an empty
# README, which pyproject.toml names), so that a code or README change rebuilds only the
# last layer. Extras: pdf (PyMuPDF 1.28.x), ai (dspy 3.4.1).
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt,target=/etc/ssl/certs/pip-ca.crt \
    mkdir supervisor_app workers && touch README.md && pip install ".[pdf,ai]"
COPY README.md ./
COPY supervisor_app/ supervisor_app/
COPY workers/ workers/
# Not editable: the package data (workers/learning/sql/*.sql, supervisor_app/static/) and
# the `jobvisor.plugins` entry points must come along in the installed copy, which the
# checks read from / (not /src, whose source tree would hide a missing file).
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca.crt,target=/etc/ssl/certs/pip-ca.crt \
    pip install --no-deps . \
 && cd / \
 && python -c "import supervisor_app.cli.main, workers.core.runtime" \
 && python -c "from importlib.resources import files; from workers.core import plugins; \
names = sorted(p.name for p in plugins.installed()); print('plug-ins:', names); \
assert {'backup', 'learning'} <= set(names), names; \
sql = sorted(f.name for f in files('workers.learning').joinpath('sql').iterdir() if f.name.endswith('.sql')); \
print('learning sql:', sql); assert sql, 'workers/learning/sql/*.sql missing'"

# --- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG PG_SOURCE
ARG PG_MAJOR
LABEL org.opencontainers.image.title="jobvisor" \
      org.opencontainers.image.description="Background jobs from one PostgreSQL queue under a single supervisor"

# tini: PID 1 that forwards signals to `jobvisor run` and reaps orphans (pg_dump,
# tesseract). postgresql-client-${PG_MAJOR}: pg_dump/pg_restore for the backup type, from
# PGDG (PG_SOURCE=pgdg) or Debian's own archive (PG_SOURCE=debian).
# tesseract-ocr(-deu, -eng): the `tesseract` vision engine (OCR_LANG deu+eng).
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    case "${PG_SOURCE}" in \
      pgdg) apt-get install -y --no-install-recommends ca-certificates postgresql-common; \
            /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y ;; \
      debian) apt-get install -y --no-install-recommends ca-certificates ;; \
      *) echo "PG_SOURCE must be pgdg or debian, not ${PG_SOURCE}" >&2; exit 1 ;; \
    esac; \
    apt-get install -y --no-install-recommends \
        "postgresql-client-${PG_MAJOR}" \
        tini \
        tesseract-ocr tesseract-ocr-deu tesseract-ocr-eng; \
    rm -rf /var/lib/apt/lists/*; \
    "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump" --version; \
    tesseract --list-langs

RUN groupadd --system --gid 10001 jobvisor \
 && useradd --system --uid 10001 --gid jobvisor --home-dir /var/lib/jobvisor \
        --shell /usr/sbin/nologin jobvisor \
 && install -d -o jobvisor -g jobvisor -m 0750 \
        /var/lib/jobvisor /var/lib/jobvisor/home /var/lib/jobvisor/storage \
 && install -d -o jobvisor -g jobvisor -m 0700 /var/lib/jobvisor/backups

COPY --from=build /opt/jobvisor/venv /opt/jobvisor/venv
# The migrations are not Python package data: JOBVISOR_SQL_DIR points `jobvisor run`
# (and `jobvisor migrate`) at them.
COPY sql/ /opt/jobvisor/sql/
COPY config/jobvisor.yaml /etc/jobvisor/jobvisor.yaml

ENV PATH=/opt/jobvisor/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    JOBVISOR_SQL_DIR=/opt/jobvisor/sql \
    JOBVISOR_CONFIG=/etc/jobvisor/jobvisor.yaml \
    # The shipped config listens on loopback only; in the container, on every address.
    JOBVISOR_HTTP_HOST=0.0.0.0 \
    JOBVISOR_HOME=/var/lib/jobvisor/home \
    STORAGE_DIR=/var/lib/jobvisor/storage \
    BACKUP_DIR=/var/lib/jobvisor/backups

WORKDIR /var/lib/jobvisor
USER 10001:10001
EXPOSE 9464

# 200 while the loop runs, the database answers and no slot is FATAL; else 503 (urlopen
# raises, python exits 1). The port is `supervisor.http.port` of the shipped config.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]

# SIGTERM drains (see the top of this file); SIGHUP re-reads the quotas. tini passes both
# on to jobvisor only: the supervisor signals its children itself.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "jobvisor", "run"]
