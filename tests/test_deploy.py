"""The deployment files: compose.yml, Dockerfile, .env.example, monitoring, Kubernetes.

No Docker engine runs here, so what an image or a compose project would do is checked
from the files themselves and, where it matters, by running the same code the same way:
the image's file layout is rebuilt in a temporary directory from the Dockerfile's COPY
and ENV lines and `jobvisor run` started from it; the PostgreSQL init script runs
against the test server with psql, then the migrations as the role it created.

Each format is read by a library made for it, never by a parser of this file's own:
python-dotenv (.env.example), expandvars (compose's ${VAR:-default}/${VAR:?error}, which
the Compose specification defines as shell parameter expansion), the vendored Compose
JSON schema with jsonschema, dockerfile (BuildKit's own Dockerfile parser), docker-py's
.dockerignore matcher (the rules `docker build` applies), durationpy (Go durations, as
compose reads stop_grace_period), promql-parser (the dashboard's PromQL) and
prometheus_client's parser (/metrics).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dockerfile as dockerfile_parser
import durationpy
import expandvars
import jsonschema
import promql_parser
import psycopg
import pytest
import yaml
from docker.utils.build import PatternMatcher, exclude_paths
from dotenv import dotenv_values
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from supervisor_app.config import load_config
from supervisor_app.migrate import discover, plugin_migrations
from tests.helpers import stop, wait_for
from tests.supervisor_harness import base_config, free_port
from workers.backup import (
    BACKUP_TOOL_MISSING,
    BACKUP_VERSION_MISMATCH,
    BackupSettings,
    run_backup,
)
from workers.core import queue as q

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENV_EXAMPLE = REPO / ".env.example"
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
INIT_SCRIPT = DEPLOY / "postgres" / "initdb" / "10-jobvisor-roles.sh"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "jobvisor.json"
SCHEMA = Path(__file__).parent / "data" / "compose-spec" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
SHIPPED_CONFIG = load_config(REPO / "config" / "jobvisor.yaml")

PASSWORDS = ("POSTGRES_PASSWORD", "JOBVISOR_APP_PASSWORD", "JOBVISOR_WORKER_PASSWORD",
             "JOBVISOR_BACKUP_PASSWORD", "GRAFANA_ADMIN_PASSWORD")
ROLE_PASSWORDS = PASSWORDS[1:4]
ROLES = ("jobvisor_app", "jobvisor_worker_login", "jobvisor_backup")
# SIGTERM: in-flight jobs get supervisor.grace; putting the rest back and exiting takes
# a few seconds more. A stop timeout shorter than this kills drains; much longer only
# delays a stuck container.
DRAIN_MARGIN = (10, 60)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _seconds(value: str | int) -> float:
    """A compose duration (Go's: "45s", "1m30s") or a number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    return durationpy.from_str(value).total_seconds()


def _assert_drain_fits(stop_timeout: float, where: str) -> None:
    grace = SHIPPED_CONFIG.supervisor.grace
    low, high = grace + DRAIN_MARGIN[0], grace + DRAIN_MARGIN[1]
    assert low <= stop_timeout <= high, (
        f"{where}: {stop_timeout:g}s to stop, but the drain takes supervisor.grace "
        f"({grace:g}s) plus a margin: keep it within {low:g}..{high:g}s")


# --- .env.example ------------------------------------------------------------------------

# The file's own convention: `# NAME=value` documents a variable that is normally unset.
_DOCUMENTED_UNSET = re.compile(r"^#\s*(?=[A-Z][A-Z0-9_]*=)", re.M)


def env_example() -> tuple[dict[str, str | None], dict[str, str | None]]:
    """(variables .env.example sets, every variable it documents incl. `# NAME=`)."""
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    documented = dotenv_values(stream=io.StringIO(_DOCUMENTED_UNSET.sub("", text)),
                               interpolate=False)
    return values, documented


def test_env_example_commits_no_password_or_token():
    values, documented = env_example()
    secret_like = {n for n in documented if re.search(r"PASSWORD|TOKEN|SECRET", n)}
    assert set(PASSWORDS) <= secret_like
    assert {n: values[n] for n in secret_like if values.get(n)} == {}
    # A DSN example may show its shape, never a real password.
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    dsns = re.findall(r"postgres(?:ql)?://\S+", text)
    assert dsns
    for dsn in dsns:
        password = conninfo_to_dict(dsn).get("password")
        assert password in (None, "<SECRET>"), dsn  # the placeholder the runbook uses


# --- compose.yml ---------------------------------------------------------------------------


def _compose_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    # Compose reads `$$` as a literal `$`; expandvars (a shell's rules) as the PID.
    assert "$$" not in text, f"{path.name}: `$$` needs a compose-aware check here"
    return yaml.safe_load(text)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """A compose file as compose sees it: every string value's ${VAR}, ${VAR:-default},
    ${VAR-default}, ${VAR:?error}, ${VAR:+alt} expanded by expandvars. A required variable
    that is missing raises expandvars.ParameterNullOrNotSet, as compose refuses to start."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    return expandvars.expand(value, environ=env, escape_char="")


class _AskedFor(dict):
    """An environment that has every variable and remembers which ones were looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def get(self, key: str, default: Any = None) -> str:
        self.names.add(key)
        return "x"


def referenced_variables(doc: Any) -> set[str]:
    env = _AskedFor()
    interpolate(doc, env)
    return env.names - {"EXPANDVARS_RECOVER_NULL"}      # expandvars' own switch


def compose_env() -> dict[str, str]:
    """.env.example's values, with the passwords a user has to fill in filled in."""
    values, _ = env_example()
    return {**{k: v or "" for k, v in values.items()},
            **{n: f"test-{n.lower()}" for n in PASSWORDS}}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(_compose_file(COMPOSE), compose_env())


@functools.cache
def _compose_validator() -> jsonschema.protocols.Validator:
    raw = SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SCHEMA_SHA256, \
        "tests/data/compose-spec/compose-spec.json is not the vendored file (README there)"
    schema = json.loads(raw)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _validate_compose(doc: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _compose_validator().iter_errors(doc)]


def test_compose_files_are_valid_against_the_compose_specification_schema(compose):
    assert _validate_compose(_compose_file(COMPOSE)) == []          # as written
    assert _validate_compose(compose) == []                         # as compose sees it
    override = DEPLOY / "compose.nvidia-readings.yml"
    assert _validate_compose(interpolate(_compose_file(override), compose_env())) == []
    assert set(_compose_file(override)["services"]) <= set(compose["services"])


def test_compose_refuses_to_start_until_every_password_is_set():
    values = compose_env()
    doc = _compose_file(COMPOSE)
    missing = set()
    for name in PASSWORDS:
        with pytest.raises(expandvars.ParameterNullOrNotSet) as err:
            interpolate(doc, {**values, name: ""})
        missing.add(err.value.args[0].split(":")[0])
    assert missing == set(PASSWORDS)


def test_compose_commits_no_password_or_superuser_dsn(compose):
    filled_in = {v for k, v in compose_env().items() if k in PASSWORDS}
    raw = _compose_file(COMPOSE)["services"]
    checked = 0
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), "environment as a mapping, so it can be checked"
        for key, value in env.items():
            if raw[name]["environment"][key] is None:        # passed through from .env
                continue
            value = str(value)
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert value in filled_in, f"{name}.{key}: not from a password variable"
                checked += 1
            if "://" in value and "@" in value:
                dsn = conninfo_to_dict(value)
                assert dsn["user"] != "postgres", f"{name}.{key}: a superuser DSN"
                assert dsn.get("password") in filled_in, f"{name}.{key}: {value}"
                checked += 1
    assert checked >= len(PASSWORDS) + 2


