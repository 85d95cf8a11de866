# syntax=docker/dockerfile:1
#
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

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# pg_dump must have the major version of the server it dumps (docs/backups.md): the same
# major as the `postgres` image in compose.yml. Debian bookworm itself ships 15, so the
# client comes from the PostgreSQL project's apt repository (PGDG).
ARG PG_MAJOR=16

# --- build: a virtual environment with jobvisor installed (not editable) -------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/jobvisor/venv
ENV PATH=/opt/jobvisor/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone (empty package directories), so that a
# code change rebuilds only the last layer. Extras: pdf (PyMuPDF 1.28.x), ai (dspy 3.4.1).
COPY pyproject.toml README.md ./
RUN mkdir supervisor_app workers && pip install ".[pdf,ai]"
COPY supervisor_app/ supervisor_app/
COPY workers/ workers/
RUN pip install --no-deps . \
 && python -c "import supervisor_app.cli.main, workers.core.runtime"

# --- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG PG_MAJOR
LABEL org.opencontainers.image.title="jobvisor" \
      org.opencontainers.image.description="Background jobs from one PostgreSQL queue under a single supervisor"

# tini: PID 1 that forwards signals to `jobvisor run` and reaps orphans (pg_dump,
# tesseract). postgresql-client-${PG_MAJOR}: pg_dump/pg_restore for the backup type.
# tesseract-ocr(-deu, -eng): the `tesseract` vision engine (OCR_LANG deu+eng).
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates postgresql-common; \
    /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y; \
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