def test_every_compose_variable_is_documented_in_env_example():
    _, documented = env_example()
    doc = _compose_file(COMPOSE)
    used = referenced_variables(doc)
    used |= {k for s in doc["services"].values()
             for k, v in (s.get("environment") or {}).items() if v is None}
    assert used - set(documented) == set()


def test_jobvisor_service_waits_for_healthy_postgres_and_keeps_its_data(compose):
    pg = compose["services"]["postgres"]
    jv = compose["services"]["jobvisor"]
    assert pg["image"].split(":")[0] == "postgres"
    assert "pg_isready" in pg["healthcheck"]["test"]
    assert "127.0.0.1" in pg["healthcheck"]["test"], "a socket check is healthy during init"
    assert f"./{INIT_SCRIPT.parent.relative_to(REPO)}:/docker-entrypoint-initdb.d:ro" \
        in pg["volumes"]
    assert jv["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert jv["env_file"] and jv["build"] == "."
    image_env = dockerfile().env("runtime")
    mounts = dict(v.split(":")[1::-1] for v in jv["volumes"])     # target -> source
    assert mounts[image_env["STORAGE_DIR"]] == "storage"
    assert mounts[image_env["BACKUP_DIR"]] == "backups"
    assert {"storage", "backups"} <= set(compose["volumes"])
    assert mounts[str(Path(image_env["JOBVISOR_CONFIG"]).parent)] == "./config"
    assert (REPO / "config" / Path(image_env["JOBVISOR_CONFIG"]).name).is_file()


def test_jobvisor_container_gets_the_app_role_but_never_the_superuser_password(compose):
    jv = compose["services"]["jobvisor"]
    env = jv["environment"]
    assert "POSTGRES_PASSWORD" not in env
    files = [e["path"] if isinstance(e, dict) else e for e in jv["env_file"]]
    assert ".env" not in {Path(f).name for f in files}, "the whole .env: superuser password"
    app = conninfo_to_dict(env["DATABASE_URL"])
    backup = conninfo_to_dict(env["BACKUP_DATABASE_URL"])
    assert (app["user"], app["host"], app["dbname"]) == ("jobvisor_app", "postgres", "jobvisor")
    assert backup["user"] == "jobvisor_backup"
    assert app["password"] == "test-jobvisor_app_password"


def test_jobvisor_stop_grace_covers_the_drain_and_stop_signal_is_sigterm(compose):
    jv = compose["services"]["jobvisor"]
    assert jv["stop_signal"] == "SIGTERM"
    _assert_drain_fits(_seconds(jv["stop_grace_period"]), "compose.yml jobvisor")
    port = SHIPPED_CONFIG.supervisor.http.port
    assert any(p.endswith(f":{port}") for p in jv["ports"])


def test_ollama_profiles_reserve_an_nvidia_gpu_or_map_the_amd_devices(compose):
    services = compose["services"]
    cuda, rocm = services["ollama"], services["ollama-rocm"]
    assert cuda["profiles"] == ["cuda"] and rocm["profiles"] == ["rocm"]
    devices = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert rocm["image"] == "ollama/ollama:rocm"
    assert set(rocm["devices"]) == {"/dev/kfd", "/dev/dri"}
    assert "video" in rocm["group_add"] and len(rocm["group_add"]) == 2
    assert "ollama" in rocm["networks"]["default"]["aliases"]
    tuning = {"OLLAMA_NUM_PARALLEL", "OLLAMA_MAX_LOADED_MODELS", "OLLAMA_KEEP_ALIVE",
              "OLLAMA_FLASH_ATTENTION", "OLLAMA_KV_CACHE_TYPE"}
    assert tuning <= set(cuda["environment"]) and tuning <= set(rocm["environment"])
    assert {"HIP_VISIBLE_DEVICES", "HSA_OVERRIDE_GFX_VERSION"} <= set(rocm["environment"])
    # Each tuning value comes from .env, with a default compose falls back to.
    raw = _compose_file(COMPOSE)["services"]["ollama"]["environment"]
    for name in tuning:
        assert referenced_variables(raw[name]) == {name}, name
        assert interpolate(raw[name], {}), f"{name}: no default"
    for service in (cuda, rocm):
        assert service["healthcheck"]["test"] == ["CMD", "ollama", "list"]
    base_url = compose["services"]["jobvisor"]["environment"]["OLLAMA_BASE_URL"]
    assert base_url == "http://ollama:11434"


def test_monitoring_profile_scrapes_jobvisor_and_provisions_the_dashboard(compose):
    services = compose["services"]
    prom, graf = services["prometheus"], services["grafana"]
    assert prom["profiles"] == graf["profiles"] == ["monitoring"]
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    (config_file,) = [c.split("=", 1)[1] for c in prom["command"]
                      if c.startswith("--config.file=")]
    config = _yaml(REPO / prom_mounts[config_file])
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    port = SHIPPED_CONFIG.supervisor.http.port
    assert targets == [f"jobvisor:{port}"]

    graf_mounts = {v.split(":")[1]: v.split(":")[0] for v in graf["volumes"]}
    provisioning = REPO / graf_mounts["/etc/grafana/provisioning"]
    (source,) = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    (provider,) = _yaml(provisioning / "dashboards" / "jobvisor.yml")["providers"]
    dashboards = REPO / graf_mounts[provider["options"]["path"]]
    assert DASHBOARD.parent == dashboards.resolve()
    uids = {t["datasource"]["uid"] for p in _panels() for t in p["targets"]}
    assert uids == {source["uid"]}


def _compose_cli() -> list[str] | None:
    """Compose v2: the docker CLI plugin, else a standalone `docker-compose` v2."""
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        version = subprocess.run([*argv, "version", "--short"], capture_output=True,
                                 text=True)
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2."):
            return argv
    return None


@pytest.mark.skipif(_compose_cli() is None, reason="Docker Compose v2 is not installed here")
def test_docker_compose_accepts_the_file_with_every_profile(tmp_path):
    def config(env: dict[str, str], profiles: str) -> subprocess.CompletedProcess[str]:
        env_file = tmp_path / ".env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        return subprocess.run(
            [*_compose_cli(), "--env-file", str(env_file), "-f", str(COMPOSE), "config",
             "--quiet"], cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "COMPOSE_PROFILES": profiles})

    for profiles in ("", "cuda,monitoring", "rocm"):
        result = config(compose_env(), profiles)
        assert result.returncode == 0, result.stderr
    for name in PASSWORDS:
        result = config({**compose_env(), name: ""}, "")
        assert result.returncode != 0 and name in result.stderr, (name, result.stderr)


# --- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Dockerfile:
    """The Dockerfile as BuildKit's parser reads it, by stage. Global ARG defaults are
    expanded (expandvars) where the build would expand them: FROM, and RUN's shell."""

    args: dict[str, str]
    stages: dict[str, list[dockerfile_parser.Command]]
    bases: dict[str, str]

    def stage(self, name: str, cmd: str | None = None) -> list[dockerfile_parser.Command]:
        return [c for c in self.stages[name] if cmd is None or c.cmd == cmd]

    def one(self, stage: str, cmd: str) -> dockerfile_parser.Command:
        (command,) = self.stage(stage, cmd)
        return command

    def expand(self, text: str) -> str:
        return expandvars.expand(text, environ=self.args, escape_char="")

    def env(self, stage: str) -> dict[str, str]:
        return {k: v for c in self.stage(stage, "ENV")
                for k, v in zip(c.value[::2], c.value[1::2], strict=True)}

    def runs(self, stage: str) -> str:
        return " ".join(self.expand(" ".join(c.value)) for c in self.stage(stage, "RUN"))

    def copies(self, stage: str) -> list[tuple[list[str], str, dict[str, str]]]:
        """(sources, destination, flags) of each COPY/ADD in a stage."""
        return [([self.expand(v) for v in c.value[:-1]], self.expand(c.value[-1]),
                 dict(f.removeprefix("--").partition("=")[::2] for f in c.flags))
                for c in self.stages[stage] if c.cmd in ("COPY", "ADD")]


def dockerfile() -> Dockerfile:
    df = Dockerfile({}, {}, {})
    stage = None
    for command in dockerfile_parser.parse_file(str(DOCKERFILE)):
        command = command._replace(cmd=command.cmd.upper())
        if command.cmd == "FROM":
            base, *alias = command.value
            stage = alias[1] if alias and alias[0].upper() == "AS" else str(len(df.stages))
            df.stages[stage], df.bases[stage] = [], df.expand(base)
        elif stage is None and command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            df.args[name] = default
        if stage is not None:
            df.stages[stage].append(command)
    return df


def _dockerignore() -> list[str]:
    """.dockerignore's patterns, read as the docker CLI reads the file: one a line, blank
    lines and `#` comments left out."""
    lines = (line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def build_context() -> set[str]:
    """Every path `docker build .` sends from this checkout (docker-py's walk, with the
    Dockerfile and .dockerignore that the builder always gets)."""
    return {p.replace(os.sep, "/") for p in exclude_paths(str(REPO), _dockerignore())}


def _files(path: Path) -> Iterator[str]:
    if path.is_file():
        yield path.relative_to(REPO).as_posix()
        return
    for p in sorted(path.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
            yield p.relative_to(REPO).as_posix()


def test_every_file_the_dockerfile_copies_exists_and_reaches_the_build_context():
    df = dockerfile()
    sources = [s for stage in df.stages for srcs, _, flags in df.copies(stage)
               if "from" not in flags for s in srcs]
    assert sources, "the Dockerfile copies nothing?"
    context = build_context()
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: no such file in the repository"
        files = list(_files(path))
        assert files, f"COPY {src}: empty"
        left_out = [f for f in files if f not in context]
        assert left_out == [], f"COPY {src}: .dockerignore leaves out {left_out[:5]}"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context():
    ignored = PatternMatcher(_dockerignore()).matches
    for path in (".env", ".git/config", ".jobvisor/backups/x/dump.pgdump", ".venv/bin/python",
                 "supervisor_app/__pycache__/x.cpython-311.pyc", "workers/x.pyc",
                 "tests/test_deploy.py", "deploy/k8s/deployment.yaml", "compose.yml"):
        assert ignored(path), path
    sent = {p.split("/")[0] for p in build_context()}
    assert {"supervisor_app", "workers", "sql"} <= sent
    assert not sent & {".env", ".git", ".jobvisor", ".venv", "tests", "deploy"}


def test_image_is_multi_stage_slim_non_root_with_tini_and_jobvisor_run():
    df = dockerfile()
    assert list(df.stages) == ["build", "runtime"]
    assert all(re.fullmatch(r"python:3\.11-slim(-\w+)?", b) for b in df.bases.values()), \
        df.bases
    (user,) = df.one("runtime", "USER").value
    assert user.split(":")[0] not in ("root", "0")
    entrypoint = df.one("runtime", "ENTRYPOINT")
    assert entrypoint.json and list(entrypoint.value) == ["/usr/bin/tini", "--", "jobvisor",
                                                          "run"]
    assert df.one("runtime", "STOPSIGNAL").value == ("SIGTERM",)
    health = " ".join(df.one("runtime", "HEALTHCHECK").value)
    port = SHIPPED_CONFIG.supervisor.http.port
    assert f"http://127.0.0.1:{port}/healthz" in health
    installs = df.runs("runtime")
    for package in ("tini", "tesseract-ocr", "tesseract-ocr-deu"):
        assert re.search(rf"\s{re.escape(package)}(\s|;|$)", installs), package
    env = df.env("runtime")
    copies = {dest.rstrip("/"): srcs for srcs, dest, flags in df.copies("runtime")
              if "from" not in flags}
    assert copies[env["JOBVISOR_SQL_DIR"]] == ["sql/"]
    assert copies[env["JOBVISOR_CONFIG"]] == ["config/jobvisor.yaml"]
    assert env["JOBVISOR_CONFIG"] == "/etc/jobvisor/jobvisor.yaml"


def test_pg_dump_in_the_image_has_the_major_version_of_the_compose_postgres(compose):
    (client,) = re.findall(r"postgresql-client-(\d+)", dockerfile().runs("runtime"))
    server = re.match(r"postgres:(\d+)", compose["services"]["postgres"]["image"])
    assert server and client == server[1]


def test_image_uid_matches_the_kubernetes_security_context():
    (user,) = dockerfile().one("runtime", "USER").value
    for doc in _k8s(kind="Deployment"):
        ctx = doc["spec"]["template"]["spec"]["securityContext"]
        assert f"{ctx['runAsUser']}:{ctx['runAsGroup']}" == user


# --- the image's layout, rebuilt in a directory ---------------------------------------------


@dataclass
class ImageLayout:
    """The image's files under `root`; its ENV with absolute paths moved under `root`."""
    root: Path
    env: dict[str, str]
    cwd: Path
    argv: list[str]

    def container_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def image_layout(tmp: Path, base_env: dict[str, str]) -> ImageLayout:
    df = dockerfile()
    root = tmp / "image"
    site = root / "opt" / "jobvisor" / "site-packages"   # stands in for the venv
    site.mkdir(parents=True)
    for srcs, _, _ in df.copies("build"):
        for src in srcs:
            if (REPO / src / "__init__.py").is_file():     # the packages pip installs
                shutil.copytree(REPO / src, site / Path(src).name,
                                ignore=shutil.ignore_patterns("__pycache__"))
    for srcs, dest, flags in df.copies("runtime"):
        if "from" in flags:
            continue
        for src in srcs:
            target = root / dest.lstrip("/")
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target)
            else:
                target = target / Path(src).name if dest.endswith("/") else target
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / src, target)
    env = {k: (str(root / v.lstrip("/")) if v.startswith("/") else v)
           for k, v in df.env("runtime").items() if k != "PATH"}
    for key in ("JOBVISOR_HOME", "STORAGE_DIR", "BACKUP_DIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    (workdir,) = df.one("runtime", "WORKDIR").value
    cwd = root / workdir.lstrip("/")
    cwd.mkdir(parents=True, exist_ok=True)
    # ENTRYPOINT `tini -- jobvisor run`: the console script from pyproject.toml.
    entry = list(df.one("runtime", "ENTRYPOINT").value)
    program, *args = entry[entry.index("--") + 1:]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts[program].split(":")
    argv = [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())",
            *args]
    clean = {k: v for k, v in base_env.items()
             if k not in ("PYTHONPATH", "LEARNING_DATABASE_URL", "DATABASE_URL")}
    return ImageLayout(root, {**clean, **env, "PYTHONPATH": str(site)}, cwd, argv)


def _run_in_image(layout: ImageLayout, *args: str, env: dict[str, str],
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = layout.argv[:3] + list(args)
    return subprocess.run(argv, cwd=layout.cwd, env={**layout.env, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_image_layout_imports_jobvisor_from_the_installed_copy(tmp_path):
    layout = image_layout(tmp_path, dict(os.environ))
    out = subprocess.run(
        [sys.executable, "-c", "import supervisor_app, workers, supervisor_app.migrate as m;"
         "print(supervisor_app.__file__); print(workers.__file__); print(m.sql_dir())"],
        cwd=layout.cwd, env=layout.env, capture_output=True, text=True, check=True)
    pkg, wrk, sql = out.stdout.split()
    assert Path(pkg).is_relative_to(layout.root) and Path(wrk).is_relative_to(layout.root)
    assert Path(sql) == layout.container_path("/opt/jobvisor/sql")
    assert [m.name for m in discover(Path(sql))] == [m.name for m in discover()]


# --- environment variables -------------------------------------------------------------------

ENV_MAPPINGS = {"env", "environ"}          # local names bound to os.environ (or a copy)
NOT_OURS = {"PATH",                         # read for locating binaries, set by the OS
            # WSGI request keys (supervisor_app/http.py reads the request's environ)
            "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "REQUEST_METHOD"}
SCAN = ("supervisor_app", "workers")
# Module constants named like these list variable names (DSN_VARIABLES, ENV_CONFIG, ...).
NAMING_CONSTANT = re.compile(r"^ENV_|_ENV$|_VARIABLES$")
ANY_PART = "[A-Z0-9_]+"                     # an f-string hole in a variable's name


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    parents: dict[ast.AST, ast.AST]
    constants: dict[str, ast.expr]          # module-level NAME = value
    imports: dict[str, tuple[str, str]]     # local name -> (module, attribute)


def _modules() -> dict[str, Module]:
    out = {}
    for package in SCAN:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(
                ".__init__")
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
            constants = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign)
                         for t in n.targets if isinstance(t, ast.Name)}
            constants |= {n.target.id: n.value for n in tree.body
                          if isinstance(n, ast.AnnAssign) and n.value is not None
                          and isinstance(n.target, ast.Name)}
            imports = {a.asname or a.name: (n.module, a.name) for n in ast.walk(tree)
                       if isinstance(n, ast.ImportFrom) and n.module for a in n.names}
            out[name] = Module(name, path, tree, parents, constants, imports)
    return out


def _env_keys(mod: Module) -> Iterator[ast.expr]:
    """The key of every read of the environment in a module."""
    def environ(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ"
                and isinstance(node.value, ast.Name) and node.value.id == "os") or (
            isinstance(node, ast.Name) and node.id in ENV_MAPPINGS)

    for n in ast.walk(mod.tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.args:
            if (n.func.attr == "getenv" and isinstance(n.func.value, ast.Name)
                    and n.func.value.id == "os") or (n.func.attr == "get"
                                                      and environ(n.func.value)):
                yield n.args[0]
        elif isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Load) and environ(n.value):
            yield n.slice
        elif (isinstance(n, ast.Compare) and len(n.ops) == 1
              and isinstance(n.ops[0], ast.In) and environ(n.comparators[0])):
            yield n.left


class EnvScan:
    """Regexes of the variable names the code reads: a read's key is followed through
    literals, f-strings (a hole matches any name part), module constants (imported too),
    loop and comprehension variables, and a helper's parameter to its callers' arguments.
    Anything else is `unresolved`, so a read the scan cannot see fails the test."""

    def __init__(self) -> None:
        self.modules = _modules()
        self.unresolved: list[str] = []
        self._following: set[tuple[str, str]] = set()

    def names(self) -> set[str]:
        found: set[str] = set()
        for mod in self.modules.values():
            for key in _env_keys(mod):
                found |= self.values(key, mod)
            for name, value in mod.constants.items():
                if NAMING_CONSTANT.search(name):
                    found |= self.values(value, mod)
        return found

    def values(self, node: ast.expr, mod: Module) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {re.escape(node.value)}
        if isinstance(node, ast.JoinedStr):
            return {"".join(re.escape(str(v.value)) if isinstance(v, ast.Constant) else ANY_PART
                            for v in node.values)}
        if isinstance(node, ast.Attribute) and node.attr == "health_token_env":
            return {re.escape(SHIPPED_CONFIG.supervisor.health_token_env)}
        if isinstance(node, ast.Name):
            return self._name(node, mod)
        if isinstance(node, ast.Subscript):                    # ROLE_VARIABLES[role]
            return self.values(node.value, mod)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and not node.args:                              # ROLE_VARIABLES.values()
            return self.values(node.func.value, mod)
        if isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict):
            items = node.values if isinstance(node, ast.Dict) else node.elts
            return set().union(*(self.values(e, mod) for e in items))
        return self._unresolved(node, mod)

    def _name(self, node: ast.Name, mod: Module) -> set[str]:
        scope = mod.parents.get(node)
        while scope is not None:
            if isinstance(scope, ast.For) and _binds(scope.target, node.id):
                return self.values(scope.iter, mod)
            for gen in getattr(scope, "generators", ()):
                if _binds(gen.target, node.id):
                    return self.values(gen.iter, mod)
            if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
                args = scope.args
                if node.id in [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]:
                    return self._callers(scope, node.id, mod)
            scope = mod.parents.get(scope)
        if node.id in mod.constants:
            return self.values(mod.constants[node.id], mod)
        source, attr = mod.imports.get(node.id, ("", ""))
        if source in self.modules and attr in self.modules[source].constants:
            return self.values(self.modules[source].constants[attr], self.modules[source])
        return self._unresolved(node, mod)

    def _callers(self, func: ast.FunctionDef | ast.AsyncFunctionDef, param: str,
                 mod: Module) -> set[str]:
        """What every call of `func` (by its name) passes as `param`."""
        if (func.name, param) in self._following:
            return set()
        self._following.add((func.name, param))
        positional = [a.arg for a in func.args.posonlyargs + func.args.args]
        skip = int(bool(positional) and positional[0] in ("self", "cls"))
        index = positional.index(param) - skip if param in positional else None
        defaults = dict(zip(positional[len(positional) - len(func.args.defaults):],
                            func.args.defaults, strict=True))
        found: set[str] = set()
        calls = 0
        for caller in self.modules.values():
            for call in ast.walk(caller.tree):
                if not (isinstance(call, ast.Call) and func.name in (
                        getattr(call.func, "id", None), getattr(call.func, "attr", None))):
                    continue
                calls += 1
                arg = next((k.value for k in call.keywords if k.arg == param), None)
                if arg is None and index is not None and index < len(call.args):
                    arg = call.args[index]
                arg = defaults.get(param) if arg is None else arg
                if arg is None or isinstance(arg, ast.Starred):
                    found |= self._unresolved(call, caller)
                else:
                    found |= self.values(arg, caller)
        return found if calls else self._unresolved(func, mod)

    def _unresolved(self, node: ast.AST, mod: Module) -> set[str]:
        where = f"{mod.path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        self.unresolved.append(f"{where}: {ast.unparse(node)}")
        return set()


def _binds(target: ast.expr, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target))


def test_every_environment_variable_the_code_reads_is_documented_in_env_example():
    scan = EnvScan()
    found = scan.names()
    assert scan.unresolved == [], "make these reads name their variable (see EnvScan)"
    _, documented = env_example()
    known = set(documented) | NOT_OURS
    # Sanity: the scan sees the reads it must see, through constants and helpers.
    for name in ("LEARNING_DATABASE_URL", "DATABASE_URL", "BACKUP_DATABASE_URL",
                 "JOBVISOR_CONFIG", "JOBVISOR_CAPACITY_OVERRIDES", "AI_VISION_OPTIONS",
                 "AI_CONNECT_TIMEOUT", "AI_VISION_READ_TIMEOUT", "BACKUP_KEEP_LAST",
                 "JOBVISOR_HEALTH_TOKEN"):
        assert any(re.fullmatch(r, name) for r in found), f"the scan misses {name}"
    missing = sorted(r for r in found if not any(re.fullmatch(r, d) for d in known))
    assert missing == [], f"read by the code, missing from .env.example: {missing}"


# --- Grafana dashboard against a real /metrics -------------------------------------------------

TARGET_LABELS = {"instance", "job"}        # added by Prometheus, not by jobvisor
# Grafana's own variables, as it fills them in before it queries Prometheus.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


def _panels() -> list[dict[str, Any]]:
    out = []
    for panel in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]:
        out.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(PromQL, legendFormat) of every panel target and template variable, as Grafana
    sends them: its $name / ${name} variables (string.Template's syntax) replaced, a
    template variable by its "All" value."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = dict(GRAFANA_VARIABLES)
    queries = []
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query or "")
        assert m, f"template variable {var['name']}: unexpected query {query!r}"
        queries.append((f"group by ({m[2]}) ({m[1]})", ""))
        variables[var["name"]] = var.get("allValue") or ".*"
    targets = [(t["expr"], t.get("legendFormat", "")) for p in _panels() for t in p["targets"]]
    return [(string.Template(e).substitute(variables), legend) for e, legend in targets] \
        + queries


def promql_metrics_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and label names a PromQL query uses, from promql-parser's tree."""
    metrics: set[str] = set()
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [*node.matchers.matchers, *(m for group in node.matchers.or_matchers
                                                   for m in group)]
            metrics.add(node.name or next(m.value for m in matchers if m.name == "__name__"))
            labels.update(m.name for m in matchers if m.name != "__name__")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier:
            labels.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier:
            if node.modifier.matching:
                labels.update(node.modifier.matching.labels)
            labels.update(node.modifier.group_labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return metrics, labels


@dataclass
class Scrape:
    samples: dict[str, set[str]]               # sample name -> label names seen
    families: dict[str, str]                   # family name -> type

    def exposes(self, name: str) -> bool:
        if name in self.samples or name in self.families:
            return True
        for suffix, kinds in (("_total", ("counter",)),
                              ("_bucket", ("histogram",)), ("_sum", ("histogram", "summary")),
                              ("_count", ("histogram", "summary"))):
            base = name.removesuffix(suffix)
            if name.endswith(suffix) and self.families.get(base) in kinds:
                return True
        return False

    def labels(self, name: str) -> set[str] | None:
        """Label names of a metric's samples; None when it has none to look at."""
        seen = [labels for sample, labels in self.samples.items()
                if sample == name or sample.removesuffix("_bucket") == name.removesuffix(
                    "_bucket")]
        return set().union(*seen) if seen else None


def _get(port: int, path: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return None


def test_dashboard_queries_only_metrics_and_labels_that_jobvisor_run_exposes(
        db, worker_env, tmp_path):
    """`jobvisor run` started the way the image starts it (ENTRYPOINT, ENV, file layout),
    then every metric and label the dashboard asks for looked up in its /metrics."""
    layout = image_layout(tmp_path, worker_env)
    port = free_port()
    small = {"memory_per_job": "1MiB", "processes": {"min": 1, "max": 1}}
    cfg = base_config(port, {"noop": small, "fail": {
        **small, "retry": {"max_attempts": 2, "backoff": "0.1s"}}})
    config_path = layout.container_path(dockerfile().env("runtime")["JOBVISOR_CONFIG"])
    config_path.write_text(yaml.safe_dump(cfg))              # as compose mounts ./config
    overrides = tmp_path / "capacity.yaml"
    overrides.write_text("gpu_free: [6GiB]\n")               # so GPU series carry samples
    env = {**layout.env, "DATABASE_URL": worker_env["DATABASE_URL"],
           "JOBVISOR_CAPACITY_OVERRIDES": str(overrides)}
    log = tmp_path / "jobvisor.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(layout.argv, cwd=layout.cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or (_get(port, "/healthz") or (0,))[0] == 200,
                 what="/healthz 200")
        assert proc.poll() is None, log.read_text()
        q.enqueue(db, q.NewJob("noop", {}))
        q.enqueue(db, q.NewJob("fail", {"kind": "permanent"}, max_attempts=2))
        q.enqueue(db, q.NewJob("fail", {"kind": "transient"}, max_attempts=2))

        def scraped() -> Scrape | None:
            status, text = _get(port, "/metrics") or (0, "")
            if status != 200:
                return None
            samples: dict[str, set[str]] = {}
            families = {}
            for fam in text_string_to_metric_families(text):
                families[fam.name] = fam.type
                for s in fam.samples:
                    samples.setdefault(s.name, set()).update(s.labels)
            ready = {"jobvisor_jobs_total", "ai_worker_failed_total", "ai_worker_retry_total",
                     "jobvisor_gpu_memory_free_bytes", "jobvisor_queue_depth",
                     "jobvisor_queue_lag_seconds", "jobvisor_worker_resident_memory_bytes",
                     "jobvisor_capacity_slots"} <= set(samples)
            return Scrape(samples, families) if ready else None

        scrape = wait_for(scraped, what="job outcomes in /metrics")
    finally:
        assert stop(proc) == 0, log.read_text()
    problems = []
    queried: set[str] = set()
    for expr, legend in dashboard_queries():
        metrics, labels = promql_metrics_and_labels(expr)
        assert metrics, f"no metric in {expr!r}"
        queried |= metrics
        for name in metrics:
            if not scrape.exposes(name):
                problems.append(f"{name} is not exposed ({expr})")
        known = [scrape.labels(n) for n in metrics]
        if all(k is not None for k in known):
            available = set().union(*known) | TARGET_LABELS
            used = labels | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
            if used - available:
                problems.append(f"labels {sorted(used - available)} not on {sorted(metrics)}")
    assert problems == []
    # The panels the runbook promises, by metric.
    assert {"jobvisor_queue_depth", "jobvisor_queue_lag_seconds", "jobvisor_jobs_total",
            "ai_worker_failed_total", "jobvisor_worker_processes",
            "jobvisor_worker_resident_memory_bytes", "jobvisor_gpu_memory_free_bytes",
            "jobvisor_worker_restarts_total"} <= queried


# --- PostgreSQL roles from the init script ---------------------------------------------------


def _psql_bin() -> Path | None:
    try:
        import pgserver
    except ImportError:
        return None
    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin"
    return bundled if (bundled / "psql").exists() else None


def _run_init_script(admin_dsn: str, dbname: str, passwords: dict[str, str]):
    info = conninfo_to_dict(admin_dsn)
    psql = _psql_bin()
    path = f"{psql}:{os.environ['PATH']}" if psql else os.environ["PATH"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {"PATH": path, "POSTGRES_USER": info.get("user") or "postgres",
            "POSTGRES_DB": dbname, "PGHOST": info.get("host") or "localhost",
            "PGPORT": str(info.get("port") or 5432), **passwords}
    if info.get("password"):
        env["PGPASSWORD"] = info["password"]
    return subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("value, problem", [("", "is empty"),
                                            ("pa ss", "may only contain"),
                                            ("p@ss/word", "may only contain")])
def test_init_script_refuses_a_missing_or_url_unsafe_password(value, problem):
    passwords = {n: "ok-1" for n in ROLE_PASSWORDS} | {"JOBVISOR_WORKER_PASSWORD": value}
    result = _run_init_script("postgresql://nobody@127.0.0.1:1/none", "none", passwords)
    assert result.returncode == 1
    assert f"JOBVISOR_WORKER_PASSWORD {problem}" in result.stderr
    assert not value or value not in result.stderr, "the password itself is never echoed"


@dataclass
class Provisioned:
    server: str                                 # superuser DSN of the server
    admin: str                                  # superuser DSN of the database
    dsn: dict[str, str]                         # role -> DSN
    migrate_output: str


@pytest.fixture(scope="module")
def provisioned(pg_server_dsn: str, tmp_path_factory) -> Iterator[Provisioned]:
    """A fresh database set up the compose way: the init script as superuser, then the
    image's `jobvisor migrate` as jobvisor_app."""
    if shutil.which("psql") is None and _psql_bin() is None:
        pytest.skip("no psql binary (pgserver's or the system's)")
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        taken = [r[0] for r in conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(ROLES),))]
        if taken:
            pytest.skip(f"roles {taken} already exist on the test server: not touching them")
        dbname = f"jobvisor_deploy_{uuid.uuid4().hex[:10]}"
        conn.execute(f'CREATE DATABASE "{dbname}"')
    passwords = {n: secrets.token_hex(12) for n in ROLE_PASSWORDS}
    admin = make_conninfo(pg_server_dsn, dbname=dbname)
    try:
        result = _run_init_script(pg_server_dsn, dbname, passwords)
        assert result.returncode == 0, result.stderr
        again = _run_init_script(pg_server_dsn, dbname, passwords)   # idempotent
        assert again.returncode == 0, again.stderr
        dsn = {role: make_conninfo(pg_server_dsn, dbname=dbname, user=role, password=pw)
               for role, pw in zip(ROLES, passwords.values(), strict=True)}
        layout = image_layout(tmp_path_factory.mktemp("image"), dict(os.environ))
        migrated = _run_in_image(layout, "migrate", env={"DATABASE_URL": dsn["jobvisor_app"]})
        assert migrated.returncode == 0, migrated.stderr
        yield Provisioned(pg_server_dsn, admin, dsn, migrated.stdout)
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            for role in ROLES:
                conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_app_role_runs_every_migration_from_the_image_layout(provisioned):
    names = [f"{m.version:03d}_{m.name}" for m in discover()]
    names += [f"{plugin.name}/{m.version:03d}_{m.name}" for plugin, found in plugin_migrations()
              for m in found]
    assert provisioned.migrate_output.strip() == "applied: " + ", ".join(names)
    with psycopg.connect(provisioned.admin) as conn:
        owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                             "WHERE datname = current_database()").fetchone()[0]
        jobs_owner = conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = "
                                  "'jobvisor' AND tablename = 'jobs'").fetchone()[0]
    assert owner == jobs_owner == "jobvisor_app"


def test_worker_login_passes_the_health_probe_and_may_lease_but_not_alter_or_delete(
        provisioned):
    with psycopg.connect(provisioned.dsn["jobvisor_worker_login"], autocommit=True) as conn:
        checks = conn.execute("SELECT check_name, ok FROM learning_worker_health_probe()")
        assert all(ok for _, ok in checks.fetchall())
        job_id = q.enqueue(conn, q.NewJob("noop", {}))
        (leased,) = q.lease(conn, "noop", 1, worker_id="deploy-test", lease_seconds=60)
        assert leased.id == job_id
        for statement in ("CREATE TABLE jobvisor.x (id int)", "DELETE FROM jobvisor.jobs",
                          "CREATE SCHEMA y", "DROP TABLE jobvisor.supervisors"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_backup_role_reads_every_row_and_writes_nothing(provisioned):
    with psycopg.connect(provisioned.admin, autocommit=True) as conn:   # superuser: no RLS
        for owner in ("alice", "bob"):
            conn.execute("INSERT INTO learning_submissions (owner_sub, source_key, mime_type)"
                         " VALUES (%s, 'k', 'application/pdf')", (owner,))
    with psycopg.connect(provisioned.dsn["jobvisor_backup"], autocommit=True) as conn:
        owners = conn.execute("SELECT DISTINCT owner_sub FROM learning_submissions").fetchall()
        assert sorted(owners) == [("alice",), ("bob",)]
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        with pytest.raises((psycopg.errors.ReadOnlySqlTransaction,
                            psycopg.errors.InsufficientPrivilege)):
            conn.execute("INSERT INTO jobvisor.jobs (job_type) VALUES ('noop')")
    with psycopg.connect(provisioned.dsn["jobvisor_worker_login"], autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM learning_submissions").fetchone() == (0,)


def test_keda_query_counts_waiting_and_running_jobs_of_the_scaled_pods_types(
        provisioned, tmp_path):
    """Run as KEDA runs it: the jobs of the types the scaled Deployment serves that wait
    or run count; delayed, finished and other types' jobs do not."""
    (scaled,) = _k8s(kind="ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert trigger["metadata"]["userName"] == "jobvisor_worker_login"
    (dep,) = [d for d in _k8s(kind="Deployment")
              if d["metadata"]["name"] == scaled["spec"]["scaleTargetRef"]["name"]]
    served = _served_types(dep)
    _, cfg = _k8s_config(tmp_path)
    others = sorted(set(cfg.types) - set(served)) + ["noop"]
    assert served and others
    with psycopg.connect(provisioned.admin, autocommit=True) as conn:
        conn.execute("DELETE FROM jobvisor.jobs")
        for job_type in served:
            queued, to_lease, done = q.enqueue_many(
                conn, [q.NewJob(job_type, {"n": n}) for n in range(3)])
            q.enqueue(conn, q.NewJob(job_type, {"later": True}, delay=3600))
            conn.execute("UPDATE jobvisor.jobs SET status = 'completed', finished_at = now() "
                         "WHERE id = %s", (done,))
            (leased,) = q.lease(conn, job_type, 1, worker_id="deploy-test", lease_seconds=60)
            assert leased.id in (queued, to_lease)
        q.enqueue_many(conn, [q.NewJob(t, {}) for t in others])
    with psycopg.connect(provisioned.dsn["jobvisor_worker_login"]) as conn:
        (depth,) = conn.execute(trigger["metadata"]["query"]).fetchone()
    assert depth == 2 * len(served)     # per served type: one queued, one leased


_COUNTS = """SELECT (SELECT count(*) FROM jobvisor.jobs),
                    (SELECT count(*) FROM public.learning_submissions),
                    (SELECT max(version) FROM jobvisor.schema_migrations)"""


def test_backup_as_the_backup_role_restores_as_the_app_role_like_the_runbook_says(
        provisioned, tmp_path):
    with psycopg.connect(provisioned.admin, autocommit=True) as conn:
        conn.execute("INSERT INTO learning_submissions (owner_sub, source_key, mime_type)"
                     " VALUES ('carol', 'k', 'image/png')")
        q.enqueue(conn, q.NewJob("noop", {"restore": True}))
        before = conn.execute(_COUNTS).fetchone()
    settings = BackupSettings.from_env({
        "BACKUP_DATABASE_URL": provisioned.dsn["jobvisor_backup"], "PATH": os.environ["PATH"],
        "BACKUP_DIR": str(tmp_path / "backups")})
    manifest = run_backup(settings)
    if manifest.error_code in (BACKUP_VERSION_MISMATCH, BACKUP_TOOL_MISSING):
        pytest.skip(f"no pg_dump for this server here ({manifest.error_message})")
    assert manifest.ok, (manifest.error_code, manifest.error_message)
    dump = tmp_path / "backups" / manifest.run_id / "dump.pgdump"
    pg_restore = Path(manifest.pg_dump_path).with_name("pg_restore")
    restored = f"jobvisor_restored_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(provisioned.server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{restored}" OWNER jobvisor_app')
    try:
        info = conninfo_to_dict(provisioned.server)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env |= {"PGHOST": info.get("host") or "localhost", "PGPORT": str(info.get("port") or 5432),
                "PGUSER": info.get("user") or "postgres"}
        if info.get("password"):
            env["PGPASSWORD"] = info["password"]
        result = subprocess.run(
            [str(pg_restore), f"--dbname={restored}", "--no-owner", "--role=jobvisor_app",
             "--exit-on-error", str(dump)], env=env, capture_output=True, text=True,
            timeout=120)
        assert result.returncode == 0, result.stderr
        with psycopg.connect(make_conninfo(provisioned.server, dbname=restored)) as conn:
            assert conn.execute(_COUNTS).fetchone() == before
            owners = conn.execute(
                "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'jobvisor' "
                "OR tablename = 'learning_submissions'").fetchall()
            assert owners == [("jobvisor_app",)]
            rls = conn.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class "
                               "WHERE oid = 'public.learning_submissions'::regclass")
            assert rls.fetchone() == (True, True)
        worker = make_conninfo(provisioned.dsn["jobvisor_worker_login"], dbname=restored)
        with psycopg.connect(worker) as conn:
            checks = conn.execute("SELECT check_name, ok FROM learning_worker_health_probe()")
            assert all(ok for _, ok in checks.fetchall())
    finally:
        with psycopg.connect(provisioned.server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE)')


# --- Kubernetes --------------------------------------------------------------------------------


def _k8s(kind: str | None = None) -> list[dict[str, Any]]:
    docs = [d for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for d in _yaml_docs(path)]
    return [d for d in docs if kind is None or d["kind"] == kind]


def _served_types(deployment: dict[str, Any]) -> list[str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    return args[args.index("--types") + 1].split(",")


def _k8s_config(tmp_path: Path):
    (cm,) = _k8s(kind="ConfigMap")
    path = tmp_path / "jobvisor.yaml"
    path.write_text(cm["data"]["jobvisor.yaml"])
    return cm, load_config(path)


def test_kustomization_lists_every_manifest_and_no_secret_is_committed():
    kustomization = _yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert _k8s(kind="Secret") == []
    for doc in _k8s():
        assert doc["apiVersion"] and doc["metadata"]["name"]


def test_k8s_config_map_holds_valid_quotas_for_every_type_the_pods_serve(tmp_path):
    cm, cfg = _k8s_config(tmp_path)
    deployments = _k8s(kind="Deployment")
    served: list[str] = []
    for dep in deployments:
        spec = dep["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        types = _served_types(dep)
        assert set(types) <= set(cfg.types), types
        served += types
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        config_dir = str(Path(dockerfile().env("runtime")["JOBVISOR_CONFIG"]).parent)
        assert volumes[mounts[config_dir]]["configMap"]["name"] == cm["metadata"]["name"]
        port = cfg.supervisor.http.port
        assert container["ports"][0]["containerPort"] == port
        assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == \
            str(port)
    assert sorted(served) == sorted(set(served)), "a type served by two deployments"
    assert set(served) == set(cfg.types)


def test_k8s_pods_drain_within_their_termination_grace(tmp_path):
    _, cfg = _k8s_config(tmp_path)
    for dep in _k8s(kind="Deployment"):
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert cfg.supervisor.grace == SHIPPED_CONFIG.supervisor.grace
        _assert_drain_fits(grace, f"deploy/k8s {dep['metadata']['name']}")


def test_k8s_volumes_land_where_the_image_reads_them():
    image_env = dockerfile().env("runtime")
    claims = {d["metadata"]["name"]: d for d in _k8s(kind="PersistentVolumeClaim")}
    wanted = {"jobvisor": ("STORAGE_DIR", "ReadWriteMany"),
              "jobvisor-backup": ("BACKUP_DIR", "ReadWriteOnce")}
    for dep in _k8s(kind="Deployment"):
        spec = dep["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        variable, mode = wanted[dep["metadata"]["name"]]
        claim = volumes[mounts[image_env[variable]]]["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == [mode]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/tmp" in mounts
        assert {e["name"] for e in container["env"]} >= {"DATABASE_URL"}
        for e in container["env"]:
            if re.search(r"PASSWORD|TOKEN|_URL$", e["name"]) and "value" in e:
                assert not e["value"].startswith("postgres"), e


def test_keda_scales_the_pipeline_deployment_and_pdb_guards_it():
    (dep,) = [d for d in _k8s(kind="Deployment") if d["metadata"]["name"] == "jobvisor"]
    (scaled,) = _k8s(kind="ScaledObject")
    (auth,) = _k8s(kind="TriggerAuthentication")
    (pdb,) = _k8s(kind="PodDisruptionBudget")
    assert scaled["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 1        # cron, rescue and pruning live on
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    secret_names = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
                    if "valueFrom" in e}
    assert {r["name"] for r in auth["spec"]["secretTargetRef"]} == secret_names
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]
